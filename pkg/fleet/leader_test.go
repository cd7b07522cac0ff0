package fleet_test

import (
	"context"
	"errors"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

// laggingReplica answers direct gets as a replica that has not caught up with its
// leader yet: it has nothing.
type laggingReplica struct{ jetstream.Stream }

func (laggingReplica) GetLastMsgForSubject(context.Context, string) (*jetstream.RawStreamMsg, error) {
	return nil, jetstream.ErrMsgNotFound
}

func (laggingReplica) GetMsg(context.Context, uint64, ...jetstream.GetMsgOpt) (*jetstream.RawStreamMsg, error) {
	return nil, jetstream.ErrMsgNotFound
}

func TestLastMsgAsksTheLeaderWhatAReplicaLacks(t *testing.T) {
	t.Parallel()
	_, _, js := fleettest.Fleet(t, fleet.Settings{})
	ctx := context.Background()
	subject := fleet.ScenePayloadSubject("j1", 3)
	if _, err := js.Publish(ctx, subject, []byte(`{"graph":{}}`)); err != nil {
		t.Fatal(err)
	}
	s, err := js.Stream(ctx, fleet.StreamScenes)
	if err != nil {
		t.Fatal(err)
	}
	msg, err := fleet.LastMsg(ctx, js, laggingReplica{s}, subject)
	if err != nil || string(msg.Data) != `{"graph":{}}` || msg.Subject != subject || msg.Sequence == 0 {
		t.Fatalf("LastMsg past a lagging replica = %+v, %v; want the stored payload", msg, err)
	}
	if _, err := fleet.LastMsg(ctx, js, laggingReplica{s}, fleet.ScenePayloadSubject("j1", 4)); !errors.Is(err, jetstream.ErrMsgNotFound) {
		t.Fatalf("LastMsg of a payload never stored: %v, want ErrMsgNotFound", err)
	}
	bySeq, err := fleet.MsgAt(ctx, js, laggingReplica{s}, msg.Sequence)
	if err != nil || string(bySeq.Data) != `{"graph":{}}` {
		t.Fatalf("MsgAt past a lagging replica = %+v, %v; want the stored payload", bySeq, err)
	}
	if _, err := fleet.MsgAt(ctx, js, laggingReplica{s}, msg.Sequence+100); !errors.Is(err, jetstream.ErrMsgNotFound) {
		t.Fatalf("MsgAt of a sequence never stored: %v, want ErrMsgNotFound", err)
	}
}

func TestObjectStoredAsksTheLeader(t *testing.T) {
	t.Parallel()
	_, _, js := fleettest.Fleet(t, fleet.Settings{})
	ctx := context.Background()
	inputs, err := js.ObjectStore(ctx, fleet.ObjectInputs)
	if err != nil {
		t.Fatal(err)
	}
	key := fleet.InputKey("j1", 0, "image")
	if _, err := inputs.PutBytes(ctx, key, []byte("png")); err != nil {
		t.Fatal(err)
	}
	if ok, err := fleet.ObjectStored(ctx, js, fleet.ObjectInputs, key); err != nil || !ok {
		t.Fatalf("ObjectStored(%s) = %v, %v; want true", key, ok, err)
	}
	if ok, err := fleet.ObjectStored(ctx, js, fleet.ObjectInputs, fleet.InputKey("j1", 1, "image")); err != nil || ok {
		t.Fatalf("ObjectStored of an object never put = %v, %v; want false", ok, err)
	}
}

// laggingBucket answers Gets as a replica that has not caught up with its leader.
type laggingBucket struct{ jetstream.KeyValue }

func (laggingBucket) Get(context.Context, string) (jetstream.KeyValueEntry, error) {
	return nil, jetstream.ErrKeyNotFound
}

func TestKeyValueGetAsksTheLeaderWhatAReplicaLacks(t *testing.T) {
	t.Parallel()
	_, _, js := fleettest.Fleet(t, fleet.Settings{})
	ctx := context.Background()
	kv, err := js.KeyValue(ctx, fleet.BucketJobs)
	if err != nil {
		t.Fatal(err)
	}
	rev, err := kv.Put(ctx, "j1", []byte(`{"id":"j1"}`))
	if err != nil {
		t.Fatal(err)
	}
	value, got, err := fleet.KVGet(ctx, js, laggingBucket{kv}, fleet.BucketJobs, "j1")
	if err != nil || string(value) != `{"id":"j1"}` || got != rev {
		t.Fatalf("get past a lagging replica = %q rev %d, %v; want the record at revision %d", value, got, err, rev)
	}
	if err := kv.Delete(ctx, "j1"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := fleet.KVGet(ctx, js, laggingBucket{kv}, fleet.BucketJobs, "j1"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("get of a deleted key: %v, want ErrKeyNotFound", err)
	}
	if _, _, err := fleet.KVGet(ctx, js, laggingBucket{kv}, fleet.BucketJobs, "j2"); !errors.Is(err, jetstream.ErrKeyNotFound) {
		t.Fatalf("get of a key never put: %v, want ErrKeyNotFound", err)
	}
}
