package executor

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"mime"
	"path"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/comfyfleet/comfyfleet/pkg/comfy"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/telemetry"
)

// scene is a scene to run: its ticket, and what its payload adds.
type scene struct {
	fleet.Ticket
	Graph   fleet.Graph
	Inputs  []fleet.Input
	Timeout time.Duration
	// delivered is when its work message reached the executor.
	delivered time.Time
}

// errPayloadMissing is the error of a scene whose payload is not in the store: its
// job expired or was deleted.
var errPayloadMissing = errors.New("the scene's payload is gone from the store")

// latePayloadWait is how long the payload of a scene whose job lives is read again,
// within the scene's delivery, before the attempt fails.
const latePayloadWait = 5 * time.Second

// load returns the scene of ticket t, with its payload.
func (e *executor) load(ctx context.Context, t fleet.Ticket) (scene, error) {
	raw, err := fleet.LastMsg(ctx, e.js, e.payloads, fleet.ScenePayloadSubject(t.JobID, t.Index))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return scene{}, errPayloadMissing
	}
	if err != nil {
		return scene{}, fmt.Errorf("read the payload of scene %s: %w", t.RunKey(), err)
	}
	var p fleet.ScenePayload
	if err := json.Unmarshal(raw.Data, &p); err != nil {
		return scene{}, fmt.Errorf("decode the payload of scene %s: %w", t.RunKey(), err)
	}
	return scene{Ticket: t, Graph: p.Graph, Inputs: p.Inputs, Timeout: p.Timeout}, nil
}

// handler returns the handler of n's work messages. It runs the scene on n and
// settles its message by what it returns: nil (ack) once the scene completed, was
// cancelled, or went back to the queue (a transient failure, with a back-off and a
// word to avoid n; the executor stopping; n drained or removed before the scene
// started); Permanent (term) once it failed for good; RetryAfter when the outcome
// could not be published, so that the message comes again.
func (e *executor) handler(n *node) fleet.Handler {
	return func(ctx context.Context, msg jetstream.Msg) error {
		md, err := msg.Metadata()
		if err != nil {
			return fmt.Errorf("work message without metadata: %w", err)
		}
		var t fleet.Ticket
		if err := json.Unmarshal(msg.Data(), &t); err != nil {
			return fleet.Permanent(fmt.Errorf("undecodable work message: %w", err))
		}
		return e.run(ctx, n, msg, t, int(md.NumDelivered))
	}
}

func (e *executor) run(ctx context.Context, n *node, msg jetstream.Msg, t fleet.Ticket, delivered int) error {
	received := time.Now()
	attempt := t.Attempt(delivered)
	stopKeepAlive := e.keepAlive(msg)
	defer stopKeepAlive()
	span := trace.SpanFromContext(ctx)
	span.SetAttributes(telemetry.SceneAttrs(t.JobID, t.Index)...)
	span.SetAttributes(attribute.String("comfyfleet.node", n.cfg.ID), attribute.Int("comfyfleet.attempt", attempt))
	log := e.log.With("scene", t.RunKey(), "node", n.cfg.ID, "attempt", attempt)

	// The attempt ends early when the node is found dead, the scene times out or is
	// cancelled, or the node hands it back, not only when we stop.
	runCtx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	release := n.hold(t.RunKey(), t.JobID, promptID(t, attempt), cancel)
	defer release()

	if e.cancels.has(t.JobID) {
		log.Info("job cancelled; dropping its scene")
		return nil
	}
	// A scene delivered again, or back from another node, may have ended since.
	if delivered > 1 || t.Moves > 0 {
		if ended, err := e.jobs.SceneEnded(ctx, t.JobID, t.Index, t.Retry); err == nil && ended {
			log.Info("scene already ended; dropping its redelivery")
			return nil
		}
	}
	// A stream leader just elected may answer before it has applied what its
	// predecessor stored and acknowledged: the payload of a living job comes back,
	// and is read again before the attempt counts as failed. Whether the job lives
	// is asked once, at the first miss.
	var asked, lives bool
	item, found, err := fleet.ReadCaughtUp(runCtx, latePayloadWait, func() (scene, bool, error) {
		item, err := e.load(runCtx, t)
		if !errors.Is(err, errPayloadMissing) {
			return item, true, err
		}
		if !asked {
			asked, lives = true, e.jobLives(ctx, t.JobID)
		}
		if !lives {
			return item, false, err
		}
		return item, false, nil
	})
	if err == nil && !found {
		err = errPayloadMissing
	}
	switch {
	case lives && errors.Is(err, errPayloadMissing):
		return e.retryOrFail(ctx, n, t, attempt, delivered, fmt.Errorf("%w, though its job lives", err), log)
	case errors.Is(err, errPayloadMissing):
		return e.fail(ctx, t, attempt, n.cfg.ID, err, log)
	case err != nil && (ctx.Err() != nil || errors.Is(context.Cause(runCtx), errHandBack)):
		// Drained, removed or stopping while the payload was read: the scene goes
		// back to the queue unstarted, as from a wait inside ComfyUI.
		return e.requeue(context.WithoutCancel(ctx), t.Requeue(delivered, n.cfg.ID, 0, nil).AfterLoss(), 0)
	case errors.Is(context.Cause(runCtx), errCancelled):
		return nil
	case err != nil:
		return err
	}
	item.delivered = received
	stopWatch := e.watch(runCtx, cancel, n, item)
	defer stopWatch()
	event := func(typ fleet.EventType) fleet.SceneEvent {
		return fleet.SceneEvent{JobID: t.JobID, Index: t.Index, Retry: t.Retry, Type: typ, Attempt: attempt, Node: n.cfg.ID}
	}
	var started time.Time
	var loaded bool
	steps := 0
	// The scene starts when ComfyUI starts it: until then it waits on the node
	// behind the running one.
	markStarted := func() {
		if !started.IsZero() {
			return
		}
		started = time.Now()
		loaded = n.start(t.RunKey(), t.Model)
		if err := e.pub.SceneEvent(ctx, event(fleet.EventStarted)); err != nil {
			log.Warn("publish started event", "err", err)
		}
	}
	report, flushProgress := e.progress(ctx, t, attempt, n.cfg.ID)
	defer flushProgress()
	onProgress := func(p comfy.Progress) {
		markStarted()
		steps = max(steps, p.Max)
		report(p)
	}

	res, err := e.execute(runCtx, n, item, attempt, log, onProgress)
	flushProgress()
	var outputs []fleet.Output
	if err == nil {
		// A prompt served from ComfyUI's cache, or followed by polling, started
		// without a message.
		markStarted()
		outputs, err = e.store(runCtx, n, item, res.Outputs)
	}
	elapsed := time.Since(started)

	if ctx.Err() != nil || errors.Is(context.Cause(runCtx), errHandBack) {
		log.Info("handing the scene back to the queue")
		e.metrics.attempt(context.WithoutCancel(ctx), n.cfg.ID, "handed_back")
		return e.requeue(context.WithoutCancel(ctx), t.Requeue(delivered, n.cfg.ID, 0, nil).AfterLoss(), 0)
	}
	if errors.Is(context.Cause(runCtx), errCancelled) {
		log.Info("scene cancelled: attempt stopped", "seconds", elapsed.Seconds())
		e.metrics.attempt(ctx, n.cfg.ID, "cancelled")
		return nil
	}
	if err != nil {
		err = attemptError(runCtx, n, err)
	}
	if err == nil {
		ev := event(fleet.EventCompleted)
		ev.Outputs, ev.Duration = outputs, elapsed
		ev.Workflow, ev.Model, ev.ModelLoaded = t.Workflow, t.Model, loaded
		if err := e.pub.SceneEvent(ctx, ev); err != nil {
			return fleet.RetryAfter(e.cfg.Settings.RetryDelay(attempt), fmt.Errorf("publish completed event; the scene will run again: %w", err))
		}
		n.finished(t.Workflow, elapsed, steps, loaded)
		e.metrics.attempt(ctx, n.cfg.ID, "completed")
		e.metrics.duration.Record(ctx, elapsed.Seconds(), metric.WithAttributes(attribute.String("node", n.cfg.ID)))
		log.Debug("scene completed", "outputs", len(outputs), "seconds", elapsed.Seconds())
		return nil
	}

	if !isPermanent(err) {
		e.probe(ctx, n)
	}
	return e.retryOrFail(ctx, n, t, attempt, delivered, err, log)
}

// jobLives reports whether job is neither finished nor gone, as its state says; a
// state that cannot be read counts as living.
func (e *executor) jobLives(ctx context.Context, job string) bool {
	st, _, err := e.jobs.State(ctx, job)
	if err != nil {
		return !errors.Is(err, fleet.ErrJobNotFound)
	}
	return !st.Status.Terminal()
}

// retryOrFail ends a failed attempt: the scene fails for good on a permanent error
// or once its attempts run out; otherwise it goes back to the queue after a back-off,
// to be placed elsewhere than n if possible.
func (e *executor) retryOrFail(ctx context.Context, n *node, t fleet.Ticket, attempt, delivered int, err error, log *slog.Logger) error {
	// Ended by the node's loss, whether the attempt saw it first or the probe after.
	lost := errors.Is(err, errNodeLost) || !n.isHealthy()
	if isPermanent(err) || t.AttemptsUsed(attempt, lost) >= e.cfg.Settings.MaxAttempts {
		return e.fail(ctx, t, attempt, n.cfg.ID, err, log)
	}
	failure := fleet.Attempt{Attempt: attempt, Node: n.cfg.ID, Error: err.Error(), At: time.Now().UTC()}
	ev := fleet.SceneEvent{JobID: t.JobID, Index: t.Index, Retry: t.Retry, Type: fleet.EventRetrying, Attempt: attempt, Node: n.cfg.ID,
		Error: err.Error(), Failures: t.Failures}
	if err := e.pub.SceneEvent(ctx, ev); err != nil {
		log.Warn("publish retrying event", "err", err)
	}
	delay := e.cfg.Settings.RetryDelay(attempt)
	e.metrics.attempt(ctx, n.cfg.ID, "retrying")
	e.freeAfterOOM(ctx, n, err)
	log.Warn("scene attempt failed; retrying", "in", delay, "err", err)
	next := t.Requeue(delivered, n.cfg.ID, delay, &failure)
	if lost {
		next = next.AfterLoss()
	}
	return e.requeue(ctx, next, delay)
}

// fail ends the scene's run for good with err.
func (e *executor) fail(ctx context.Context, t fleet.Ticket, attempt int, node string, err error, log *slog.Logger) error {
	ev := fleet.SceneEvent{JobID: t.JobID, Index: t.Index, Retry: t.Retry, Type: fleet.EventFailed, Attempt: attempt, Node: node,
		Error: err.Error(), Failures: t.Failures}
	if perr := e.pub.SceneEvent(ctx, ev); perr != nil {
		return fleet.RetryAfter(e.cfg.Settings.RetryDelay(attempt), fmt.Errorf("publish failed event: %w", perr))
	}
	e.metrics.attempt(ctx, node, "failed")
	log.Warn("scene failed", "err", err)
	return fleet.Permanent(fmt.Errorf("scene %s failed: %w", t.RunKey(), err))
}

// requeue puts t back in the queue. If the queue cannot be reached, the message
// comes again to this node instead, after delay.
func (e *executor) requeue(ctx context.Context, t fleet.Ticket, delay time.Duration) error {
	if err := e.pub.Requeue(ctx, t); err != nil {
		return fleet.RetryAfter(max(delay, time.Second), fmt.Errorf("put the scene back in the queue; it comes back to this node: %w", err))
	}
	return nil
}

// keepAlive marks msg in progress every heartbeat interval until the returned
// function is called.
func (e *executor) keepAlive(msg jetstream.Msg) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(e.cfg.Settings.HeartbeatInterval())
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				if err := msg.InProgress(); err != nil && !errors.Is(err, nats.ErrConnectionClosed) {
					e.log.Warn("mark scene in progress", "subject", msg.Subject(), "err", err)
				}
			}
		}
	})
	return func() { close(done); wg.Wait() }
}

// progress returns the callback that publishes a scene's progress, at most once per
// ProgressInterval and always for the last step, and the function that waits until
// what it took is published (call it once no more progress comes). The callback never
// waits for the server: one event at a time is published in the background, a later
// one replacing any that waits, so that a slow link to the hub (a node in another
// region) does not slow the scene down by a round trip per step.
func (e *executor) progress(ctx context.Context, item fleet.Ticket, attempt int, node string) (report func(comfy.Progress), flush func()) {
	waiting := make(chan fleet.SceneEvent, 1)
	var wg sync.WaitGroup
	wg.Go(func() {
		for ev := range waiting {
			if err := e.pub.SceneEvent(ctx, ev); err != nil {
				e.log.Debug("publish progress", "scene", item.RunKey(), "err", err)
			}
		}
	})
	var last time.Time
	report = func(p comfy.Progress) {
		if p.Max <= 0 {
			return
		}
		final := p.Value >= p.Max-1
		if !final && time.Since(last) < e.cfg.ProgressInterval {
			return
		}
		last = time.Now()
		ev := fleet.SceneEvent{JobID: item.JobID, Index: item.Index, Retry: item.Retry, Type: fleet.EventProgress, Attempt: attempt, Node: node,
			Progress: &fleet.Progress{Value: p.Value + 1, Max: p.Max, Node: p.Node}}
		// The only sender: once the slot is emptied, this send cannot block.
		select {
		case <-waiting:
		default:
		}
		waiting <- ev
	}
	var once sync.Once
	flush = func() {
		once.Do(func() {
			close(waiting)
			wg.Wait()
		})
	}
	return report, flush
}

// store copies the prompt's output files from the node into the outputs store.
func (e *executor) store(ctx context.Context, n *node, item scene, outs []comfy.Output) ([]fleet.Output, error) {
	ctx, span := tracer.Start(ctx, "store outputs", trace.WithAttributes(attribute.Int("comfyfleet.outputs", len(outs))))
	defer span.End()
	stored := make([]fleet.Output, 0, len(outs))
	names := newOutputNames(item.Index)
	for _, o := range outs {
		if o.File.Filename == "" {
			continue
		}
		name := names.next(o.NodeID, o.File.Filename)
		file, err := n.client.View(ctx, o.File)
		if err != nil {
			return nil, &fileError{err: fmt.Errorf("fetch output %s from node %s: %w", o.File.Filename, n.cfg.ID, err)}
		}
		contentType := file.ContentType
		if contentType == "" || contentType == "application/octet-stream" {
			if t := mime.TypeByExtension(path.Ext(name)); t != "" {
				contentType = t
			}
		}
		obj, err := e.outputs.Put(ctx, fleet.OutputKey(item.JobID, item.Index, name), contentType, file.Size, file.Body)
		file.Body.Close()
		if err != nil {
			return nil, fmt.Errorf("store output %s: %w", name, err)
		}
		stored = append(stored, fleet.Output{Name: name, ContentType: contentType, Size: obj.Size, Kind: o.Kind, NodeID: o.NodeID})
	}
	return stored, nil
}

// probe checks n at once after a transient failure, so that a dead node stops pulling
// work before its next heartbeat.
func (e *executor) probe(ctx context.Context, n *node) {
	ctx, cancel := context.WithTimeout(ctx, e.cfg.HeartbeatInterval)
	defer cancel()
	stats, err := n.client.SystemStats(ctx)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) && time.Since(n.client.LastHeard()) < e.cfg.HeartbeatInterval {
			// Slow to answer, but it spoke meanwhile (a websocket frame, another
			// answer): busy, not gone.
			return
		}
		n.setHealth(err, nil)
		return
	}
	n.setHealth(nil, &stats)
}
