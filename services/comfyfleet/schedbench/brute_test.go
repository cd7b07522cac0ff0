package schedbench

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"
)

// naive is the least makespan over every assignment of scenes to nodes and every order of
// each node's scenes, simulated scene by scene.
func naive(nodes []Node, scenes []Scene, load float64) float64 {
	best := math.Inf(1)
	on := make([][]Scene, len(nodes))
	var assign func(i int)
	assign = func(i int) {
		if i == len(scenes) {
			makespan := 0.0
			for n, list := range on {
				makespan = max(makespan, bestOrder(nodes[n], list, load))
			}
			best = min(best, makespan)
			return
		}
		for n, node := range nodes {
			if !(node.Speed > 0) || !slices.Contains(node.Pools, scenes[i].Pool) {
				continue
			}
			on[n] = append(on[n], scenes[i])
			assign(i + 1)
			on[n] = on[n][:len(on[n])-1]
		}
	}
	assign(0)
	return best
}

// bestOrder is the least finish time of node running list in any order, +Inf if every
// order runs past its kill.
func bestOrder(node Node, list []Scene, load float64) float64 {
	best := math.Inf(1)
	order := slices.Clone(list)
	var permute func(k int)
	permute = func(k int) {
		if k == len(order) {
			t, model := 0.0, node.Model
			for _, s := range order {
				if s.Model != "" && s.Model != model {
					t += load
					model = s.Model
				}
				t += s.Duration / node.Speed
				if node.KilledAt > 0 && t > node.KilledAt+1e-9 {
					return
				}
			}
			best = min(best, t)
			return
		}
		for i := k; i < len(order); i++ {
			order[k], order[i] = order[i], order[k]
			permute(k + 1)
			order[k], order[i] = order[i], order[k]
		}
	}
	permute(0)
	return best
}

func randomInstance(r *rand.Rand, maxScenes, maxNodes int, identical bool) ([]Node, []Scene, float64) {
	pools := []string{"img", "vid"}
	models := []string{"", "A", "B", "C"}
	nodes := make([]Node, 1+r.IntN(maxNodes))
	for i := range nodes {
		n := Node{
			ID:    fmt.Sprint(i),
			Speed: []float64{0.5, 1, 1, 2, 3}[r.IntN(5)],
			Model: models[r.IntN(len(models))],
		}
		switch r.IntN(4) {
		case 0:
			n.Pools = []string{"vid"}
		case 1:
			n.Pools = []string{"img", "vid"}
		default:
			n.Pools = []string{"img"}
		}
		if r.IntN(5) == 0 {
			n.KilledAt = float64(1 + r.IntN(12))
		}
		nodes[i] = n
	}
	scenes := make([]Scene, 1+r.IntN(maxScenes))
	for i := range scenes {
		scenes[i] = Scene{
			Duration: float64(1 + r.IntN(6)),
			Pool:     pools[r.IntN(4)/3],
			Model:    models[r.IntN(len(models))],
		}
		if identical {
			scenes[i] = scenes[0]
		}
	}
	load := []float64{0, 1, 2.5}[r.IntN(3)]
	return nodes, scenes, load
}

func TestOptimumAgainstNaive(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	for i := range 400 {
		nodes, scenes, load := randomInstance(r, 7, 3, i%4 == 0)
		want := naive(nodes, scenes, load)
		got := Optimum(nodes, scenes, load)
		if !near(got.Makespan, want) || !got.Exact {
			t.Fatalf("instance %d: Optimum = %+v, naive %v\nnodes %+v\nscenes %+v\nload %v", i, got, want, nodes, scenes, load)
		}

		p := newProblem(nodes, scenes, load)
		if len(p.speed) == 0 {
			continue
		}
		if v, ok := p.exhaustive(0, math.Inf(1), exhaustiveBudget); !ok || !near(v, want) {
			t.Fatalf("instance %d: exhaustive = %v, %v; naive %v\nnodes %+v\nscenes %+v\nload %v", i, v, ok, want, nodes, scenes, load)
		}
		if lb, _ := p.lowerBound(); lb > want+tol(want) {
			t.Fatalf("instance %d: lower bound %v above naive %v\nnodes %+v\nscenes %+v\nload %v", i, lb, want, nodes, scenes, load)
		}
		if ub := p.heuristic(); ub < want-tol(want) {
			t.Fatalf("instance %d: heuristic %v below naive %v\nnodes %+v\nscenes %+v\nload %v", i, ub, want, nodes, scenes, load)
		}
		if p.identical() {
			if v := p.greedyIdentical(); !near(v, want) {
				t.Fatalf("instance %d: greedy %v, naive %v\nnodes %+v\nscenes %+v\nload %v", i, v, want, nodes, scenes, load)
			}
		}
	}
}

// byAssignment is the least makespan over every assignment of scenes to nodes, a node's
// finish time taken from its best order: its scenes' time plus one load per model it needs
// other than its resident one.
func byAssignment(p *problem) float64 {
	best := math.Inf(1)
	t := make([]float64, len(p.speed))
	has := make([]map[int]bool, len(p.speed))
	for n := range has {
		has[n] = map[int]bool{p.resident[n]: true}
	}
	var assign func(i int)
	assign = func(i int) {
		if i == len(p.jobs) {
			best = min(best, slices.Max(append([]float64{0}, t...)))
			return
		}
		j := p.jobs[i]
		for n := range p.speed {
			if !p.serves[n][j.pool] {
				continue
			}
			t0, had := t[n], has[n][j.model]
			t[n] += j.dur / p.speed[n]
			if j.model >= 0 && !had {
				t[n] += p.load
				has[n][j.model] = true
			}
			if fits(t[n], p.kill[n]) {
				assign(i + 1)
			}
			t[n] = t0
			if !had {
				delete(has[n], j.model)
			}
		}
	}
	assign(0)
	return best
}

func TestExhaustiveAgainstAssignments(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	for i := range 60 {
		nodes, scenes, load := randomInstance(r, 10, 4, false)
		// Repeat scenes and nodes so that the symmetry breaking has work to do.
		scenes = append(scenes, scenes[:len(scenes)/2]...)
		nodes = append(nodes, nodes[0])
		p := newProblem(nodes, scenes, load)
		if len(p.jobs) > 11 || len(p.speed) > 4 {
			continue
		}
		want := byAssignment(p)
		if v, ok := p.exhaustive(0, math.Inf(1), exhaustiveBudget); !ok || !near(v, want) {
			t.Fatalf("instance %d: exhaustive = %v, %v; want %v\nnodes %+v\nscenes %+v\nload %v", i, v, ok, want, nodes, scenes, load)
		}
	}
}

func TestListLayoutIsASchedule(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	for i := range 300 {
		nodes, scenes, load := randomInstance(r, 30, 6, false)
		p := newProblem(nodes, scenes, load)
		order := make([]int, len(p.jobs))
		for k := range order {
			order[k] = k
		}
		l := p.listLayout(order)
		if l == nil {
			continue
		}
		for n := range p.speed {
			finish := 0.0
			models := map[int]bool{}
			for k, on := range l.on {
				if on != n {
					continue
				}
				j := p.jobs[k]
				if !p.serves[n][j.pool] {
					t.Fatalf("instance %d: scene %d on node %d outside its pool", i, k, n)
				}
				finish += j.dur / p.speed[n]
				if j.model >= 0 && j.model != p.resident[n] {
					models[j.model] = true
				}
			}
			finish += float64(len(models)) * load
			if !near(l.t[n], finish) || !fits(finish, p.kill[n]) {
				t.Fatalf("instance %d: node %d finishes at %v, layout says %v, kill %v", i, n, finish, l.t[n], p.kill[n])
			}
		}
		if got := p.listSchedule(order); !near(got, slices.Max(l.t)) {
			t.Fatalf("instance %d: listSchedule %v, layout %v", i, got, slices.Max(l.t))
		}
	}
}

func TestExhaustiveGivesUp(t *testing.T) {
	nodes, scenes := scattered(rand.New(rand.NewPCG(1, 1)), 14, 8, 3)
	p := newProblem(nodes, scenes, 2.5)
	lb, _ := p.lowerBound()
	if v, ok := p.exhaustive(lb, p.heuristic(), 10); ok {
		t.Errorf("exhaustive with 10 steps = %v, want to give up", v)
	}
}
