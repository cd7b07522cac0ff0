package outputs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/config"
	"github.com/aws/aws-sdk-go-v2/feature/s3/transfermanager"
	"github.com/aws/aws-sdk-go-v2/service/s3"
	"github.com/aws/aws-sdk-go-v2/service/s3/types"
)

// S3Config configures an S3-compatible store.
type S3Config struct {
	// Bucket is the bucket's name. Required.
	Bucket string
	// Prefix is put before every key, with a "/" between: outputs land under
	// PREFIX/<job>/<index>/<file>. Defaults to none.
	Prefix string
	// PartSize is the size of each part of a multipart upload; a file larger than it
	// goes up in parts, Concurrency at a time. At least 5 MiB, S3's smallest part.
	// Defaults to 16 MiB.
	PartSize int64
	// Concurrency is how many parts of one file go up at once. Defaults to 4.
	Concurrency int
	// AWS is the SDK configuration. Defaults to the environment's, as every AWS tool
	// reads it: AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
	// AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL), profiles, web identity tokens and
	// instance roles. With no region, us-east-1.
	AWS *aws.Config
	// PathStyle puts the bucket in the URL's path rather than its host name, as MinIO
	// and most S3-compatible servers want. Defaults to true when an endpoint is set
	// (AWS_ENDPOINT_URL_S3), false for AWS itself.
	PathStyle *bool
}

// minPartSize is S3's smallest part of a multipart upload but the last.
const minPartSize = 5 << 20

// S3 keeps outputs in an S3-compatible bucket.
type S3 struct {
	cfg      S3Config
	client   *s3.Client
	presign  *s3.PresignClient
	transfer *transfermanager.Client
}

// NewS3 returns the store of cfg. It makes no request: a wrong bucket or credentials
// show on the first Put.
func NewS3(ctx context.Context, cfg S3Config) (*S3, error) {
	if cfg.Bucket == "" {
		return nil, errors.New("outputs: S3 needs a bucket: s3://BUCKET/PREFIX")
	}
	cfg.Prefix = strings.Trim(cfg.Prefix, "/")
	if cfg.PartSize == 0 {
		cfg.PartSize = 16 << 20
	}
	if cfg.PartSize < minPartSize {
		return nil, fmt.Errorf("outputs: S3 part size %d bytes is below S3's minimum of 5 MiB", cfg.PartSize)
	}
	if cfg.Concurrency <= 0 {
		cfg.Concurrency = 4
	}
	var awsCfg aws.Config
	if cfg.AWS != nil {
		awsCfg = cfg.AWS.Copy()
	} else {
		loaded, err := config.LoadDefaultConfig(ctx)
		if err != nil {
			return nil, fmt.Errorf("outputs: load AWS configuration: %w", err)
		}
		awsCfg = loaded
	}
	if awsCfg.Region == "" {
		awsCfg.Region = "us-east-1"
	}
	client := s3.NewFromConfig(awsCfg, func(o *s3.Options) {
		custom := o.BaseEndpoint != nil
		o.UsePathStyle = custom
		if cfg.PathStyle != nil {
			o.UsePathStyle = *cfg.PathStyle
		}
		if custom {
			// S3-compatible servers differ in the request checksums they accept;
			// send them only where S3 requires them.
			o.RequestChecksumCalculation = aws.RequestChecksumCalculationWhenRequired
			o.ResponseChecksumValidation = aws.ResponseChecksumValidationWhenRequired
		}
	})
	checksums := client.Options().RequestChecksumCalculation
	transfer := transfermanager.New(client, func(o *transfermanager.Options) {
		o.PartSizeBytes = cfg.PartSize
		o.MultipartUploadThreshold = cfg.PartSize
		o.Concurrency = cfg.Concurrency
		o.RequestChecksumCalculation = checksums
	})
	return &S3{cfg: cfg, client: client, presign: s3.NewPresignClient(client), transfer: transfer}, nil
}

// objectKey is the bucket key of key.
func (s *S3) objectKey(key string) string {
	if s.cfg.Prefix == "" {
		return key
	}
	return s.cfg.Prefix + "/" + key
}

// countingReader counts the bytes read through it.
type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}

// Put uploads r under key: in one request up to PartSize, else in parts.
func (s *S3) Put(ctx context.Context, key, contentType string, size int64, r io.Reader) (Object, error) {
	body := &countingReader{r: r}
	in := &transfermanager.UploadObjectInput{
		Bucket:      aws.String(s.cfg.Bucket),
		Key:         aws.String(s.objectKey(key)),
		Body:        body,
		ContentType: aws.String(contentType),
	}
	if size >= 0 {
		in.ContentLength = aws.Int64(size)
	}
	if _, err := s.transfer.UploadObject(ctx, in); err != nil {
		return Object{}, fmt.Errorf("outputs: put %s in s3://%s: %w", key, s.cfg.Bucket, err)
	}
	return Object{Key: key, ContentType: contentType, Size: body.n}, nil
}

// Open downloads the object under key.
func (s *S3) Open(ctx context.Context, key string) (io.ReadCloser, Object, error) {
	out, err := s.client.GetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(s.cfg.Bucket), Key: aws.String(s.objectKey(key))})
	var noKey *types.NoSuchKey
	if errors.As(err, &noKey) {
		return nil, Object{}, fmt.Errorf("%w: %s", ErrNotFound, key)
	}
	if err != nil {
		return nil, Object{}, fmt.Errorf("outputs: open %s in s3://%s: %w", key, s.cfg.Bucket, err)
	}
	return out.Body, Object{Key: key, ContentType: aws.ToString(out.ContentType), Size: aws.ToInt64(out.ContentLength)}, nil
}

// URL presigns a GET of the object under key, valid for ttl.
func (s *S3) URL(ctx context.Context, key string, ttl time.Duration) (string, error) {
	req, err := s.presign.PresignGetObject(ctx, &s3.GetObjectInput{Bucket: aws.String(s.cfg.Bucket), Key: aws.String(s.objectKey(key))},
		s3.WithPresignExpires(ttl))
	if err != nil {
		return "", fmt.Errorf("outputs: presign %s in s3://%s: %w", key, s.cfg.Bucket, err)
	}
	return req.URL, nil
}

// Delete removes the object under key.
func (s *S3) Delete(ctx context.Context, key string) error {
	_, err := s.client.DeleteObject(ctx, &s3.DeleteObjectInput{Bucket: aws.String(s.cfg.Bucket), Key: aws.String(s.objectKey(key))})
	if err != nil {
		return fmt.Errorf("outputs: delete %s in s3://%s: %w", key, s.cfg.Bucket, err)
	}
	return nil
}

// DeletePrefix removes every object under prefix, a thousand per request.
func (s *S3) DeletePrefix(ctx context.Context, prefix string) error {
	pages := s3.NewListObjectsV2Paginator(s.client, &s3.ListObjectsV2Input{
		Bucket: aws.String(s.cfg.Bucket),
		Prefix: aws.String(s.objectKey(prefix)),
	})
	for pages.HasMorePages() {
		page, err := pages.NextPage(ctx)
		if err != nil {
			return fmt.Errorf("outputs: list %s in s3://%s: %w", prefix, s.cfg.Bucket, err)
		}
		if len(page.Contents) == 0 {
			continue
		}
		ids := make([]types.ObjectIdentifier, len(page.Contents))
		for i, o := range page.Contents {
			ids[i] = types.ObjectIdentifier{Key: o.Key}
		}
		out, err := s.client.DeleteObjects(ctx, &s3.DeleteObjectsInput{
			Bucket: aws.String(s.cfg.Bucket),
			Delete: &types.Delete{Objects: ids, Quiet: aws.Bool(true)},
		})
		if err != nil {
			return fmt.Errorf("outputs: delete %s in s3://%s: %w", prefix, s.cfg.Bucket, err)
		}
		if len(out.Errors) > 0 {
			e := out.Errors[0]
			return fmt.Errorf("outputs: delete %s in s3://%s: %d objects failed, first %s: %s", prefix, s.cfg.Bucket,
				len(out.Errors), aws.ToString(e.Key), aws.ToString(e.Message))
		}
	}
	return nil
}
