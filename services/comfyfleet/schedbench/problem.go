package schedbench

import (
	"cmp"
	"math"
	"slices"
)

// problem is a part in indexed form. Only nodes with a positive speed serving one of the
// part's pools are kept; models are those the scenes need, so a resident checkpoint no
// scene needs counts as none.
type problem struct {
	load     float64
	speed    []float64
	kill     []float64 // +Inf: never
	resident []int     // model index, -1 none
	serves   [][]bool  // [node][pool]
	npools   int
	nmodels  int
	jobs     []job
}

type job struct {
	dur   float64
	pool  int
	model int // -1: none
}

func newProblem(nodes []Node, scenes []Scene, load float64) *problem {
	p := &problem{load: load}
	pools := map[string]int{}
	models := map[string]int{}
	for _, s := range scenes {
		if _, ok := pools[s.Pool]; !ok {
			pools[s.Pool] = len(pools)
		}
		m := -1
		if s.Model != "" {
			var ok bool
			if m, ok = models[s.Model]; !ok {
				m = len(models)
				models[s.Model] = m
			}
		}
		p.jobs = append(p.jobs, job{dur: max(s.Duration, 0), pool: pools[s.Pool], model: m})
	}
	p.npools, p.nmodels = len(pools), len(models)
	for _, n := range nodes {
		if !(n.Speed > 0) {
			continue
		}
		serves := make([]bool, p.npools)
		serving := false
		for _, name := range n.Pools {
			if i, ok := pools[name]; ok {
				serves[i], serving = true, true
			}
		}
		if !serving {
			continue
		}
		kill := math.Inf(1)
		if n.KilledAt > 0 {
			kill = n.KilledAt
		}
		res := -1
		if m, ok := models[n.Model]; ok && n.Model != "" {
			res = m
		}
		p.speed = append(p.speed, n.Speed)
		p.kill = append(p.kill, kill)
		p.resident = append(p.resident, res)
		p.serves = append(p.serves, serves)
	}
	return p
}

// firstLoad is the load node n pays before its first scene of model m.
func (p *problem) firstLoad(n, m int) float64 {
	if m < 0 || p.resident[n] == m {
		return 0
	}
	return p.load
}

// lowerBound returns a proven lower bound of the part's optimum and the name of the
// argument that gave it; +Inf proves that no schedule exists.
//
// Every scene finishes no earlier than on its best node alone (largest scene). For a set
// of pools, the nodes serving them must do all their work, plus one load of every model
// that none of those pools' nodes holds, on the capacity they have until the makespan
// (work / capacity); a killed node contributes only up to its kill.
func (p *problem) lowerBound() (float64, string) {
	largest := 0.0
	for _, j := range p.jobs {
		best := math.Inf(1)
		for n := range p.speed {
			if !p.serves[n][j.pool] {
				continue
			}
			if f := p.firstLoad(n, j.model) + j.dur/p.speed[n]; fits(f, p.kill[n]) {
				best = min(best, f)
			}
		}
		largest = max(largest, best)
	}
	if math.IsInf(largest, 1) {
		return largest, MethodInfeasible
	}

	// forced[pool][model]: a scene of the pool needs the model and no node of the pool
	// holds it at the start.
	forced := make([][]bool, p.npools)
	for i := range forced {
		forced[i] = make([]bool, p.nmodels)
	}
	work := make([]float64, p.npools)
	for _, j := range p.jobs {
		work[j.pool] += j.dur
		if j.model < 0 {
			continue
		}
		held := false
		for n := range p.speed {
			if p.serves[n][j.pool] && p.resident[n] == j.model {
				held = true
				break
			}
		}
		if !held {
			forced[j.pool][j.model] = true
		}
	}
	capacity := 0.0
	in := make([]bool, p.npools)
	try := func() {
		capacity = max(capacity, p.capacityBound(in, work, forced))
	}
	if p.npools <= 10 {
		for set := 1; set < 1<<p.npools; set++ {
			for i := range in {
				in[i] = set&(1<<i) != 0
			}
			try()
		}
	} else {
		for i := range in {
			clear(in)
			in[i] = true
			try()
		}
		for i := range in {
			in[i] = true
		}
		try()
	}
	if math.IsInf(capacity, 1) {
		return capacity, MethodInfeasible
	}
	if largest >= capacity {
		return largest, MethodLargest
	}
	return capacity, MethodCapacity
}

// capacityBound is the least time by which the nodes serving the pools in `in` can do the
// work of those pools and the forced loads.
func (p *problem) capacityBound(in []bool, work []float64, forced [][]bool) float64 {
	need := 0.0
	for i, ok := range in {
		if ok {
			need += work[i]
		}
	}
	type capa struct{ speed, kill float64 }
	var caps []capa
	minSpeed := math.Inf(1)
	for n := range p.speed {
		for i, ok := range in {
			if ok && p.serves[n][i] {
				caps = append(caps, capa{p.speed[n], p.kill[n]})
				minSpeed = min(minSpeed, p.speed[n])
				break
			}
		}
	}
	if p.load > 0 {
		loads := 0
		for m := range p.nmodels {
			for i, ok := range in {
				if ok && forced[i][m] {
					loads++
					break
				}
			}
		}
		need += float64(loads) * p.load * minSpeed
	}
	if need <= 0 {
		return 0
	}
	slices.SortFunc(caps, func(a, b capa) int { return cmp.Compare(a.kill, b.kill) })
	slope := 0.0
	for _, c := range caps {
		slope += c.speed
	}
	done, at := 0.0, 0.0
	for _, c := range caps {
		if math.IsInf(c.kill, 1) {
			break
		}
		next := done + slope*(c.kill-at)
		if next >= need-tol(need) {
			return min(at+(need-done)/slope, c.kill)
		}
		done, at, slope = next, c.kill, slope-c.speed
	}
	if slope <= 0 {
		return math.Inf(1)
	}
	return at + (need-done)/slope
}

// identical reports whether all scenes have the same duration, pool and model.
func (p *problem) identical() bool {
	for _, j := range p.jobs[1:] {
		if j != p.jobs[0] {
			return false
		}
	}
	return true
}

// greedyIdentical gives each of the identical scenes in turn to the node where it would
// finish earliest. The k-th scene of node n finishes at f_n(k) = load_n + k·d/speed_n,
// nondecreasing in k, so the greedy takes the len(jobs) smallest of all the f_n(k), and
// no schedule can have a makespan below the len(jobs)-th smallest: it is optimal, with
// loads and kills too (a value past the node's kill is +Inf).
func (p *problem) greedyIdentical() float64 {
	j := p.jobs[0]
	count := make([]int, len(p.speed))
	makespan := 0.0
	for range p.jobs {
		best, at := math.Inf(1), -1
		for n := range p.speed {
			if !p.serves[n][j.pool] {
				continue
			}
			f := p.firstLoad(n, j.model) + float64(count[n]+1)*(j.dur/p.speed[n])
			if fits(f, p.kill[n]) && f < best {
				best, at = f, n
			}
		}
		if at < 0 {
			return math.Inf(1)
		}
		count[at]++
		makespan = max(makespan, best)
	}
	return makespan
}

// heuristic returns the makespan of the best of a few list schedules, each improved by
// local search (+Inf if all of them strand a scene).
func (p *problem) heuristic() float64 {
	order := make([]int, len(p.jobs))
	for i := range order {
		order[i] = i
	}
	longest := func(a, b int) int { return cmp.Compare(p.jobs[b].dur, p.jobs[a].dur) }
	best := math.Inf(1)

	slices.SortStableFunc(order, longest)
	best = min(best, p.listSchedule(order))

	slices.SortStableFunc(order, func(a, b int) int {
		return cmp.Or(cmp.Compare(p.jobs[a].model, p.jobs[b].model), longest(a, b))
	})
	best = min(best, p.listSchedule(order))

	modelWork := make([]float64, p.nmodels+1)
	for _, j := range p.jobs {
		modelWork[j.model+1] += j.dur
	}
	slices.SortStableFunc(order, func(a, b int) int {
		ma, mb := p.jobs[a].model, p.jobs[b].model
		return cmp.Or(cmp.Compare(modelWork[mb+1], modelWork[ma+1]), cmp.Compare(ma, mb), longest(a, b))
	})
	return min(best, p.listSchedule(order))
}

// listSchedule gives the scenes in order each to the node where it finishes earliest, then
// improves the result by local search, and returns the makespan (+Inf if a scene strands).
func (p *problem) listSchedule(order []int) float64 {
	l := p.listLayout(order)
	if l == nil {
		return math.Inf(1)
	}
	return slices.Max(l.t)
}

// listLayout is the layout behind listSchedule, nil if a scene strands.
func (p *problem) listLayout(order []int) *layout {
	l := newLayout(p)
	for _, i := range order {
		j := p.jobs[i]
		best, at := math.Inf(1), -1
		for n := range p.speed {
			if !p.serves[n][j.pool] {
				continue
			}
			if f := l.with(n, i); fits(f, p.kill[n]) && f < best {
				best, at = f, n
			}
		}
		if at < 0 {
			return nil
		}
		l.add(at, i)
	}
	l.improve()
	return l
}

// layout is an assignment of scenes to nodes with each node's finish time.
type layout struct {
	p     *problem
	on    []int     // node of each scene, -1 none
	t     []float64 // finish time of each node
	work  []float64 // sum of d/speed on each node
	count [][]int   // [node][model]: scenes of the model on the node
	loads []int     // loads each node pays
}

func newLayout(p *problem) *layout {
	l := &layout{p: p, on: make([]int, len(p.jobs)), t: make([]float64, len(p.speed)),
		work: make([]float64, len(p.speed)), count: make([][]int, len(p.speed)), loads: make([]int, len(p.speed))}
	for i := range l.on {
		l.on[i] = -1
	}
	for n := range l.count {
		l.count[n] = make([]int, p.nmodels)
	}
	return l
}

// time is a node's finish time with work w and k loads.
func (l *layout) time(w float64, k int) float64 {
	return w + float64(k)*l.p.load
}

// loadDelta is the change in node n's loads when d scenes of model m are added (+1) or
// removed (-1).
func (l *layout) loadDelta(n, m, d int) int {
	if m < 0 || m == l.p.resident[n] {
		return 0
	}
	switch c := l.count[n][m]; {
	case d > 0 && c == 0:
		return 1
	case d < 0 && c == 1:
		return -1
	}
	return 0
}

// with is node n's finish time if scene i is added to it.
func (l *layout) with(n, i int) float64 {
	j := l.p.jobs[i]
	return l.time(l.work[n]+j.dur/l.p.speed[n], l.loads[n]+l.loadDelta(n, j.model, 1))
}

// without is node n's finish time if scene i is taken from it.
func (l *layout) without(n, i int) float64 {
	j := l.p.jobs[i]
	return l.time(l.work[n]-j.dur/l.p.speed[n], l.loads[n]+l.loadDelta(n, j.model, -1))
}

func (l *layout) add(n, i int) {
	j := l.p.jobs[i]
	l.loads[n] += l.loadDelta(n, j.model, 1)
	if j.model >= 0 {
		l.count[n][j.model]++
	}
	l.work[n] += j.dur / l.p.speed[n]
	l.on[i] = n
	l.t[n] = l.time(l.work[n], l.loads[n])
}

func (l *layout) remove(i int) {
	n := l.on[i]
	j := l.p.jobs[i]
	l.loads[n] += l.loadDelta(n, j.model, -1)
	if j.model >= 0 {
		l.count[n][j.model]--
	}
	l.work[n] -= j.dur / l.p.speed[n]
	l.on[i] = -1
	l.t[n] = l.time(l.work[n], l.loads[n])
}

// improve moves single scenes off a latest node, or swaps one with a scene of another
// node, while that ends both nodes before the latest node's finish time.
func (l *layout) improve() {
	p := l.p
	swaps := len(p.jobs) <= 200
	for range min(20*len(p.jobs), 1000) {
		c := 0
		for n := range l.t {
			if l.t[n] > l.t[c] {
				c = n
			}
		}
		if !l.step(c, swaps) {
			return
		}
	}
}

// step makes one improving move of a scene of node c and reports whether it found one.
func (l *layout) step(c int, swaps bool) bool {
	p := l.p
	limit := l.t[c]
	for i, n := range l.on {
		if n != c {
			continue
		}
		ji := p.jobs[i]
		tc := l.without(c, i)
		for m := range p.speed {
			if m == c || !p.serves[m][ji.pool] {
				continue
			}
			if tm := l.with(m, i); better(max(tc, tm), limit) && fits(tm, p.kill[m]) {
				l.remove(i)
				l.add(m, i)
				return true
			}
		}
		if !swaps {
			continue
		}
		for k, m := range l.on {
			if m == c || m < 0 || !p.serves[m][ji.pool] || !p.serves[c][p.jobs[k].pool] || p.jobs[k] == ji {
				continue
			}
			l.remove(i)
			l.remove(k)
			tc, tm := l.with(c, k), l.with(m, i)
			if better(max(tc, tm), limit) && fits(tc, p.kill[c]) && fits(tm, p.kill[m]) {
				l.add(c, k)
				l.add(m, i)
				return true
			}
			l.add(c, i)
			l.add(m, k)
		}
	}
	return false
}
