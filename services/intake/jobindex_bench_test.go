package intake

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"runtime"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

var benchJobs = flag.Int("joblist.jobs", 10000, "job states in the bucket of the job list benchmarks")

// benchStates fills the job state bucket of a new fleet with n states of 4 scenes,
// of 10 tenants, one created a second, a tenth of them failed, and returns the bucket.
func benchStates(b *testing.B, n int) jetstream.KeyValue {
	b.Helper()
	_, _, js := fleettest.Fleet(b, fleet.Settings{})
	ctx := context.Background()
	kv, err := js.KeyValue(ctx, fleet.BucketJobState)
	if err != nil {
		b.Fatal(err)
	}
	t0 := time.Now().Add(-time.Duration(n) * time.Second)
	for i := range n {
		id, _ := uuid.NewV7()
		st := fleet.NewJobState(&fleet.Job{ID: id.String(), Tenant: fmt.Sprintf("tenant-%d", i%10), Priority: 5,
			CreatedAt: t0.Add(time.Duration(i) * time.Second), Scenes: make([]fleet.Scene, 4)})
		for s := range 4 {
			typ := fleet.EventCompleted
			if i%10 == 0 && s == 0 {
				typ = fleet.EventFailed
			}
			st.End(s, 0, typ, st.CreatedAt.Add(time.Second))
		}
		v, err := json.Marshal(st)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := js.PublishAsync("$KV."+fleet.BucketJobState+"."+st.ID, v); err != nil {
			b.Fatal(err)
		}
	}
	select {
	case <-js.PublishAsyncComplete():
	case <-time.After(time.Minute):
		b.Fatal("states not stored within a minute")
	}
	return kv
}

// BenchmarkJobIndexFollow is an intake's start: the watch of the job states until
// the index holds them all, and the memory the index takes.
//
//	go test ./services/intake -run '^$' -bench JobIndex -benchtime 3x -args -joblist.jobs=100000
func BenchmarkJobIndexFollow(b *testing.B) {
	kv := benchStates(b, *benchJobs)
	var before, after runtime.MemStats
	for b.Loop() {
		runtime.GC()
		runtime.ReadMemStats(&before)
		x := newJobIndex(fleet.DefaultRetention)
		ctx, cancel := context.WithCancel(context.Background())
		ready := make(chan struct{})
		stopped := make(chan error, 1)
		go func() { stopped <- x.follow(ctx, kv, slog.New(slog.DiscardHandler), func() { close(ready) }) }()
		select {
		case <-ready:
		case err := <-stopped:
			b.Fatal(err)
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		cancel()
		if err := <-stopped; err != nil {
			b.Fatal(err)
		}
		if x.size() != *benchJobs {
			b.Fatalf("index holds %d jobs, want %d", x.size(), *benchJobs)
		}
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/float64(*benchJobs), "heap-B/job")
	}
	b.ReportMetric(float64(*benchJobs), "jobs")
}

// BenchmarkJobIndexPage is one page of GET /v1/jobs from the index: the newest 50 of
// a tenant, and its newest 50 failed (a hundredth of its jobs).
func BenchmarkJobIndexPage(b *testing.B) {
	x := newJobIndex(fleet.DefaultRetention)
	t0 := time.Now().Add(-time.Duration(*benchJobs) * time.Second)
	for i := range *benchJobs {
		st := fleet.NewJobState(&fleet.Job{ID: fmt.Sprintf("job-%08d", i), Tenant: fmt.Sprintf("tenant-%d", i%10),
			CreatedAt: t0.Add(time.Duration(i) * time.Second), Scenes: make([]fleet.Scene, 4)})
		if i%100 < 10 {
			for s := range 4 {
				st.End(s, 0, fleet.EventFailed, st.CreatedAt)
			}
		}
		x.put(st, uint64(i+1))
	}
	now := time.Now()
	for _, q := range []struct {
		name string
		q    listQuery
	}{
		{"newest", listQuery{tenant: "tenant-3", limit: 50}},
		{"failed", listQuery{tenant: "tenant-3", limit: 50, statuses: map[string]bool{"failed": true}}},
	} {
		b.Run(q.name, func(b *testing.B) {
			for b.Loop() {
				if jobs, _ := x.page(q.q, now); len(jobs) == 0 {
					b.Fatal("empty page")
				}
			}
		})
	}
}

// BenchmarkJobStateScan is what a job list would cost without the index: every
// state of the bucket read, per request, by an ordered consumer.
func BenchmarkJobStateScan(b *testing.B) {
	kv := benchStates(b, *benchJobs)
	ctx := context.Background()
	for b.Loop() {
		w, err := kv.WatchAll(ctx)
		if err != nil {
			b.Fatal(err)
		}
		n := 0
		for e := range w.Updates() {
			if e == nil {
				break
			}
			var st fleet.JobState
			if err := json.Unmarshal(e.Value(), &st); err != nil {
				b.Fatal(err)
			}
			n++
		}
		_ = w.Stop()
		if n != *benchJobs {
			b.Fatalf("read %d states, want %d", n, *benchJobs)
		}
	}
}
