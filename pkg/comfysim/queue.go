package comfysim

import (
	"context"
	"strconv"
	"sync"
	"sync/atomic"
)

// maxHistory is ComfyUI's MAXIMUM_HISTORY_SIZE.
const maxHistory = 10000

// qnum is a queue number: the server's counter, or float(number) when the
// client chose one.
type qnum struct {
	v       float64
	isFloat bool
}

// MarshalJSON writes an int, or a Python float for client numbers.
func (q qnum) MarshalJSON() ([]byte, error) {
	if q.isFloat {
		return pyFloat(q.v).MarshalJSON()
	}
	return strconv.AppendInt(nil, int64(q.v), 10), nil
}

// job is an accepted prompt.
type job struct {
	number    qnum
	id        string
	g         *graph
	extra     obj
	outputs   []string
	clientID  string
	hasClient bool
}

// item is the queue entry as /queue and /history show it:
// [number, prompt_id, prompt, extra_data, outputs_to_execute].
func (j *job) item() []any {
	return []any{j.number, j.id, j.g.raw, j.extra, j.outputs}
}

// less orders the heap as Python compares (number, prompt_id, ...) tuples.
func (j *job) less(o *job) bool {
	if j.number.v != o.number.v {
		return j.number.v < o.number.v
	}
	return j.id < o.id
}

// historyEntry is one prompt of /history.
type historyEntry struct {
	job     *job
	outputs obj
	status  obj
	meta    obj
}

// MarshalJSON writes the entry as the real server orders it.
func (h *historyEntry) MarshalJSON() ([]byte, error) {
	return obj{{"prompt", h.job.item()}, {"outputs", h.outputs}, {"status", h.status}, {"meta", h.meta}}.MarshalJSON()
}

// running is the prompt the worker executes, with its interrupt flag.
type running struct {
	job         *job
	interrupt   chan struct{}
	interrupted bool
}

// promptQueue holds the pending heap, the running prompt and the history.
// Every change broadcasts a status message while the lock is held, so
// that clients see the counts in the order they happened.
type promptQueue struct {
	hub *hub
	// maxHistory is how many prompts the history keeps.
	maxHistory int

	mu        sync.Mutex
	counter   int64
	pending   []*job
	current   *running
	history   []string
	entries   map[string]*historyEntry
	wake      chan struct{}
	remaining atomic.Int64
}

func newPromptQueue(h *hub, maxHistory int) *promptQueue {
	return &promptQueue{hub: h, maxHistory: maxHistory, entries: map[string]*historyEntry{}, wake: make(chan struct{}, 1)}
}

// nextNumber takes the server's counter, negated for front.
func (q *promptQueue) nextNumber(front bool) qnum {
	q.mu.Lock()
	defer q.mu.Unlock()
	n := q.counter
	q.counter++
	if front {
		n = -n
	}
	return qnum{v: float64(n)}
}

// bumpNumber advances the counter for a request that gets no number.
func (q *promptQueue) bumpNumber() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.counter++
}

// known reports whether a prompt id is pending, running or in history.
func (q *promptQueue) known(id string) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.current != nil && q.current.job.id == id {
		return true
	}
	if _, ok := q.entries[id]; ok {
		return true
	}
	for _, j := range q.pending {
		if j.id == id {
			return true
		}
	}
	return false
}

func (q *promptQueue) updatedLocked() {
	n := int64(len(q.pending))
	if q.current != nil {
		n++
	}
	q.remaining.Store(n)
	q.hub.broadcast(statusMessage(int(n), ""))
}

// put adds a job to the pending heap.
func (q *promptQueue) put(j *job) {
	q.mu.Lock()
	defer q.mu.Unlock()
	heapPush(&q.pending, j)
	q.updatedLocked()
	select {
	case q.wake <- struct{}{}:
	default:
	}
}

// take waits for the next job and marks it running.
func (q *promptQueue) take(ctx context.Context) (*running, bool) {
	for {
		q.mu.Lock()
		if len(q.pending) > 0 {
			r := &running{job: heapPop(&q.pending), interrupt: make(chan struct{})}
			q.current = r
			q.updatedLocked()
			q.mu.Unlock()
			return r, true
		}
		q.mu.Unlock()
		select {
		case <-ctx.Done():
			return nil, false
		case <-q.wake:
		}
	}
}

// finish moves the running job to the history.
func (q *promptQueue) finish(r *running, e *historyEntry) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.current == r {
		q.current = nil
	}
	if len(q.history) >= q.maxHistory {
		delete(q.entries, q.history[0])
		q.history = q.history[1:]
	}
	if _, dup := q.entries[r.job.id]; !dup {
		q.history = append(q.history, r.job.id)
	}
	q.entries[r.job.id] = e
	q.updatedLocked()
}

// interrupt flags the running prompt, or only the prompt promptID when
// it is not empty. It reports whether a prompt was flagged.
func (q *promptQueue) interrupt(promptID string) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	r := q.current
	if r == nil || (promptID != "" && r.job.id != promptID) {
		return false
	}
	if !r.interrupted {
		r.interrupted = true
		close(r.interrupt)
	}
	return true
}

// announce runs send, which tells the client a node starts, and reports
// whether the prompt was interrupted before it. Holding the lock makes
// the two one step for /interrupt: an interrupt sent by a client that saw
// the node start is noticed by the node after it.
func (q *promptQueue) announce(r *running, send func()) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	send()
	return r.interrupted
}

// snapshot returns the running and pending items, pending in heap order.
func (q *promptQueue) snapshot() (run, pending [][]any) {
	q.mu.Lock()
	defer q.mu.Unlock()
	run = [][]any{}
	if q.current != nil {
		run = append(run, q.current.job.item())
	}
	pending = make([][]any, 0, len(q.pending))
	for _, j := range q.pending {
		pending = append(pending, j.item())
	}
	return run, pending
}

// deletePending removes a pending prompt.
func (q *promptQueue) deletePending(id string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for i, j := range q.pending {
		if j.id != id {
			continue
		}
		if len(q.pending) == 1 {
			// The real server wipes the queue here and then reports
			// the deletion too: two status messages.
			q.pending = nil
			q.updatedLocked()
		} else {
			q.pending = append(q.pending[:i], q.pending[i+1:]...)
			heapify(q.pending)
		}
		q.updatedLocked()
		return
	}
}

// clearPending drops every pending prompt.
func (q *promptQueue) clearPending() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.pending = nil
	q.updatedLocked()
}

// historyOf returns one entry as {id: entry}, or {}.
func (q *promptQueue) historyOf(id string) obj {
	q.mu.Lock()
	defer q.mu.Unlock()
	if e, ok := q.entries[id]; ok {
		return obj{{id, e}}
	}
	return obj{}
}

// historyPage is get_history(max_items, offset): a negative offset with
// max_items set means the last max_items entries.
func (q *promptQueue) historyPage(maxItems *int, offset int) obj {
	q.mu.Lock()
	defer q.mu.Unlock()
	if offset < 0 && maxItems != nil {
		offset = len(q.history) - *maxItems
	}
	out := obj{}
	for i, id := range q.history {
		if i < offset {
			continue
		}
		out = append(out, kv{id, q.entries[id]})
		if maxItems != nil && len(out) >= *maxItems {
			break
		}
	}
	return out
}

func (q *promptQueue) deleteHistory(id string) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if _, ok := q.entries[id]; !ok {
		return
	}
	delete(q.entries, id)
	for i, h := range q.history {
		if h == id {
			q.history = append(q.history[:i], q.history[i+1:]...)
			break
		}
	}
}

func (q *promptQueue) clearHistory() {
	q.mu.Lock()
	defer q.mu.Unlock()
	q.history = nil
	q.entries = map[string]*historyEntry{}
}

// The heap functions follow Python's heapq exactly, so that
// queue_pending lists prompts in the same order a real server does.

func heapPush(h *[]*job, j *job) {
	*h = append(*h, j)
	siftDown(*h, 0, len(*h)-1)
}

func heapPop(h *[]*job) *job {
	last := (*h)[len(*h)-1]
	*h = (*h)[:len(*h)-1]
	if len(*h) == 0 {
		return last
	}
	top := (*h)[0]
	(*h)[0] = last
	siftUp(*h, 0)
	return top
}

func heapify(h []*job) {
	for i := len(h)/2 - 1; i >= 0; i-- {
		siftUp(h, i)
	}
}

func siftDown(h []*job, start, pos int) {
	item := h[pos]
	for pos > start {
		parent := (pos - 1) >> 1
		if !item.less(h[parent]) {
			break
		}
		h[pos] = h[parent]
		pos = parent
	}
	h[pos] = item
}

func siftUp(h []*job, pos int) {
	end, start, item := len(h), pos, h[pos]
	child := 2*pos + 1
	for child < end {
		if right := child + 1; right < end && !h[child].less(h[right]) {
			child = right
		}
		h[pos] = h[child]
		pos = child
		child = 2*pos + 1
	}
	h[pos] = item
	siftDown(h, start, pos)
}
