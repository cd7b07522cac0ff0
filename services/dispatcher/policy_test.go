package dispatcher

import (
	"fmt"
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
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
		out = append(out, &waiting{seq: uint64(i + 1), item: fleet.WorkItem{JobID: "j" + tenant, Index: i, Tenant: tenant,
			Priority: priority, Pool: "image", Workflow: "txt2img", SubmittedAt: at}})
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
		got := count(p.plan(now, scenes(tc.scenes, 5, "t", now), fleetOf(tc.speeds...)))
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
		nodes[0].held = append(nodes[0].held, &held{item: fleet.WorkItem{Workflow: "txt2img"}, seq: uint64(i)})
	}
	nodes[0].held[0].startedAt = now
	p := planner{policy: FastestFinish}
	if got := p.plan(now, scenes(1, 5, "t", now), nodes); len(got) != 0 {
		t.Errorf("placed %v; want the scene kept for the fast node", count(got))
	}
}

func TestFastestFinishGroupsCheckpoints(t *testing.T) {
	now := time.Now()
	nodes := fleetOf(1, 1)
	nodes[0].model, nodes[1].model = "a.safetensors", "b.safetensors"
	queue := scenes(4, 5, "t", now)
	for i, w := range queue {
		w.model = []string{"a.safetensors", "b.safetensors"}[i%2]
	}
	p := planner{policy: FastestFinish, loadPenalty: 5 * time.Second}
	for _, pl := range p.plan(now, queue, nodes) {
		if want := map[string]string{"n0": "a.safetensors", "n1": "b.safetensors"}[pl.node.id]; pl.w.model != want {
			t.Errorf("scene of %s placed on %s, which has %s loaded", pl.w.model, pl.node.id, want)
		}
	}
}

func TestPriorityFirstThenTenantsInTurn(t *testing.T) {
	now := time.Now()
	queue := append(scenes(3, 1, "a", now), scenes(3, 1, "b", now.Add(time.Second))...)
	urgent := scenes(1, 10, "c", now.Add(time.Hour))[0]
	queue = append(queue, urgent)
	got := order(queue, map[string]int{"a": 0, "b": 0})
	var tenants []string
	for _, w := range got {
		tenants = append(tenants, w.item.Tenant)
	}
	if want := []string{"c", "a", "b", "a", "b", "a", "b"}; !slices.Equal(tenants, want) {
		t.Errorf("order %v, want %v", tenants, want)
	}
	// A tenant already holding scenes yields to one holding none.
	got = order(queue[:6], map[string]int{"a": 2})
	if got[0].item.Tenant != "b" || got[1].item.Tenant != "b" {
		t.Errorf("tenant a holds 2 scenes, yet the order starts %s, %s", got[0].item.Tenant, got[1].item.Tenant)
	}
}

func TestBaselinePoliciesCommitEveryScene(t *testing.T) {
	now := time.Now()
	for policy, want := range map[Policy]map[string]int{
		RoundRobin: {"n0": 2, "n1": 2, "n2": 2},
		LeastConn:  {"n0": 2, "n1": 2, "n2": 2},
	} {
		p := planner{policy: policy}
		if got := count(p.plan(now, scenes(6, 5, "t", now), fleetOf(3, 1, 1))); !maps.Equal(got, want) {
			t.Errorf("%s placed %v, want %v", policy, got, want)
		}
	}
	nodes := fleetOf(3, 1, 1)
	nodes[0].weight = 3
	p := planner{policy: Weighted}
	if got, want := count(p.plan(now, scenes(5, 5, "t", now), nodes)), map[string]int{"n0": 3, "n1": 1, "n2": 1}; !maps.Equal(got, want) {
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
		for _, pl := range p.plan(now, scenes(3, 5, "t", now), nodes) {
			if pl.node.id != "n2" {
				t.Errorf("%s placed an image scene on %s", policy, pl.node.id)
			}
		}
	}
}
