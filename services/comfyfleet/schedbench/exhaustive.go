package schedbench

import (
	"cmp"
	"fmt"
	"math"
	"math/bits"
	"slices"
)

// On one node the best order runs the resident model's scenes first and then each other
// model's scenes together, so a node's finish time depends only on the set of scenes it
// gets: the sum of their d/speed plus one load per model other than the resident one.
// The search therefore assigns scenes to nodes, never orders them.
//
// Identical scenes form a group that is dealt out as counts per node rather than scene by
// scene. Nodes that are interchangeable (same speed, kill time, pools and resident model)
// and in the same state (same finish time, same models loaded) when a group is dealt get
// nonincreasing counts: any schedule can be relabelled to deal them so.

type group struct {
	dur   float64
	pool  int
	model int
	count int
	nodes []int
	cands []cand // scratch for dealing the group
}

// cand is a node the group currently being dealt may go to.
type cand struct {
	node   int
	load   float64 // paid before the group's first scene on the node
	step   float64 // dur/speed
	key    float64 // finish time of one scene of the group on the node
	same   int     // earlier cand interchangeable with this one, -1 none
	cap    int     // most scenes of the group the node can still take
	sufCap int     // sum of cap over this cand and those after it
	k      int     // scenes dealt to it on the current branch
}

type search struct {
	p        *problem
	groups   []group
	kind     []int     // nodes of equal kind are interchangeable
	deadline []float64 // kill time with tolerance
	t        []float64
	loaded   []uint64 // models present on each node

	// For the groups from index i on: their work, models and nodes, and the total and
	// least speed of those nodes.
	sufWork     []float64
	sufModels   []uint64
	sufNodes    []uint64
	sufSpeed    []float64
	sufMinSpeed []float64

	best   float64
	steps  int
	budget int
}

// exhaustive returns the optimum of p by branch and bound, given a lower bound lb and the
// makespan ub of a known schedule (+Inf if none). It gives up, returning false, after
// budget steps or when p has more than 64 nodes or models.
func (p *problem) exhaustive(lb, ub float64, budget int) (float64, bool) {
	if !better(lb, ub) {
		return ub, true
	}
	if len(p.speed) > 64 || p.nmodels > 64 {
		return 0, false
	}
	s := &search{p: p, best: ub, budget: budget}
	s.init()
	for _, g := range s.groups {
		if len(g.nodes) == 0 {
			return math.Inf(1), true
		}
	}
	s.next(0, 0)
	if s.steps > s.budget {
		return 0, false
	}
	return s.best, true
}

func (s *search) init() {
	p := s.p
	counts := map[job]int{}
	for _, j := range p.jobs {
		counts[j]++
	}
	for j, c := range counts {
		g := group{dur: j.dur, pool: j.pool, model: j.model, count: c}
		for n := range p.speed {
			if p.serves[n][j.pool] {
				g.nodes = append(g.nodes, n)
			}
		}
		g.cands = make([]cand, len(g.nodes))
		s.groups = append(s.groups, g)
	}
	slices.SortFunc(s.groups, func(a, b group) int {
		return cmp.Or(cmp.Compare(b.dur, a.dur), cmp.Compare(b.count, a.count),
			cmp.Compare(a.pool, b.pool), cmp.Compare(a.model, b.model))
	})

	kinds := map[string]int{}
	s.kind = make([]int, len(p.speed))
	s.t = make([]float64, len(p.speed))
	s.loaded = make([]uint64, len(p.speed))
	s.deadline = make([]float64, len(p.speed))
	for n := range p.speed {
		s.deadline[n] = p.kill[n] + tol(p.kill[n])
		key := fmt.Sprint(p.speed[n], p.kill[n], p.resident[n], p.serves[n])
		k, ok := kinds[key]
		if !ok {
			k = len(kinds)
			kinds[key] = k
		}
		s.kind[n] = k
		if p.resident[n] >= 0 {
			s.loaded[n] = 1 << p.resident[n]
		}
	}

	G := len(s.groups)
	s.sufWork = make([]float64, G+1)
	s.sufModels = make([]uint64, G+1)
	s.sufNodes = make([]uint64, G+1)
	s.sufSpeed = make([]float64, G+1)
	s.sufMinSpeed = make([]float64, G+1)
	for i := G - 1; i >= 0; i-- {
		g := &s.groups[i]
		s.sufWork[i] = s.sufWork[i+1] + float64(g.count)*g.dur
		s.sufModels[i] = s.sufModels[i+1]
		if g.model >= 0 {
			s.sufModels[i] |= 1 << g.model
		}
		s.sufNodes[i] = s.sufNodes[i+1]
		for _, n := range g.nodes {
			s.sufNodes[i] |= 1 << n
		}
		s.sufMinSpeed[i] = math.Inf(1)
		for x := s.sufNodes[i]; x != 0; x &= x - 1 {
			n := bits.TrailingZeros64(x)
			s.sufSpeed[i] += p.speed[n]
			s.sufMinSpeed[i] = min(s.sufMinSpeed[i], p.speed[n])
		}
	}
}

// bound is a lower bound of any completion of the current branch, whose makespan so far
// is cur, before group gi is dealt.
func (s *search) bound(gi int, cur float64) float64 {
	p := s.p
	lb := cur

	need := s.sufWork[gi]
	var present uint64
	for n := range s.loaded {
		present |= s.loaded[n]
	}
	for x := s.sufNodes[gi]; x != 0; x &= x - 1 {
		n := bits.TrailingZeros64(x)
		need += p.speed[n] * s.t[n]
	}
	if forced := bits.OnesCount64(s.sufModels[gi] &^ present); forced > 0 {
		need += float64(forced) * p.load * s.sufMinSpeed[gi]
	}
	lb = max(lb, need/s.sufSpeed[gi])

	g := &s.groups[gi]
	first := math.Inf(1)
	for _, n := range g.nodes {
		f := s.t[n] + g.dur/p.speed[n]
		if g.model >= 0 && s.loaded[n]&(1<<g.model) == 0 {
			f += p.load
		}
		if f <= s.deadline[n] {
			first = min(first, f)
		}
	}
	return max(lb, first)
}

// next deals group gi and the ones after it.
func (s *search) next(gi int, cur float64) {
	if gi == len(s.groups) {
		if better(cur, s.best) {
			s.best = cur
		}
		return
	}
	if !better(s.bound(gi, cur), s.best) {
		return
	}
	p := s.p
	g := &s.groups[gi]
	cs := g.cands
	for i, n := range g.nodes {
		c := cand{node: n, step: g.dur / p.speed[n], same: -1}
		if g.model >= 0 && s.loaded[n]&(1<<g.model) == 0 {
			c.load = p.load
		}
		c.key = s.t[n] + c.load + c.step
		cs[i] = c
	}
	for i := 1; i < len(cs); i++ {
		for j := i; j > 0 && cs[j].key < cs[j-1].key; j-- {
			cs[j], cs[j-1] = cs[j-1], cs[j]
		}
	}
	for i := range cs {
		c := &cs[i]
		n := c.node
		for j := i - 1; j >= 0; j-- {
			m := cs[j].node
			if s.kind[m] == s.kind[n] && s.t[m] == s.t[n] && s.loaded[m] == s.loaded[n] {
				c.same = j
				break
			}
		}
		c.cap = s.capacity(c, g.count)
	}
	sum := 0
	for i := len(cs) - 1; i >= 0; i-- {
		sum += cs[i].cap
		cs[i].sufCap = sum
	}
	s.deal(gi, 0, g.count, cur)
}

// capacity is the most scenes of a group of count scenes that c's node can take and still
// finish before its kill and before the best makespan found.
func (s *search) capacity(c *cand, count int) int {
	n := c.node
	t := s.t[n]
	ok := func(k int) bool {
		f := t + c.load + float64(k)*c.step
		return f <= s.deadline[n] && better(f, s.best)
	}
	if !ok(1) {
		return 0
	}
	if c.step == 0 {
		return count
	}
	limit := min(s.p.kill[n], s.best)
	k := count
	if most := (limit - t - c.load) / c.step; most < float64(count) {
		k = max(1, int(most))
	}
	for k > 1 && !ok(k) {
		k--
	}
	for k < count && ok(k+1) {
		k++
	}
	return k
}

// deal gives rem scenes of group gi to the cands from i on.
func (s *search) deal(gi, i, rem int, cur float64) {
	s.steps++
	if s.steps > s.budget {
		return
	}
	if rem == 0 {
		s.next(gi+1, cur)
		return
	}
	g := &s.groups[gi]
	cs := g.cands
	if i == len(cs) || rem > cs[i].sufCap {
		return
	}
	c := &cs[i]
	n := c.node
	most := min(rem, c.cap)
	if c.same >= 0 {
		most = min(most, cs[c.same].k)
	}
	t0, loaded0 := s.t[n], s.loaded[n]
	for k := most; k >= 1; k-- {
		f := t0 + c.load + float64(k)*c.step
		if f > s.deadline[n] || !better(f, s.best) {
			continue
		}
		c.k = k
		s.t[n] = f
		if g.model >= 0 {
			s.loaded[n] = loaded0 | 1<<g.model
		}
		s.deal(gi, i+1, rem-k, max(cur, f))
		if s.steps > s.budget {
			break
		}
	}
	s.t[n], s.loaded[n] = t0, loaded0
	c.k = 0
	s.deal(gi, i+1, rem, cur)
}
