package intake

import (
	"cmp"
	"context"
	"encoding/json"
	"log/slog"
	"sync"
	"time"

	"github.com/google/btree"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// jobIndex holds a summary of every job of the fleet_job_state bucket, ordered by
// tenant and creation, so that a page of the job list costs what the page holds
// rather than a read of the whole bucket. A watch of the bucket feeds it (follow);
// the intake adds the jobs it records at once, so that its own job list shows them
// before the watch does.
type jobIndex struct {
	retention time.Duration

	mu    sync.RWMutex
	jobs  map[string]*indexed
	order *btree.BTreeG[*indexed]
	// gone holds the last revision of the jobs removed from the index by a deletion
	// this intake made, until the watch brings the deletion: an older put arriving
	// meanwhile must not bring the job back.
	gone map[string]uint64
}

// indexed is one job of the index.
type indexed struct {
	key     indexKey
	rev     uint64
	expires time.Time
	summary api.JobSummary
}

// indexKey orders the index: by tenant, then newest first (as the list shows jobs),
// then by id, so that jobs created in the same instant have an order too.
type indexKey struct {
	tenant  string
	created int64
	id      string
}

func (a indexKey) compare(b indexKey) int {
	return cmp.Or(cmp.Compare(a.tenant, b.tenant), -cmp.Compare(a.created, b.created), -cmp.Compare(a.id, b.id))
}

func newJobIndex(retention time.Duration) *jobIndex {
	return &jobIndex{
		retention: retention,
		jobs:      map[string]*indexed{},
		order:     btree.NewG(32, func(a, b *indexed) bool { return a.key.compare(b.key) < 0 }),
		gone:      map[string]uint64{},
	}
}

// put takes the state of a job at revision rev, unless the index holds a later one.
func (x *jobIndex) put(st *fleet.JobState, rev uint64) {
	e := &indexed{
		key:     indexKey{tenant: st.Tenant, created: st.CreatedAt.UnixNano(), id: st.ID},
		rev:     rev,
		expires: fleet.Expiry(st.CreatedAt, st.ExpiresAt, x.retention),
		summary: api.FromJobState(st),
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	if last, ok := x.gone[st.ID]; ok && last >= rev {
		return
	}
	if old := x.jobs[st.ID]; old != nil {
		if old.rev >= rev {
			return
		}
		x.order.Delete(old)
	}
	x.jobs[st.ID] = e
	x.order.ReplaceOrInsert(e)
}

// remove drops job id, deleted at revision rev (0 when the deletion's revision is
// not known: a deletion this intake made).
func (x *jobIndex) remove(id string, rev uint64) {
	x.mu.Lock()
	defer x.mu.Unlock()
	old := x.jobs[id]
	if rev == 0 {
		if old != nil {
			x.gone[id] = old.rev
		}
	} else {
		delete(x.gone, id)
	}
	if old != nil && (rev == 0 || old.rev < rev) {
		delete(x.jobs, id)
		x.order.Delete(old)
	}
}

// prune drops the jobs expired at now.
func (x *jobIndex) prune(now time.Time) {
	x.mu.Lock()
	defer x.mu.Unlock()
	var expired []*indexed
	for _, e := range x.jobs {
		if !now.Before(e.expires) {
			expired = append(expired, e)
		}
	}
	for _, e := range expired {
		delete(x.jobs, e.key.id)
		x.order.Delete(e)
	}
}

// listQuery selects a page of one tenant's jobs.
type listQuery struct {
	tenant string
	// statuses, if not empty, are the states a job must be in.
	statuses map[string]bool
	// since and until bound the jobs' creation: since included, until not; zero
	// for no bound.
	since, until time.Time
	// after, if set, is the cursor: the page starts with the job after it.
	after *indexKey
	limit int
}

// page returns the jobs of q, newest first, and the cursor of the page after it,
// nil if there is none. Jobs expired at now are left out.
func (x *jobIndex) page(q listQuery, now time.Time) ([]api.JobSummary, *indexKey) {
	// The newest key the page may start at: the cursor's successor, or the newest
	// key created before until, or the newest of the tenant.
	pivot := &indexed{key: indexKey{tenant: q.tenant, created: maxInt64, id: "\U0010FFFF"}}
	if !q.until.IsZero() {
		pivot.key.created = q.until.UnixNano() - 1
	}
	if q.after != nil && q.after.compare(pivot.key) > 0 {
		pivot.key = *q.after
	}
	out := make([]api.JobSummary, 0, min(q.limit, 64))
	var next *indexKey
	x.mu.RLock()
	defer x.mu.RUnlock()
	x.order.AscendGreaterOrEqual(pivot, func(e *indexed) bool {
		if e.key.tenant != q.tenant || !q.since.IsZero() && e.key.created < q.since.UnixNano() {
			return false
		}
		if q.after != nil && e.key == *q.after {
			return true
		}
		if !now.Before(e.expires) || len(q.statuses) > 0 && !q.statuses[e.summary.Status] {
			return true
		}
		if len(out) == q.limit {
			k := out[len(out)-1]
			next = &indexKey{tenant: q.tenant, created: k.CreatedAt.UnixNano(), id: k.ID}
			return false
		}
		out = append(out, e.summary)
		return true
	})
	return out, next
}

const maxInt64 = int64(^uint64(0) >> 1)

// size is how many jobs the index holds.
func (x *jobIndex) size() int {
	x.mu.RLock()
	defer x.mu.RUnlock()
	return len(x.jobs)
}

// replace makes the index hold exactly what other holds: a new watch's snapshot.
func (x *jobIndex) replace(other *jobIndex) {
	other.mu.Lock()
	defer other.mu.Unlock()
	x.mu.Lock()
	defer x.mu.Unlock()
	x.jobs, x.order = other.jobs, other.order
	for id, last := range x.gone {
		if e := x.jobs[id]; e != nil && e.rev <= last {
			delete(x.jobs, id)
			x.order.Delete(e)
		}
	}
}

// pruneEvery is how often follow drops the jobs whose retention or ttl has passed:
// JetStream removes their state without a deletion that the watch would bring.
const pruneEvery = time.Minute

// follow keeps the index equal to the job state bucket until ctx ends; ready is
// called once the index holds the bucket's content as of the start. A watch that
// closes (its connection lost) is started again, from a fresh snapshot
// (fleet.FollowBucket).
func (x *jobIndex) follow(ctx context.Context, kv jetstream.KeyValue, log *slog.Logger, ready func()) error {
	prune := time.NewTicker(pruneEvery)
	defer prune.Stop()
	fleet.FollowBucket(ctx, kv, log, ready, func(updates <-chan jetstream.KeyValueEntry, live func()) {
		x.mirror(ctx, updates, prune.C, log, live)
	})
	return nil
}

// mirror applies one watch's entries until the watch closes or ctx ends. The entries
// before the watch's nil marker, the bucket's content, replace the index's at once.
func (x *jobIndex) mirror(ctx context.Context, updates <-chan jetstream.KeyValueEntry, prune <-chan time.Time, log *slog.Logger, ready func()) {
	into := newJobIndex(x.retention)
	for {
		var e jetstream.KeyValueEntry
		select {
		case <-ctx.Done():
			return
		case now := <-prune:
			x.prune(now)
			continue
		case entry, ok := <-updates:
			if !ok {
				return
			}
			e = entry
		}
		switch {
		case e == nil:
			if into != x {
				x.replace(into)
				into = x
				ready()
			}
		case e.Operation() != jetstream.KeyValuePut:
			into.remove(e.Key(), e.Revision())
		default:
			var st fleet.JobState
			if err := json.Unmarshal(e.Value(), &st); err != nil || st.ID != e.Key() {
				log.Warn("undecodable job state; left out of the job list", "job", e.Key(), "err", err)
				continue
			}
			into.put(&st, e.Revision())
		}
	}
}
