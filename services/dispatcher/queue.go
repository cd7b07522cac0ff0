package dispatcher

import (
	"cmp"
	"container/heap"
	"maps"
	"slices"
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

// cursor walks one bucket in order.
type cursor struct {
	b    *bucket
	head *waiting
}

// next moves the cursor to the scene after its head and reports whether there is one.
func (c *cursor) next() bool {
	var found *waiting
	after := c.head
	visit := func(w *waiting) bool {
		if after != nil && w == after {
			return true
		}
		found = w
		return false
	}
	if after == nil {
		c.b.items.Ascend(visit)
	} else {
		c.b.items.AscendGreaterOrEqual(after, visit)
	}
	c.head = found
	return found != nil
}

// merge yields the scenes of cursors, picking each time the head of the tenant with
// the fewest scenes held, the oldest among equals.
func merge(cursors []*cursor, held map[string]int, yield func(*waiting) bool) bool {
	for len(cursors) > 0 {
		best := 0
		for i := 1; i < len(cursors); i++ {
			a, b := cursors[i].head, cursors[best].head
			if c := cmp.Compare(held[a.t.Tenant], held[b.t.Tenant]); c < 0 || c == 0 && older(a, b) {
				best = i
			}
		}
		c := cursors[best]
		w := c.head
		held[w.t.Tenant]++
		if !yield(w) {
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
