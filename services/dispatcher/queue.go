package dispatcher

import (
	"cmp"
	"container/heap"
	"maps"
	"slices"
	"strings"
	"time"
	"unique"

	"github.com/google/btree"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/inventory"
)

// sceneKey names a scene: every run of it shares one queue entry.
type sceneKey struct {
	job   string
	index int
}

// waiting is a scene in the queue as the dispatcher keeps it: its ticket (strings
// shared with every other ticket of the same tenant, pool, workflow and model), the
// sequence of its queue entry, and its trace context. Never its graph.
type waiting struct {
	t   fleet.Ticket
	seq uint64
	// trace is the W3C traceparent the ticket carried, passed on to the work message.
	trace string
	// bucket is where the scene is indexed; nil while its back-off runs.
	bucket *bucket
	// delayIdx is its place in the delayed heap, -1 when not there.
	delayIdx int
}

func (w *waiting) key() sceneKey { return sceneKey{w.t.JobID, w.t.Index} }

// older orders scenes oldest first: by submission, then job and index.
func older(a, b *waiting) bool {
	if c := a.t.SubmittedAt.Compare(b.t.SubmittedAt); c != 0 {
		return c < 0
	}
	if a.t.JobID != b.t.JobID {
		return a.t.JobID < b.t.JobID
	}
	return a.t.Index < b.t.Index
}

// bucket holds the waiting scenes of one pool, priority, checkpoint and tenant,
// oldest first.
type bucket struct {
	model, tenant string
	items         *btree.BTreeG[*waiting]
}

type bucketKey struct{ model, tenant string }

// poolQueue is one pool's waiting scenes, by priority.
type poolQueue struct {
	levels [maxPriority + 1]map[bucketKey]*bucket
	size   int
}

const (
	minPriority = 1
	maxPriority = 10
)

// queue indexes the waiting scenes by pool, priority, checkpoint and tenant, so that
// planning reads the few scenes at the head of each pool instead of the whole queue.
// Scenes whose back-off has not passed wait apart, by the time it passes.
type queue struct {
	scenes  map[sceneKey]*waiting
	pools   map[string]*poolQueue
	delayed delayHeap
	// needs interns the requirements, by key.
	needs map[string]*inventory.Requirements
}

func newQueue() *queue {
	return &queue{scenes: map[sceneKey]*waiting{}, pools: map[string]*poolQueue{}, needs: map[string]*inventory.Requirements{}}
}

// intern returns the one copy of s that every ticket sharing it holds (a job's
// scenes share its id and trace, most share tenant, pool and workflow): a million
// queued scenes hold a few thousand strings, not millions. Copies no ticket holds
// any more are collected.
func intern(s string) string {
	if s == "" {
		return ""
	}
	return unique.Make(s).Value()
}

// len is the number of waiting scenes.
func (q *queue) len() int { return len(q.scenes) }

func (q *queue) get(k sceneKey) *waiting { return q.scenes[k] }

// add puts w in the queue, in place of an entry of the same scene, and returns the
// entry it replaced, if any.
func (q *queue) add(w *waiting, now time.Time) *waiting {
	t := &w.t
	t.JobID, t.Tenant, t.Pool, t.Workflow, t.Model, t.Avoid = intern(t.JobID), intern(t.Tenant), intern(t.Pool), intern(t.Workflow), intern(t.Model), intern(t.Avoid)
	t.Region, t.PreferRegion, w.trace = intern(t.Region), intern(t.PreferRegion), intern(w.trace)
	if t.Needs != nil {
		if shared, ok := q.needs[t.Needs.Key]; ok {
			t.Needs = shared
		} else {
			q.needs[t.Needs.Key] = t.Needs
		}
	}
	t.Priority = min(max(t.Priority, minPriority), maxPriority)
	old := q.remove(w.key())
	q.scenes[w.key()] = w
	w.delayIdx = -1
	if t.NotBefore.After(now) {
		heap.Push(&q.delayed, w)
		return old
	}
	q.index(w)
	return old
}

func (q *queue) index(w *waiting) {
	pq := q.pools[w.t.Pool]
	if pq == nil {
		pq = &poolQueue{}
		q.pools[w.t.Pool] = pq
	}
	level := pq.levels[w.t.Priority]
	if level == nil {
		level = map[bucketKey]*bucket{}
		pq.levels[w.t.Priority] = level
	}
	bk := bucketKey{w.t.Model, w.t.Tenant}
	b := level[bk]
	if b == nil {
		b = &bucket{model: w.t.Model, tenant: w.t.Tenant, items: btree.NewG(16, older)}
		level[bk] = b
	}
	b.items.ReplaceOrInsert(w)
	w.bucket = b
	pq.size++
}

// remove takes scene k out of the queue and returns its entry, nil if it was not there.
func (q *queue) remove(k sceneKey) *waiting {
	w := q.scenes[k]
	if w == nil {
		return nil
	}
	delete(q.scenes, k)
	if w.delayIdx >= 0 {
		heap.Remove(&q.delayed, w.delayIdx)
		return w
	}
	if b := w.bucket; b != nil {
		b.items.Delete(w)
		w.bucket = nil
		pq := q.pools[w.t.Pool]
		pq.size--
		if b.items.Len() == 0 {
			delete(pq.levels[w.t.Priority], bucketKey{b.model, b.tenant})
		}
		if pq.size == 0 {
			delete(q.pools, w.t.Pool)
		}
	}
	return w
}

// due indexes the scenes whose back-off has passed by now, and returns when the next
// one passes (zero if none waits).
func (q *queue) due(now time.Time) time.Time {
	for q.delayed.Len() > 0 {
		w := q.delayed[0]
		if w.t.NotBefore.After(now) {
			return w.t.NotBefore
		}
		heap.Pop(&q.delayed)
		q.index(w)
	}
	return time.Time{}
}

// poolNames returns the pools with waiting scenes, sorted.
func (q *queue) poolNames() []string {
	return slices.Sorted(maps.Keys(q.pools))
}

// each yields the waiting scenes of pool in the order the planner considers them,
// until yield returns false: highest priority first; within a priority, scenes
// whose checkpoint is resident (or that need none) before the others; then the
// tenant holding the fewest scenes first (held counts what each tenant holds and is
// counted up as scenes are yielded), so that tenants share the fleet; then the
// oldest first.
func (q *queue) each(pool string, resident func(model string) bool, held map[string]int, yield func(*waiting) bool) {
	pq := q.pools[pool]
	if pq == nil {
		return
	}
	for prio := maxPriority; prio >= minPriority; prio-- {
		level := pq.levels[prio]
		if len(level) == 0 {
			continue
		}
		var first, second []*cursor
		for _, b := range level {
			c := &cursor{b: b}
			if !c.next() {
				continue
			}
			if b.model == "" || resident(b.model) {
				first = append(first, c)
			} else {
				second = append(second, c)
			}
		}
		for _, group := range [][]*cursor{first, second} {
			if !merge(group, held, yield) {
				return
			}
		}
	}
}

// cursor walks one bucket in order. It reads the bucket a run of scenes at a time,
// not one descent of the tree per scene: a plan does not change the queue, so what
// it read ahead stays valid.
type cursor struct {
	b    *bucket
	head *waiting
	// held counts the scenes its tenant holds, during a merge.
	held *int
	// ahead are the scenes after head, read ahead; done is set once the bucket has
	// none after them.
	ahead []*waiting
	done  bool
	run   [cursorRun]*waiting
}

// cursorRun is how many scenes a cursor reads at a time.
const cursorRun = 32

// next moves the cursor to the scene after its head and reports whether there is one.
func (c *cursor) next() bool {
	if len(c.ahead) == 0 && !c.done {
		c.readAhead()
	}
	if len(c.ahead) == 0 {
		c.head = nil
		return false
	}
	c.head, c.ahead = c.ahead[0], c.ahead[1:]
	return true
}

// readAhead reads the scenes after head, up to a run of them.
func (c *cursor) readAhead() {
	run := c.run[:0]
	after := c.head
	visit := func(w *waiting) bool {
		if w != after {
			run = append(run, w)
		}
		return len(run) < cursorRun
	}
	if after == nil {
		c.b.items.Ascend(visit)
	} else {
		c.b.items.AscendGreaterOrEqual(after, visit)
	}
	c.ahead, c.done = run, len(run) < cursorRun
}

// merge yields the scenes of cursors, picking each time the head of the tenant with
// the fewest scenes held, the oldest among equals. The cursors of one tenant count
// in one counter, read from held and written back to it at the end.
func merge(cursors []*cursor, held map[string]int, yield func(*waiting) bool) bool {
	slices.SortFunc(cursors, func(a, b *cursor) int { return strings.Compare(a.b.tenant, b.b.tenant) })
	counts, tenants := make([]int, 0, len(cursors)), make([]string, 0, len(cursors))
	for _, c := range cursors {
		if t := c.b.tenant; len(tenants) == 0 || t != tenants[len(tenants)-1] {
			counts, tenants = append(counts, held[t]), append(tenants, t)
		}
		c.held = &counts[len(counts)-1]
	}
	defer func() {
		for i, t := range tenants {
			held[t] = counts[i]
		}
	}()
	for len(cursors) > 0 {
		best := 0
		for i := 1; i < len(cursors); i++ {
			a, b := cursors[i], cursors[best]
			if c := cmp.Compare(*a.held, *b.held); c < 0 || c == 0 && older(a.head, b.head) {
				best = i
			}
		}
		c := cursors[best]
		*c.held++
		if !yield(c.head) {
			return false
		}
		if !c.next() {
			cursors = slices.Delete(cursors, best, best+1)
		}
	}
	return true
}

// delayHeap orders backed-off scenes by when their back-off passes.
type delayHeap []*waiting

func (h delayHeap) Len() int           { return len(h) }
func (h delayHeap) Less(i, j int) bool { return h[i].t.NotBefore.Before(h[j].t.NotBefore) }
func (h delayHeap) Swap(i, j int) {
	h[i], h[j] = h[j], h[i]
	h[i].delayIdx, h[j].delayIdx = i, j
}

func (h *delayHeap) Push(x any) {
	w := x.(*waiting)
	w.delayIdx = len(*h)
	*h = append(*h, w)
}

func (h *delayHeap) Pop() any {
	old := *h
	w := old[len(old)-1]
	old[len(old)-1] = nil
	*h = old[:len(old)-1]
	w.delayIdx = -1
	return w
}
