package fleet_test

import (
	"context"
	"errors"
	"log/slog"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

// jobsFleet starts a fleet of its own for tb and opens its jobs.
func jobsFleet(tb testing.TB) (*nats.Conn, jetstream.JetStream, *fleet.Jobs) {
	tb.Helper()
	_, nc, js := fleettest.Fleet(tb, fleet.Settings{})
	jobs, err := fleet.OpenJobs(context.Background(), js)
	if err != nil {
		tb.Fatal(err)
	}
	return nc, js, jobs
}

func TestEnsureIsIdempotent(t *testing.T) {
	t.Parallel()
	_, _, js := fleettest.Fleet(t, fleet.Settings{})
	if err := fleet.Ensure(context.Background(), js, fleet.Settings{}); err != nil {
		t.Fatalf("second Ensure: %v", err)
	}
}

func TestJobStateConcurrentEndsKeepEveryChange(t *testing.T) {
	t.Parallel()
	_, _, jobs := jobsFleet(t)
	ctx := context.Background()
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
			if _, err := jobs.UpdateState(ctx, "j1", func(st *fleet.JobState) error {
				if !st.End(i, 0, fleet.EventCompleted, time.Now()) {
					return fleet.ErrNoChange
				}
				return nil
			}); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	st, _, err := jobs.State(ctx, "j1")
	if err != nil {
		t.Fatal(err)
	}
	if succeeded, _, _ := st.Counts(); st.Status != fleet.StatusSucceeded || succeeded != n {
		t.Fatalf("job state %s with %d succeeded, want succeeded with %d; outcomes %q", st.Status, succeeded, n, st.Outcomes)
	}
}

func TestCreateRecordsAJobOnceAndKeepsAStateWrittenFirst(t *testing.T) {
	t.Parallel()
	_, js, jobs := jobsFleet(t)
	ctx := context.Background()
	job := &fleet.Job{ID: "j1", Status: fleet.StatusQueued, Scenes: []fleet.Scene{{Status: fleet.StatusQueued}, {Index: 1, Status: fleet.StatusQueued}}}
	// The tracker got to a scene's start first.
	if _, _, err := jobs.UpdateStateFrom(ctx, "j1", fleet.NewJobState(job), 0, func(st *fleet.JobState) error {
		st.Start(time.Now())
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := jobs.Create(ctx, job); err != nil {
		t.Fatalf("create: %v", err)
	}
	if err := jobs.Create(ctx, job); !errors.Is(err, jetstream.ErrKeyExists) {
		t.Fatalf("second create: %v, want ErrKeyExists", err)
	}
	st, _, err := jobs.State(ctx, "j1")
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != fleet.StatusRunning {
		t.Fatalf("state %s after the job was created, want the tracker's running", st.Status)
	}
	// In a batch with other messages, a record there already is no error.
	msgs, err := jobs.CreateMessages(job, nil)
	if err != nil {
		t.Fatal(err)
	}
	pub := fleet.NewPublisher(js, "test")
	if err := pub.Batch(ctx, append(msgs, fleet.Outgoing{Subject: fleet.SubmitJobSubject("j2"), MsgID: "m", Value: job})); err != nil {
		t.Fatalf("batch with the job's creation: %v", err)
	}
}

func TestJobStateIgnoresEndsOfEarlierRuns(t *testing.T) {
	t.Parallel()
	now := time.Now()
	st := fleet.NewJobState(&fleet.Job{ID: "j", Scenes: make([]fleet.Scene, 2)})
	st.End(0, 0, fleet.EventFailed, now)
	st.End(1, 0, fleet.EventCompleted, now)
	if st.Status != fleet.StatusFailed || st.FinishedAt == nil {
		t.Fatalf("status %s finished %v, want failed and finished", st.Status, st.FinishedAt)
	}
	if !st.Reopen(0, 1, now) || st.Reopen(0, 1, now) {
		t.Fatal("reopen changed nothing, or reopening the same run twice changed something")
	}
	if st.Status != fleet.StatusRunning || st.FinishedAt != nil || st.Round != 1 {
		t.Fatalf("after reopen: status %s finished %v round %d", st.Status, st.FinishedAt, st.Round)
	}
	if st.End(0, 0, fleet.EventFailed, now) {
		t.Fatal("a late end of the first run counted")
	}
	if !st.End(0, 1, fleet.EventCompleted, now) || st.Status != fleet.StatusSucceeded {
		t.Fatalf("end of the retry: status %s", st.Status)
	}
}

func TestGetFoldsTheEventsOfEveryScene(t *testing.T) {
	t.Parallel()
	_, js, jobs := jobsFleet(t)
	ctx := context.Background()
	// More scenes than one batched read of their events covers.
	const n = 230
	created := time.Now().UTC().Truncate(time.Millisecond)
	job := &fleet.Job{ID: "big", Status: fleet.StatusQueued, Scenes: make([]fleet.Scene, n), CreatedAt: created}
	for i := range job.Scenes {
		job.Scenes[i] = fleet.Scene{Index: i, Pool: "image", Status: fleet.StatusQueued, QueuedAt: created}
	}
	if err := jobs.Create(ctx, job); err != nil {
		t.Fatal(err)
	}
	pub := fleet.NewPublisher(js, "test")
	publish := func(ev fleet.SceneEvent) {
		t.Helper()
		ev.JobID = "big"
		if err := pub.SceneEvent(ctx, ev); err != nil {
			t.Fatal(err)
		}
	}
	for i := range n {
		publish(fleet.SceneEvent{Index: i, Type: fleet.EventQueued, Pool: "image"})
		publish(fleet.SceneEvent{Index: i, Type: fleet.EventStarted, Attempt: 1, Node: "a"})
		if i == 7 {
			continue // still running
		}
		publish(fleet.SceneEvent{Index: i, Type: fleet.EventProgress, Attempt: 1, Node: "a", Progress: &fleet.Progress{Value: 5, Max: 10}})
		publish(fleet.SceneEvent{Index: i, Type: fleet.EventCompleted, Attempt: 1, Node: "a", Outputs: []fleet.Output{{Name: "x.png"}}})
	}
	// Scene 3 of the last chunk failed twice, then for good; then was retried by
	// hand, and its retry runs.
	last := n - 3
	first := fleet.Attempt{Attempt: 1, Node: "a", Error: "one"}
	publish(fleet.SceneEvent{Index: last, Type: fleet.EventRetrying, Attempt: 2, Node: "b", Error: "two", Failures: []fleet.Attempt{first}})
	gotJob, err := jobs.Get(ctx, "big")
	if err != nil {
		t.Fatal(err)
	}
	s := gotJob.Scenes[last]
	if s.Status != fleet.StatusSucceeded {
		t.Fatalf("scene %d is %s; a retrying event after its completion must not reopen it", last, s.Status)
	}
	publish(fleet.SceneEvent{Index: 7, Type: fleet.EventFailed, Attempt: 3, Node: "c", Error: "three",
		Failures: []fleet.Attempt{first, {Attempt: 2, Node: "b", Error: "two"}}})
	publish(fleet.SceneEvent{Index: 7, Retry: 1, Type: fleet.EventQueued, Pool: "image"})
	publish(fleet.SceneEvent{Index: 7, Retry: 1, Type: fleet.EventStarted, Attempt: 4, Node: "d"})
	gotJob, err = jobs.Get(ctx, "big")
	if err != nil {
		t.Fatal(err)
	}
	s = gotJob.Scenes[7]
	if s.Status != fleet.StatusRunning || s.Retries != 1 || s.Attempts != 4 || s.Node != "d" {
		t.Fatalf("retried scene: %+v", s)
	}
	if len(s.Failures) != 3 || s.Failures[0].Error != "one" || s.Failures[2].Error != "three" {
		t.Fatalf("failures of the retried scene: %+v, want its three failed attempts in order", s.Failures)
	}
	if gotJob.Status != fleet.StatusRunning || gotJob.FinishedAt != nil {
		t.Fatalf("job %s finished %v, want running", gotJob.Status, gotJob.FinishedAt)
	}
	for i, sc := range gotJob.Scenes {
		if i != 7 && (sc.Status != fleet.StatusSucceeded || len(sc.Outputs) != 1 || sc.StartedAt == nil) {
			t.Fatalf("scene %d: %+v, want succeeded with its output", i, sc)
		}
	}
	publish(fleet.SceneEvent{Index: 7, Retry: 1, Type: fleet.EventCompleted, Attempt: 4, Node: "d"})
	gotJob, err = jobs.Get(ctx, "big")
	if err != nil {
		t.Fatal(err)
	}
	if gotJob.Status != fleet.StatusSucceeded || gotJob.FinishedAt == nil {
		t.Fatalf("job %s finished %v, want succeeded", gotJob.Status, gotJob.FinishedAt)
	}
	// Read with its events at once, as the notifier does once it ended; a wrong
	// number of scenes reads them again.
	for _, scenes := range []int{n, 1, n + 150} {
		ended, err := jobs.GetEnded(ctx, "big", scenes)
		if err != nil {
			t.Fatal(err)
		}
		if !reflect.DeepEqual(ended, gotJob) {
			t.Errorf("GetEnded(%d scenes) differs from Get", scenes)
		}
	}
	if ended, err := jobs.SceneEnded(ctx, "big", 7, 1); err != nil || !ended {
		t.Fatalf("SceneEnded(7, run 1) = %v, %v", ended, err)
	}
	if ended, err := jobs.SceneEnded(ctx, "big", 7, 2); err != nil || ended {
		t.Fatalf("SceneEnded(7, run 2) = %v, %v; want false", ended, err)
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

func TestASlowMessageHoldsUpNoOther(t *testing.T) {
	t.Parallel()
	_, _, js := fleettest.Fleet(t, fleet.Settings{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	release := make(chan struct{})
	handled := make(chan string, 8)
	cfg := jetstream.ConsumerConfig{Durable: "slow", AckPolicy: jetstream.AckExplicitPolicy, AckWait: time.Minute}
	done := make(chan error, 1)
	go func() {
		done <- fleet.Consume(ctx, js, fleet.StreamDone, cfg, slog.New(slog.DiscardHandler), func(ctx context.Context, msg jetstream.Msg) error {
			if msg.Subject() == fleet.DoneSubject("j0") {
				select {
				case <-release:
				case <-ctx.Done():
				}
			}
			handled <- msg.Subject()
			return nil
		}, fleet.Workers(2))
	}()
	for _, job := range []string{"j0", "j1", "j2", "j3"} {
		if _, err := js.Publish(ctx, fleet.DoneSubject(job), []byte(`{}`)); err != nil {
			t.Fatal(err)
		}
	}
	// One worker is held by j0; the other takes every later message.
	for range 3 {
		select {
		case subj := <-handled:
			if subj == fleet.DoneSubject("j0") {
				t.Fatal("the held message was handled before it was released")
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a message waited behind the one being handled, with a worker free")
		}
	}
	close(release)
	select {
	case subj := <-handled:
		if subj != fleet.DoneSubject("j0") {
			t.Fatalf("handled %s, want the released j0", subj)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the released message was not handled")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestAPanickingHandlerIsLoggedAndItsMessageRetried(t *testing.T) {
	t.Parallel()
	_, _, js := fleettest.Fleet(t, fleet.Settings{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var logs fleettest.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	handled := make(chan uint64, 4)
	cfg := jetstream.ConsumerConfig{Durable: "panics", AckPolicy: jetstream.AckExplicitPolicy, AckWait: 5 * time.Second}
	done := make(chan error, 1)
	go func() {
		done <- fleet.Consume(ctx, js, fleet.StreamDone, cfg, log, func(_ context.Context, msg jetstream.Msg) error {
			md, err := msg.Metadata()
			if err != nil {
				return err
			}
			if md.NumDelivered == 1 {
				var nilMap map[string]int
				nilMap["boom"]++ // a panic, as a bug in a handler would cause
			}
			handled <- md.NumDelivered
			return nil
		})
	}()
	if _, err := js.Publish(ctx, fleet.DoneSubject("j1"), []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	select {
	case n := <-handled:
		if n != 2 {
			t.Fatalf("handled at delivery %d, want the second, after the panic", n)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("the message was not retried after its handler panicked; logs:\n%s", logs.String())
	}
	for _, want := range []string{"handler panicked", "assignment to entry in nil map", "fleet_test.go"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("the log lacks %q:\n%s", want, logs.String())
		}
	}
	// The process lives on: the consumer still takes messages.
	if _, err := js.Publish(ctx, fleet.DoneSubject("j2"), []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-handled:
	case <-time.After(10 * time.Second):
		t.Fatal("no message handled after the panic")
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

func TestEnsureWorkConsumerReplacesOneKeptOnFile(t *testing.T) {
	t.Parallel()
	settings := fleet.Settings{AckWait: 2 * time.Second}
	_, _, js := fleettest.Fleet(t, settings)
	ctx := context.Background()
	old := fleet.WorkConsumer("gpu-a", settings)
	old.MemoryStorage = false
	if _, err := js.CreateOrUpdateConsumer(ctx, fleet.StreamWork, old); err != nil {
		t.Fatal(err)
	}
	cons, err := fleet.EnsureWorkConsumer(ctx, js, "gpu-a", settings)
	if err != nil {
		t.Fatal(err)
	}
	if info, err := cons.Info(ctx); err != nil || !info.Config.MemoryStorage {
		t.Fatalf("work consumer after Ensure: %+v, %v; want its state in memory", info, err)
	}
}

func TestEnsureExistsCreatesWhatIsMissing(t *testing.T) {
	t.Parallel()
	s := fleettest.NATS(t)
	_, js := fleettest.Connect(t, s)
	ctx := context.Background()
	if err := fleet.EnsureExists(ctx, js, fleet.Settings{}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.KeyValue(ctx, fleet.BucketJobState); err != nil {
		t.Fatalf("bucket %s after EnsureExists on an empty server: %v", fleet.BucketJobState, err)
	}
	if err := js.DeleteKeyValue(ctx, fleet.BucketLeases); err != nil {
		t.Fatal(err)
	}
	if err := fleet.EnsureExists(ctx, js, fleet.Settings{}); err != nil {
		t.Fatal(err)
	}
	if _, err := js.KeyValue(ctx, fleet.BucketLeases); err != nil {
		t.Fatalf("bucket %s deleted, after EnsureExists: %v", fleet.BucketLeases, err)
	}
}

// Attempts the fleet ended do not use up a scene's attempts, up to LossAllowance of
// them; the scene's own failures always do.
func TestLossesUpToTheAllowanceDoNotUseUpAttempts(t *testing.T) {
	var tk fleet.Ticket
	attempt := 0
	for range fleet.LossAllowance {
		attempt++
		if used := tk.AttemptsUsed(attempt, true); used != 0 {
			t.Fatalf("after %d losses, %d attempts used; want none", attempt, used)
		}
		tk = tk.Requeue(1, "gpu", 0, nil).AfterLoss()
	}
	attempt++
	if used := tk.AttemptsUsed(attempt, true); used != 1 {
		t.Errorf("a loss beyond the allowance uses %d attempts, want 1", used)
	}
	if used := tk.AttemptsUsed(attempt, false); used != 1 {
		t.Errorf("a failure after the allowed losses uses %d attempts, want 1", used)
	}
	tk.AttemptBase = 4
	if used := tk.AttemptsUsed(attempt+4, false); used != 1 {
		t.Errorf("with 4 attempts in earlier runs, %d used by this run, want 1", used)
	}
	if tk.Lost != fleet.LossAllowance || tk.Requeued != fleet.LossAllowance {
		t.Errorf("the ticket counts %d losses in %d requeued attempts, want %d of %d", tk.Lost, tk.Requeued, fleet.LossAllowance, fleet.LossAllowance)
	}
}

func TestNoMessageKnowsEveryAnswerForAMessageAlreadyGone(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	_, _, js := fleettest.Fleet(t, fleet.Settings{})
	var seqs []uint64
	for range 3 {
		ack, err := js.Publish(ctx, fleet.WorkSubject("gpu-1"), []byte("{}"))
		if err != nil {
			t.Fatal(err)
		}
		seqs = append(seqs, ack.Sequence)
	}
	work, err := js.Stream(ctx, fleet.StreamWork)
	if err != nil {
		t.Fatal(err)
	}
	// The server answers a delete of a message below the stream's first one apart
	// from one between others ("no message found", "sequence N not found").
	for _, seq := range []uint64{seqs[1], seqs[0]} {
		if err := work.DeleteMsg(ctx, seq); err != nil {
			t.Fatalf("first delete of %d: %v", seq, err)
		}
		if err := work.DeleteMsg(ctx, seq); err == nil || !fleet.NoMessage(err) {
			t.Errorf("a second delete of message %d: %v; NoMessage says false", seq, err)
		}
		if _, err := work.GetMsg(ctx, seq); err == nil || !fleet.NoMessage(err) {
			t.Errorf("a get of deleted message %d: %v; NoMessage says false", seq, err)
		}
	}
	if _, err := js.Stream(ctx, "NO_SUCH_STREAM"); err == nil || fleet.NoMessage(err) {
		t.Errorf("a missing stream: %v; NoMessage says true", err)
	}
}
