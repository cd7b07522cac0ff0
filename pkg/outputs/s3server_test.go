package outputs_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3mem"
)

// The fake server's credentials and region.
const (
	accessKey = "AKIACOMFYFLEETTEST"
	secretKey = "comfyfleet/test/secret/key"
	region    = "eu-central-1"
)

// s3Server is gofakes3 on a loopback socket, behind a check of every request's
// Signature Version 4 (header-signed and presigned) against the test's credentials,
// which gofakes3 does not make itself.
type s3Server struct {
	URL     string
	backend *s3mem.Backend

	mu       sync.Mutex
	requests []string
}

func startS3(t *testing.T, buckets ...string) *s3Server {
	t.Helper()
	s := &s3Server{backend: s3mem.New()}
	for _, b := range buckets {
		if err := s.backend.CreateBucket(b); err != nil {
			t.Fatal(err)
		}
	}
	fake := gofakes3.New(s.backend, gofakes3.WithAutoBucket(false)).Server()
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

// count returns how many requests matched match.
func (s *s3Server) count(match func(string) bool) int {
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

func (s *s3Server) verify(t *testing.T, next http.Handler) http.Handler {
	creds := aws.Credentials{AccessKeyID: accessKey, SecretAccessKey: secretKey}
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
	if len(scope) != 5 || scope[0] != creds.AccessKeyID || scope[2] != region || scope[3] != "s3" {
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
		signed, _, err := signer.PresignHTTP(ctx, creds, again, payload, "s3", region, at)
		if err != nil {
			return err
		}
		su, err := url.Parse(signed)
		if err != nil {
			return err
		}
		got = su.Query().Get("X-Amz-Signature")
	} else {
		if err := signer.SignHTTP(ctx, creds, again, payload, "s3", region, at); err != nil {
			return err
		}
		_, got, _ = strings.Cut(again.Header.Get("Authorization"), "Signature=")
	}
	if got != signature {
		return errors.New("signature does not match")
	}
	return nil
}
