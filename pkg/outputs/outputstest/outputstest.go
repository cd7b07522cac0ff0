// Package outputstest runs a real S3-protocol server on loopback for tests of output
// storage: gofakes3 behind a check of every request's AWS Signature Version 4, with
// the credentials and region that S3Server.Env and S3Server.AWSConfig give clients.
package outputstest

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3mem"
)

// The server's credentials and region.
const (
	AccessKey = "AKIACOMFYFLEETTEST"
	SecretKey = "comfyfleet/test/secret/key"
	Region    = "eu-central-1"
)

// S3Server is gofakes3 on a loopback socket, behind a check of every request's
// Signature Version 4 (header-signed and presigned) against AccessKey and SecretKey,
// which gofakes3 does not make itself. It records every request it gets.
type S3Server struct {
	// URL is the server's base URL, the endpoint clients use (path-style).
	URL string
	// Backend holds the buckets and their objects.
	Backend *s3mem.Backend

	mu       sync.Mutex
	requests []string
}

// Start runs a server with buckets until the test ends.
func Start(t testing.TB, buckets ...string) *S3Server {
	t.Helper()
	s := &S3Server{Backend: s3mem.New()}
	for _, b := range buckets {
		if err := s.Backend.CreateBucket(b); err != nil {
			t.Fatal(err)
		}
	}
	fake := gofakes3.New(s.Backend, gofakes3.WithAutoBucket(false)).Server()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: s.verify(t, fake), ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("s3 server: %v", err)
		}
	}()
	t.Cleanup(func() {
		srv.Close()
		<-done
	})
	s.URL = "http://" + ln.Addr().String()
	return s
}

// Env points the standard AWS variables at the server for the rest of the test, as
// an operator configures comfyfleet's --outputs s3://…, and keeps the machine's own
// AWS configuration files and instance metadata out. Tests that call it cannot run
// in parallel (testing.T.Setenv).
func (s *S3Server) Env(t *testing.T) {
	t.Helper()
	dir := t.TempDir()
	for k, v := range map[string]string{
		"AWS_ENDPOINT_URL_S3": s.URL, "AWS_REGION": Region, "AWS_ACCESS_KEY_ID": AccessKey, "AWS_SECRET_ACCESS_KEY": SecretKey,
		"AWS_CONFIG_FILE": filepath.Join(dir, "config"), "AWS_SHARED_CREDENTIALS_FILE": filepath.Join(dir, "credentials"),
		"AWS_EC2_METADATA_DISABLED": "true", "AWS_ENDPOINT_URL": "", "AWS_PROFILE": "", "AWS_SESSION_TOKEN": "",
	} {
		t.Setenv(k, v)
	}
}

// AWSConfig is an SDK configuration for the server, signing with secret (SecretKey,
// or another one to see requests refused).
func (s *S3Server) AWSConfig(secret string) *aws.Config {
	return &aws.Config{
		Region:       Region,
		BaseEndpoint: aws.String(s.URL),
		Credentials:  credentials.NewStaticCredentialsProvider(AccessKey, secret, ""),
	}
}

// Count returns how many requests matched match; each is "METHOD /path?query".
func (s *S3Server) Count(match func(request string) bool) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, r := range s.requests {
		if match(r) {
			n++
		}
	}
	return n
}

// Requests returns the requests served so far, in order; each is "METHOD /path?query".
func (s *S3Server) Requests() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.requests)
}

// Object returns the content of the object under key in bucket.
func (s *S3Server) Object(bucket, key string) ([]byte, error) {
	obj, err := s.Backend.GetObject(bucket, key, nil)
	if err != nil {
		return nil, err
	}
	defer obj.Contents.Close()
	var b bytes.Buffer
	if _, err := io.Copy(&b, obj.Contents); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// Keys returns the keys of the objects in bucket that start with prefix, sorted.
func (s *S3Server) Keys(bucket, prefix string) ([]string, error) {
	p := gofakes3.NewPrefix(&prefix, nil)
	list, err := s.Backend.ListBucket(bucket, &p, gofakes3.ListBucketPage{})
	if err != nil {
		return nil, err
	}
	keys := make([]string, 0, len(list.Contents))
	for _, c := range list.Contents {
		keys = append(keys, c.Key)
	}
	sort.Strings(keys)
	return keys, nil
}

func (s *S3Server) verify(t testing.TB, next http.Handler) http.Handler {
	creds := aws.Credentials{AccessKeyID: AccessKey, SecretAccessKey: SecretKey}
	signer := v4.NewSigner(func(o *v4.SignerOptions) { o.DisableURIPathEscaping = true })
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.requests = append(s.requests, r.Method+" "+r.URL.RequestURI())
		s.mu.Unlock()
		if err := checkSignature(r.Context(), signer, creds, r); err != nil {
			t.Logf("s3 server: %s %s refused: %v", r.Method, r.URL, err)
			http.Error(w, "<Error><Code>SignatureDoesNotMatch</Code><Message>"+err.Error()+"</Message></Error>", http.StatusForbidden)
			return
		}
		next.ServeHTTP(w, r)
	})
}

// checkSignature signs r again with the server's credentials and compares.
func checkSignature(ctx context.Context, signer *v4.Signer, creds aws.Credentials, r *http.Request) error {
	q := r.URL.Query()
	presigned := q.Get("X-Amz-Signature") != ""
	var credential, amzDate, signedHeaders, signature, payload string
	if presigned {
		credential, amzDate, signedHeaders, signature = q.Get("X-Amz-Credential"), q.Get("X-Amz-Date"), q.Get("X-Amz-SignedHeaders"), q.Get("X-Amz-Signature")
		payload = "UNSIGNED-PAYLOAD"
		q.Del("X-Amz-Signature")
	} else {
		auth, ok := strings.CutPrefix(r.Header.Get("Authorization"), "AWS4-HMAC-SHA256 ")
		if !ok {
			return errors.New("not signed with AWS4-HMAC-SHA256")
		}
		for _, part := range strings.Split(auth, ",") {
			k, v, _ := strings.Cut(strings.TrimSpace(part), "=")
			switch k {
			case "Credential":
				credential = v
			case "SignedHeaders":
				signedHeaders = v
			case "Signature":
				signature = v
			}
		}
		amzDate, payload = r.Header.Get("X-Amz-Date"), r.Header.Get("X-Amz-Content-Sha256")
	}
	scope := strings.Split(credential, "/")
	if len(scope) != 5 || scope[0] != creds.AccessKeyID || scope[2] != Region || scope[3] != "s3" {
		return errors.New("credential scope " + credential)
	}
	at, err := time.Parse("20060102T150405Z", amzDate)
	if err != nil {
		return err
	}
	if presigned {
		expires, err := time.ParseDuration(q.Get("X-Amz-Expires") + "s")
		if err != nil || time.Now().After(at.Add(expires)) {
			return errors.New("presigned URL expired")
		}
	}
	u := url.URL{Scheme: "http", Host: r.Host, Path: r.URL.Path, RawPath: r.URL.RawPath, RawQuery: q.Encode()}
	again, err := http.NewRequestWithContext(ctx, r.Method, u.String(), nil)
	if err != nil {
		return err
	}
	for _, h := range strings.Split(signedHeaders, ";") {
		switch h {
		case "host":
		case "content-length":
			again.ContentLength = r.ContentLength
		default:
			again.Header[http.CanonicalHeaderKey(h)] = r.Header.Values(h)
		}
	}
	var got string
	if presigned {
		signed, _, err := signer.PresignHTTP(ctx, creds, again, payload, "s3", Region, at)
		if err != nil {
			return err
		}
		su, err := url.Parse(signed)
		if err != nil {
			return err
		}
		got = su.Query().Get("X-Amz-Signature")
	} else {
		if err := signer.SignHTTP(ctx, creds, again, payload, "s3", Region, at); err != nil {
			return err
		}
		_, got, _ = strings.Cut(again.Header.Get("Authorization"), "Signature=")
	}
	if got != signature {
		return errors.New("signature does not match")
	}
	return nil
}
