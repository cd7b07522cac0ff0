package dispatcher

import (
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/inventory"
)

// fleetOf returns idle image nodes whose measured txt2img duration is 3s/speed.
func fleetOf(speeds ...float64) []*nodeView {
	f := &fleetSpeeds{reference: map[string]float64{}}
	var nodes []*nodeView
	for i, sp := range speeds {
		s := newSpeedModel(f, 1)
		s.observe("txt2img", time.Duration(3/sp*float64(time.Second)), false)
		nodes = append(nodes, &nodeView{id: fmt.Sprintf("n%d", i), pools: []string{"image"}, weight: 1, usable: true, speed: s})
	}
	return nodes
}

func scenes(n int, priority int, tenant string, at time.Time) []*waiting {
	var out []*waiting
	for i := range n {
		out = append(out, &waiting{seq: uint64(i + 1), t: fleet.Ticket{JobID: "j" + tenant, Index: i, Tenant: tenant,
			Priority: priority, Pool: "image", Workflow: "txt2img", SubmittedAt: at}})
	}
	return out
}

func queueOf(ws ...*waiting) *queue {
	q := newQueue()
	for _, w := range ws {
		q.add(w, time.Time{})
	}
	return q
}

// order lists the queue as the planner considers it, with no resident checkpoint.
func order(q *queue, held map[string]int) []*waiting {
	var out []*waiting
	for _, pool := range q.poolNames() {
		q.each(pool, func(string) bool { return false }, held, func(w *waiting) bool {
			out = append(out, w)
			return true
		})
	}
	return out
}

func count(ps []placement) map[string]int {
	c := map[string]int{}
	for _, p := range ps {
		c[p.node.id]++
	}
	return c
}

func TestFastestFinishKeepsTheLastScenesOffSlowNodes(t *testing.T) {
	now := time.Now()
	for _, tc := range []struct {
		speeds []float64
		scenes int
		want   map[string]int
	}{
		// Both on the fast node: one runs, one waits inside ComfyUI behind it.
		{[]float64{10, 1}, 2, map[string]int{"n0": 2}},
		// The optimum gives the fast node four and each slow one one; the first
		// plan releases two to the fast node (its slots) and one to each slow node,
		// and keeps the other two for the fast node.
		{[]float64{3, 1, 1}, 6, map[string]int{"n0": 2, "n1": 1, "n2": 1}},
		{[]float64{1, 1, 1, 1, 1, 1}, 6, map[string]int{"n0": 1, "n1": 1, "n2": 1, "n3": 1, "n4": 1, "n5": 1}},
	} {
		p := planner{policy: FastestFinish}
		got := count(p.plan(now, queueOf(scenes(tc.scenes, 5, "t", now)...), fleetOf(tc.speeds...), nil))
		if !maps.Equal(got, tc.want) {
			t.Errorf("%d scenes on %v: placed %v, want %v", tc.scenes, tc.speeds, got, tc.want)
		}
	}
}

func TestFastestFinishWaitsForAFastNodeThatIsBusy(t *testing.T) {
	now := time.Now()
	nodes := fleetOf(10, 1)
	// The fast node holds a running and a queued scene: 0.6s of work. The slow
	// node would take 3s; the scene waits for the fast node.
	for i := range 2 {
		nodes[0].held = append(nodes[0].held, &held{t: fleet.Ticket{Workflow: "txt2img"}, seq: uint64(i)})
	}
	nodes[0].held[0].startedAt = now
	p := planner{policy: FastestFinish}
	if got := p.plan(now, queueOf(scenes(1, 5, "t", now)...), nodes, nil); len(got) != 0 {
		t.Errorf("placed %v; want the scene kept for the fast node", count(got))
	}
}

func TestFastestFinishGroupsCheckpoints(t *testing.T) {
	now := time.Now()
	nodes := fleetOf(1, 1)
	nodes[0].model, nodes[1].model = "a.safetensors", "b.safetensors"
	ws := scenes(4, 5, "t", now)
	for i, w := range ws {
		w.t.Model = []string{"a.safetensors", "b.safetensors"}[i%2]
	}
	p := planner{policy: FastestFinish, loadPenalty: 5 * time.Second}
	placed := p.plan(now, queueOf(ws...), nodes, nil)
	if len(placed) != 4 {
		t.Fatalf("placed %d scenes, want all 4 (two slots a node)", len(placed))
	}
	for _, pl := range placed {
		if want := map[string]string{"n0": "a.safetensors", "n1": "b.safetensors"}[pl.node.id]; pl.w.t.Model != want {
			t.Errorf("scene of %s placed on %s, which has %s loaded", pl.w.t.Model, pl.node.id, want)
		}
	}
}

func TestPriorityFirstThenTenantsInTurn(t *testing.T) {
	now := time.Now()
	ws := append(scenes(3, 1, "a", now), scenes(3, 1, "b", now.Add(time.Second))...)
	urgent := scenes(1, 10, "c", now.Add(time.Hour))[0]
	got := order(queueOf(append(ws, urgent)...), map[string]int{"a": 0, "b": 0})
	var tenants []string
	for _, w := range got {
		tenants = append(tenants, w.t.Tenant)
	}
	if want := []string{"c", "a", "b", "a", "b", "a", "b"}; !slices.Equal(tenants, want) {
		t.Errorf("order %v, want %v", tenants, want)
	}
	// A tenant already holding scenes yields to one holding none.
	got = order(queueOf(ws...), map[string]int{"a": 2})
	if got[0].t.Tenant != "b" || got[1].t.Tenant != "b" {
		t.Errorf("tenant a holds 2 scenes, yet the order starts %s, %s", got[0].t.Tenant, got[1].t.Tenant)
	}
}

// TestQueueOrderCrossesReadAheadRuns walks buckets longer than a cursor's run: every
// scene comes once, each tenant's oldest first, the tenants in turn.
func TestQueueOrderCrossesReadAheadRuns(t *testing.T) {
	now := time.Now()
	const n = 3*cursorRun + 5
	ws := append(scenes(n, 1, "a", now), scenes(n, 1, "b", now)...)
	for i, w := range ws {
		w.t.SubmittedAt = now.Add(time.Duration(i%n) * time.Millisecond)
	}
	got := order(queueOf(ws...), map[string]int{})
	if len(got) != 2*n {
		t.Fatalf("%d scenes yielded, want %d", len(got), 2*n)
	}
	next := map[string]int{}
	for i, w := range got {
		if want := []string{"a", "b"}[i%2]; w.t.Tenant != want || w.t.Index != next[want] {
			t.Fatalf("scene %d of the order is %s/%d, want %s/%d", i, w.t.Tenant, w.t.Index, want, next[want])
		}
		next[w.t.Tenant]++
	}
}

func TestBaselinePoliciesCommitEveryScene(t *testing.T) {
	now := time.Now()
	for policy, want := range map[Policy]map[string]int{
		RoundRobin: {"n0": 2, "n1": 2, "n2": 2},
		LeastConn:  {"n0": 2, "n1": 2, "n2": 2},
	} {
		p := planner{policy: policy}
		if got := count(p.plan(now, queueOf(scenes(6, 5, "t", now)...), fleetOf(3, 1, 1), nil)); !maps.Equal(got, want) {
			t.Errorf("%s placed %v, want %v", policy, got, want)
		}
	}
	nodes := fleetOf(3, 1, 1)
	nodes[0].weight = 3
	p := planner{policy: Weighted}
	if got, want := count(p.plan(now, queueOf(scenes(5, 5, "t", now)...), nodes, nil)), map[string]int{"n0": 3, "n1": 1, "n2": 1}; !maps.Equal(got, want) {
		t.Errorf("weighted placed %v, want %v", got, want)
	}
}

func TestUnusableNodesAndOtherPoolsGetNothing(t *testing.T) {
	now := time.Now()
	nodes := fleetOf(1, 1, 1)
	nodes[0].usable = false
	nodes[1].pools = []string{"video"}
	for _, policy := range Policies {
		p := planner{policy: policy}
		for _, pl := range p.plan(now, queueOf(scenes(3, 5, "t", now)...), nodes, nil) {
			if pl.node.id != "n2" {
				t.Errorf("%s placed an image scene on %s", policy, pl.node.id)
			}
		}
	}
}

func TestFastestFinishAvoidsTheNodeThatFailedUnlessItIsTheOnlyOne(t *testing.T) {
	now := time.Now()
	w := scenes(1, 5, "t", now)[0]
	w.t.Avoid = "n0"
	p := planner{policy: FastestFinish}
	got := p.plan(now, queueOf(w), fleetOf(10, 1), nil)
	if len(got) != 1 || got[0].node.id != "n1" {
		t.Fatalf("placed %v; want the scene on n1, away from the fast node it failed on", count(got))
	}
	got = p.plan(now, queueOf(w), fleetOf(10), nil)
	if len(got) != 1 || got[0].node.id != "n0" {
		t.Fatalf("placed %v; want the scene back on n0, the only node", count(got))
	}
}

func TestQueueReplacesEntriesAndKeepsBackedOffScenesApart(t *testing.T) {
	now := time.Now()
	q := newQueue()
	a := scenes(2, 5, "t", now)
	q.add(a[0], now)
	q.add(a[1], now)
	requeued := &waiting{seq: 9, t: a[0].t}
	requeued.t.Moves, requeued.t.NotBefore = 1, now.Add(time.Second)
	if old := q.add(requeued, now); old != a[0] {
		t.Fatalf("add of a requeued ticket replaced %v, want the first entry", old)
	}
	if got := order(q, map[string]int{}); len(got) != 1 || got[0] != a[1] {
		t.Fatalf("order %v, want only the scene not backed off", got)
	}
	if next := q.due(now); !next.Equal(requeued.t.NotBefore) {
		t.Fatalf("next due %v, want %v", next, requeued.t.NotBefore)
	}
	if next := q.due(now.Add(2 * time.Second)); !next.IsZero() {
		t.Fatalf("next due %v after the back-off passed, want none", next)
	}
	if got := order(q, map[string]int{}); len(got) != 2 {
		t.Fatalf("order has %d scenes after the back-off, want 2", len(got))
	}
	q.remove(a[1].key())
	q.remove(requeued.key())
	if q.len() != 0 || len(q.pools) != 0 {
		t.Fatalf("queue keeps %d scenes and %d pools after every removal", q.len(), len(q.pools))
	}
}

// BenchmarkPlanDeepQueue times one plan, as a slot frees on one of 500 busy nodes
// while a million scenes wait.
func BenchmarkPlanDeepQueue(b *testing.B) {
	now := time.Now()
	speeds := make([]float64, 500)
	for i := range speeds {
		speeds[i] = 1 + float64(i%4)
	}
	nodes := fleetOf(speeds...)
	for _, n := range nodes {
		for i := range fleet.NodeSlots {
			n.held = append(n.held, &held{t: fleet.Ticket{Workflow: "txt2img"}, seq: uint64(i), startedAt: now})
		}
	}
	q := newQueue()
	for i := range 1_000_000 {
		tenant := fmt.Sprintf("t%d", i%7)
		q.add(&waiting{seq: uint64(i + 1), t: fleet.Ticket{JobID: fmt.Sprintf("j%d", i/100), Index: i % 100, Tenant: tenant,
			Priority: 1 + i%10, Pool: "image", Workflow: "txt2img", SubmittedAt: now.Add(time.Duration(i))}}, now)
	}
	p := planner{policy: FastestFinish}
	b.ResetTimer()
	for i := range b.N {
		n := nodes[i%len(nodes)]
		n.held = n.held[:1]
		if got := p.plan(now, q, nodes, nil); len(got) != 1 {
			b.Fatalf("placed %d scenes, want 1", len(got))
		}
		n.held = n.held[:2]
	}
}

func TestFastestFinishKeepsToRegionsAndInventories(t *testing.T) {
	now := time.Now()
	nodes := fleetOf(1, 1, 4)
	nodes[0].region, nodes[1].region, nodes[2].region = "shanghai", "shenzhen", "shenzhen"
	sdxl := &inventory.Requirements{Key: "sdxl", Classes: map[string][]string{"CheckpointLoaderSimple": {"4"}},
		Models: []inventory.Model{{Class: "CheckpointLoaderSimple", Input: "ckpt_name", File: "sdxl.safetensors", Nodes: []string{"4"}}}}
	nodes[2].inv = &inventory.Inventory{Classes: []string{"CheckpointLoaderSimple"}, Models: []inventory.Models{{Kind: "ckpt_name",
		Inputs: map[string][]string{"CheckpointLoaderSimple": {"ckpt_name"}}, Files: []string{"sd15.safetensors"}}}}
	p := planner{policy: FastestFinish, regionPenalty: 10 * time.Second}
	for _, tc := range []struct {
		name string
		set  func(*fleet.Ticket)
		want string
	}{
		{"required region", func(t *fleet.Ticket) { t.Region = "shanghai" }, "n0"},
		// The fast node lacks the checkpoint; of the two others the first by id.
		{"needs a checkpoint", func(t *fleet.Ticket) { t.Needs = sdxl }, "n0"},
		{"needs it, in shenzhen", func(t *fleet.Ticket) { t.Needs, t.Region = sdxl, "shenzhen" }, "n1"},
		// Preferring shanghai costs the fast shenzhen node more than its speed gains.
		{"prefers shanghai", func(t *fleet.Ticket) { t.PreferRegion = "shanghai" }, "n0"},
		{"no wish", func(*fleet.Ticket) {}, "n2"},
	} {
		w := scenes(1, 5, "t", now)[0]
		tc.set(&w.t)
		got := p.plan(now, queueOf(w), nodes, nil)
		if len(got) != 1 || got[0].node.id != tc.want {
			t.Errorf("%s: placed %v, want on %s", tc.name, count(got), tc.want)
		}
	}
	w := scenes(1, 5, "t", now)[0]
	w.t.Region = "beijing"
	if got := p.plan(now, queueOf(w), nodes, nil); len(got) != 0 {
		t.Errorf("a scene for a region without nodes was placed: %v", count(got))
	}
}

func TestFastestFinishCountsEachNodesSetupTime(t *testing.T) {
	now := time.Now()
	nodes := fleetOf(1, 1)
	// Equal speeds; the first node's scenes come from far away.
	nodes[0].setup = 2 * time.Second
	p := planner{policy: FastestFinish}
	if got := p.plan(now, queueOf(scenes(1, 5, "t", now)...), nodes, nil); len(got) != 1 || got[0].node.id != "n1" {
		t.Errorf("placed %v, want on the node without the setup time", count(got))
	}
}
