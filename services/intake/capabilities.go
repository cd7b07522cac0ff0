package intake

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"sync"

	"github.com/danielgtaylor/huma/v2"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/inventory"
	"github.com/comfyfleet/comfyfleet/pkg/workflow"
)

// capabilities mirrors, with watches of the registry and inventory buckets, every
// registered node and its last known inventory: what submissions are judged against,
// without a read per request.
type capabilities struct {
	configs mirror[fleet.NodeConfig]
	invs    mirror[*inventory.Inventory]
}

// poolNode is a registered node of a pool and its inventory, nil while unknown.
type poolNode struct {
	cfg fleet.NodeConfig
	inv *inventory.Inventory
}

// pool returns the registered nodes that serve pool, online or not, ordered by id.
func (c *capabilities) pool(pool string) []poolNode {
	configs := c.configs.all()
	invs := c.invs.all()
	var out []poolNode
	for _, id := range slices.Sorted(maps.Keys(configs)) {
		if cfg := configs[id]; slices.Contains(cfg.Pools, pool) {
			out = append(out, poolNode{cfg: cfg, inv: invs[id]})
		}
	}
	return out
}

// follow keeps c equal to the buckets until ctx is done, in goroutines that wg
// waits for. It returns once c holds what both buckets hold now.
func (c *capabilities) follow(ctx context.Context, js jetstream.JetStream, log *slog.Logger, wg *sync.WaitGroup) error {
	registry, err := js.KeyValue(ctx, fleet.BucketRegistry)
	if err != nil {
		return fmt.Errorf("intake: open bucket %s: %w", fleet.BucketRegistry, err)
	}
	inventories, err := js.KeyValue(ctx, fleet.BucketInventory)
	if err != nil {
		return fmt.Errorf("intake: open bucket %s: %w", fleet.BucketInventory, err)
	}
	configsReady, invsReady := make(chan struct{}), make(chan struct{})
	wg.Go(func() {
		c.configs.follow(ctx, registry, log, configsReady, func(b []byte) (fleet.NodeConfig, error) {
			var cfg fleet.NodeConfig
			err := json.Unmarshal(b, &cfg)
			return cfg, err
		})
	})
	wg.Go(func() {
		c.invs.follow(ctx, inventories, log, invsReady, func(b []byte) (*inventory.Inventory, error) {
			var inv inventory.Inventory
			if err := json.Unmarshal(b, &inv); err != nil {
				return nil, err
			}
			return &inv, nil
		})
	})
	for _, ready := range []chan struct{}{configsReady, invsReady} {
		select {
		case <-ready:
		case <-ctx.Done():
			return fmt.Errorf("intake: read node registry and inventories: %w", ctx.Err())
		}
	}
	return nil
}

// mirror holds the decoded values of a bucket's keys, kept current by a watch.
type mirror[T any] struct {
	mu     sync.RWMutex
	values map[string]T
}

// all returns the values by key; the caller must not change the map.
func (m *mirror[T]) all() map[string]T {
	m.mu.RLock()
	defer m.mu.RUnlock()
	return m.values
}

// follow applies the bucket's entries to m until ctx is done, watching again when a
// watch ends; ready is closed once m holds the bucket's content as it was when
// follow began. Undecodable entries are logged and left out.
func (m *mirror[T]) follow(ctx context.Context, kv jetstream.KeyValue, log *slog.Logger, ready chan struct{}, decode func([]byte) (T, error)) {
	fleet.FollowBucket(ctx, kv, log, func() { close(ready) }, func(updates <-chan jetstream.KeyValueEntry, live func()) {
		m.apply(ctx, updates, kv.Bucket(), log, live, decode)
	})
}

// apply applies one watch's entries to m until the watch closes or ctx ends. The
// watch starts with the bucket's whole content, which replaces m's at once; then
// calls live.
func (m *mirror[T]) apply(ctx context.Context, updates <-chan jetstream.KeyValueEntry, bucket string, log *slog.Logger, live func(), decode func([]byte) (T, error)) {
	next := map[string]T{}
	snapshotDone := false
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
			snapshotDone = true
		case e.Operation() != jetstream.KeyValuePut:
			delete(next, e.Key())
		default:
			v, err := decode(e.Value())
			if err != nil {
				log.Warn("skip undecodable entry", "bucket", bucket, "key", e.Key(), "err", err)
				delete(next, e.Key())
				break
			}
			next[e.Key()] = v
		}
		if !snapshotDone {
			continue
		}
		// Copied on write: readers keep the map they got.
		m.mu.Lock()
		m.values = maps.Clone(next)
		m.mu.Unlock()
		live()
	}
}

// graphClasses tells the output nodes of a raw graph's classes: by the known
// inventories of the pool's nodes, else by a stock ComfyUI's classes.
func (in *intake) graphClasses(pool string) workflow.NodeClasses {
	var known inventory.Classes
	for _, n := range in.caps.pool(pool) {
		if n.inv != nil {
			known = append(known, n.inv)
		}
	}
	if len(known) == 0 {
		return workflow.StockClasses
	}
	return known
}

// judge checks that some registered node of the scene's pool, online or not, can run
// what its graph needs by their last known inventories (a pool with no inventory yet
// accepts), and returns an error detail per problem, at the field of the scene (at)
// that names what is missing: a template's parameter, or the graph's node.
func (in *intake) judge(at, pool string, needs *inventory.Requirements, tpl *workflow.Template) []error {
	nodes := in.caps.pool(pool)
	invs := make([]*inventory.Inventory, len(nodes))
	for i, n := range nodes {
		// Runs is memoised by the needs' key: the scenes of one template cost one
		// comparison per node.
		if n.inv.Runs(needs) {
			return nil
		}
		invs[i] = n.inv
	}
	err := inventory.CheckPool(pool, invs, needs)
	if err == nil {
		return nil
	}
	ue, ok := err.(*inventory.UnrunnableError)
	if !ok {
		return []error{&huma.ErrorDetail{Location: at, Message: err.Error()}}
	}
	var errs []error
	for _, p := range ue.Problems {
		field, value := inventory.GraphField(p.Missing), p.Class
		if tpl != nil {
			field = inventory.TemplateField(p.Missing, tpl)
		}
		if p.File != "" {
			value = p.File
		}
		errs = append(errs, &huma.ErrorDetail{Location: at + "." + field, Message: p.Message, Value: value})
	}
	return errs
}

// explainWaits sets, on each queued scene of view that no node taking scenes now can
// run, why: no node serves its pool, none is online, or none of those online has
// what it needs (while an offline or drained one has).
func (in *intake) explainWaits(ctx context.Context, j *fleet.Job, view *api.Job) {
	var queued []int
	for i, s := range j.Scenes {
		if s.Status == fleet.StatusQueued {
			queued = append(queued, i)
		}
	}
	if len(queued) == 0 {
		return
	}
	states, err := readAll[fleet.NodeStatus](ctx, in.nodes)
	if err != nil {
		in.log.Debug("read node states to explain waits", "job", j.ID, "err", err)
		return
	}
	// Scenes of one template share their pool and needs: one answer for all of them.
	reasons := map[[3]string]string{}
	for _, i := range queued {
		s := j.Scenes[i]
		key := [3]string{s.Pool, s.NeedsKey, s.Region}
		if reason, ok := reasons[key]; ok {
			view.Scenes[i].WaitingFor = reason
			continue
		}
		view.Scenes[i].WaitingFor = in.waitReason(s, j.Needs[s.NeedsKey], states)
		reasons[key] = view.Scenes[i].WaitingFor
	}
}

// waitReason says why no node taking scenes can run s, which needs needs; "" when
// one can.
func (in *intake) waitReason(s fleet.Scene, needs *inventory.Requirements, states map[string]fleet.NodeStatus) string {
	nodes := in.caps.pool(s.Pool)
	var online []*inventory.Inventory
	for _, n := range nodes {
		st, seen := states[n.cfg.ID]
		if n.cfg.Drained || !seen || st.State == fleet.NodeOffline || s.Region != "" && n.cfg.Region != s.Region {
			continue
		}
		online = append(online, n.inv)
	}
	switch {
	case len(nodes) == 0:
		return "no node serves pool " + s.Pool
	case len(online) == 0:
		return "no node of pool " + s.Pool + " is online"
	}
	if err := inventory.CheckOnline(s.Pool, online, needs); err != nil {
		return err.Error()
	}
	return ""
}
