package fleet_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

func TestEnsureIsIdempotent(t *testing.T) {
	t.Parallel()
	_, _, js := fleettest.Fleet(t, fleet.Settings{})
	if err := fleet.Ensure(context.Background(), js, fleet.Settings{}); err != nil {
		t.Fatalf("second Ensure: %v", err)
	}
}

func TestJobsUpdateConcurrentScenesKeepEveryChange(t *testing.T) {
	t.Parallel()
	_, _, js := fleettest.Fleet(t, fleet.Settings{})
	ctx := context.Background()
	jobs, err := fleet.OpenJobs(ctx, js)
	if err != nil {
		t.Fatal(err)
	}
	const n = 16
	job := &fleet.Job{ID: "j1", Status: fleet.StatusQueued, Scenes: make([]fleet.Scene, n)}
	for i := range job.Scenes {
		job.Scenes[i] = fleet.Scene{Index: i, Status: fleet.StatusQueued}
	}
	if err := jobs.Create(ctx, job); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			ev := fleet.SceneEvent{JobID: "j1", Index: i, Type: fleet.EventCompleted, Attempt: 1, Node: "n", Time: time.Now()}
			if _, err := jobs.Update(ctx, "j1", func(j *fleet.Job) error {
				if !j.Apply(ev) {
					return fleet.ErrNoChange
				}
				return nil
			}); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	got, _, err := jobs.Get(ctx, "j1")
	if err != nil {
		t.Fatal(err)
	}
	if got.Status != fleet.StatusSucceeded {
		t.Fatalf("job status %s, want succeeded; scenes %+v", got.Status, got.Scenes)
	}
}

func TestApplyIgnoresStaleAndRepeatedEvents(t *testing.T) {
	t.Parallel()
	now := time.Now()
	j := fleet.Job{ID: "j", Status: fleet.StatusQueued, Scenes: []fleet.Scene{{Status: fleet.StatusQueued}, {Status: fleet.StatusQueued}}}
	ev := func(typ fleet.EventType, attempt int) fleet.SceneEvent {
		return fleet.SceneEvent{JobID: "j", Index: 0, Type: typ, Attempt: attempt, Node: "a", Error: "boom", Time: now}
	}
	steps := []struct {
		ev      fleet.SceneEvent
		changed bool
		scene   fleet.Status
		job     fleet.Status
	}{
		{ev(fleet.EventStarted, 1), true, fleet.StatusRunning, fleet.StatusRunning},
		{ev(fleet.EventStarted, 1), false, fleet.StatusRunning, fleet.StatusRunning},
		{ev(fleet.EventRetrying, 1), true, fleet.StatusQueued, fleet.StatusRunning},
		{ev(fleet.EventRetrying, 1), false, fleet.StatusQueued, fleet.StatusRunning},
		{ev(fleet.EventStarted, 2), true, fleet.StatusRunning, fleet.StatusRunning},
		{ev(fleet.EventStarted, 1), false, fleet.StatusRunning, fleet.StatusRunning},
		{ev(fleet.EventCompleted, 2), true, fleet.StatusSucceeded, fleet.StatusRunning},
		{ev(fleet.EventFailed, 3), false, fleet.StatusSucceeded, fleet.StatusRunning},
	}
	for i, st := range steps {
		if got := j.Apply(st.ev); got != st.changed {
			t.Fatalf("step %d (%s attempt %d): changed=%v, want %v", i, st.ev.Type, st.ev.Attempt, got, st.changed)
		}
		if j.Scenes[0].Status != st.scene || j.Status != st.job {
			t.Fatalf("step %d: scene %s job %s, want %s %s", i, j.Scenes[0].Status, j.Status, st.scene, st.job)
		}
	}
	if len(j.Scenes[0].Failures) != 1 || j.Scenes[0].Attempts != 2 {
		t.Fatalf("failures %+v attempts %d, want one failure and 2 attempts", j.Scenes[0].Failures, j.Scenes[0].Attempts)
	}
	j.Apply(fleet.SceneEvent{JobID: "j", Index: 1, Type: fleet.EventFailed, Attempt: 3, Error: "x", Time: now})
	if j.Status != fleet.StatusFailed || j.FinishedAt == nil {
		t.Fatalf("job %s finished %v, want failed and finished", j.Status, j.FinishedAt)
	}
}

func TestApplyCancelsWhicheverAttemptRuns(t *testing.T) {
	t.Parallel()
	now := time.Now()
	j := fleet.Job{ID: "j", Status: fleet.StatusRunning, Scenes: []fleet.Scene{
		{Status: fleet.StatusRunning, Attempts: 2, Node: "a"},
		{Status: fleet.StatusSucceeded, Attempts: 1},
	}}
	// The intake cancels from a job state that may lag behind the executors, so its
	// event names no attempt.
	if !j.Apply(fleet.SceneEvent{JobID: "j", Index: 0, Type: fleet.EventCancelled, Time: now}) {
		t.Fatal("cancellation of a scene in its second attempt was ignored")
	}
	if j.Scenes[0].Status != fleet.StatusCancelled || j.Status != fleet.StatusCancelled || j.FinishedAt == nil {
		t.Fatalf("scene %s, job %s finished %v; want both cancelled and finished", j.Scenes[0].Status, j.Status, j.FinishedAt)
	}
	if j.Apply(fleet.SceneEvent{JobID: "j", Index: 0, Type: fleet.EventCompleted, Attempt: 2, Node: "a", Time: now}) {
		t.Fatal("a completion after the cancellation changed the scene")
	}
}
