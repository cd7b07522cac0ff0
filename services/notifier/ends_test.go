package notifier

import (
	"context"
	"errors"
	"sync"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

// TestEndsThatComeTogetherAreWrittenTogether: while a job's state is written, the
// ends of its other scenes gather and the next write takes them all; each end learns
// the state written with it, and one end of each write is told it wrote it.
func TestEndsThatComeTogetherAreWrittenTogether(t *testing.T) {
	var g endGroups
	const scenes = 50
	release := make(chan struct{})
	var (
		mu     sync.Mutex
		writes [][]int
	)
	write := func(_ context.Context, evs []fleet.SceneEvent) (*fleet.JobState, error) {
		mu.Lock()
		first := len(writes) == 0
		var idx []int
		for _, ev := range evs {
			idx = append(idx, ev.Index)
		}
		writes = append(writes, idx)
		n := len(writes)
		mu.Unlock()
		if first {
			<-release // the first write is slow: every other end comes meanwhile
		}
		return &fleet.JobState{ID: evs[0].JobID, Round: n}, nil
	}

	type result struct {
		st    *fleet.JobState
		wrote bool
		err   error
	}
	results := make([]result, scenes)
	var wg sync.WaitGroup
	wg.Go(func() {
		st, wrote, err := g.fold(t.Context(), fleet.SceneEvent{JobID: "j", Index: 0, Type: fleet.EventCompleted}, write)
		results[0] = result{st, wrote, err}
	})
	fleettest.Eventually(t, 10*time.Second, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(writes) == 1
	}, "the first write did not start")
	for i := 1; i < scenes; i++ {
		wg.Go(func() {
			st, wrote, err := g.fold(t.Context(), fleet.SceneEvent{JobID: "j", Index: i, Type: fleet.EventCompleted}, write)
			results[i] = result{st, wrote, err}
		})
	}
	// Every other end has joined the second group before the first write ends.
	fleettest.Eventually(t, 10*time.Second, func() bool {
		g.mu.Lock()
		defer g.mu.Unlock()
		return g.open["j"] != nil && len(g.open["j"].evs) == scenes-1
	}, "the other ends did not join the next group")
	close(release)
	wg.Wait()

	if len(writes) != 2 || len(writes[0]) != 1 || len(writes[1]) != scenes-1 {
		t.Fatalf("writes %v; want the first end alone, then the %d others together", writes, scenes-1)
	}
	wrote := 0
	for i, r := range results {
		want := 1
		if i > 0 {
			want = 2
		}
		if r.err != nil || r.st == nil || r.st.Round != want {
			t.Errorf("end %d: state %+v, %v; want the state of write %d", i, r.st, r.err, want)
		}
		if r.wrote {
			wrote++
		}
	}
	if wrote != 2 {
		t.Errorf("%d ends were told they wrote; want one for each write", wrote)
	}
}

// TestAFailedWriteFailsEveryEndOfItsGroup, and the job's next ends are written
// afresh.
func TestAFailedWriteFailsEveryEndOfItsGroup(t *testing.T) {
	var g endGroups
	refused := errors.New("refused")
	_, wrote, err := g.fold(t.Context(), fleet.SceneEvent{JobID: "j", Index: 0}, func(context.Context, []fleet.SceneEvent) (*fleet.JobState, error) {
		return nil, refused
	})
	if !errors.Is(err, refused) || !wrote {
		t.Fatalf("fold = %v, wrote %v; want the write's error", err, wrote)
	}
	st, _, err := g.fold(t.Context(), fleet.SceneEvent{JobID: "j", Index: 1}, func(_ context.Context, evs []fleet.SceneEvent) (*fleet.JobState, error) {
		if len(evs) != 1 || evs[0].Index != 1 {
			t.Errorf("second write took %+v; want only the second end", evs)
		}
		return &fleet.JobState{ID: "j"}, nil
	})
	if err != nil || st == nil {
		t.Fatalf("second fold = %+v, %v", st, err)
	}
}

// TestAWriteThatPanicsFailsItsGroupAndFreesTheJob: the panic reaches the end that
// wrote (its handler's recovery), the others of its group fail, and the job's next
// ends are written.
func TestAWriteThatPanicsFailsItsGroupAndFreesTheJob(t *testing.T) {
	var g endGroups
	func() {
		defer func() {
			if recover() == nil {
				t.Error("the panic of the write did not reach the end that wrote")
			}
		}()
		_, _, _ = g.fold(t.Context(), fleet.SceneEvent{JobID: "j"}, func(context.Context, []fleet.SceneEvent) (*fleet.JobState, error) {
			panic("bug")
		})
	}()
	st, wrote, err := g.fold(t.Context(), fleet.SceneEvent{JobID: "j", Index: 1}, func(context.Context, []fleet.SceneEvent) (*fleet.JobState, error) {
		return &fleet.JobState{ID: "j"}, nil
	})
	if err != nil || st == nil || !wrote {
		t.Fatalf("the next fold of the job = %+v, %v, %v", st, wrote, err)
	}
}
