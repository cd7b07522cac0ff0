// Package outputs keeps the files that scenes produce: in the fleet's JetStream object
// store (the default, no other server needed) or in an S3-compatible bucket (AWS S3,
// MinIO, R2, …), behind one Store interface.
package outputs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// Store keeps output files under keys such as fleet.OutputKey(job, index, name).
type Store interface {
	// Put stores the content of r under key. size is its length in bytes, or -1 when
	// unknown. It returns what was stored.
	Put(ctx context.Context, key, contentType string, size int64, r io.Reader) (Object, error)
	// Open returns a reader of the file under key, and what it is; ErrNotFound when
	// there is none. The caller closes the reader.
	Open(ctx context.Context, key string) (io.ReadCloser, Object, error)
	// URL returns a link that downloads the file under key for ttl without
	// credentials (an S3 presigned URL), or "" when only the API can serve it.
	URL(ctx context.Context, key string, ttl time.Duration) (string, error)
	// Delete removes the file under key; a missing file is no error.
	Delete(ctx context.Context, key string) error
	// DeletePrefix removes every file whose key starts with prefix, such as a job's
	// "<job>/".
	DeletePrefix(ctx context.Context, prefix string) error
}

// Object is a stored file.
type Object struct {
	Key         string
	ContentType string
	Size        int64
}

// ErrNotFound is what Open returns for a key that holds no file.
var ErrNotFound = errors.New("outputs: no such file")

// Open returns the store that spec names: "" or "nats" for the fleet's JetStream object
// store (fleet.ObjectOutputs, on js), or "s3://BUCKET/PREFIX[?part_size=SIZE]" for an
// S3-compatible bucket configured by the standard AWS variables (see NewS3 and
// ParseS3).
func Open(ctx context.Context, spec string, js jetstream.JetStream) (Store, error) {
	switch {
	case spec == "" || spec == "nats":
		if js == nil {
			return nil, errors.New("outputs: the JetStream object store needs a JetStream connection")
		}
		return NewJetStream(ctx, js, fleet.ObjectOutputs)
	case strings.HasPrefix(spec, "s3://"):
		cfg, err := ParseS3(spec)
		if err != nil {
			return nil, err
		}
		return NewS3(ctx, cfg)
	}
	return nil, fmt.Errorf("outputs: %q: use nats (the default) or s3://BUCKET/PREFIX", spec)
}

// ParseS3 reads "s3://BUCKET/PREFIX" into an S3Config. The query may set the part
// size of multipart uploads, part_size, in bytes or with a MiB or GiB suffix.
func ParseS3(spec string) (S3Config, error) {
	u, err := url.Parse(spec)
	if err != nil || u.Scheme != "s3" || u.Host == "" || u.User != nil {
		return S3Config{}, fmt.Errorf("outputs: %q: want s3://BUCKET or s3://BUCKET/PREFIX", spec)
	}
	cfg := S3Config{Bucket: u.Host, Prefix: strings.Trim(u.Path, "/")}
	for name, values := range u.Query() {
		if name != "part_size" || len(values) != 1 {
			return S3Config{}, fmt.Errorf("outputs: %q: the only parameter is part_size, once", spec)
		}
		if cfg.PartSize, err = parseSize(values[0]); err != nil {
			return S3Config{}, fmt.Errorf("outputs: %q: part_size: %w", spec, err)
		}
	}
	return cfg, nil
}

// parseSize reads a size in bytes, or in MiB or GiB with that suffix.
func parseSize(s string) (int64, error) {
	digits, unit := s, int64(1)
	if d, ok := strings.CutSuffix(s, "MiB"); ok {
		digits, unit = d, 1<<20
	} else if d, ok := strings.CutSuffix(s, "GiB"); ok {
		digits, unit = d, 1<<30
	}
	n, err := strconv.ParseInt(digits, 10, 64)
	if err != nil || n <= 0 || n > math.MaxInt64/unit {
		return 0, fmt.Errorf("%q is not a size: bytes, or a number with MiB or GiB", s)
	}
	return n * unit, nil
}
