package fleet

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Direct gets, and the key-value Gets built on them, are answered by any replica of
// a stream, and a replica that has not caught up yet (one just restarted, or slow)
// may lack a message that the leader stored and acknowledged: a "not found" from a
// direct get is no proof. The readers below ask the stream's leader again before
// they take a message, key or object for gone.

// LastMsg returns the last message on subject in s: by a direct get, and when that
// finds nothing, from the stream's leader. Only a message the leader does not hold
// either is jetstream.ErrMsgNotFound.
func LastMsg(ctx context.Context, js jetstream.JetStream, s jetstream.Stream, subject string) (*jetstream.RawStreamMsg, error) {
	msg, err := s.GetLastMsgForSubject(ctx, subject)
	if !errors.Is(err, jetstream.ErrMsgNotFound) {
		return msg, err
	}
	return leaderLastMsg(ctx, js.Conn(), apiPrefix(js), s.CachedInfo().Config.Name, subject)
}

// MsgAt returns the message at sequence seq of s: by a direct get, and when that
// finds nothing, from the stream's leader. Only a message the leader does not hold
// either is jetstream.ErrMsgNotFound.
func MsgAt(ctx context.Context, js jetstream.JetStream, s jetstream.Stream, seq uint64) (*jetstream.RawStreamMsg, error) {
	msg, err := s.GetMsg(ctx, seq)
	if !errors.Is(err, jetstream.ErrMsgNotFound) {
		return msg, err
	}
	return leaderGet(ctx, js.Conn(), apiPrefix(js), s.CachedInfo().Config.Name, fmt.Sprintf("message %d", seq), struct {
		Seq uint64 `json:"seq"`
	}{seq})
}

// ObjectStored reports whether the leader of the object store bucket's stream holds
// the object name: whether an object a replica did not find is there all the same.
func ObjectStored(ctx context.Context, js jetstream.JetStream, bucket, name string) (bool, error) {
	subject := "$O." + bucket + ".M." + base64.URLEncoding.EncodeToString([]byte(name))
	_, err := leaderLastMsg(ctx, js.Conn(), apiPrefix(js), "OBJ_"+bucket, subject)
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		return false, nil
	case err != nil:
		return false, err
	}
	return true, nil
}

// kvValue is a key's value and revision.
type kvValue struct {
	value    []byte
	revision uint64
}

// kvGet reads key from kv, the key-value bucket named bucket, asking the leader of
// its stream when a replica did not find it. A key that the leader does not hold,
// or holds deleted, is jetstream.ErrKeyNotFound.
func kvGet(ctx context.Context, nc *nats.Conn, apiPfx string, kv jetstream.KeyValue, bucket, key string) (kvValue, error) {
	e, err := kv.Get(ctx, key)
	if err == nil {
		return kvValue{e.Value(), e.Revision()}, nil
	}
	if !errors.Is(err, jetstream.ErrKeyNotFound) {
		return kvValue{}, err
	}
	msg, err := leaderLastMsg(ctx, nc, apiPfx, "KV_"+bucket, kvSubject(bucket, key))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return kvValue{}, jetstream.ErrKeyNotFound
	}
	if err != nil {
		return kvValue{}, err
	}
	if op := msg.Header.Get("KV-Operation"); op == "DEL" || op == "PURGE" {
		return kvValue{}, jetstream.ErrKeyNotFound
	}
	return kvValue{msg.Data, msg.Sequence}, nil
}

// leaderLastMsg reads the last message on subject in stream from the stream's leader.
func leaderLastMsg(ctx context.Context, nc *nats.Conn, apiPfx, stream, subject string) (*jetstream.RawStreamMsg, error) {
	return leaderGet(ctx, nc, apiPfx, stream, "the last message on "+subject, struct {
		LastFor string `json:"last_by_subj"`
	}{subject})
}

// leaderGet reads the message of stream that request names (what, for errors)
// through the STREAM.MSG.GET API, which only the stream's leader answers.
func leaderGet(ctx context.Context, nc *nats.Conn, apiPfx, stream, what string, request any) (*jetstream.RawStreamMsg, error) {
	req, err := json.Marshal(request)
	if err != nil {
		return nil, err
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, 10*time.Second)
		defer cancel()
	}
	fail := func(err error) error {
		return fmt.Errorf("read %s from the leader of %s: %w", what, stream, err)
	}
	reply, err := nc.RequestWithContext(ctx, apiPfx+"STREAM.MSG.GET."+stream, req)
	if err != nil {
		return nil, fail(err)
	}
	var resp struct {
		Error *jetstream.APIError `json:"error"`
		Msg   *struct {
			Subject  string    `json:"subject"`
			Sequence uint64    `json:"seq"`
			Header   []byte    `json:"hdrs"`
			Data     []byte    `json:"data"`
			Time     time.Time `json:"time"`
		} `json:"message"`
	}
	if err := json.Unmarshal(reply.Data, &resp); err != nil {
		return nil, fail(err)
	}
	switch {
	case resp.Error != nil && resp.Error.ErrorCode == jetstream.JSErrCodeMessageNotFound:
		return nil, jetstream.ErrMsgNotFound
	case resp.Error != nil:
		return nil, fail(resp.Error)
	case resp.Msg == nil:
		return nil, jetstream.ErrMsgNotFound
	}
	return &jetstream.RawStreamMsg{Subject: resp.Msg.Subject, Sequence: resp.Msg.Sequence, Header: decodeHeader(resp.Msg.Header),
		Data: resp.Msg.Data, Time: resp.Msg.Time}, nil
}

// decodeHeader decodes a stored message's header block: "NATS/1.0", then
// "Name: value" lines, names kept as written (nats.Header does not canonicalize).
func decodeHeader(raw []byte) nats.Header {
	h := nats.Header{}
	lines := strings.Split(string(raw), "\r\n")
	for _, line := range lines[min(1, len(lines)):] {
		if name, value, ok := strings.Cut(line, ":"); ok {
			h.Add(strings.TrimSpace(name), strings.TrimSpace(value))
		}
	}
	return h
}

// CatchUpDelay is how long ReadCaughtUp waits between two reads.
const CatchUpDelay = 250 * time.Millisecond

// ReadCaughtUp calls read until it returns a value that shows what the caller knows
// was stored (caughtUp), an error, or until wait has passed, every CatchUpDelay: a
// replica or a stream leader just elected may answer for seconds as it was before.
// It returns the last read, and caughtUp false if the time ran out. Call it within a
// delivery whose AckWait is extended (msg.InProgress) meanwhile.
func ReadCaughtUp[T any](ctx context.Context, wait time.Duration, read func() (v T, caughtUp bool, err error)) (T, bool, error) {
	until := time.Now().Add(wait)
	for {
		v, caughtUp, err := read()
		if err != nil || caughtUp || !time.Now().Before(until) {
			return v, caughtUp, err
		}
		select {
		case <-ctx.Done():
			return v, false, ctx.Err()
		case <-time.After(CatchUpDelay):
		}
	}
}
