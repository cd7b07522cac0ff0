package dispatcher

import (
	"cmp"
	"container/heap"
	"fmt"
	"maps"
	"slices"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/inventory"
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
	t        fleet.Ticket
	seq      uint64
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
	// region is where the node is; setup its measured time from a scene's delivery
	// to its prompt being on the node.
	region string
	setup  time.Duration
	// inv is what the node can run; nil while not known. invBehind is set while
	// the node's heartbeat names an inventory version other than inv's: the
	// version published last is on its way.
	inv       *inventory.Inventory
	invBehind bool
	// runs remembers whether inv runs runsNeeds: the last requirements asked of
	// this inventory, as a node fits the same class of scenes plan after plan.
	runsInv   *inventory.Inventory
	runsNeeds *inventory.Requirements
	runs      bool
}

func (n *nodeView) serves(pool string) bool { return slices.Contains(n.pools, pool) }

// fits reports whether n may run w: in the region w requires, if any, with every node
// class and model file w needs (a node whose executor could not read its inventory
// may; one whose inventory is on its way may not).
func (n *nodeView) fits(w *waiting) bool {
	if w.t.Region != "" && n.region != w.t.Region {
		return false
	}
	if w.t.Needs == nil {
		return true
	}
	if n.invBehind {
		return false
	}
	if n.inv == nil {
		return true
	}
	if n.runsInv != n.inv || n.runsNeeds != w.t.Needs {
		n.runsInv, n.runsNeeds, n.runs = n.inv, w.t.Needs, n.inv.Runs(w.t.Needs)
	}
	return n.runs
}

// placement is the planner's decision to release a waiting scene to a node.
type placement struct {
	w    *waiting
	node *nodeView
}

// planner decides placements. It is pure: plan reads the queue and the nodes and
// returns decisions, keeping only round-robin's turn between calls.
type planner struct {
	policy Policy
	// loadPenalty is the assumed time to load a checkpoint on a node that has not
	// been measured doing so.
	loadPenalty time.Duration
	// regionPenalty is added to the time of a scene on a node outside the region it
	// prefers.
	regionPenalty time.Duration
	// turn is round-robin's position in each pool.
	turn map[string]int
	// scratch is what a plan builds and the next reuses, so that plans do not
	// allocate.
	scratch struct {
		held     map[string]int
		futures  []future
		cands    []*future
		resident map[string]bool
		heap     classHeap
	}
}

// horizon bounds how many scenes of a pool one plan considers, as a multiple of the
// pool's slots: scenes further back could only reserve time far in the future.
const horizonPerSlot = 4

// plan returns the placements to make now. nodes are sorted by id; holding counts
// the scenes each tenant holds on nodes.
func (p *planner) plan(now time.Time, q *queue, nodes []*nodeView, holding map[string]int) []placement {
	if p.scratch.held == nil {
		p.scratch.held = map[string]int{}
	}
	held := p.scratch.held
	clear(held)
	maps.Copy(held, holding)
	if p.policy == FastestFinish {
		return p.fastestFinish(now, q, nodes, held)
	}
	var out []placement
	load := map[*nodeView]int{}
	for _, n := range nodes {
		load[n] = len(n.held)
	}
	for _, pool := range q.poolNames() {
		q.each(pool, func(string) bool { return true }, held, func(w *waiting) bool {
			cands := candidates(w, nodes)
			if len(cands) == 0 {
				return true
			}
			var n *nodeView
			switch p.policy {
			case RoundRobin:
				if p.turn == nil {
					p.turn = map[string]int{}
				}
				n = cands[p.turn[w.t.Pool]%len(cands)]
				p.turn[w.t.Pool]++
			case LeastConn:
				n = slices.MinFunc(cands, func(a, b *nodeView) int { return cmp.Compare(load[a], load[b]) })
			case Weighted:
				n = slices.MinFunc(cands, func(a, b *nodeView) int {
					return cmp.Compare(float64(load[a]+1)/a.weight, float64(load[b]+1)/b.weight)
				})
			}
			load[n]++
			out = append(out, placement{w, n})
			return true
		})
	}
	return out
}

// candidates are the usable nodes of w's pool, without the node its last attempt
// failed on unless no other can take it.
func candidates(w *waiting, nodes []*nodeView) []*nodeView {
	var all, others []*nodeView
	for _, n := range nodes {
		if !n.usable || !n.serves(w.t.Pool) || !n.fits(w) {
			continue
		}
		all = append(all, n)
		if n.id != w.t.Avoid {
			others = append(others, n)
		}
	}
	if len(others) > 0 {
		return others
	}
	return all
}

// future is a node's state at the end of what the plan gave it so far. Its times
// are from the plan's now.
type future struct {
	node  *nodeView
	free  int
	until time.Duration
	model string
	// end is when the node would finish the scene being placed; pos its place in
	// the class heap.
	end time.Duration
	pos int
	// scene is the time a scene of the heap's class takes on the node, from its
	// delivery, when its checkpoint is resident; load the time to load another.
	scene, load time.Duration
}

// fastestFinish plans the waiting scenes of each pool in order (see queue.each) on
// the node that would finish each earliest, given what each node holds and what the
// plan gave it before. A scene is released only if that node has a free slot;
// otherwise it stays in the queue, and the node's time stays reserved for it, so
// that a later scene does not take its place. A pool is planned until its nodes have
// no free slot left, or a horizon of scenes has been considered.
func (p *planner) fastestFinish(now time.Time, q *queue, nodes []*nodeView, held map[string]int) []placement {
	if cap(p.scratch.futures) < len(nodes) {
		p.scratch.futures = make([]future, len(nodes))
	}
	fut := p.scratch.futures[:len(nodes)]
	for i, n := range nodes {
		f := &fut[i]
		*f = future{node: n, free: fleet.NodeSlots - len(n.held), model: n.model}
		for _, h := range n.held {
			d := p.duration(n, f.model, h.t.Workflow, h.t.Model)
			if !h.startedAt.IsZero() {
				d -= now.Sub(h.startedAt)
			}
			f.until += max(d, 0)
			if h.t.Model != "" {
				f.model = h.t.Model
			}
		}
	}
	if p.scratch.resident == nil {
		p.scratch.resident = map[string]bool{}
	}
	var out []placement
	for _, pool := range q.poolNames() {
		cands := p.scratch.cands[:0]
		free := 0
		for i, n := range nodes {
			if n.usable && n.serves(pool) {
				cands = append(cands, &fut[i])
				free += max(fut[i].free, 0)
			}
		}
		p.scratch.cands = cands
		if free == 0 {
			continue
		}
		resident := p.scratch.resident
		clear(resident)
		for _, f := range cands {
			resident[f.model] = true
		}
		horizon := max(64, horizonPerSlot*fleet.NodeSlots*len(cands))
		considered := 0
		var h *classHeap
		q.each(pool, func(m string) bool { return resident[m] }, held, func(w *waiting) bool {
			considered++
			if h == nil || !h.of(w) {
				h = p.newClassHeap(w, cands)
			}
			if h.Len() == 0 {
				return free > 0 && considered < horizon
			}
			f := h.best(w.t.Avoid)
			f.until = f.end
			if w.t.Model != "" {
				f.model = w.t.Model
			}
			if f.free > 0 {
				f.free--
				free--
				out = append(out, placement{w, f.node})
			}
			h.update(f)
			return free > 0 && considered < horizon
		})
	}
	return out
}

// classHeap orders the nodes of a pool that fit a class of scenes (one workflow,
// checkpoint, set of requirements and region) by when each would finish a scene of
// it: the earliest first; among equals a node with a free slot, then the first by id.
type classHeap struct {
	class *waiting
	nodes []*future
}

// of reports whether w is of the heap's class.
func (h *classHeap) of(w *waiting) bool {
	c := h.class.t
	return c.Workflow == w.t.Workflow && c.Model == w.t.Model && c.Needs == w.t.Needs &&
		c.Region == w.t.Region && c.PreferRegion == w.t.PreferRegion
}

// newClassHeap returns the heap of w's class among cands. It is the planner's one
// heap, emptied first: a plan builds a class's heap when the class changes.
func (p *planner) newClassHeap(w *waiting, cands []*future) *classHeap {
	h := &p.scratch.heap
	h.class, h.nodes = w, h.nodes[:0]
	for _, f := range cands {
		if f.node.fits(w) {
			f.pos = len(h.nodes)
			h.nodes = append(h.nodes, f)
			f.scene = f.node.speed.estimate(workflowKey(w.t.Workflow)) + f.node.setup
			if w.t.PreferRegion != "" && f.node.region != w.t.PreferRegion {
				f.scene += p.regionPenalty
			}
			f.load = f.node.speed.loadTime(p.loadPenalty)
			f.end = h.endOf(f)
		}
	}
	heap.Init(h)
	return h
}

// endOf is when f's node would finish a scene of the class after what it holds.
func (h *classHeap) endOf(f *future) time.Duration {
	return f.until + afterLoad(f.scene, f.load, f.model, h.class.t.Model)
}

// best is the node that finishes the scene first, other than avoid if another can
// take it.
func (h *classHeap) best(avoid string) *future {
	top := h.nodes[0]
	if top.node.id != avoid || len(h.nodes) == 1 {
		return top
	}
	heap.Pop(h)
	next := h.nodes[0]
	heap.Push(h, top)
	return next
}

// update re-orders f after its future changed.
func (h *classHeap) update(f *future) {
	f.end = h.endOf(f)
	heap.Fix(h, f.pos)
}

func (h *classHeap) Len() int { return len(h.nodes) }
func (h *classHeap) Less(i, j int) bool {
	a, b := h.nodes[i], h.nodes[j]
	if a.end != b.end {
		return a.end < b.end
	}
	if af, bf := a.free > 0, b.free > 0; af != bf {
		return af
	}
	return a.node.id < b.node.id
}
func (h *classHeap) Swap(i, j int) {
	h.nodes[i], h.nodes[j] = h.nodes[j], h.nodes[i]
	h.nodes[i].pos, h.nodes[j].pos = i, j
}
func (h *classHeap) Push(x any) {
	f := x.(*future)
	f.pos = len(h.nodes)
	h.nodes = append(h.nodes, f)
}
func (h *classHeap) Pop() any {
	f := h.nodes[len(h.nodes)-1]
	h.nodes = h.nodes[:len(h.nodes)-1]
	return f
}

// duration predicts how long a scene of workflow needing model takes on n after a
// scene that left resident on it.
func (p *planner) duration(n *nodeView, resident, workflow, model string) time.Duration {
	return afterLoad(n.speed.estimate(workflowKey(workflow)), n.speed.loadTime(p.loadPenalty), resident, model)
}

// afterLoad is a scene's time d, and load more if it needs a checkpoint other than
// resident.
func afterLoad(d, load time.Duration, resident, model string) time.Duration {
	if model != "" && model != resident {
		d += load
	}
	return d
}
