package dispatcher

import (
	"cmp"
	"fmt"
	"maps"
	"math"
	"slices"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// Policy decides where the dispatcher places waiting scenes.
type Policy string

// The scheduling policies.
const (
	// FastestFinish, the default, predicts from measured history when each node
	// would finish each waiting scene (the work it holds, its speed for the scene's
	// workflow, the time to load another checkpoint) and gives each scene, highest
	// priority first, to the node that finishes it earliest. It releases a scene
	// only when that node has a free slot, so a fast node that is busy gets the
	// scene a little later rather than a slow idle node getting it now, and higher
	// priorities overtake what is still waiting.
	FastestFinish Policy = "fastest-finish"
	// RoundRobin gives waiting scenes to the nodes of their pool in turn, as a
	// client cycling through a list of nodes does.
	RoundRobin Policy = "round-robin"
	// LeastConn gives each waiting scene to the node holding the fewest scenes, as
	// a load balancer's least-connections does.
	LeastConn Policy = "least-conn"
	// Weighted gives each waiting scene to the node with the fewest scenes per unit
	// of its static weight, as nginx's least_conn with weights does.
	Weighted Policy = "weighted"
)

// Policies lists every policy, the default first.
var Policies = []Policy{FastestFinish, RoundRobin, LeastConn, Weighted}

// ParsePolicy returns the policy named s.
func ParsePolicy(s string) (Policy, error) {
	if s == "" {
		return FastestFinish, nil
	}
	p := Policy(s)
	if !slices.Contains(Policies, p) {
		return "", fmt.Errorf("unknown scheduling policy %q: use one of %v", s, Policies)
	}
	return p, nil
}

// waiting is a scene in the queue.
type waiting struct {
	item  fleet.WorkItem
	seq   uint64
	model string
	// header carries the scene's trace context on to its work message.
	header nats.Header
}

// workflowKey names the workflow whose durations a scene shares: its template, or
// "graph" for a raw graph.
func workflowKey(name string) string {
	if name == "" {
		return "graph"
	}
	return name
}

// held is a scene placed on a node and not yet finished.
type held struct {
	item     fleet.WorkItem
	seq      uint64
	model    string
	placedAt time.Time
	// startedAt is when ComfyUI started it; zero while it waits on the node.
	startedAt time.Time
}

// nodeView is what the planner knows of a node.
type nodeView struct {
	id     string
	pools  []string
	weight float64
	// usable is false for a node that must get no new scene: drained, unregistered,
	// silent or offline.
	usable bool
	// model is the checkpoint the node ran last.
	model string
	held  []*held
	speed *speedModel
}

func (n *nodeView) serves(pool string) bool { return slices.Contains(n.pools, pool) }

// placement is the planner's decision to release a waiting scene to a node.
type placement struct {
	w    *waiting
	node *nodeView
}

// planner holds what policies need between plans.
type planner struct {
	policy Policy
	// loadPenalty is the assumed time to load a checkpoint on a node that has not
	// been measured doing so.
	loadPenalty time.Duration
	// turn is round-robin's position in each pool.
	turn map[string]int
}

// plan returns the placements to make now. queue is in the order scenes should be
// considered (see order); nodes are sorted by id.
func (p *planner) plan(now time.Time, queue []*waiting, nodes []*nodeView) []placement {
	if p.policy == FastestFinish {
		return p.fastestFinish(now, queue, nodes)
	}
	var out []placement
	load := map[*nodeView]int{}
	for _, n := range nodes {
		load[n] = len(n.held)
	}
	for _, w := range queue {
		if w.item.NotBefore.After(now) {
			continue
		}
		cands := candidates(w, nodes)
		if len(cands) == 0 {
			continue
		}
		var n *nodeView
		switch p.policy {
		case RoundRobin:
			if p.turn == nil {
				p.turn = map[string]int{}
			}
			n = cands[p.turn[w.item.Pool]%len(cands)]
			p.turn[w.item.Pool]++
		case LeastConn:
			n = slices.MinFunc(cands, func(a, b *nodeView) int { return cmp.Compare(load[a], load[b]) })
		case Weighted:
			n = slices.MinFunc(cands, func(a, b *nodeView) int {
				return cmp.Compare(float64(load[a]+1)/a.weight, float64(load[b]+1)/b.weight)
			})
		}
		load[n]++
		out = append(out, placement{w, n})
	}
	return out
}

// candidates are the usable nodes of w's pool, without the node its last attempt
// failed on unless no other can take it.
func candidates(w *waiting, nodes []*nodeView) []*nodeView {
	var all, others []*nodeView
	for _, n := range nodes {
		if !n.usable || !n.serves(w.item.Pool) {
			continue
		}
		all = append(all, n)
		if n.id != w.item.Avoid {
			others = append(others, n)
		}
	}
	if len(others) > 0 {
		return others
	}
	return all
}

// fastestFinish plans every waiting scene in order on the node that would finish it
// earliest, given what each node holds and what the plan gave it before. A scene is
// released only if that node has a free slot; otherwise it stays in the queue, and
// the node's time stays reserved for it, so that a later scene does not take its
// place.
func (p *planner) fastestFinish(now time.Time, queue []*waiting, nodes []*nodeView) []placement {
	fut := make(map[*nodeView]*future, len(nodes))
	for _, n := range nodes {
		f := &future{free: fleet.NodeSlots - len(n.held), until: now, model: n.model}
		for _, h := range n.held {
			d := p.duration(n, f.model, h.item.Workflow, h.model)
			if !h.startedAt.IsZero() {
				d -= now.Sub(h.startedAt)
			}
			f.until = f.until.Add(max(d, 0))
			if h.model != "" {
				f.model = h.model
			}
		}
		fut[n] = f
	}
	var out []placement
	for _, w := range preferResident(queue, nodes, fut) {
		if w.item.NotBefore.After(now) {
			continue
		}
		var best *nodeView
		var bestEnd time.Time
		for _, n := range candidates(w, nodes) {
			f := fut[n]
			end := f.until.Add(p.duration(n, f.model, w.item.Workflow, w.model))
			if best == nil || end.Before(bestEnd) || end.Equal(bestEnd) && f.free > 0 && fut[best].free <= 0 {
				best, bestEnd = n, end
			}
		}
		if best == nil {
			continue
		}
		f := fut[best]
		f.until = bestEnd
		if w.model != "" {
			f.model = w.model
		}
		if f.free > 0 {
			f.free--
			out = append(out, placement{w, best})
		}
	}
	return out
}

// future is a node's state at the end of what the plan gave it so far.
type future struct {
	free  int
	until time.Time
	model string
}

// preferResident moves forward, within each priority, the scenes whose checkpoint a
// usable node will have loaded: they run without a load, and the scenes of other
// checkpoints then go, grouped, to the nodes that switch.
func preferResident(queue []*waiting, nodes []*nodeView, fut map[*nodeView]*future) []*waiting {
	loaded := map[string]bool{}
	for _, n := range nodes {
		if n.usable {
			loaded[fut[n].model] = true
		}
	}
	out := slices.Clone(queue)
	slices.SortStableFunc(out, func(a, b *waiting) int {
		if c := cmp.Compare(b.item.Priority, a.item.Priority); c != 0 {
			return c
		}
		ra, rb := a.model == "" || loaded[a.model], b.model == "" || loaded[b.model]
		switch {
		case ra && !rb:
			return -1
		case rb && !ra:
			return 1
		}
		return 0
	})
	return out
}

// duration predicts how long a scene of workflow needing model takes on n after a
// scene that left resident on it.
func (p *planner) duration(n *nodeView, resident, workflow, model string) time.Duration {
	d := n.speed.estimate(workflowKey(workflow))
	if model != "" && model != resident {
		d += n.speed.loadTime(p.loadPenalty)
	}
	return d
}

// speedModel is what the dispatcher learned of one node's speed: moving averages
// of its scene durations by workflow and of its model loads, and its slowness
// relative to the fleet's reference duration of each workflow.
type speedModel struct {
	fleet *fleetSpeeds
	// byWorkflow averages this node's durations of each workflow.
	byWorkflow map[string]float64
	// slowness is this node's durations over the fleet's reference durations; a
	// node never measured starts at 1/weight.
	slowness float64
	// load averages the time this node took to load a checkpoint; 0 until measured.
	load float64
}

// fleetSpeeds holds each workflow's reference duration: what it takes on a node of
// slowness 1.
type fleetSpeeds struct {
	reference map[string]float64
}

// defaultSceneSeconds is the assumed duration, at slowness 1, of a workflow never
// measured anywhere.
const defaultSceneSeconds = 10.0

// ema is the weight of a new measurement in the moving averages.
const ema = 0.3

func newSpeedModel(f *fleetSpeeds, weight float64) *speedModel {
	if weight <= 0 {
		weight = 1
	}
	return &speedModel{fleet: f, byWorkflow: map[string]float64{}, slowness: 1 / weight}
}

func average(old, v float64) float64 {
	if old == 0 {
		return v
	}
	return ema*v + (1-ema)*old
}

// estimate predicts the duration of a scene of workflow on the node, without
// loading a model.
func (s *speedModel) estimate(workflow string) time.Duration {
	secs, ok := s.byWorkflow[workflow]
	if !ok {
		ref, known := s.fleet.reference[workflow]
		if !known {
			ref = defaultSceneSeconds
		}
		secs = ref * s.slowness
	}
	return time.Duration(secs * float64(time.Second))
}

// loadTime is the node's measured model-load time, or fallback.
func (s *speedModel) loadTime(fallback time.Duration) time.Duration {
	if s.load == 0 {
		return fallback
	}
	return time.Duration(s.load * float64(time.Second))
}

// observe learns from a scene of workflow that took d on the node, loading a model
// first when loaded.
func (s *speedModel) observe(workflow string, d time.Duration, loaded bool) {
	secs := d.Seconds()
	if secs <= 0 || math.IsNaN(secs) {
		return
	}
	if loaded {
		if base, ok := s.byWorkflow[workflow]; ok {
			s.load = average(s.load, max(secs-base, 0))
		}
		return
	}
	s.learn(workflow, secs)
}

func (s *speedModel) learn(workflow string, secs float64) {
	s.byWorkflow[workflow] = average(s.byWorkflow[workflow], secs)
	ref, ok := s.fleet.reference[workflow]
	if !ok {
		s.fleet.reference[workflow] = secs / s.slowness
		return
	}
	s.slowness = average(s.slowness, secs/ref)
}

// seed adopts the averages an executor reports for workflows the dispatcher has not
// measured on the node itself (after a dispatcher restart).
func (s *speedModel) seed(byWorkflow map[string]float64) {
	for wf, secs := range byWorkflow {
		if _, ok := s.byWorkflow[wf]; !ok && secs > 0 {
			s.learn(wf, secs)
		}
	}
}

// order sorts the queue in the order the planner considers it: highest priority
// first; among equals, the tenant holding the fewest scenes first, so that tenants
// share the fleet; then the oldest first.
func order(queue []*waiting, holding map[string]int) []*waiting {
	byTenant := map[string][]*waiting{}
	for _, w := range queue {
		byTenant[w.item.Tenant] = append(byTenant[w.item.Tenant], w)
	}
	older := func(a, b *waiting) int {
		return cmp.Or(
			cmp.Compare(b.item.Priority, a.item.Priority),
			a.item.SubmittedAt.Compare(b.item.SubmittedAt),
			cmp.Compare(a.item.JobID, b.item.JobID),
			cmp.Compare(a.item.Index, b.item.Index),
		)
	}
	heads := make([]string, 0, len(byTenant))
	for t, ws := range byTenant {
		slices.SortFunc(ws, older)
		heads = append(heads, t)
	}
	share := maps.Clone(holding)
	if share == nil {
		share = map[string]int{}
	}
	out := make([]*waiting, 0, len(queue))
	for len(heads) > 0 {
		i := 0
		for j := 1; j < len(heads); j++ {
			a, b := byTenant[heads[j]][0], byTenant[heads[i]][0]
			c := cmp.Or(
				cmp.Compare(b.item.Priority, a.item.Priority),
				cmp.Compare(share[heads[j]], share[heads[i]]),
				older(a, b),
			)
			if c < 0 {
				i = j
			}
		}
		t := heads[i]
		out = append(out, byTenant[t][0])
		share[t]++
		if byTenant[t] = byTenant[t][1:]; len(byTenant[t]) == 0 {
			heads = slices.Delete(heads, i, i+1)
		}
	}
	return out
}
