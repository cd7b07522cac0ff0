package executor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/inventory"
)

// inventoryTimeout bounds one read of a node's /object_info and its publication.
const inventoryTimeout = 30 * time.Second

// nodeInventory is what the executor knows of a node's inventory.
type nodeInventory struct {
	// mu serialises reads, so that two of them never publish out of order.
	mu sync.Mutex
	// version is the version published last, "" before the first read.
	version string
	// first is closed once the inventory has been read for the first time, or has
	// failed to be.
	first chan struct{}
	once  sync.Once
}

func (i *nodeInventory) readOnce() { i.once.Do(func() { close(i.first) }) }

// readInventory reads n's /object_info and, when its content changed, publishes it:
// the whole answer in the object store ObjectNodeInfo, then the compact inventory in
// BucketInventory (where dispatchers and intakes follow it), both under the node's
// id.
func (e *executor) readInventory(ctx context.Context, n *node) (fleet.NodeRefreshReply, error) {
	n.inv.mu.Lock()
	defer n.inv.mu.Unlock()
	ctx, cancel := context.WithTimeout(ctx, inventoryTimeout)
	defer cancel()
	id := n.cfg.ID
	info, err := n.client.ObjectInfo(ctx, "")
	if err != nil {
		return fleet.NodeRefreshReply{}, fmt.Errorf("read /object_info of node %s: %w", id, err)
	}
	inv, err := inventory.FromObjectInfo(info)
	if err != nil {
		return fleet.NodeRefreshReply{}, fmt.Errorf("inventory of node %s: %w", id, err)
	}
	if n.inv.version == "" {
		// What an earlier run of the executor published may still be current.
		if entry, err := e.inventories.Get(ctx, id); err == nil {
			var published struct {
				Version string `json:"version"`
			}
			if json.Unmarshal(entry.Value(), &published) == nil {
				n.inv.version = published.Version
			}
		} else if !errors.Is(err, jetstream.ErrKeyNotFound) {
			return fleet.NodeRefreshReply{}, fmt.Errorf("read the published inventory of node %s: %w", id, err)
		}
	}
	if inv.Version == n.inv.version {
		n.reportInventory(inv.Version)
		return fleet.NodeRefreshReply{Version: inv.Version}, nil
	}
	raw, err := json.Marshal(info)
	if err != nil {
		return fleet.NodeRefreshReply{}, fmt.Errorf("encode /object_info of node %s: %w", id, err)
	}
	if _, err := e.objectInfo.PutBytes(ctx, id, raw); err != nil {
		return fleet.NodeRefreshReply{}, fmt.Errorf("store /object_info of node %s: %w", id, err)
	}
	compact, err := json.Marshal(inv)
	if err != nil {
		return fleet.NodeRefreshReply{}, fmt.Errorf("encode inventory of node %s: %w", id, err)
	}
	if _, err := e.inventories.Put(ctx, id, compact); err != nil {
		return fleet.NodeRefreshReply{}, fmt.Errorf("publish inventory of node %s: %w", id, err)
	}
	e.log.Info("node inventory published", "node", id, "version", inv.Version, "classes", len(inv.Classes),
		"model_lists", len(inv.Models), "object_info_bytes", len(raw), "inventory_bytes", len(compact))
	n.inv.version = inv.Version
	n.reportInventory(inv.Version)
	return fleet.NodeRefreshReply{Version: inv.Version, Changed: true}, nil
}

// reportInventory names the inventory version published in n's heartbeats.
func (n *node) reportInventory(version string) {
	n.mu.Lock()
	n.status.Inventory = version
	n.mu.Unlock()
}

// followInventory reads n's inventory again every InventoryInterval while n is
// healthy, and whenever asked on n's NodeRefreshSubject, until ctx is done. (The
// heartbeat reads it whenever n comes up.)
func (e *executor) followInventory(ctx context.Context, n *node) {
	asks := make(chan *nats.Msg, 16)
	sub, err := e.nc.ChanSubscribe(fleet.NodeRefreshSubject(n.cfg.ID), asks)
	if err != nil {
		e.log.Warn("cannot take inventory refresh requests; the inventory is read on schedule only", "node", n.cfg.ID, "err", err)
	} else {
		defer func() { _ = sub.Unsubscribe() }()
	}
	t := time.NewTicker(e.cfg.InventoryInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			if !n.isHealthy() {
				continue
			}
			if _, err := e.readInventory(ctx, n); err != nil && ctx.Err() == nil {
				e.log.Warn("read node inventory", "node", n.cfg.ID, "err", err)
			}
		case ask := <-asks:
			reply, err := e.readInventory(ctx, n)
			if err != nil {
				reply.Error = err.Error()
			}
			b, err := json.Marshal(reply)
			if err == nil {
				err = ask.Respond(b)
			}
			if err != nil {
				e.log.Warn("answer an inventory refresh request", "node", n.cfg.ID, "err", err)
			}
		}
	}
}
