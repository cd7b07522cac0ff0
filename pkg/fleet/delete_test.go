package fleet_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

// storedJob is a job with every piece a job has in the fleet: its commit, its
// scenes' payloads, its record and state, an input image, events, outputs, a dead
// letter and an expiry schedule. Its scene 0 succeeded, scene 1 failed; open lists
// the scenes left open instead (queued).
func storedJob(t *testing.T, js jetstream.JetStream, jobs *fleet.Jobs, id string, open ...int) {
	t.Helper()
	ctx := context.Background()
	pub := fleet.NewPublisher(js, "test")
	now := time.Now().UTC().Truncate(time.Second)
	expires := now.Add(time.Hour)
	job := &fleet.Job{ID: id, Tenant: "t", Status: fleet.StatusQueued, CreatedAt: now, UpdatedAt: now, ExpiresAt: &expires,
		Scenes: []fleet.Scene{
			{Index: 0, Pool: "image", Status: fleet.StatusQueued, Spec: fleet.SceneSpec{Inputs: []fleet.Input{{Param: "image", Object: fleet.InputKey(id, 0, "image")}}}},
			{Index: 1, Pool: "image", Status: fleet.StatusQueued},
		}}
	msgs := []fleet.Outgoing{
		{Subject: fleet.ScenePayloadSubject(id, 0), MsgID: "payload." + id + ".0", Value: fleet.ScenePayload{JobID: id}},
		{Subject: fleet.ScenePayloadSubject(id, 1), MsgID: "payload." + id + ".1", Value: fleet.ScenePayload{JobID: id, Index: 1}},
		fleet.ExpirySchedule(job),
		{Subject: fleet.SubmitJobSubject(id), MsgID: fleet.SubmitMsgID(id), Value: job},
	}
	if err := pub.Batch(ctx, msgs); err != nil {
		t.Fatal(err)
	}
	if err := jobs.Create(ctx, job); err != nil {
		t.Fatal(err)
	}
	put := func(bucket, name string) {
		t.Helper()
		store, err := js.ObjectStore(ctx, bucket)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := store.Put(ctx, jetstream.ObjectMeta{Name: name}, bytes.NewReader([]byte("data of "+name))); err != nil {
			t.Fatal(err)
		}
	}
	put(fleet.ObjectInputs, fleet.InputKey(id, 0, "image"))
	events := []fleet.SceneEvent{{JobID: id, Index: 0, Type: fleet.EventQueued}, {JobID: id, Index: 1, Type: fleet.EventQueued}}
	for i, typ := range []fleet.EventType{fleet.EventCompleted, fleet.EventFailed} {
		if slices.Contains(open, i) {
			continue
		}
		ev := fleet.SceneEvent{JobID: id, Index: i, Type: typ, Attempt: 1, Node: "n", Error: "broke"}
		if typ == fleet.EventCompleted {
			ev.Error = ""
			ev.Outputs = []fleet.Output{{Name: "s0_a.png", ContentType: "image/png"}}
			put(fleet.ObjectOutputs, fleet.OutputKey(id, 0, "s0_a.png"))
		}
		events = append(events, ev)
		if _, err := jobs.UpdateState(ctx, id, func(st *fleet.JobState) error {
			st.End(i, 0, typ, now)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	if err := pub.SceneEvents(ctx, events); err != nil {
		t.Fatal(err)
	}
	dead, err := js.KeyValue(ctx, fleet.BucketDeadLetters)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dead.Put(ctx, fleet.DeadLetterKey(id, 1), []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
}

func TestDeleteRemovesEveryPieceOfAJob(t *testing.T) {
	t.Parallel()
	_, js, jobs := jobsFleet(t)
	ctx := context.Background()
	storedJob(t, js, jobs, "gone")
	storedJob(t, js, jobs, "kept")
	before := fleettest.JobPieces(t, js, "gone")
	for what, n := range before {
		if n == 0 {
			t.Fatalf("the stored job has no %s: %v", what, before)
		}
	}
	if err := jobs.Delete(ctx, "gone", nil, nil); err != nil {
		t.Fatalf("delete an ended job: %v", err)
	}
	if gone, left := fleettest.Gone(fleettest.JobPieces(t, js, "gone")); !gone {
		t.Errorf("after Delete, the job's %v are left", left)
	}
	if _, err := jobs.Get(ctx, "gone"); !errors.Is(err, fleet.ErrJobNotFound) {
		t.Errorf("Get after Delete: %v, want ErrJobNotFound", err)
	}
	if kept := fleettest.JobPieces(t, js, "kept"); kept["record"] != 1 || kept["events"] != before["events"] || kept["inputs"] != 1 || kept["outputs"] != 1 {
		t.Errorf("the other job lost pieces: %v", kept)
	}
	if err := jobs.Delete(ctx, "gone", nil, nil); !errors.Is(err, fleet.ErrJobNotFound) {
		t.Errorf("second Delete: %v, want ErrJobNotFound", err)
	}
}

func TestDeleteOfARunningJobCancelsItOrRefuses(t *testing.T) {
	t.Parallel()
	nc, js, jobs := jobsFleet(t)
	ctx := context.Background()
	storedJob(t, js, jobs, "open", 1)
	if err := jobs.Delete(ctx, "open", nil, nil); !errors.Is(err, fleet.ErrJobRunning) {
		t.Fatalf("delete a running job without cancel: %v, want ErrJobRunning", err)
	}
	if p := fleettest.JobPieces(t, js, "open"); p["record"] != 1 || p["payloads"] != 2 {
		t.Fatalf("a refused Delete removed pieces: %v", p)
	}
	// Cancelled events go out first: executors stop what they run of the job.
	cancelled, err := nc.SubscribeSync(fleet.SceneCancelledFilter)
	if err != nil {
		t.Fatal(err)
	}
	if err := jobs.Delete(ctx, "open", nil, fleet.NewPublisher(js, "test")); err != nil {
		t.Fatalf("delete a running job, cancelling it: %v", err)
	}
	m, err := cancelled.NextMsg(10 * time.Second)
	if err != nil {
		t.Fatalf("no scene cancelled: %v", err)
	}
	if want := fleet.SceneEventSubject("open", 1, fleet.EventCancelled); m.Subject != want {
		t.Errorf("cancelled %s, want %s", m.Subject, want)
	}
	if gone, left := fleettest.Gone(fleettest.JobPieces(t, js, "open")); !gone {
		t.Errorf("after Delete, the job's %v are left", left)
	}
}

// BenchmarkDelete deletes a finished job of 100 scenes, each with an output file.
//
//	go test ./pkg/fleet -run '^$' -bench Delete -benchtime 5x
func BenchmarkDelete(b *testing.B) {
	_, js, jobs := jobsFleet(b)
	ctx := context.Background()
	outputs, err := js.ObjectStore(ctx, fleet.ObjectOutputs)
	if err != nil {
		b.Fatal(err)
	}
	pub := fleet.NewPublisher(js, "bench")
	const scenes = 100
	n := 0
	for b.Loop() {
		b.StopTimer()
		n++
		id := fmt.Sprintf("job-%d", n)
		job := &fleet.Job{ID: id, Status: fleet.StatusQueued, CreatedAt: time.Now(), Scenes: make([]fleet.Scene, scenes)}
		events := make([]fleet.SceneEvent, scenes)
		for i := range scenes {
			job.Scenes[i] = fleet.Scene{Index: i, Status: fleet.StatusQueued}
			name := fmt.Sprintf("s%d_a.png", i)
			if _, err := outputs.Put(ctx, jetstream.ObjectMeta{Name: fleet.OutputKey(id, i, name)}, bytes.NewReader(make([]byte, 4096))); err != nil {
				b.Fatal(err)
			}
			events[i] = fleet.SceneEvent{JobID: id, Index: i, Type: fleet.EventCompleted, Attempt: 1, Outputs: []fleet.Output{{Name: name}}}
		}
		if err := jobs.Create(ctx, job); err != nil {
			b.Fatal(err)
		}
		if err := pub.SceneEvents(ctx, events); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		if err := jobs.Delete(ctx, id, nil, nil); err != nil {
			b.Fatal(err)
		}
	}
}
