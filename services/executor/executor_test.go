package executor_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/comfy"
	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/workflow"
	"github.com/comfyfleet/comfyfleet/services/dispatcher"
	"github.com/comfyfleet/comfyfleet/services/executor"
)

// rig is an embedded NATS with the fleet's streams, executors started on demand, and
// every scene event they publish.
type rig struct {
	t        *testing.T
	nc       *nats.Conn
	js       jetstream.JetStream
	settings fleet.Settings
	events   *fleettest.Events[fleet.SceneEvent]
	// pos is the position after the event await returned last.
	pos int
	ctx context.Context
	wg  *sync.WaitGroup
}

func newRig(t *testing.T, adjust ...func(*fleet.Settings)) *rig {
	t.Helper()
	settings := fleet.Settings{AckWait: 2 * time.Second, RetryBackoff: 100 * time.Millisecond, NodeTTL: 3 * time.Second}
	for _, f := range adjust {
		f(&settings)
	}
	_, nc, js := fleettest.Fleet(t, settings)
	r := &rig{t: t, nc: nc, js: js, settings: settings, events: fleettest.SceneEvents(t, nc), wg: &sync.WaitGroup{}}
	ctx, cancel := context.WithCancel(context.Background())
	r.ctx = ctx
	t.Cleanup(func() { cancel(); r.wg.Wait() })
	// The dispatcher places the scenes: queued ones, and those the executors give back.
	r.wg.Go(func() {
		cfg := dispatcher.Config{Conn: nc, Settings: settings, Logger: fleettest.Logger(t)}
		if err := dispatcher.Run(ctx, cfg); err != nil {
			t.Errorf("dispatcher: %v", err)
		}
	})
	return r
}

// sim starts a simulated ComfyUI node whose sampler steps take 10ms.
func (r *rig) sim(cfg comfysim.Config) (*comfysim.Server, fleet.NodeConfig) {
	r.t.Helper()
	cfg.StepDuration = 10 * time.Millisecond
	sim := fleettest.Sim(r.t, cfg)
	return sim, fleet.NodeConfig{ID: cfg.Name, URL: sim.URL(), Pools: []string{"image"}, Weight: 1}
}

// executor runs an executor for nodes on a connection of its own, which it returns,
// until the test ends.
func (r *rig) executor(name string, transport http.RoundTripper, nodes ...fleet.NodeConfig) *nats.Conn {
	r.t.Helper()
	nc, err := nats.Connect(r.nc.ConnectedUrl())
	if err != nil {
		r.t.Fatal(err)
	}
	r.t.Cleanup(nc.Close)
	cfg := executor.Config{Conn: nc, Settings: r.settings, Nodes: nodes, Name: name, HeartbeatInterval: 200 * time.Millisecond,
		Logger: fleettest.Logger(r.t)}
	if transport != nil {
		cfg.HTTPClient = &http.Client{Transport: transport}
	}
	r.wg.Go(func() {
		if err := executor.Run(r.ctx, cfg); err != nil {
			r.t.Errorf("executor %s: %v", name, err)
		}
	})
	return nc
}

// submit commits a job of one txt2img scene of steps sampler steps in the image pool,
// as the intake does: the scene's payload, then the job; the dispatcher queues it.
func (r *rig) submit(job string, steps int, timeout time.Duration) fleet.Ticket {
	r.t.Helper()
	payload, commit, t := r.job(job, steps, timeout)
	r.publish(payload, commit)
	return t
}

// firstAttemptOn runs the node first and another, gpu-b, each under an executor of
// its own, submits job (a scene of steps), and waits for its first attempt to start
// on first: first is thought the faster, by its weight, so that it takes that attempt
// whatever the setup times measured.
func (r *rig) firstAttemptOn(first comfysim.Config, job string, steps int) (firstSim, otherSim *comfysim.Server, firstNode, other fleet.NodeConfig) {
	r.t.Helper()
	firstSim, firstNode = r.sim(first)
	otherSim, other = r.sim(comfysim.Config{Name: "gpu-b"})
	other.Weight = 0.5
	r.executor("exec-a", nil, firstNode)
	r.executor("exec-b", nil, other)
	r.awaitOnline(firstNode.ID, other.ID)
	r.submit(job, steps, 0)
	if started := r.await(fleet.EventStarted, 30*time.Second); started.Node != firstNode.ID {
		r.t.Fatalf("first attempt on %s, want %s", started.Node, firstNode.ID)
	}
	return firstSim, otherSim, firstNode, other
}

// job returns the messages that submit a job of one txt2img scene of steps sampler
// steps in the image pool, its scene's payload and its commit, and the scene's ticket.
func (r *rig) job(job string, steps int, timeout time.Duration) (payload, commit fleet.Outgoing, t fleet.Ticket) {
	r.t.Helper()
	catalog, err := workflow.Load(os.DirFS("../../workflows"))
	if err != nil {
		r.t.Fatal(err)
	}
	tpl, _ := catalog.Get("txt2img")
	graph, err := tpl.Render(map[string]any{"prompt": "a fox", "steps": steps, "width": 256, "height": 256})
	if err != nil {
		r.t.Fatal(err)
	}
	now := time.Now().UTC()
	j := &fleet.Job{ID: job, Status: fleet.StatusQueued, Priority: 5, CreatedAt: now, UpdatedAt: now,
		Scenes: []fleet.Scene{{Index: 0, Pool: "image", Spec: fleet.SceneSpec{Workflow: "txt2img"}, Model: fleet.Checkpoint(graph),
			Status: fleet.StatusQueued, QueuedAt: now}}}
	p := fleet.ScenePayload{JobID: job, Index: 0, Graph: graph, Timeout: timeout}
	return fleet.Outgoing{Subject: fleet.ScenePayloadSubject(job, 0), MsgID: p.MsgID(), Value: p},
		fleet.Outgoing{Subject: fleet.SubmitJobSubject(job), MsgID: fleet.SubmitMsgID(job), Value: j},
		fleet.Ticket{JobID: job, Index: 0, Priority: 5, Pool: "image", Workflow: "txt2img", SubmittedAt: now}
}

// publish publishes msgs as one batch, as the intake does.
func (r *rig) publish(msgs ...fleet.Outgoing) {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := fleet.NewPublisher(r.js, "test").Batch(ctx, msgs); err != nil {
		r.t.Fatal(err)
	}
}

// awaitOnline waits until every node is recorded online and the leading dispatcher
// sees them so.
func (r *rig) awaitOnline(ids ...string) {
	r.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	nodes, err := r.js.KeyValue(ctx, fleet.BucketNodes)
	if err != nil {
		r.t.Fatal(err)
	}
	fleettest.Eventually(r.t, 10*time.Second, func() bool {
		for _, id := range ids {
			e, err := nodes.Get(ctx, id)
			if err != nil || !strings.Contains(string(e.Value()), `"state":"online"`) {
				return false
			}
		}
		return true
	}, "nodes %v not online", ids)
	// And the dispatcher has heard of them: a scene submitted now may go to any.
	fleettest.Eventually(r.t, 10*time.Second, func() bool {
		m, err := r.nc.Request(fleet.QueuesSubject, nil, time.Second)
		if err != nil {
			return false
		}
		var q fleet.QueueSummary
		return json.Unmarshal(m.Data, &q) == nil && q.Leading && q.Nodes[string(fleet.NodeOnline)] >= len(ids)
	}, "the dispatcher does not see nodes %v online", ids)
}

// await returns the first scene event of type typ after the one it returned last,
// failing the test after within.
func (r *rig) await(typ fleet.EventType, within time.Duration) fleet.SceneEvent {
	r.t.Helper()
	ev, next := r.events.Next(r.t, r.pos, within, string(typ)+" event", fleettest.OfType(typ))
	r.pos = next
	return ev
}

// seen returns the scene events up to the one await returned last.
func (r *rig) seen() []fleet.SceneEvent {
	return r.events.All(nil)[:r.pos]
}

func promptID(item fleet.Ticket, attempt string) string {
	return comfy.PromptID(item.JobID, "0", attempt)
}

// wsCutter is a transport that can drop the websockets it opened, as a flaky network
// between an executor and its ComfyUI node would.
type wsCutter struct {
	base http.RoundTripper

	mu       sync.Mutex
	upgrades int
	sockets  []io.Closer
}

func (c *wsCutter) RoundTrip(req *http.Request) (*http.Response, error) {
	resp, err := c.base.RoundTrip(req)
	if err == nil && resp.StatusCode == http.StatusSwitchingProtocols {
		c.mu.Lock()
		c.upgrades++
		c.sockets = append(c.sockets, resp.Body)
		c.mu.Unlock()
	}
	return resp, err
}

// drop closes every open websocket and reports how many it closed.
func (c *wsCutter) drop() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range c.sockets {
		_ = s.Close()
	}
	n := len(c.sockets)
	c.sockets = nil
	return n
}

func (c *wsCutter) opened() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.upgrades
}

func TestWebsocketDroppedMidPromptIsFollowedWithoutRenderingAgain(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	sim, node := r.sim(comfysim.Config{Name: "gpu"})
	cutter := &wsCutter{base: http.DefaultTransport.(*http.Transport).Clone()}
	r.executor("exec", cutter, node)
	item := r.submit("ws-drop", 150, 0)

	for {
		ev := r.await(fleet.EventProgress, 30*time.Second)
		if ev.Progress != nil && ev.Progress.Max > 0 && ev.Progress.Value < ev.Progress.Max/2 {
			break
		}
	}
	if n := cutter.drop(); n != 1 {
		t.Fatalf("dropped %d websockets mid-prompt, want 1", n)
	}
	done := r.await(fleet.EventCompleted, 30*time.Second)

	for _, ev := range r.seen() {
		if ev.Type == fleet.EventRetrying || ev.Type == fleet.EventFailed {
			t.Errorf("%s event after the websocket dropped: %s", ev.Type, ev.Error)
		}
	}
	if done.Attempt != 1 || len(done.Outputs) == 0 {
		t.Errorf("completed attempt %d with %d outputs; want the first attempt with its outputs", done.Attempt, len(done.Outputs))
	}
	st := sim.Stats()
	if st.Prompts != 1 || len(st.Rendered) != 1 || st.Rendered[0] != promptID(item, "1") {
		t.Errorf("node took %d prompts and rendered %v; want the first attempt's prompt once", st.Prompts, st.Rendered)
	}
	if cutter.opened() < 2 {
		t.Errorf("%d websockets opened; want a reconnection after the drop", cutter.opened())
	}
}

func TestOutOfMemoryIsRetriedOnAnotherNode(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	oomSim, okSim, oom, ok := r.firstAttemptOn(comfysim.Config{Name: "gpu-a", OOMRate: 1}, "oom", 20)
	retry := r.await(fleet.EventRetrying, 30*time.Second)
	if retry.Node != oom.ID || !strings.Contains(retry.Error, "OutOfMemoryError") {
		t.Errorf("retrying event from %s: %q; want the out-of-memory error of %s", retry.Node, retry.Error, oom.ID)
	}
	done := r.await(fleet.EventCompleted, 30*time.Second)
	if done.Node != ok.ID || done.Attempt != 2 {
		t.Errorf("completed on %s at attempt %d; want %s at attempt 2", done.Node, done.Attempt, ok.ID)
	}
	if st := oomSim.Stats(); st.Prompts != 1 || st.Failed != 1 {
		t.Errorf("the node out of memory took %d prompts (%d failed); want only the first attempt", st.Prompts, st.Failed)
	}
	if st := okSim.Stats(); len(st.Rendered) != 1 {
		t.Errorf("the other node rendered %v; want the retry", st.Rendered)
	}
}

// A node lost during a scene is not the scene's failure: with one attempt allowed,
// the scene whose node died runs again on another node and completes.
func TestALostNodeDoesNotUseUpTheScenesAttempts(t *testing.T) {
	t.Parallel()
	r := newRig(t, func(s *fleet.Settings) { s.MaxAttempts = 1 })
	lostSim, okSim, lost, ok := r.firstAttemptOn(comfysim.Config{Name: "gpu-a"}, "lost", 150)
	lostSim.Kill()
	retry := r.await(fleet.EventRetrying, 30*time.Second)
	if retry.Node != lost.ID {
		t.Errorf("retrying event from %s (%q); want the loss of %s", retry.Node, retry.Error, lost.ID)
	}
	done := r.await(fleet.EventCompleted, 30*time.Second)
	if done.Node != ok.ID || done.Attempt != 2 {
		t.Errorf("completed on %s at attempt %d; want %s at attempt 2", done.Node, done.Attempt, ok.ID)
	}
	if st := okSim.Stats(); len(st.Rendered) != 1 {
		t.Errorf("the other node rendered %v; want the second attempt", st.Rendered)
	}
}

// recordWithoutPayload records and queues job as the router would, while its scene's
// payload is not (yet) in the store (the router itself waits for a commit's
// payloads), and returns that payload and the scene's ticket. reads counts the
// executors' reads of the payload, seen on the bus.
func (r *rig) recordWithoutPayload(job string) (payload fleet.Outgoing, item fleet.Ticket, reads *atomic.Int64) {
	r.t.Helper()
	payload, commit, item := r.job(job, 5, 0)
	reads = &atomic.Int64{}
	for _, subject := range []string{"$JS.API.DIRECT.GET." + fleet.StreamScenes + ".>", "$JS.API.STREAM.MSG.GET." + fleet.StreamScenes} {
		sub, err := r.nc.Subscribe(subject, func(m *nats.Msg) {
			if strings.Contains(m.Subject, payload.Subject) || strings.Contains(string(m.Data), payload.Subject) {
				reads.Add(1)
			}
		})
		if err != nil {
			r.t.Fatal(err)
		}
		r.t.Cleanup(func() { _ = sub.Unsubscribe() })
	}
	if err := r.nc.Flush(); err != nil {
		r.t.Fatal(err)
	}
	jobs, err := fleet.OpenJobs(r.ctx, r.js)
	if err != nil {
		r.t.Fatal(err)
	}
	j := commit.Value.(*fleet.Job)
	record, err := jobs.CreateMessages(j, nil)
	if err != nil {
		r.t.Fatal(err)
	}
	queue, err := fleet.QueueMessages(fleet.NewPublisher(r.js, "test"), j)
	if err != nil {
		r.t.Fatal(err)
	}
	r.publish(append(record, queue...)...)
	return payload, item, reads
}

// A payload not found while its job lives is one a stream leader just elected has not
// applied yet: it is read again within the attempt, which runs once it is there.
func TestPayloadLateForALivingJobIsReadAgainWithinTheAttempt(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	sim, node := r.sim(comfysim.Config{Name: "gpu"})
	r.executor("exec", nil, node)
	payload, item, reads := r.recordWithoutPayload("late-payload")

	// The executor reads the payload again and again within its first attempt...
	fleettest.Eventually(t, 30*time.Second, func() bool { return reads.Load() >= 4 },
		"the executor did not read the missing payload again")
	r.publish(payload)
	r.completedOnlyBy(sim, item, 1)
	// ...and the attempt did not fail meanwhile.
	for _, ev := range r.seen() {
		if ev.Type == fleet.EventRetrying || ev.Type == fleet.EventFailed {
			t.Errorf("%s event %q; want none while the payload came late", ev.Type, ev.Error)
		}
	}
}

// A payload still missing after the executor's wait fails the attempt, which is
// retried, and runs once the payload is there.
func TestPayloadNotFoundForALivingJobIsRetried(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	sim, node := r.sim(comfysim.Config{Name: "gpu"})
	r.executor("exec", nil, node)
	payload, item, _ := r.recordWithoutPayload("missing-payload")

	retry := r.await(fleet.EventRetrying, 30*time.Second)
	if !strings.Contains(retry.Error, "payload is gone from the store, though its job lives") {
		t.Errorf("retrying event: %q; want the payload not found for a living job", retry.Error)
	}
	r.publish(payload)
	r.completedOnlyBy(sim, item, 2)
}

// A payload not found for a job that is gone (deleted, expired: no record, no state)
// fails the scene at once: no attempt is spent waiting for it or retrying.
func TestPayloadNotFoundForAGoneJobFailsTheScene(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	_, node := r.sim(comfysim.Config{Name: "gpu"})
	r.executor("exec", nil, node)
	_, commit, _ := r.job("gone", 5, 0)
	queue, err := fleet.QueueMessages(fleet.NewPublisher(r.js, "test"), commit.Value.(*fleet.Job))
	if err != nil {
		t.Fatal(err)
	}
	r.publish(queue...)

	failed := r.await(fleet.EventFailed, 30*time.Second)
	if failed.Attempt != 1 || failed.Error != "the scene's payload is gone from the store" {
		t.Errorf("failed at attempt %d: %q; want attempt 1, the payload gone", failed.Attempt, failed.Error)
	}
	for _, ev := range r.seen() {
		if ev.Type == fleet.EventRetrying {
			t.Errorf("retrying event %q; want none for a gone job", ev.Error)
		}
	}
}

// completedOnlyBy waits for the scene's completed event and checks that attempt,
// and no other, completed it with outputs, and that sim rendered its prompt alone.
func (r *rig) completedOnlyBy(sim *comfysim.Server, item fleet.Ticket, attempt int) {
	r.t.Helper()
	done := r.await(fleet.EventCompleted, 30*time.Second)
	if done.Attempt != attempt || len(done.Outputs) == 0 {
		r.t.Errorf("completed attempt %d with %d outputs; want attempt %d with its outputs", done.Attempt, len(done.Outputs), attempt)
	}
	if st := sim.Stats(); len(st.Rendered) != 1 || st.Rendered[0] != promptID(item, strconv.Itoa(attempt)) {
		r.t.Errorf("node rendered %v; want attempt %d's prompt", st.Rendered, attempt)
	}
}

func TestTimedOutAttemptIsInterruptedAndRetriedElsewhere(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	slowSim, slow := r.sim(comfysim.Config{Name: "slow", Speed: 0.02})
	fastSim, fast := r.sim(comfysim.Config{Name: "fast"})
	r.executor("exec-slow", nil, slow)
	r.submit("timeout", 20, 2*time.Second)

	if first := r.await(fleet.EventStarted, 30*time.Second); first.Node != slow.ID {
		t.Fatalf("first attempt on %s, want %s", first.Node, slow.ID)
	}
	r.executor("exec-fast", nil, fast)
	retry := r.await(fleet.EventRetrying, 30*time.Second)
	if retry.Node != slow.ID || retry.Error != "timed out after 2s" {
		t.Errorf("retrying event from %s: %q; want %s timed out after 2s", retry.Node, retry.Error, slow.ID)
	}
	done := r.await(fleet.EventCompleted, 30*time.Second)
	if done.Node != fast.ID || done.Attempt != 2 {
		t.Errorf("completed on %s at attempt %d; want %s at attempt 2", done.Node, done.Attempt, fast.ID)
	}
	fleettest.Eventually(t, 5*time.Second, func() bool { return slowSim.Stats().Interrupted == 1 },
		"the timed-out prompt was not interrupted on the slow node")
	if st := slowSim.Stats(); st.Prompts != 1 || len(st.Rendered) != 0 {
		t.Errorf("slow node took %d prompts and rendered %v; want one, interrupted", st.Prompts, st.Rendered)
	}
	if st := fastSim.Stats(); len(st.Rendered) != 1 {
		t.Errorf("fast node rendered %v; want the retry", st.Rendered)
	}
}

func TestRedeliveryFollowsThePromptStillRunningOnItsNode(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	sim, node := r.sim(comfysim.Config{Name: "gpu", Speed: 0.5})
	lost := r.executor("lost", nil, node)
	item := r.submit("follow", 150, 0)

	r.await(fleet.EventProgress, 30*time.Second)
	// The executor loses NATS for good while ComfyUI keeps rendering its prompt; the
	// scene comes back after AckWait to the other executor of the same node.
	lost.Close()
	r.executor("successor", nil, node)
	if again := r.await(fleet.EventStarted, 30*time.Second); again.Attempt != 2 || sim.Stats().Completed != 0 {
		t.Fatalf("attempt %d started with %d prompts completed; want the redelivery while the first prompt still runs",
			again.Attempt, sim.Stats().Completed)
	}
	done := r.await(fleet.EventCompleted, 30*time.Second)
	if done.Attempt != 2 || len(done.Outputs) == 0 {
		t.Errorf("completed attempt %d with %d outputs; want the redelivery with outputs", done.Attempt, len(done.Outputs))
	}
	if st := sim.Stats(); st.Prompts != 1 || len(st.Rendered) != 1 || st.Rendered[0] != promptID(item, "1") || st.Interrupted != 0 {
		t.Errorf("node took %d prompts, rendered %v, interrupted %d; want the first attempt's prompt once, uninterrupted",
			st.Prompts, st.Rendered, st.Interrupted)
	}
}
