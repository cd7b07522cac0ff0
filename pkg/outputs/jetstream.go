package outputs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// contentTypeKey is the object metadata entry that holds a file's content type.
const contentTypeKey = "content-type"

// chunkSize is the object store's default chunk size.
const chunkSize = 128 * 1024

// JetStream keeps outputs in a JetStream object store.
type JetStream struct {
	os jetstream.ObjectStore
}

// NewJetStream returns the store backed by os.
func NewJetStream(os jetstream.ObjectStore) *JetStream { return &JetStream{os: os} }

// Put stores r under key, with its content type in the object's metadata. A file
// whose size is known and smaller than a chunk is read into a buffer of its size:
// the object store otherwise allocates and clears a whole chunk (128 KiB) for
// every file, however small.
func (s *JetStream) Put(ctx context.Context, key, contentType string, size int64, r io.Reader) (Object, error) {
	meta := jetstream.ObjectMeta{Name: key, Metadata: map[string]string{contentTypeKey: contentType}}
	if size > 0 && size < chunkSize {
		meta.Opts = &jetstream.ObjectMetaOptions{ChunkSize: uint32(size)}
	}
	info, err := s.os.Put(ctx, meta, r)
	if err != nil {
		return Object{}, fmt.Errorf("outputs: put %s: %w", key, err)
	}
	return Object{Key: key, ContentType: contentType, Size: int64(info.Size)}, nil
}

// Open reads the object under key.
func (s *JetStream) Open(ctx context.Context, key string) (io.ReadCloser, Object, error) {
	res, err := s.os.Get(ctx, key)
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		return nil, Object{}, fmt.Errorf("%w: %s", ErrNotFound, key)
	}
	if err != nil {
		return nil, Object{}, fmt.Errorf("outputs: open %s: %w", key, err)
	}
	info, err := res.Info()
	if err != nil {
		res.Close()
		return nil, Object{}, fmt.Errorf("outputs: open %s: %w", key, err)
	}
	return res, Object{Key: key, ContentType: info.Metadata[contentTypeKey], Size: int64(info.Size)}, nil
}

// URL is always "": the API serves JetStream objects itself.
func (s *JetStream) URL(context.Context, string, time.Duration) (string, error) { return "", nil }

// Delete removes the object under key.
func (s *JetStream) Delete(ctx context.Context, key string) error {
	if err := s.os.Delete(ctx, key); err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
		return fmt.Errorf("outputs: delete %s: %w", key, err)
	}
	return nil
}

// DeletePrefix removes every object whose name starts with prefix.
func (s *JetStream) DeletePrefix(ctx context.Context, prefix string) error {
	infos, err := s.os.List(ctx)
	if errors.Is(err, jetstream.ErrNoObjectsFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("outputs: list for %s: %w", prefix, err)
	}
	for _, info := range infos {
		if strings.HasPrefix(info.Name, prefix) {
			if err := s.Delete(ctx, info.Name); err != nil {
				return err
			}
		}
	}
	return nil
}
