package outputs

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nuid"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// contentTypeKey is the object metadata entry that holds a file's content type.
const contentTypeKey = "content-type"

// chunkSize is the object store's default chunk size.
const chunkSize = 128 * 1024

// JetStream keeps outputs in a JetStream object store.
type JetStream struct {
	os jetstream.ObjectStore
	// js, bucket and stream store small files without the object store's Put (see
	// putChunk).
	js     jetstream.JetStream
	bucket string
	stream jetstream.Stream
}

// NewJetStream returns the store backed by bucket, an object store on js.
func NewJetStream(ctx context.Context, js jetstream.JetStream, bucket string) (*JetStream, error) {
	os, err := js.ObjectStore(ctx, bucket)
	if err != nil {
		return nil, fmt.Errorf("outputs: open object store %s: %w", bucket, err)
	}
	stream, err := js.Stream(ctx, "OBJ_"+bucket)
	if err != nil {
		return nil, fmt.Errorf("outputs: open the stream of object store %s: %w", bucket, err)
	}
	return &JetStream{os: os, js: js, bucket: bucket, stream: stream}, nil
}

// Put stores r under key, with its content type in the object's metadata. A file
// whose size is known and fits one chunk is stored by putChunk.
func (s *JetStream) Put(ctx context.Context, key, contentType string, size int64, r io.Reader) (Object, error) {
	meta := jetstream.ObjectMeta{Name: key, Metadata: map[string]string{contentTypeKey: contentType}}
	var info *jetstream.ObjectInfo
	var err error
	if size > 0 && size <= chunkSize {
		info, err = s.putChunk(ctx, meta, size, r)
	} else {
		info, err = s.os.Put(ctx, meta, r)
	}
	if err != nil {
		return Object{}, fmt.Errorf("outputs: put %s: %w", key, err)
	}
	return Object{Key: key, ContentType: contentType, Size: int64(info.Size)}, nil
}

// putChunk stores a file of size bytes, at most a chunk, as the object store lays
// out an object (NATS ADR-20): its content on $O.<bucket>.C.<nuid>, then its
// ObjectInfo rolled up on $O.<bucket>.M.<name in base64url>, and the chunks of the
// object it replaces purged. The object store's own Put does the same, but makes a
// JetStream context, a reply subscription and a seeded random source for every
// object, a buffer of a whole chunk (128 KiB), and reads the name's info first: for
// the small outputs of fast scenes, a tenth of the NATS server's CPU (the
// subscriptions) and most of the executor's garbage.
func (s *JetStream) putChunk(ctx context.Context, meta jetstream.ObjectMeta, size int64, r io.Reader) (*jetstream.ObjectInfo, error) {
	data := make([]byte, size+1)
	n, err := io.ReadFull(r, data)
	switch {
	case errors.Is(err, io.ErrUnexpectedEOF):
		data = data[:n]
	case err == nil:
		// Longer than it announced: stored whole, in chunks.
		return s.os.Put(ctx, meta, io.MultiReader(bytes.NewReader(data), r))
	default:
		return nil, err
	}
	if len(data) == 0 {
		return s.os.Put(ctx, meta, bytes.NewReader(data))
	}
	digest := sha256.Sum256(data)
	meta.Opts = &jetstream.ObjectMetaOptions{ChunkSize: chunkSize}
	info := &jetstream.ObjectInfo{ObjectMeta: meta, Bucket: s.bucket, NUID: nuid.Next(), Size: uint64(len(data)), Chunks: 1,
		Digest: "SHA-256=" + base64.URLEncoding.EncodeToString(digest[:])}
	metaMsg := nats.NewMsg("$O." + s.bucket + ".M." + base64.URLEncoding.EncodeToString([]byte(meta.Name)))
	metaMsg.Header.Set(jetstream.MsgRollup, jetstream.MsgRollupSubject)
	// Only if the name is new: most are, and the info of one that is not must be
	// read first (replace).
	metaMsg.Header.Set(jetstream.ExpectedLastSubjSeqHeader, "0")
	if metaMsg.Data, err = json.Marshal(info); err != nil {
		return nil, err
	}
	// Both to one stream from one connection: the server stores the content first.
	chunkSubject := "$O." + s.bucket + ".C." + info.NUID
	chunkAck, err := s.js.PublishMsgAsync(&nats.Msg{Subject: chunkSubject, Data: data})
	if err != nil {
		return nil, fmt.Errorf("store the content: %w", err)
	}
	metaAck, err := s.js.PublishMsgAsync(metaMsg)
	if err == nil {
		chunkErr, metaErr := stored(ctx, chunkAck), stored(ctx, metaAck)
		if chunkErr == nil && fleet.WrongLastSequence(metaErr) {
			metaErr = s.replace(ctx, meta.Name, metaMsg)
		}
		err = errors.Join(chunkErr, metaErr)
	}
	if err != nil {
		_ = s.stream.Purge(context.WithoutCancel(ctx), jetstream.WithPurgeSubject(chunkSubject))
		return nil, fmt.Errorf("store the object: %w", err)
	}
	info.ModTime = time.Now().UTC()
	return info, nil
}

// replace writes the info metaMsg of an object whose name was written before (a
// scene run again), and purges the content of the object it replaces.
func (s *JetStream) replace(ctx context.Context, name string, metaMsg *nats.Msg) error {
	old, err := s.os.GetInfo(ctx, name, jetstream.GetObjectInfoShowDeleted())
	if err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
		return err
	}
	metaMsg.Header.Del(jetstream.ExpectedLastSubjSeqHeader)
	if _, err := s.js.PublishMsg(ctx, metaMsg); err != nil {
		return err
	}
	if old != nil && !old.Deleted {
		_ = s.stream.Purge(ctx, jetstream.WithPurgeSubject("$O."+s.bucket+".C."+old.NUID))
	}
	return nil
}

// stored waits until the server has stored the message of ack.
func stored(ctx context.Context, ack jetstream.PubAckFuture) error {
	select {
	case <-ack.Ok():
		return nil
	case err := <-ack.Err():
		return err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Open reads the object under key (see fleet.OpenObject).
func (s *JetStream) Open(ctx context.Context, key string) (io.ReadCloser, Object, error) {
	res, info, err := fleet.OpenObject(ctx, s.os, key)
	if errors.Is(err, jetstream.ErrObjectNotFound) {
		return nil, Object{}, fmt.Errorf("%w: %s", ErrNotFound, key)
	}
	if err != nil {
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
