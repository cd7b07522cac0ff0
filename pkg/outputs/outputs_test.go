package outputs_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"testing/iotest"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/outputs"
	"github.com/comfyfleet/comfyfleet/pkg/outputs/outputstest"
)

func testContext(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	t.Cleanup(cancel)
	return ctx
}

func read(t *testing.T, s outputs.Store, key string) ([]byte, outputs.Object) {
	t.Helper()
	r, obj, err := s.Open(testContext(t), key)
	if err != nil {
		t.Fatalf("open %s: %v", key, err)
	}
	defer r.Close()
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatalf("read %s: %v", key, err)
	}
	return b, obj
}

// exercise runs what every Store must do.
func exercise(t *testing.T, s outputs.Store) {
	t.Helper()
	ctx := testContext(t)
	image := []byte("\x89PNG\r\n\x1a\n not really an image")
	key := fleet.OutputKey("job1", 0, "fox_00001_.png")
	obj, err := s.Put(ctx, key, "image/png", int64(len(image)), bytes.NewReader(image))
	if err != nil {
		t.Fatal(err)
	}
	if obj != (outputs.Object{Key: key, ContentType: "image/png", Size: int64(len(image))}) {
		t.Errorf("Put = %+v", obj)
	}
	got, obj := read(t, s, key)
	if !bytes.Equal(got, image) || obj.ContentType != "image/png" || obj.Size != int64(len(image)) {
		t.Errorf("Open = %q %+v, want the bytes put as image/png", got, obj)
	}
	// A size not known in advance.
	video := bytes.Repeat([]byte("frame "), 1000)
	if obj, err := s.Put(ctx, fleet.OutputKey("job1", 1, "clip.mp4"), "video/mp4", -1, io.MultiReader(bytes.NewReader(video))); err != nil || obj.Size != int64(len(video)) {
		t.Errorf("Put of unknown size = %+v, %v", obj, err)
	}
	// A size known in advance, the body read a byte at a time.
	mask := fleet.OutputKey("job1", 2, "mask.png")
	if _, err := s.Put(ctx, mask, "image/png", int64(len(image)), iotest.OneByteReader(bytes.NewReader(image))); err != nil {
		t.Fatal(err)
	}
	if got, _ := read(t, s, mask); !bytes.Equal(got, image) {
		t.Errorf("Open of a file read a byte at a time = %q, want %q", got, image)
	}
	other := fleet.OutputKey("job10", 0, "other.png")
	if _, err := s.Put(ctx, other, "image/png", 3, strings.NewReader("abc")); err != nil {
		t.Fatal(err)
	}

	if _, _, err := s.Open(ctx, fleet.OutputKey("job1", 0, "missing.png")); !errors.Is(err, outputs.ErrNotFound) {
		t.Errorf("Open(missing) = %v, want ErrNotFound", err)
	}
	if err := s.Delete(ctx, key); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Open(ctx, key); !errors.Is(err, outputs.ErrNotFound) {
		t.Errorf("Open after Delete = %v, want ErrNotFound", err)
	}
	if err := s.Delete(ctx, key); err != nil {
		t.Errorf("Delete of a deleted file = %v, want nil", err)
	}
	if err := s.DeletePrefix(ctx, "job1/"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := s.Open(ctx, fleet.OutputKey("job1", 1, "clip.mp4")); !errors.Is(err, outputs.ErrNotFound) {
		t.Errorf("Open after DeletePrefix = %v, want ErrNotFound", err)
	}
	if got, _ := read(t, s, other); string(got) != "abc" {
		t.Errorf("DeletePrefix(job1/) took job10's file too")
	}
}

func TestJetStream(t *testing.T) {
	t.Parallel()
	_, _, js := fleettest.Fleet(t, fleet.Settings{})
	s, err := outputs.Open(testContext(t), "", js)
	if err != nil {
		t.Fatal(err)
	}
	exercise(t, s)
	if u, err := s.URL(testContext(t), fleet.OutputKey("job10", 0, "other.png"), time.Hour); u != "" || err != nil {
		t.Errorf("URL = %q, %v; want none: the API serves JetStream outputs", u, err)
	}
}

// TestS3FromTheEnvironment configures the store as an operator would: --outputs and
// the standard AWS variables.
func TestS3FromTheEnvironment(t *testing.T) {
	srv := outputstest.Start(t, "studio")
	srv.Env(t)
	s, err := outputs.Open(testContext(t), "s3://studio/renders/2026", nil)
	if err != nil {
		t.Fatal(err)
	}
	exercise(t, s)

	// The file lands in the bucket under the prefix.
	if _, err := srv.Backend.HeadObject("studio", "renders/2026/job10/0/other.png"); err != nil {
		t.Errorf("no object renders/2026/job10/0/other.png in the bucket: %v", err)
	}
	// Its presigned URL downloads the same bytes without credentials.
	u, err := s.URL(testContext(t), fleet.OutputKey("job10", 0, "other.png"), 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(u, srv.URL+"/studio/renders/2026/job10/0/other.png?") || !strings.Contains(u, "X-Amz-Expires=600") {
		t.Errorf("presigned URL %s: want path-style, under the prefix, for 600 s", u)
	}
	if code, body := httpGet(t, u); code != http.StatusOK || string(body) != "abc" {
		t.Errorf("GET presigned URL: %d %q, want the file", code, body)
	}
	if code, _ := httpGet(t, tamper(t, u)); code != http.StatusForbidden {
		t.Errorf("GET with another object's key and the same signature: %d, want 403", code)
	}
}

func tamper(t *testing.T, raw string) string {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	u.Path = strings.Replace(u.Path, "other.png", "another.png", 1)
	return u.String()
}

func httpGet(t *testing.T, u string) (int, []byte) {
	t.Helper()
	resp, err := http.Get(u)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, b
}

func TestS3MultipartVideoArrivesWhole(t *testing.T) {
	t.Parallel()
	srv := outputstest.Start(t, "studio")
	const partSize = 5 << 20
	s, err := outputs.NewS3(testContext(t), outputs.S3Config{Bucket: "studio", Prefix: "/videos/", PartSize: partSize, Concurrency: 2,
		AWS: srv.AWSConfig(outputstest.SecretKey)})
	if err != nil {
		t.Fatal(err)
	}
	video := make([]byte, 20<<20+12345)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range video {
		video[i] = byte(rng.Uint32())
	}
	key := fleet.OutputKey("job2", 0, "clip_00001.mp4")
	// As the executor streams it from ComfyUI's /view: a reader of unknown length.
	obj, err := s.Put(testContext(t), key, "video/mp4", -1, io.MultiReader(bytes.NewReader(video)))
	if err != nil {
		t.Fatal(err)
	}
	if obj.Size != int64(len(video)) {
		t.Errorf("stored %d bytes, want %d", obj.Size, len(video))
	}
	started := srv.Count(func(r string) bool { return strings.HasPrefix(r, "POST ") && strings.Contains(r, "?uploads") })
	parts := srv.Count(func(r string) bool { return strings.HasPrefix(r, "PUT ") && strings.Contains(r, "partNumber=") })
	if started != 1 || parts != 5 {
		t.Errorf("%d multipart uploads with %d parts, want 1 with 5 parts of at most 5 MiB", started, parts)
	}
	u, err := s.URL(testContext(t), key, time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	code, body := httpGet(t, u)
	if code != http.StatusOK || sha256.Sum256(body) != sha256.Sum256(video) {
		t.Errorf("GET presigned URL: %d, %d bytes; want the %d bytes put", code, len(body), len(video))
	}
	if _, err := srv.Backend.HeadObject("studio", "videos/job2/0/clip_00001.mp4"); err != nil {
		t.Errorf("not under the prefix: %v", err)
	}
}

func TestS3RefusesWrongCredentialsAndBadSpecs(t *testing.T) {
	t.Parallel()
	srv := outputstest.Start(t, "studio")
	s, err := outputs.NewS3(testContext(t), outputs.S3Config{Bucket: "studio", AWS: srv.AWSConfig("not the secret")})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Put(testContext(t), "a/0/x.png", "image/png", 1, strings.NewReader("x")); err == nil {
		t.Errorf("Put with a wrong secret succeeded: the server does not check signatures")
	}
	for _, spec := range []string{"s3://", "s3:///prefix", "file:///tmp", "s3://bucket/p?x=1", "S3",
		"s3://bucket/p?part_size=1MiB", "s3://bucket/p?part_size=big", "s3://bucket/p?part_size=-5MiB",
		"s3://bucket/p?part_size=5MiB&part_size=6MiB", "s3://bucket/p?part_size=9999999999GiB"} {
		if _, err := outputs.Open(testContext(t), spec, nil); err == nil {
			t.Errorf("Open(%q) accepted it", spec)
		}
	}
	if _, err := outputs.NewS3(testContext(t), outputs.S3Config{Bucket: "b", PartSize: 1 << 20, AWS: srv.AWSConfig(outputstest.SecretKey)}); err == nil {
		t.Errorf("NewS3 accepted parts of 1 MiB")
	}
}

func TestParseS3ReadsBucketPrefixAndPartSize(t *testing.T) {
	t.Parallel()
	for spec, want := range map[string]outputs.S3Config{
		"s3://renders":                     {Bucket: "renders"},
		"s3://renders/studio/2026/":        {Bucket: "renders", Prefix: "studio/2026"},
		"s3://renders/v?part_size=5MiB":    {Bucket: "renders", Prefix: "v", PartSize: 5 << 20},
		"s3://renders?part_size=1GiB":      {Bucket: "renders", PartSize: 1 << 30},
		"s3://renders/v?part_size=8388608": {Bucket: "renders", Prefix: "v", PartSize: 8 << 20},
	} {
		if got, err := outputs.ParseS3(spec); err != nil || got.Bucket != want.Bucket || got.Prefix != want.Prefix || got.PartSize != want.PartSize {
			t.Errorf("ParseS3(%q) = %+v, %v; want %+v", spec, got, err, want)
		}
	}
}

// TestJetStreamSmallFilesAreObjectsAsTheStoreWritesThem checks the objects the store
// writes itself, the outputs that fit one chunk, against the object store's own.
func TestJetStreamSmallFilesAreObjectsAsTheStoreWritesThem(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	_, nc, js := fleettest.Fleet(t, fleet.Settings{})
	s, err := outputs.Open(ctx, "", js)
	if err != nil {
		t.Fatal(err)
	}
	// Reads of an object's info, which a new name does not need.
	reads := make(chan *nats.Msg, 16)
	sub, err := nc.ChanSubscribe("$JS.API.DIRECT.GET.OBJ_"+fleet.ObjectOutputs+".>", reads)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	os, err := js.ObjectStore(ctx, fleet.ObjectOutputs)
	if err != nil {
		t.Fatal(err)
	}
	chunks := func() int {
		t.Helper()
		stream, err := js.Stream(ctx, "OBJ_"+fleet.ObjectOutputs)
		if err != nil {
			t.Fatal(err)
		}
		info, err := stream.Info(ctx, jetstream.WithSubjectFilter("$O."+fleet.ObjectOutputs+".C.>"))
		if err != nil {
			t.Fatal(err)
		}
		return len(info.State.Subjects)
	}

	image := bytes.Repeat([]byte("\x89PNG pixels "), 100)
	key := fleet.OutputKey("job1", 0, "fox_00001_.png")
	if _, err := s.Put(ctx, key, "image/png", int64(len(image)), bytes.NewReader(image)); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	if n := len(reads); n != 0 {
		t.Errorf("a new name was written after %d reads of its info, want none", n)
	}
	ref, err := os.PutBytes(ctx, "reference", image)
	if err != nil {
		t.Fatal(err)
	}
	info, err := os.GetInfo(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if info.Size != ref.Size || info.Chunks != 1 || info.Digest != ref.Digest || info.Metadata["content-type"] != "image/png" {
		t.Errorf("info %+v; the object store writes %+v", info, ref)
	}
	// The object store's reader checks the digest at the end.
	if got, err := os.GetBytes(ctx, key); err != nil || !bytes.Equal(got, image) {
		t.Errorf("object store's GetBytes = %d bytes, %v; want the file", len(got), err)
	}
	if n := chunks(); n != 2 {
		t.Errorf("%d chunk subjects, want 2 (the file's and the reference's)", n)
	}

	// Written again: the new content, and the old chunk purged.
	again := []byte("second render")
	if _, err := s.Put(ctx, key, "image/png", int64(len(again)), bytes.NewReader(again)); err != nil {
		t.Fatal(err)
	}
	if got, _ := read(t, s, key); !bytes.Equal(got, again) {
		t.Errorf("after a second Put: %q, want %q", got, again)
	}
	if n := chunks(); n != 2 {
		t.Errorf("%d chunk subjects after the file was written again, want 2", n)
	}

	// A file longer or shorter than it announced is stored as it is.
	for _, announced := range []int64{3, 1000} {
		k := fleet.OutputKey("job1", 1, "mask.png")
		if obj, err := s.Put(ctx, k, "image/png", announced, bytes.NewReader(image[:10])); err != nil || obj.Size != 10 {
			t.Errorf("Put of 10 bytes announced as %d = %+v, %v", announced, obj, err)
		}
		if got, _ := read(t, s, k); !bytes.Equal(got, image[:10]) {
			t.Errorf("10 bytes announced as %d read back as %q", announced, got)
		}
	}

	if err := s.Delete(ctx, key); err != nil {
		t.Fatal(err)
	}
	if err := os.Delete(ctx, "reference"); err != nil {
		t.Fatal(err)
	}
	if err := s.Delete(ctx, fleet.OutputKey("job1", 1, "mask.png")); err != nil {
		t.Fatal(err)
	}
	if n := chunks(); n != 0 {
		t.Errorf("%d chunk subjects after every file was deleted, want 0", n)
	}
}

// TestJetStreamReadsOutlastTheClientsDefaultTimeout reads a file of several chunks
// as a slow client downloads it: the object store's reader would end at the
// JetStream client's default timeout.
func TestJetStreamReadsOutlastTheClientsDefaultTimeout(t *testing.T) {
	t.Parallel()
	ctx := testContext(t)
	_, nc, _ := fleettest.Fleet(t, fleet.Settings{})
	const timeout = 100 * time.Millisecond
	js, err := jetstream.New(nc, jetstream.WithDefaultTimeout(timeout))
	if err != nil {
		t.Fatal(err)
	}
	s, err := outputs.Open(ctx, "", js)
	if err != nil {
		t.Fatal(err)
	}
	video := make([]byte, 3*128*1024+5)
	for i := range video {
		video[i] = byte(i % 251)
	}
	key := fleet.OutputKey("job1", 0, "clip.mp4")
	if _, err := s.Put(ctx, key, "video/mp4", int64(len(video)), bytes.NewReader(video)); err != nil {
		t.Fatal(err)
	}
	r, _, err := s.Open(context.Background(), key)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	head := make([]byte, 1024)
	if _, err := io.ReadFull(r, head); err != nil {
		t.Fatal(err)
	}
	// The client is slow: the read must not depend on the time it takes.
	time.Sleep(3 * timeout)
	rest, err := io.ReadAll(r)
	if err != nil || !bytes.Equal(append(head, rest...), video) {
		t.Errorf("read %d bytes of %d after a pause of %s: %v", len(head)+len(rest), len(video), 3*timeout, err)
	}
}
