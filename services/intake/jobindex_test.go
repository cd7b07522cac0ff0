package intake

import (
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// indexOf holds n jobs of tenant "t", one created each second from t0 (job-00 the
// oldest), every third one failed, the others queued, and one job of tenant "u".
func indexOf(n int, t0 time.Time) *jobIndex {
	x := newJobIndex(time.Hour)
	for i := range n {
		st := fleet.NewJobState(&fleet.Job{ID: fmt.Sprintf("job-%02d", i), Tenant: "t", CreatedAt: t0.Add(time.Duration(i) * time.Second), Scenes: make([]fleet.Scene, 2)})
		if i%3 == 0 {
			st.End(0, 0, fleet.EventFailed, t0)
			st.End(1, 0, fleet.EventCompleted, t0)
		}
		x.put(st, uint64(i+1))
	}
	x.put(fleet.NewJobState(&fleet.Job{ID: "other", Tenant: "u", CreatedAt: t0}), uint64(n+1))
	return x
}

// pageIDs runs q on x and returns the ids listed and the cursor.
func pageIDs(x *jobIndex, q listQuery, now time.Time) ([]string, *indexKey) {
	jobs, next := x.page(q, now)
	out := make([]string, len(jobs))
	for i, j := range jobs {
		out[i] = j.ID
	}
	return out, next
}

func TestJobIndexPagesNewestFirstWithFilters(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)
	x := indexOf(10, t0)
	now := t0.Add(time.Minute)
	for _, tc := range []struct {
		name string
		q    listQuery
		want []string
		more bool
	}{
		{"first page", listQuery{tenant: "t", limit: 3}, []string{"job-09", "job-08", "job-07"}, true},
		{"all of a tenant", listQuery{tenant: "t", limit: 100}, []string{"job-09", "job-08", "job-07", "job-06", "job-05", "job-04", "job-03", "job-02", "job-01", "job-00"}, false},
		{"exactly the rest", listQuery{tenant: "t", limit: 10}, []string{"job-09", "job-08", "job-07", "job-06", "job-05", "job-04", "job-03", "job-02", "job-01", "job-00"}, false},
		{"another tenant", listQuery{tenant: "u", limit: 100}, []string{"other"}, false},
		{"an unknown tenant", listQuery{tenant: "v", limit: 100}, []string{}, false},
		{"failed", listQuery{tenant: "t", limit: 100, statuses: map[string]bool{"failed": true}}, []string{"job-09", "job-06", "job-03", "job-00"}, false},
		{"failed or queued, paged", listQuery{tenant: "t", limit: 2, statuses: map[string]bool{"failed": true, "queued": true}}, []string{"job-09", "job-08"}, true},
		{"since, included", listQuery{tenant: "t", limit: 100, since: t0.Add(7 * time.Second)}, []string{"job-09", "job-08", "job-07"}, false},
		{"until, excluded", listQuery{tenant: "t", limit: 100, until: t0.Add(2 * time.Second)}, []string{"job-01", "job-00"}, false},
		{"between", listQuery{tenant: "t", limit: 100, since: t0.Add(4 * time.Second), until: t0.Add(6 * time.Second)}, []string{"job-05", "job-04"}, false},
		{"running: none", listQuery{tenant: "t", limit: 100, statuses: map[string]bool{"running": true}}, []string{}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, next := pageIDs(x, tc.q, now)
			if !slices.Equal(got, tc.want) || (next != nil) != tc.more {
				t.Errorf("page %v (more: %v), want %v (more: %v)", got, next != nil, tc.want, tc.more)
			}
		})
	}
}

func TestJobIndexCursorWalksEveryJobOnce(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)
	x := indexOf(10, t0)
	// Two jobs created in the same instant as job-05: the id orders them.
	for _, id := range []string{"job-05a", "job-05b"} {
		x.put(fleet.NewJobState(&fleet.Job{ID: id, Tenant: "t", CreatedAt: t0.Add(5 * time.Second)}), 100)
	}
	q := listQuery{tenant: "t", limit: 3, statuses: map[string]bool{"queued": true}}
	var all []string
	for range 10 {
		got, next := pageIDs(x, q, t0)
		all = append(all, got...)
		if next == nil {
			break
		}
		// The cursor goes through its text form, as clients pass it back.
		k, err := decodeCursor(encodeCursor(*next))
		if err != nil {
			t.Fatal(err)
		}
		k.tenant = q.tenant
		q.after = &k
	}
	want := []string{"job-08", "job-07", "job-05b", "job-05a", "job-05", "job-04", "job-02", "job-01"}
	if !slices.Equal(all, want) {
		t.Errorf("pages gave %v, want %v", all, want)
	}
}

func TestJobIndexKeepsTheLatestRevisionAndDropsDeletedAndExpiredJobs(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)
	x := indexOf(3, t0)
	st := fleet.NewJobState(&fleet.Job{ID: "job-01", Tenant: "t", CreatedAt: t0.Add(time.Second), Scenes: make([]fleet.Scene, 1)})
	running := *st
	running.Start(t0)
	x.put(&running, 10)
	x.put(st, 9)
	if got, _ := pageIDs(x, listQuery{tenant: "t", limit: 10, statuses: map[string]bool{"running": true}}, t0); !slices.Equal(got, []string{"job-01"}) {
		t.Errorf("after a later then an earlier revision, running jobs: %v", got)
	}

	// Deleted here: a revision the watch brings before the deletion does not bring
	// it back.
	x.remove("job-01", 0)
	x.put(&running, 10)
	x.remove("job-01", 11)
	if got, _ := pageIDs(x, listQuery{tenant: "t", limit: 10}, t0); !slices.Equal(got, []string{"job-02", "job-00"}) {
		t.Errorf("after deleting job-01: %v", got)
	}

	// Expired by the retention (an hour) or its own ttl: left out, then pruned.
	short := t0.Add(10 * time.Minute)
	x.put(fleet.NewJobState(&fleet.Job{ID: "short", Tenant: "t", CreatedAt: t0.Add(3 * time.Second), ExpiresAt: &short}), 20)
	if got, _ := pageIDs(x, listQuery{tenant: "t", limit: 10}, short.Add(-time.Second)); !slices.Equal(got, []string{"short", "job-02", "job-00"}) {
		t.Errorf("before the ttl: %v", got)
	}
	if got, _ := pageIDs(x, listQuery{tenant: "t", limit: 10}, short); !slices.Equal(got, []string{"job-02", "job-00"}) {
		t.Errorf("at the ttl: %v", got)
	}
	x.prune(t0.Add(time.Hour + time.Second))
	if got, _ := pageIDs(x, listQuery{tenant: "t", limit: 10}, t0); x.size() != 1 || !slices.Equal(got, []string{"job-02"}) {
		t.Errorf("pruned an hour and a second after job-00: %d jobs left, %v listed; want job-02, created later", x.size(), got)
	}
}
