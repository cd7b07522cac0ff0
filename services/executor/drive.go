package executor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/comfy"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// driven is a node this executor drives, with what stops it.
type driven struct {
	node *node
	stop context.CancelFunc
	done chan struct{}
}

// drive drives the configured nodes, and follows the registry until ctx is done:
// a node drained there hands back what it has not started, a node removed stops
// and hands back everything, and with Adopt a node registered through the API is
// claimed and driven at once.
func (e *executor) drive(ctx context.Context) {
	nodes := map[string]*driven{}
	var wg sync.WaitGroup
	defer wg.Wait()
	defer func() {
		for _, d := range nodes {
			d.stop()
		}
	}()
	start := func(nc fleet.NodeConfig) {
		nctx, stop := context.WithCancel(ctx)
		client := comfy.New(nc.URL, comfy.WithHTTPClient(e.cfg.HTTPClient), comfy.WithLogger(e.log),
			comfy.WithClientID(fmt.Sprintf("comfyfleet-%s-%s", e.cfg.Name, nc.ID)))
		d := &driven{node: newNode(nc, client, e.cfg.Name), stop: stop, done: make(chan struct{})}
		d.node.setDrained(nc.Drained, time.Now())
		nodes[nc.ID] = d
		e.live.add(d.node)
		wg.Go(func() {
			defer close(d.done)
			defer client.Close()
			defer e.live.remove(d.node)
			e.runNode(nctx, d.node)
		})
		e.log.Info("driving node", "node", nc.ID, "url", nc.URL, "pools", nc.Pools)
	}
	for _, nc := range e.cfg.Nodes {
		nc.Executor = e.cfg.Name
		start(nc)
	}
	for ctx.Err() == nil {
		watch, err := e.registry.Watch(ctx)
		if err != nil {
			e.log.Warn("watch the registry", "err", err)
			fleet.Pause(ctx, e.cfg.HeartbeatInterval)
			continue
		}
		for entry := range watch.Updates() {
			if entry == nil {
				continue
			}
			id := entry.Key()
			d := nodes[id]
			if entry.Operation() != jetstream.KeyValuePut {
				if d != nil {
					e.log.Info("node removed from the registry: it finishes the scenes it runs and hands back the others", "node", id)
					d.node.retire(entry.Created())
					delete(nodes, id)
					wg.Go(func() {
						for d.node.holding() > 0 && ctx.Err() == nil {
							fleet.Pause(ctx, 50*time.Millisecond)
						}
						d.stop()
						<-d.done
					})
				}
				continue
			}
			var nc fleet.NodeConfig
			if err := json.Unmarshal(entry.Value(), &nc); err != nil {
				continue
			}
			switch {
			case d != nil && nc.Executor != "" && nc.Executor != e.cfg.Name:
				e.log.Info("node now driven by another executor", "node", id, "executor", nc.Executor)
				d.stop()
				<-d.done
				delete(nodes, id)
			case d != nil && nc.URL != d.node.cfg.URL:
				d.stop()
				<-d.done
				start(nc)
			case d != nil:
				d.node.setDrained(nc.Drained, entry.Created())
			case nc.Executor == "" && e.cfg.Adopt && fleet.ValidToken(id):
				claimed, err := e.adopt(ctx, id)
				if err != nil {
					e.log.Debug("adopt node", "node", id, "err", err)
					continue
				}
				start(claimed)
			}
		}
		watch.Stop()
		fleet.Pause(ctx, e.cfg.HeartbeatInterval)
	}
}

// errClaimed is the error of an adoption another executor made first.
var errClaimed = errors.New("driven by another executor")

// adopt claims a node registered through the API by compare-and-set, so that only
// one adopting executor drives it.
func (e *executor) adopt(ctx context.Context, id string) (fleet.NodeConfig, error) {
	nc, _, err := e.registry.Change(ctx, id, func(cur *fleet.NodeConfig) (*fleet.NodeConfig, error) {
		switch {
		case cur == nil:
			return nil, fleet.ErrNodeNotFound
		case cur.Executor != "" && cur.Executor != e.cfg.Name:
			return nil, errClaimed
		case len(cur.Pools) == 0:
			return nil, errors.New("node serves no pool")
		}
		next := *cur
		next.ID, next.Executor = id, e.cfg.Name
		if next.Region == "" {
			next.Region = e.cfg.Region
		}
		return &next, nil
	})
	return nc, err
}

// liveNodes are the nodes the executor drives now.
type liveNodes struct {
	mu    sync.Mutex
	nodes map[string]*node
}

func (l *liveNodes) add(n *node) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.nodes == nil {
		l.nodes = map[string]*node{}
	}
	l.nodes[n.cfg.ID] = n
}

func (l *liveNodes) remove(n *node) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.nodes[n.cfg.ID] == n {
		delete(l.nodes, n.cfg.ID)
	}
}

func (l *liveNodes) all() []*node {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Collect(maps.Values(l.nodes))
}

// runNode probes and reports n, and runs its scenes, until ctx is done.
func (e *executor) runNode(ctx context.Context, n *node) {
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() { e.heartbeat(ctx, n) })
	wg.Go(func() { e.followInventory(ctx, n) })
	var cons jetstream.Consumer
	err := fleet.Retry(ctx, e.log, "work consumer of node "+n.cfg.ID, func(ctx context.Context) error {
		var err error
		cons, err = fleet.EnsureWorkConsumer(ctx, e.js, n.cfg.ID, e.cfg.Settings)
		return err
	})
	if err != nil {
		return
	}
	e.seedSetup(ctx, n)
	e.serve(ctx, n, cons)
}
