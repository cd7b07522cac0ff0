package workflow

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// Store keeps the fleet's templates in the fleet.BucketWorkflows bucket: one JSON
// Template per key, the key being its name. Every intake reads templates from there,
// so all of them offer the same versions.
type Store struct {
	kv jetstream.KeyValue
}

// OpenStore binds to the templates bucket, which fleet.Ensure must have created.
func OpenStore(ctx context.Context, js jetstream.JetStream) (*Store, error) {
	kv, err := js.KeyValue(ctx, fleet.BucketWorkflows)
	if err != nil {
		return nil, fmt.Errorf("open bucket %s: %w", fleet.BucketWorkflows, err)
	}
	return &Store{kv: kv}, nil
}

// Seed stores each *.json template of fsys that the bucket does not hold yet, and
// returns the names it stored. It never replaces a stored template, so an
// administrator's version survives restarts and upgrades.
func (s *Store) Seed(ctx context.Context, fsys fs.FS) ([]string, error) {
	ts, err := readDir(fsys)
	if err != nil {
		return nil, fmt.Errorf("seed templates: %w", err)
	}
	var seeded []string
	for _, t := range ts {
		b, err := json.Marshal(t)
		if err != nil {
			return seeded, fmt.Errorf("seed template %s: encode: %w", t.Name, err)
		}
		_, err = s.kv.Create(ctx, t.Name, b)
		if errors.Is(err, jetstream.ErrKeyExists) {
			continue
		}
		if err != nil {
			return seeded, fmt.Errorf("seed template %s: %w", t.Name, err)
		}
		seeded = append(seeded, t.Name)
	}
	return seeded, nil
}

// Put stores t, which must have passed Validate, in place of any version of the same
// name. It returns the entry's revision and whether the name was new.
func (s *Store) Put(ctx context.Context, t *Template) (rev uint64, created bool, err error) {
	b, err := json.Marshal(t)
	if err != nil {
		return 0, false, fmt.Errorf("encode template %s: %w", t.Name, err)
	}
	rev, err = s.kv.Create(ctx, t.Name, b)
	if err == nil {
		return rev, true, nil
	}
	if !errors.Is(err, jetstream.ErrKeyExists) {
		return 0, false, fmt.Errorf("store template %s: %w", t.Name, err)
	}
	if rev, err = s.kv.Put(ctx, t.Name, b); err != nil {
		return 0, false, fmt.Errorf("store template %s: %w", t.Name, err)
	}
	return rev, false, nil
}

// Follow keeps c equal to the bucket until ctx is done. It calls ready once, as soon
// as c holds every template the bucket held when Follow began; after that it applies
// each change as it happens. An entry that is not a valid template is logged and
// skipped (a change to one leaves the version c had). A watch that closes is started
// again (fleet.FollowBucket). Follow returns nil once ctx ends.
func (s *Store) Follow(ctx context.Context, c *Catalog, log *slog.Logger, ready func()) error {
	fleet.FollowBucket(ctx, s.kv, log, ready, func(updates <-chan jetstream.KeyValueEntry, live func()) {
		mirror(ctx, updates, c, log, live)
	})
	return nil
}

// mirror applies one watch's entries to c until the watch closes or ctx ends. The
// entries before the watch's nil marker are the bucket's current content: they
// replace c's all at once.
func mirror(ctx context.Context, updates <-chan jetstream.KeyValueEntry, c *Catalog, log *slog.Logger, ready func()) {
	snapshot := map[string]version{}
	inSnapshot := true
	for {
		var e jetstream.KeyValueEntry
		select {
		case <-ctx.Done():
			return
		case entry, ok := <-updates:
			if !ok {
				return
			}
			e = entry
		}
		switch {
		case e == nil:
			if inSnapshot {
				c.replace(snapshot)
				inSnapshot = false
				ready()
			}
		case e.Operation() != jetstream.KeyValuePut:
			if inSnapshot {
				delete(snapshot, e.Key())
			} else {
				c.remove(e.Key(), e.Revision())
			}
		default:
			t, err := Parse(e.Value())
			if err == nil && t.Name != e.Key() {
				err = fmt.Errorf("holds template %q", t.Name)
			}
			if err != nil {
				log.Warn("skip invalid workflow template", "bucket", fleet.BucketWorkflows, "key", e.Key(), "revision", e.Revision(), "err", err)
				continue
			}
			if inSnapshot {
				snapshot[t.Name] = version{t: t, rev: e.Revision()}
			} else {
				c.Set(t, e.Revision())
			}
		}
	}
}
