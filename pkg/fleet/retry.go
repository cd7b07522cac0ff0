package fleet

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go/jetstream"
)

// attemptTimeout bounds one attempt of Retry: a request a NATS cluster does not
// answer yet (while it elects its JetStream leader) is sent again rather than
// awaited for as long as the caller's context lasts.
const attemptTimeout = 5 * time.Second

// Retry calls f until it succeeds or ctx ends, each call bounded by 5s, waiting
// longer after each failure (200ms doubling to 5s) and logging each one: a service
// starting while NATS is down or restarting waits for it instead of giving up. f
// marks an error that retrying cannot fix with backoff.Permanent.
func Retry(ctx context.Context, log *slog.Logger, what string, f func(context.Context) error) error {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = 200 * time.Millisecond
	b.MaxInterval = 5 * time.Second
	b.MaxElapsedTime = 0
	attempt := func() error {
		ctx, cancel := context.WithTimeout(ctx, attemptTimeout)
		defer cancel()
		return f(ctx)
	}
	return backoff.RetryNotify(attempt, backoff.WithContext(b, ctx),
		func(err error, next time.Duration) {
			log.Warn(what+" failed; retrying", "in", next.Round(time.Millisecond), "err", err)
		})
}

// Pause waits d or until ctx is done.
func Pause(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// FollowBucket watches every key of kv until ctx ends. It hands each watch's updates
// to apply, which returns when the watch closes or ctx ends, and calls the live
// function it is given once it has applied the watch's first snapshot (the entries
// before the nil marker); ready is called the first time that happens. A watch that
// cannot start, or closes (its connection lost), is started again after a second,
// from a fresh snapshot, which also catches up on deletions missed meanwhile.
func FollowBucket(ctx context.Context, kv jetstream.KeyValue, log *slog.Logger, ready func(), apply func(updates <-chan jetstream.KeyValueEntry, live func())) {
	var once sync.Once
	live := func() { once.Do(ready) }
	for ctx.Err() == nil {
		w, err := kv.WatchAll(ctx)
		if err != nil {
			if ctx.Err() == nil {
				log.Warn("watch bucket; watching again", "bucket", kv.Bucket(), "err", err)
				Pause(ctx, time.Second)
			}
			continue
		}
		apply(w.Updates(), live)
		_ = w.Stop()
		if ctx.Err() == nil {
			log.Warn("bucket watch closed; watching again", "bucket", kv.Bucket())
			Pause(ctx, time.Second)
		}
	}
}
