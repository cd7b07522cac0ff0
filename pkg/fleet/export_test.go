package fleet

import (
	"context"

	"github.com/nats-io/nats.go/jetstream"
)

// KVGet is kvGet for the tests: it returns the value and revision of key.
func KVGet(ctx context.Context, js jetstream.JetStream, kv jetstream.KeyValue, bucket, key string) ([]byte, uint64, error) {
	v, err := kvGet(ctx, js.Conn(), apiPrefix(js), kv, bucket, key)
	return v.value, v.revision, err
}
