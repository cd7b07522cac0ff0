package dispatcher

import (
	"context"
	"errors"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// leaseKey is the key of the dispatchers' lease in fleet.BucketLeases.
const leaseKey = "dispatcher"

// lease elects the one dispatcher that places scenes: the one holding a key in the
// leases bucket, whose entries expire after the lease's TTL unless renewed. The
// holder renews it five times per TTL, and keeps leading through failed renewals (a
// NATS server dying, its stream electing a new leader) until three quarters of the
// TTL have passed since the last one; the others try to take it as often, so a
// standby takes over within about one TTL of the holder's death, and at once when
// the holder stops and releases it.
type lease struct {
	kv  jetstream.KeyValue
	id  string
	ttl time.Duration
	log *slog.Logger
}

// run calls leading with whether this dispatcher holds the lease, each time that
// changes, until ctx is done; then it releases the lease if it holds it.
func (l *lease) run(ctx context.Context, leading func(bool)) {
	every := l.ttl / 5
	tick := time.NewTicker(every)
	defer tick.Stop()
	var rev uint64
	var renewed time.Time
	report := leading
	for {
		if rev == 0 {
			r, err := l.kv.Create(ctx, leaseKey, []byte(l.id))
			if err == nil {
				rev, renewed = r, time.Now()
				l.log.Info("this dispatcher leads: it places scenes")
				report(true)
			} else if !errors.Is(err, jetstream.ErrKeyExists) && ctx.Err() == nil {
				l.log.Debug("take the dispatchers' lease", "err", err)
			}
		} else {
			// A slow server may answer late: wait as long as the lease holds.
			callCtx, cancel := context.WithTimeout(ctx, max(every, l.ttl*3/4-time.Since(renewed)))
			r, err := l.kv.Update(callCtx, leaseKey, []byte(l.id), rev)
			cancel()
			if errors.Is(err, jetstream.ErrKeyExists) {
				// A renewal whose answer was lost moved the revision on: the entry
				// still naming this dispatcher is its own.
				getCtx, cancel := context.WithTimeout(ctx, every)
				r, err = l.ownRevision(getCtx, err)
				cancel()
			}
			switch {
			case err == nil:
				rev, renewed = r, time.Now()
			case ctx.Err() != nil:
			case errors.Is(err, jetstream.ErrKeyExists), time.Since(renewed) > l.ttl*3/4:
				// Another dispatcher holds it, or it may have expired: another may.
				l.log.Warn("lost the dispatchers' lease; standing by", "err", err)
				rev = 0
				report(false)
			default:
				// The bucket's stream may be electing a new leader: the lease holds
				// until it expires.
				l.log.Debug("renew the dispatchers' lease", "err", err)
			}
		}
		select {
		case <-ctx.Done():
			if rev != 0 {
				release, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
				if err := l.kv.Delete(release, leaseKey, jetstream.LastRevision(rev)); err != nil {
					l.log.Debug("release the dispatchers' lease", "err", err)
				}
				cancel()
			}
			return
		case <-tick.C:
		}
	}
}

// ownRevision returns the revision of the lease's entry if it names this dispatcher,
// and otherwise err, the failed renewal's error.
func (l *lease) ownRevision(ctx context.Context, err error) (uint64, error) {
	e, getErr := l.kv.Get(ctx, leaseKey)
	if getErr != nil || string(e.Value()) != l.id {
		return 0, err
	}
	return e.Revision(), nil
}

// openLease binds to the leases bucket.
func openLease(ctx context.Context, js jetstream.JetStream, id string, ttl time.Duration, log *slog.Logger) (*lease, error) {
	kv, err := js.KeyValue(ctx, fleet.BucketLeases)
	if err != nil {
		return nil, err
	}
	return &lease{kv: kv, id: id, ttl: ttl, log: log}, nil
}
