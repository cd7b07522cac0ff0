package schedbench

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

func gpus(pool string, speeds ...float64) []Node {
	nodes := make([]Node, len(speeds))
	for i, s := range speeds {
		nodes[i] = Node{ID: fmt.Sprintf("%s%d", pool, i), Speed: s, Pools: []string{pool}}
	}
	return nodes
}

func work(count int, dur float64, pool, model string) []Scene {
	scenes := make([]Scene, count)
	for i := range scenes {
		scenes[i] = Scene{Duration: dur, Pool: pool, Model: model}
	}
	return scenes
}

func alternating(count int, dur float64, pool string, models ...string) []Scene {
	scenes := make([]Scene, count)
	for i := range scenes {
		scenes[i] = Scene{Duration: dur, Pool: pool, Model: models[i%len(models)]}
	}
	return scenes
}

func near(a, b float64) bool {
	if math.IsInf(a, 1) || math.IsInf(b, 1) {
		return a == b
	}
	return math.Abs(a-b) <= 1e-9*max(1, math.Abs(b))
}

func TestOptimum(t *testing.T) {
	residentA := gpus("img", 1, 1)
	residentA[0].Model = "A"
	killed := gpus("img", 1, 1)
	killed[1].KilledAt = 2
	shared := []Node{
		{ID: "both", Speed: 1, Pools: []string{"img", "vid"}},
		{ID: "img", Speed: 1, Pools: []string{"img"}},
	}
	shortLived := gpus("img", 1)
	shortLived[0].KilledAt = 2

	tests := []struct {
		name   string
		nodes  []Node
		scenes []Scene
		load   float64
		want   float64
		method string
	}{
		{"six on one", gpus("img", 1), work(6, 3, "img", ""), 0, 18, MethodIdentical},
		{"six on two", gpus("img", 1, 1), work(6, 3, "img", ""), 0, 9, MethodIdentical},
		{"six on three", gpus("img", 1, 1, 1), work(6, 3, "img", ""), 0, 6, MethodIdentical},
		{"six on six", gpus("img", 1, 1, 1, 1, 1, 1), work(6, 3, "img", ""), 0, 3, MethodIdentical},
		{"six on 3,1,1", gpus("img", 3, 1, 1), work(6, 3, "img", ""), 0, 4, MethodIdentical},
		{"twelve on 3,1,1", gpus("img", 3, 1, 1), work(12, 3, "img", ""), 0, 8, MethodIdentical},
		{"two on 10,1", gpus("img", 10, 1), work(2, 3, "img", ""), 0, 0.6, MethodIdentical},
		{"hundred on 4,4,2,2,1,1,1,1", gpus("img", 4, 4, 2, 2, 1, 1, 1, 1), work(100, 3, "img", ""), 0, 19.5, MethodIdentical},
		{"six videos on three", gpus("vid", 1, 1, 1), work(6, 480, "vid", ""), 0, 960, MethodIdentical},
		{"alternating checkpoints", gpus("img", 1, 1), alternating(8, 2, "img", "A", "B"), 3, 11, MethodExhaustive},
		{"alternating checkpoints, A resident", residentA, alternating(8, 2, "img", "A", "B"), 3, 11, MethodExhaustive},
		{"one checkpoint, A resident", residentA, work(4, 2, "img", "A"), 3, 6, MethodIdentical},
		{"a kill", killed, work(6, 1, "img", ""), 0, 4, MethodIdentical},
		{"a kill, mixed scenes", killed, append(work(3, 1, "img", ""), work(3, 1, "img", "A")...), 0, 4, MethodExhaustive},
		{"no node for the pool", gpus("img", 1, 1), append(work(2, 1, "img", ""), work(1, 1, "vid", "")...), 0, math.Inf(1), MethodInfeasible},
		{"only a stopped node", gpus("img", 0), work(1, 1, "img", ""), 0, math.Inf(1), MethodInfeasible},
		{"too long for a dying node", shortLived, work(1, 3, "img", ""), 0, math.Inf(1), MethodInfeasible},
		{"too much for a dying node", shortLived, work(3, 1, "img", ""), 0, math.Inf(1), MethodInfeasible},
		{"no scenes", gpus("img", 1), nil, 0, 0, MethodNoScenes},
		{
			"disjoint pools",
			append(gpus("img", 1, 1), gpus("vid", 1, 1, 1)...),
			append(work(6, 3, "img", ""), work(3, 480, "vid", "")...),
			0, 480, MethodIdentical,
		},
		{
			"disjoint pools, different methods",
			append(gpus("img", 2, 1), gpus("vid", 1, 1)...),
			append(append(work(2, 3, "img", "A"), work(2, 2, "img", "B")...), work(60, 4, "vid", "")...),
			1, 120, MethodExhaustive + " + " + MethodIdentical,
		},
		{
			"shared node",
			shared,
			append(work(1, 4, "vid", ""), work(3, 4, "img", "")...),
			0, 8, MethodExhaustive,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := Optimum(tc.nodes, tc.scenes, tc.load)
			if !near(got.Makespan, tc.want) || !got.Exact || got.Method != tc.method {
				t.Errorf("Optimum = %+v, want %v exact by %q", got, tc.want, tc.method)
			}
			if len(tc.scenes) == 0 || len(tc.scenes) > 12 {
				return
			}
			p := newProblem(tc.nodes, tc.scenes, tc.load)
			if v, ok := p.exhaustive(0, math.Inf(1), exhaustiveBudget); !ok || !near(v, tc.want) {
				t.Errorf("exhaustive = %v, %v; want %v", v, ok, tc.want)
			}
		})
	}
}

func TestOptimumHundredAboveWorkOverCapacity(t *testing.T) {
	got := Optimum(gpus("img", 4, 4, 2, 2, 1, 1, 1, 1), work(100, 3, "img", ""), 0)
	if got.Makespan < 300.0/16 {
		t.Errorf("Optimum = %v, below work / capacity %v", got.Makespan, 300.0/16)
	}
}

func TestOptimumLargeGivesLowerBound(t *testing.T) {
	nodes := gpus("img", 3, 2, 2, 1, 1)
	nodes[1].Model = "A"
	var scenes []Scene
	total := 0.0
	for i := range 40 {
		scenes = append(scenes, Scene{Duration: float64(1 + i%7), Pool: "img", Model: []string{"A", "B"}[i%2]})
		total += float64(1 + i%7)
	}
	got := Optimum(nodes, scenes, 2.5)
	p := newProblem(nodes, scenes, 2.5)
	lb, _ := p.lowerBound()
	ub := p.heuristic()
	if got.Makespan < lb || got.Makespan > ub {
		t.Errorf("Optimum = %+v, outside [%v, %v]", got, lb, ub)
	}
	if !got.Exact && got.Method != MethodCapacity && got.Method != MethodLargest {
		t.Errorf("inexact Optimum = %+v, want a lower-bound method", got)
	}
	if got.Makespan < total/9 {
		t.Errorf("Optimum = %v, below work / capacity %v", got.Makespan, total/9)
	}
}

func TestOptimumExhaustiveSizes(t *testing.T) {
	tests := []struct {
		name   string
		nodes  []Node
		scenes []Scene
	}{
		{"12 scenes on 3 nodes, two models", gpus("img", 1, 1.5, 2), mixed(12, 2)},
		{"14 scenes on 8 equal nodes", gpus("img", 1, 1, 1, 1, 1, 1, 1, 1), mixed(14, 2)},
		{"14 scenes on 8 nodes", gpus("img", 3, 2, 2, 1.5, 1, 1, 1, 0.5), mixed(14, 3)},
	}
	r := rand.New(rand.NewPCG(7, 8))
	for i := range 5 {
		nodes, scenes := scattered(r, 12, 3, 2)
		tests = append(tests, struct {
			name   string
			nodes  []Node
			scenes []Scene
		}{fmt.Sprintf("12 scattered scenes on 3 nodes, two models #%d", i), nodes, scenes})
		nodes, scenes = scattered(r, 14, 8, 3)
		tests = append(tests, struct {
			name   string
			nodes  []Node
			scenes []Scene
		}{fmt.Sprintf("14 scattered scenes on 8 nodes #%d", i), nodes, scenes})
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := Optimum(tc.nodes, tc.scenes, 2.5)
			if !got.Exact || got.Method != MethodExhaustive {
				t.Errorf("Optimum = %+v, want exhaustive", got)
			}
		})
	}
}

// scattered returns nodes of random speeds, some holding model A, and scenes of random
// durations needing one of the first models checkpoints.
func scattered(r *rand.Rand, scenes, nodes, models int) ([]Node, []Scene) {
	ns := make([]Node, nodes)
	for i := range ns {
		ns[i] = Node{ID: fmt.Sprint(i), Speed: 0.5 + 3*r.Float64(), Pools: []string{"img"}}
		if r.IntN(3) == 0 {
			ns[i].Model = "A"
		}
	}
	ss := make([]Scene, scenes)
	for i := range ss {
		ss[i] = Scene{Duration: 1 + 20*r.Float64(), Pool: "img", Model: string(rune('A' + r.IntN(models)))}
	}
	return ns, ss
}

// mixed returns count scenes of various durations cycling through models checkpoints.
func mixed(count, models int) []Scene {
	scenes := make([]Scene, count)
	for i := range scenes {
		scenes[i] = Scene{
			Duration: float64(2 + (i*7)%11),
			Pool:     "img",
			Model:    string(rune('A' + i%models)),
		}
	}
	return scenes
}

func BenchmarkOptimumTwelveOnThree(b *testing.B) {
	nodes, scenes := gpus("img", 1, 1.5, 2), mixed(12, 2)
	for b.Loop() {
		Optimum(nodes, scenes, 2.5)
	}
}

func BenchmarkOptimumTwelveScatteredOnThree(b *testing.B) {
	nodes, scenes := scattered(rand.New(rand.NewPCG(1, 1)), 12, 3, 2)
	for b.Loop() {
		Optimum(nodes, scenes, 2.5)
	}
}

func BenchmarkOptimumFourteenScatteredOnEight(b *testing.B) {
	nodes, scenes := scattered(rand.New(rand.NewPCG(1, 1)), 14, 8, 3)
	for b.Loop() {
		Optimum(nodes, scenes, 2.5)
	}
}

func BenchmarkOptimumFourteenOnEight(b *testing.B) {
	nodes, scenes := gpus("img", 3, 2, 2, 1.5, 1, 1, 1, 0.5), mixed(14, 3)
	for b.Loop() {
		Optimum(nodes, scenes, 2.5)
	}
}

func TestLowerBound(t *testing.T) {
	killed := gpus("img", 1, 1)
	killed[1].KilledAt = 2
	tests := []struct {
		name   string
		nodes  []Node
		scenes []Scene
		load   float64
		want   float64
		method string
	}{
		{"hundred on 4,4,2,2,1,1,1,1", gpus("img", 4, 4, 2, 2, 1, 1, 1, 1), work(100, 3, "img", ""), 0, 18.75, MethodCapacity},
		{"a kill", killed, work(6, 1, "img", ""), 0, 4, MethodCapacity},
		{"two loads", gpus("img", 1, 1), alternating(8, 2, "img", "A", "B"), 3, 11, MethodCapacity},
		{"one long scene", gpus("img", 2, 1), append(work(1, 10, "img", "A"), work(2, 1, "img", "")...), 1, 6, MethodLargest},
		{
			"pools sharing a node",
			[]Node{{Speed: 1, Pools: []string{"img"}}, {Speed: 1, Pools: []string{"img", "vid"}}, {Speed: 1, Pools: []string{"vid"}}},
			append(work(4, 3, "img", ""), work(2, 3, "vid", "")...),
			0, 6, MethodCapacity,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, method := newProblem(tc.nodes, tc.scenes, tc.load).lowerBound()
			if !near(got, tc.want) || method != tc.method {
				t.Errorf("lowerBound = %v by %q, want %v by %q", got, method, tc.want, tc.method)
			}
		})
	}
}
