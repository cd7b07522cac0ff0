// Package schedbench computes the optimum makespan of a scheduling scenario, the yardstick
// against which the scheduling benchmark measures its policies.
//
// A scenario is a set of GPU nodes and a set of independent scenes. A node runs one scene
// at a time, without preemption, and only scenes of the pools it serves. Running a scene
// whose checkpoint is not resident first loads it, which takes a fixed time on any node and
// evicts the previous one. A node may die at a known time; what it runs must finish by then.
// The optimum knows everything in advance.
package schedbench

import (
	"math"
	"strings"
)

// Node is a GPU of the benchmark.
type Node struct {
	// ID names the node.
	ID string
	// Speed is the node's relative speed: a scene of Duration d takes d/Speed seconds on it.
	// A node with Speed <= 0 runs nothing.
	Speed float64
	// Pools lists the pools the node serves.
	Pools []string
	// Model is the checkpoint resident at the start ("" none).
	Model string
	// KilledAt is the time, in seconds after the start, when the node dies for good;
	// 0 means never.
	KilledAt float64
}

// Scene is one unit of work.
type Scene struct {
	// Duration is the scene's time in seconds at speed 1, without model loading.
	Duration float64
	// Pool is the pool whose nodes may run the scene.
	Pool string
	// Model is the checkpoint the scene needs ("" none: it never pays a load).
	Model string
}

// Bound is the optimum makespan of a scenario, or a proven lower bound of it.
type Bound struct {
	// Makespan is the optimum, or a lower bound of it when Exact is false; +Inf when no
	// schedule can run every scene.
	Makespan float64
	// Exact tells whether Makespan is the optimum rather than a lower bound.
	Exact bool
	// Method names how Makespan was found, e.g. "exhaustive", "greedy (identical scenes)"
	// or "work / capacity"; methods of independent parts are joined by " + ".
	Method string
}

// Method names used in Bound.Method.
const (
	// MethodNoScenes: there is nothing to run, the makespan is 0.
	MethodNoScenes = "no scenes"
	// MethodInfeasible: some scene can run on no living node, the makespan is +Inf.
	MethodInfeasible = "infeasible"
	// MethodExhaustive: branch and bound over all assignments of scenes to nodes.
	MethodExhaustive = "exhaustive"
	// MethodIdentical: all scenes are alike; the earliest-finish greedy is optimal.
	MethodIdentical = "greedy (identical scenes)"
	// MethodMatched: a list schedule's makespan equals the lower bound.
	MethodMatched = "list scheduling meets lower bound"
	// MethodCapacity: lower bound from the work of pools over their nodes' capacity,
	// counting loads that no schedule avoids.
	MethodCapacity = "work / capacity"
	// MethodLargest: lower bound from the scene that takes longest even on its best node.
	MethodLargest = "largest scene"
)

// maxExhaustive is the most scenes of one independent part that Optimum searches
// exhaustively; exhaustiveBudget caps the search steps so that a hard instance falls back
// to a lower bound in a fraction of a second.
const (
	maxExhaustive    = 18
	exhaustiveBudget = 2_000_000
)

// Optimum returns the least makespan any schedule can achieve, knowing everything in advance
// (speeds, scene durations, when nodes die). load is the seconds to load a checkpoint that is
// not resident (not scaled by speed); a node holds one checkpoint at a time.
//
// Pools whose node sets are disjoint are solved apart and the largest makespan is taken.
// A part whose scenes are all alike is solved by a greedy that is optimal for identical
// jobs, a part of at most 18 scenes by branch and bound; a larger part gets a lower bound
// (Exact false) unless a list schedule reaches it. A negative load counts as 0, a negative
// Duration as 0.
func Optimum(nodes []Node, scenes []Scene, load float64) Bound {
	if len(scenes) == 0 {
		return Bound{Makespan: 0, Exact: true, Method: MethodNoScenes}
	}
	if !(load > 0) {
		load = 0
	}
	parts, ok := split(nodes, scenes)
	if !ok {
		return infeasible()
	}
	var lb, ub float64
	exact := true
	var methods []string
	for _, part := range parts {
		r := solve(newProblem(part.nodes, part.scenes, load))
		if math.IsInf(r.lb, 1) {
			return infeasible()
		}
		lb, ub = max(lb, r.lb), max(ub, r.ub)
		exact = exact && r.exact
		if !contains(methods, r.method) {
			methods = append(methods, r.method)
		}
	}
	method := strings.Join(methods, " + ")
	switch {
	case exact:
		return Bound{Makespan: lb, Exact: true, Method: method}
	case ub <= lb+tol(lb):
		return Bound{Makespan: ub, Exact: true, Method: method}
	default:
		return Bound{Makespan: lb, Exact: false, Method: method}
	}
}

func infeasible() Bound {
	return Bound{Makespan: math.Inf(1), Exact: true, Method: MethodInfeasible}
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// part is an independent subproblem: the scenes of pools connected through shared nodes,
// and the nodes able to run them.
type part struct {
	nodes  []Node
	scenes []Scene
}

// split groups the scenes into parts whose node sets are disjoint. It reports false when
// some scene's pool has no node with a positive speed.
func split(nodes []Node, scenes []Scene) ([]part, bool) {
	poolIdx := map[string]int{}
	var pools []string
	for _, s := range scenes {
		if _, ok := poolIdx[s.Pool]; !ok {
			poolIdx[s.Pool] = len(pools)
			pools = append(pools, s.Pool)
		}
	}
	parent := make([]int, len(pools))
	for i := range parent {
		parent[i] = i
	}
	find := func(i int) int {
		for parent[i] != i {
			parent[i] = parent[parent[i]]
			i = parent[i]
		}
		return i
	}
	served := make([]bool, len(pools))
	nodeRoot := make([]int, len(nodes))
	for i, n := range nodes {
		nodeRoot[i] = -1
		if !(n.Speed > 0) {
			continue
		}
		for _, p := range n.Pools {
			j, ok := poolIdx[p]
			if !ok {
				continue
			}
			served[j] = true
			if nodeRoot[i] < 0 {
				nodeRoot[i] = j
			} else {
				parent[find(j)] = find(nodeRoot[i])
			}
		}
	}
	for _, ok := range served {
		if !ok {
			return nil, false
		}
	}
	partOf := map[int]int{}
	var parts []part
	at := func(pool int) *part {
		r := find(pool)
		k, ok := partOf[r]
		if !ok {
			k = len(parts)
			partOf[r] = k
			parts = append(parts, part{})
		}
		return &parts[k]
	}
	for _, s := range scenes {
		p := at(poolIdx[s.Pool])
		p.scenes = append(p.scenes, s)
	}
	for i, n := range nodes {
		if nodeRoot[i] >= 0 {
			p := at(nodeRoot[i])
			p.nodes = append(p.nodes, n)
		}
	}
	return parts, true
}

// result is the outcome for one part: lb <= optimum <= ub, with lb == ub when exact.
type result struct {
	lb, ub float64
	exact  bool
	method string
}

// solve picks the strongest method that applies to one part.
func solve(p *problem) result {
	lb, lbMethod := p.lowerBound()
	if math.IsInf(lb, 1) {
		return result{lb: lb, ub: lb, exact: true, method: MethodInfeasible}
	}
	if p.identical() {
		v := p.greedyIdentical()
		return result{lb: v, ub: v, exact: true, method: MethodIdentical}
	}
	ub := p.heuristic()
	if len(p.jobs) <= maxExhaustive {
		if v, ok := p.exhaustive(lb, ub, exhaustiveBudget); ok {
			return result{lb: v, ub: v, exact: true, method: MethodExhaustive}
		}
	}
	if ub <= lb+tol(lb) {
		return result{lb: ub, ub: ub, exact: true, method: MethodMatched}
	}
	return result{lb: lb, ub: ub, exact: false, method: lbMethod}
}

// tol is the slack allowed in comparisons of times near x.
func tol(x float64) float64 {
	return 1e-9 * max(1, math.Abs(x))
}

// fits reports whether work finishing at f is done by the kill time kill (+Inf: never).
func fits(f, kill float64) bool {
	return f <= kill+tol(kill)
}

// better reports whether makespan a improves on makespan b (+Inf: none yet).
func better(a, b float64) bool {
	if math.IsInf(b, 1) {
		return a < b
	}
	return a < b-tol(b)
}
