package dispatcher

import (
	"fmt"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/inventory"
)

// stateWithNode is a fleet state with one registered node driven by executor ex,
// holding one scene, heard from at t0.
func stateWithNode(t0 time.Time, ex string) *fleetState {
	s := newFleetState(fleet.Settings{AckWait: 4 * time.Second, NodeTTL: 10 * time.Second})
	s.registryReady = true
	s.registryChanged("gpu", &fleet.NodeConfig{ID: "gpu", Pools: []string{"image"}, Weight: 1})
	s.heartbeat(fleet.NodeStatus{ID: "gpu", Executor: ex, State: fleet.NodeBusy}, t0)
	s.hold("gpu", fleet.Ticket{JobID: "j", Index: 0, Pool: "image"}, 1, t0)
	return s
}

func TestAnExecutorWhoseConnectionIsGoneLosesItsNodesAfterTheGrace(t *testing.T) {
	t0 := time.Now()
	s := stateWithNode(t0, "ex")
	if got := s.executors(); len(got) != 1 || got[0] != "ex" {
		t.Fatalf("executors to ask: %v, want ex", got)
	}
	s.answered("ex", true, t0.Add(100*time.Millisecond))
	if s.usable(s.nodes["gpu"], t0.Add(200*time.Millisecond)) {
		t.Error("a node whose executor meets no responders still takes scenes")
	}
	if lost := s.lost(t0.Add(500 * time.Millisecond)); len(lost) != 0 {
		t.Errorf("lost %v within the grace; a reconnection to another server takes that long", lost)
	}
	if lost := s.lost(t0.Add(1200 * time.Millisecond)); len(lost) != 1 || lost[0].id != "gpu" || lost[0].undeliveredOnly {
		t.Errorf("lost %v after the grace, want every scene of gpu", lost)
	}
}

func TestASlowExecutorKeepsItsNodesUntilAckWait(t *testing.T) {
	t0 := time.Now()
	s := stateWithNode(t0, "ex")
	// Its answer came late (a timeout, not "no responders"): alive, only slow.
	s.answered("ex", false, t0.Add(time.Second))
	if lost := s.lost(t0.Add(3 * time.Second)); len(lost) != 0 {
		t.Errorf("lost %v: a slow executor lost its nodes before ack-wait", lost)
	}
	if lost := s.lost(t0.Add(5 * time.Second)); len(lost) != 1 {
		t.Errorf("lost %v after ack-wait of silence, want gpu", lost)
	}
}

func TestAHeartbeatBringsBackAnExecutorThatWasGone(t *testing.T) {
	t0 := time.Now()
	s := stateWithNode(t0, "ex")
	s.answered("ex", true, t0)
	s.heartbeat(fleet.NodeStatus{ID: "gpu", Executor: "ex", State: fleet.NodeOnline}, t0.Add(3*time.Second))
	if !s.usable(s.nodes["gpu"], t0.Add(3*time.Second)) {
		t.Error("a node whose restarted executor reports again takes no scenes")
	}
}

// An end seen as published but not stored (its stream electing a leader) must not
// make the scene's ticket stale: the ticket put back in the queue runs it again.
// Only an end read from the events stream does.
func TestOnlyAStoredEndMakesATicketStale(t *testing.T) {
	t0 := time.Now()
	s := stateWithNode(t0, "ex")
	end := fleet.SceneEvent{JobID: "j", Index: 0, Type: fleet.EventCompleted, Node: "gpu"}
	s.sceneEvent(end)
	if len(s.nodes["gpu"].held) != 0 {
		t.Error("the node still holds a scene whose end was published: its slot did not free")
	}
	requeued := &waiting{t: fleet.Ticket{JobID: "j", Index: 0, Pool: "image", Moves: 1}, seq: 2}
	if !s.enqueue(requeued, t0) {
		t.Fatal("a ticket was dropped for an end seen as published only")
	}
	if w := s.ended(end, t0); w != requeued {
		t.Fatalf("the stored end removed %v, want the waiting ticket", w)
	}
	if s.enqueue(&waiting{t: fleet.Ticket{JobID: "j", Index: 0, Pool: "image", Moves: 2}, seq: 3}, t0) {
		t.Error("a ticket of a run whose end is stored was queued")
	}
}

func TestViewsFollowTheFleetBetweenCalls(t *testing.T) {
	t0 := time.Now()
	s := stateWithNode(t0, "ex")
	nodes, tenants := s.views(t0)
	if len(nodes) != 1 || !nodes[0].usable || len(nodes[0].held) != 1 || tenants[""] != 1 {
		t.Fatalf("first views: %d nodes, usable %v, %d held, tenants %v", len(nodes), nodes[0].usable, len(nodes[0].held), tenants)
	}
	// A node added, the first drained and its scene ended, another tenant's scene
	// placed: the next views show all of it.
	s.registryChanged("a-gpu", &fleet.NodeConfig{ID: "a-gpu", Pools: []string{"video"}, Weight: 2})
	s.heartbeat(fleet.NodeStatus{ID: "a-gpu", Executor: "ex", State: fleet.NodeOnline}, t0)
	s.registryChanged("gpu", &fleet.NodeConfig{ID: "gpu", Pools: []string{"image"}, Weight: 1, Drained: true})
	s.ended(fleet.SceneEvent{JobID: "j", Index: 0, Type: fleet.EventCompleted, Node: "gpu"}, t0)
	s.hold("a-gpu", fleet.Ticket{JobID: "k", Index: 0, Pool: "video", Tenant: "t2"}, 2, t0)
	nodes, tenants = s.views(t0)
	if len(nodes) != 2 || nodes[0].id != "a-gpu" || nodes[1].id != "gpu" {
		t.Fatalf("views after a node was added: %v, want a-gpu then gpu", nodes)
	}
	if !nodes[0].usable || nodes[0].weight != 2 || !nodes[0].serves("video") || len(nodes[0].held) != 1 {
		t.Errorf("new node's view: usable %v, weight %v, pools %v, %d held", nodes[0].usable, nodes[0].weight, nodes[0].pools, len(nodes[0].held))
	}
	if nodes[1].usable || len(nodes[1].held) != 0 {
		t.Errorf("drained node's view: usable %v, %d held; want unusable, none", nodes[1].usable, len(nodes[1].held))
	}
	if len(tenants) != 1 || tenants["t2"] != 1 {
		t.Errorf("tenants holding scenes %v, want t2: 1", tenants)
	}
}

// TestViewsCountEachTenantsScenes counts what nodes hold by tenant, whatever the
// order of the tenants from node to node.
func TestViewsCountEachTenantsScenes(t *testing.T) {
	t0 := time.Now()
	s := stateWithNode(t0, "ex")
	s.hold("gpu", fleet.Ticket{JobID: "a1", Pool: "image", Tenant: "a"}, 2, t0)
	for i, tenant := range []string{"b", "a", "a", "b"} {
		id := fmt.Sprintf("gpu%d", i)
		s.registryChanged(id, &fleet.NodeConfig{ID: id, Pools: []string{"image"}, Weight: 1})
		s.hold(id, fleet.Ticket{JobID: fmt.Sprintf("%s%d", tenant, i), Pool: "image", Tenant: tenant}, uint64(3+i), t0)
	}
	if _, tenants := s.views(t0); len(tenants) != 3 || tenants[""] != 1 || tenants["a"] != 3 || tenants["b"] != 2 {
		t.Errorf("tenants holding scenes %v, want \"\": 1, a: 3, b: 2", tenants)
	}
}

func TestTheEndOfARunFreesEveryNodeHoldingIt(t *testing.T) {
	t0 := time.Now()
	s := stateWithNode(t0, "ex")
	moving := fleet.Ticket{JobID: "m", Index: 0, Pool: "image"}
	other := fleet.Ticket{JobID: "o", Index: 0, Pool: "image"}
	// The work stream holds the moving scene twice: on the node it leaves, not yet
	// acknowledged, and on the node it went to.
	s.scanned([]placedMsg{{node: "gpu", seq: 1, t: moving}, {node: "gpu2", seq: 2, t: moving}, {node: "gpu2", seq: 3, t: other}}, t0)
	if len(s.nodes["gpu"].held) != 1 || len(s.nodes["gpu2"].held) != 2 {
		t.Fatalf("after the scan gpu holds %d, gpu2 %d; want 1 and 2", len(s.nodes["gpu"].held), len(s.nodes["gpu2"].held))
	}
	s.ended(fleet.SceneEvent{JobID: "m", Index: 0, Type: fleet.EventCompleted, Node: "gpu2"}, t0)
	if len(s.nodes["gpu"].held) != 0 || len(s.nodes["gpu2"].held) != 1 || s.nodes["gpu2"].held[other.RunKey()] == nil {
		t.Fatalf("after the end gpu holds %d, gpu2 %v; want nothing, and only the other scene", len(s.nodes["gpu"].held), s.nodes["gpu2"].held)
	}
	// Back in the queue, a scene is held nowhere.
	s.enqueue(&waiting{seq: 9, t: other}, t0)
	if len(s.nodes["gpu2"].held) != 0 || len(s.holders) != 0 {
		t.Fatalf("a requeued scene is still held: gpu2 %v, holders %v", s.nodes["gpu2"].held, s.holders)
	}
}

// BenchmarkViews refreshes the views of 500 busy nodes, as before every plan of a
// backlog's drain.
func BenchmarkViews(b *testing.B) {
	t0 := time.Now()
	s := newFleetState(fleet.Settings{AckWait: 4 * time.Second, NodeTTL: 10 * time.Second})
	s.registryReady = true
	for i := range 500 {
		id := fmt.Sprintf("n%03d", i)
		s.registryChanged(id, &fleet.NodeConfig{ID: id, Pools: []string{"image"}, Weight: 1})
		s.heartbeat(fleet.NodeStatus{ID: id, Executor: fmt.Sprintf("ex%d", i%2), State: fleet.NodeBusy}, t0)
		for j := range fleet.NodeSlots {
			s.hold(id, fleet.Ticket{JobID: id, Index: j, Pool: "image", Tenant: "studio"}, uint64(2*i+j+1), t0)
		}
	}
	b.ResetTimer()
	for range b.N {
		if nodes, tenants := s.views(t0); len(nodes) != 500 || tenants["studio"] != 500*fleet.NodeSlots {
			b.Fatalf("%d nodes, %v", len(nodes), tenants)
		}
	}
}

// TestANodeWhoseInventoryIsOnItsWayTakesNoSceneThatNeedsAnything: its heartbeat,
// straight from the executor, may come before the inventory it names, through the
// inventory bucket. Until that version is read the node may lack what a scene needs.
func TestANodeWhoseInventoryIsOnItsWayTakesNoSceneThatNeedsAnything(t *testing.T) {
	t0 := time.Now()
	s := stateWithNode(t0, "ex")
	video := &waiting{t: fleet.Ticket{JobID: "v", Pool: "image", Needs: &inventory.Requirements{Key: "vhs", Classes: map[string][]string{"VHS_VideoCombine": {"2"}}}}}
	plain := &waiting{t: fleet.Ticket{JobID: "p", Pool: "image"}}
	fits := func() (bool, bool) {
		nodes, _ := s.views(t0)
		return nodes[0].fits(video), nodes[0].fits(plain)
	}
	if v, p := fits(); !v || !p {
		t.Errorf("no inventory read and none announced: fits the video scene %v, the plain one %v; want both", v, p)
	}
	s.heartbeat(fleet.NodeStatus{ID: "gpu", Executor: "ex", State: fleet.NodeOnline, Inventory: "v1"}, t0)
	if v, p := fits(); v || !p {
		t.Errorf("inventory v1 announced, not read: fits the video scene %v, the plain one %v; want only the plain one", v, p)
	}
	s.inventoryChanged("gpu", &inventory.Inventory{Version: "v1", Classes: []string{"EmptyImage", "VHS_VideoCombine"}})
	if v, p := fits(); !v || !p {
		t.Errorf("inventory v1 read: fits the video scene %v, the plain one %v; want both", v, p)
	}
	s.heartbeat(fleet.NodeStatus{ID: "gpu", Executor: "ex", State: fleet.NodeOnline, Inventory: "v2"}, t0)
	if v, _ := fits(); v {
		t.Error("inventory v2 announced, v1 read: the video scene fits by the old inventory")
	}
	s.inventoryChanged("gpu", &inventory.Inventory{Version: "v2", Classes: []string{"EmptyImage"}})
	if v, p := fits(); v || !p {
		t.Errorf("inventory v2, without the video node, read: fits the video scene %v, the plain one %v", v, p)
	}
}
