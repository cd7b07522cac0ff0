package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"
)

// ErrNodeNotFound is returned for a node id that is not in the registry.
var ErrNodeNotFound = errors.New("node not found")

// Registry reads and changes the desired configuration of nodes in BucketRegistry.
// Every change is a compare-and-set on the entry's revision, so that an executor
// registering its nodes and an administrator draining one through the API never undo
// each other.
type Registry struct {
	kv jetstream.KeyValue
}

// OpenRegistry binds to the registry bucket, which Ensure must have created.
func OpenRegistry(ctx context.Context, js jetstream.JetStream) (*Registry, error) {
	kv, err := js.KeyValue(ctx, BucketRegistry)
	if err != nil {
		return nil, fmt.Errorf("open bucket %s: %w", BucketRegistry, err)
	}
	return &Registry{kv: kv}, nil
}

// Get returns the configuration of node id and its revision.
func (r *Registry) Get(ctx context.Context, id string) (*NodeConfig, uint64, error) {
	if !ValidToken(id) {
		return nil, 0, ErrNodeNotFound
	}
	e, err := r.kv.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, 0, ErrNodeNotFound
	}
	if err != nil {
		return nil, 0, fmt.Errorf("get node %s: %w", id, err)
	}
	var cfg NodeConfig
	if err := json.Unmarshal(e.Value(), &cfg); err != nil {
		return nil, 0, fmt.Errorf("decode node %s: %w", id, err)
	}
	return &cfg, e.Revision(), nil
}

// Change writes the configuration of node id as change makes it from the current
// one (nil when there is none), by compare-and-set, retrying on conflict. change may
// return ErrNoChange, with the configuration to report, to skip the write; any
// other error it returns is returned as it is. Change returns the configuration as
// written and whether the node is new.
func (r *Registry) Change(ctx context.Context, id string, change func(cur *NodeConfig) (*NodeConfig, error)) (NodeConfig, bool, error) {
	for {
		cur, rev, err := r.Get(ctx, id)
		if errors.Is(err, ErrNodeNotFound) {
			cur, err = nil, nil
		}
		if err != nil {
			return NodeConfig{}, false, err
		}
		next, err := change(cur)
		if errors.Is(err, ErrNoChange) {
			return *next, false, nil
		}
		if err != nil {
			return NodeConfig{}, false, err
		}
		b, err := json.Marshal(next)
		if err != nil {
			return NodeConfig{}, false, fmt.Errorf("encode node %s: %w", id, err)
		}
		if cur == nil {
			_, err = r.kv.Create(ctx, id, b)
		} else {
			_, err = r.kv.Update(ctx, id, b, rev)
		}
		if err == nil {
			return *next, cur == nil, nil
		}
		if !casConflict(err) {
			return NodeConfig{}, false, fmt.Errorf("store node %s: %w", id, err)
		}
		if ctx.Err() != nil {
			return NodeConfig{}, false, ctx.Err()
		}
	}
}

// Delete removes node id, whatever its configuration, by compare-and-set.
func (r *Registry) Delete(ctx context.Context, id string) error {
	for {
		_, rev, err := r.Get(ctx, id)
		if err != nil {
			return err
		}
		err = r.kv.Delete(ctx, id, jetstream.LastRevision(rev))
		if err == nil {
			return nil
		}
		if !casConflict(err) {
			return fmt.Errorf("remove node %s: %w", id, err)
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
}

// All returns every registered node's configuration, by id.
func (r *Registry) All(ctx context.Context) (map[string]NodeConfig, error) {
	lister, err := r.kv.ListKeys(ctx)
	if errors.Is(err, jetstream.ErrNoKeysFound) {
		return map[string]NodeConfig{}, nil
	}
	if err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	defer lister.Stop()
	out := map[string]NodeConfig{}
	for id := range lister.Keys() {
		cfg, _, err := r.Get(ctx, id)
		if errors.Is(err, ErrNodeNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out[id] = *cfg
	}
	return out, nil
}

// Watch follows every node's configuration: the current ones, a nil entry, then
// changes.
func (r *Registry) Watch(ctx context.Context) (jetstream.KeyWatcher, error) {
	return r.kv.WatchAll(ctx)
}

// casConflict reports whether a compare-and-set write lost to another writer.
func casConflict(err error) bool {
	return errors.Is(err, jetstream.ErrKeyExists) || errors.Is(err, jetstream.ErrKeyRevisionMismatch) || WrongLastSequence(err)
}
