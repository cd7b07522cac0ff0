package executor_test

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/inventory"
	"github.com/comfyfleet/comfyfleet/services/executor"
)

// inventoryRig is a fleet's NATS, and the inventory bucket and object_info store that
// executors publish to.
type inventoryRig struct {
	t          *testing.T
	nc         *nats.Conn
	settings   fleet.Settings
	kv         jetstream.KeyValue
	objectInfo jetstream.ObjectStore
	ctx        context.Context
	wg         sync.WaitGroup
}

func newInventoryRig(t *testing.T) *inventoryRig {
	t.Helper()
	settings := fleet.Settings{AckWait: 2 * time.Second, NodeTTL: 3 * time.Second}
	_, nc, js := fleettest.Fleet(t, settings)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	r := &inventoryRig{t: t, nc: nc, settings: settings, ctx: ctx}
	t.Cleanup(func() { cancel(); r.wg.Wait() })
	var err error
	if r.kv, err = js.KeyValue(ctx, fleet.BucketInventory); err != nil {
		t.Fatal(err)
	}
	if r.objectInfo, err = js.ObjectStore(ctx, fleet.ObjectNodeInfo); err != nil {
		t.Fatal(err)
	}
	return r
}

// run starts an executor driving a simulated node of cfg, reading its inventory every
// interval.
func (r *inventoryRig) run(cfg comfysim.Config, interval time.Duration) *comfysim.Server {
	r.t.Helper()
	cfg.StepDuration = 10 * time.Millisecond
	sim := fleettest.Sim(r.t, cfg)
	node := fleet.NodeConfig{ID: cfg.Name, URL: sim.URL(), Pools: []string{"image"}, Weight: 1}
	r.wg.Go(func() {
		err := executor.Run(r.ctx, executor.Config{Conn: r.nc, Settings: r.settings, Nodes: []fleet.NodeConfig{node}, Name: "exec-" + cfg.Name,
			HeartbeatInterval: 100 * time.Millisecond, InventoryInterval: interval,
			Logger: fleettest.Logger(r.t)})
		if err != nil {
			r.t.Errorf("executor: %v", err)
		}
	})
	return sim
}

// published returns node's inventory as published and its revision, nil if none is.
func (r *inventoryRig) published(node string) (*inventory.Inventory, uint64) {
	r.t.Helper()
	e, err := r.kv.Get(r.ctx, node)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, 0
	}
	if err != nil {
		r.t.Fatal(err)
	}
	var inv inventory.Inventory
	if err := json.Unmarshal(e.Value(), &inv); err != nil {
		r.t.Fatal(err)
	}
	return &inv, e.Revision()
}

// rawInventory is the inventory of node's /object_info as stored whole.
func (r *inventoryRig) rawInventory(node string) *inventory.Inventory {
	r.t.Helper()
	b, err := r.objectInfo.GetBytes(r.ctx, node)
	if err != nil {
		r.t.Fatal(err)
	}
	var info map[string]json.RawMessage
	if err := json.Unmarshal(b, &info); err != nil {
		r.t.Fatal(err)
	}
	inv, err := inventory.FromObjectInfo(info)
	if err != nil {
		r.t.Fatal(err)
	}
	return inv
}

// refresh asks the executor driving node to read its inventory again.
func (r *inventoryRig) refresh(node string) (fleet.NodeRefreshReply, error) {
	return fleet.RefreshNode(r.ctx, r.nc, node)
}

func checkpoints(inv *inventory.Inventory) []string {
	files, _ := inv.Files("CheckpointLoaderSimple", "ckpt_name")
	return files
}

func TestInventoryPublishedBeforeOnlineOnRequestAndOnSchedule(t *testing.T) {
	t.Parallel()
	r := newInventoryRig(t)
	asked := r.run(comfysim.Config{Name: "asked", Models: map[string][]string{"ckpt_name": {"a.safetensors"}},
		WithoutClasses: []string{"VHS_VideoCombine"}}, time.Hour)
	scheduled := r.run(comfysim.Config{Name: "scheduled", Models: map[string][]string{"ckpt_name": {"a.safetensors"}}}, 100*time.Millisecond)

	// A node is reported online only once its inventory is published.
	nodes, err := jetstream.New(r.nc)
	if err != nil {
		t.Fatal(err)
	}
	states, err := nodes.KeyValue(r.ctx, fleet.BucketNodes)
	if err != nil {
		t.Fatal(err)
	}
	reported := func(state fleet.NodeState) func() bool {
		return func() bool {
			e, err := states.Get(r.ctx, "asked")
			if err != nil {
				return false
			}
			var st fleet.NodeStatus
			return json.Unmarshal(e.Value(), &st) == nil && st.State == state
		}
	}
	fleettest.Eventually(t, 20*time.Second, reported(fleet.NodeOnline), "node asked never reported online")
	inv, rev := r.published("asked")
	if inv == nil {
		t.Fatal("node asked reported online before its inventory was published")
	}
	if !slices.Equal(checkpoints(inv), []string{"a.safetensors"}) || inv.Has("VHS_VideoCombine") || !inv.Has("SaveImage") {
		t.Errorf("inventory of asked: checkpoints %v, VHS_VideoCombine %v, SaveImage %v", checkpoints(inv), inv.Has("VHS_VideoCombine"), inv.Has("SaveImage"))
	}
	if raw := r.rawInventory("asked"); raw.Version != inv.Version {
		t.Errorf("object_info stored whole has version %s, the bucket %s", raw.Version, inv.Version)
	}
	// Its heartbeats name that version, for a dispatcher to wait for it.
	e, err := states.Get(r.ctx, "asked")
	if err != nil {
		t.Fatal(err)
	}
	var st fleet.NodeStatus
	if err := json.Unmarshal(e.Value(), &st); err != nil || st.Inventory != inv.Version {
		t.Errorf("heartbeat names inventory %q, want %q (%v)", st.Inventory, inv.Version, err)
	}

	// Asked again with nothing changed: the same version, nothing published.
	reply, err := r.refresh("asked")
	if err != nil || reply.Changed || reply.Version != inv.Version || reply.Error != "" {
		t.Fatalf("refresh of an unchanged node: %+v, %v", reply, err)
	}
	if _, again := r.published("asked"); again != rev {
		t.Errorf("an unchanged inventory was published again: revision %d, then %d", rev, again)
	}

	// A checkpoint copied onto the node shows once asked.
	if err := asked.AddModel("ckpt_name", "b.safetensors"); err != nil {
		t.Fatal(err)
	}
	reply, err = r.refresh("asked")
	if err != nil || !reply.Changed || reply.Version == inv.Version {
		t.Fatalf("refresh after a checkpoint was added: %+v, %v", reply, err)
	}
	inv, _ = r.published("asked")
	if !slices.Equal(checkpoints(inv), []string{"a.safetensors", "b.safetensors"}) || inv.Version != reply.Version {
		t.Errorf("after refresh: checkpoints %v version %s, want a and b, version %s", checkpoints(inv), inv.Version, reply.Version)
	}
	if raw := r.rawInventory("asked"); raw.Version != reply.Version {
		t.Errorf("object_info stored whole not refreshed: version %s", raw.Version)
	}

	// And on schedule, unasked.
	if err := scheduled.AddModel("ckpt_name", "c.safetensors"); err != nil {
		t.Fatal(err)
	}
	fleettest.Eventually(t, 10*time.Second, func() bool {
		inv, _ := r.published("scheduled")
		return inv != nil && slices.Contains(checkpoints(inv), "c.safetensors")
	}, "the scheduled read never published the new checkpoint")

	// A node that no executor drives answers nothing.
	if _, err := r.refresh("nobody"); !errors.Is(err, fleet.ErrNoExecutor) {
		t.Errorf("refresh of a node nobody drives: %v, want no responders", err)
	}

	// A node that went down answers with why it could not be read, and is read
	// again as soon as it is back.
	asked.Kill()
	reply, err = r.refresh("asked")
	if err != nil || reply.Error == "" {
		t.Errorf("refresh of a dead node: %+v, %v; want the error", reply, err)
	}
	fleettest.Eventually(t, 10*time.Second, reported(fleet.NodeOffline), "node asked never reported offline")
	if err := asked.SetModels("ckpt_name", []string{"d.safetensors"}); err != nil {
		t.Fatal(err)
	}
	if err := asked.Restart(); err != nil {
		t.Fatal(err)
	}
	fleettest.Eventually(t, 10*time.Second, func() bool {
		inv, _ := r.published("asked")
		return inv != nil && slices.Equal(checkpoints(inv), []string{"d.safetensors"})
	}, "the inventory was not read again when the node came back")
}
