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
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/comfyfleet/comfyfleet/pkg/comfy"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/telemetry"
)

// run executes one delivered scene on n and settles its message: ack on success or
// when the scene was cancelled; on a transient failure, back to the queue with a
// back-off and a word to avoid n; term on a permanent failure or the last attempt;
// and back to the queue at once when the executor stops or n is drained or removed
// before the scene started.
func (e *executor) run(ctx context.Context, n *node, msg jetstream.Msg) {
	md, err := msg.Metadata()
	if err != nil {
		e.log.Error("work message without metadata", "err", err)
		_ = msg.Nak()
		return
	}
	var item fleet.WorkItem
	if err := json.Unmarshal(msg.Data(), &item); err != nil {
		e.log.Error("drop undecodable work message", "subject", msg.Subject(), "err", err)
		_ = msg.TermWithReason("undecodable")
		return
	}
	delivered := int(md.NumDelivered)
	attempt := item.Attempt(delivered)
	stopKeepAlive := e.keepAlive(msg)
	defer stopKeepAlive()

	ctx = telemetry.Extract(ctx, msg.Headers())
	ctx, span := tracer.Start(ctx, "execute scene", trace.WithAttributes(telemetry.SceneAttrs(item.JobID, item.Index)...),
		trace.WithAttributes(attribute.String("comfyfleet.node", n.cfg.ID), attribute.Int("comfyfleet.attempt", attempt)))
	defer span.End()
	log := e.log.With("scene", item.MsgID(), "node", n.cfg.ID, "attempt", attempt)

	// The attempt ends early when the node is found dead, the scene times out or is
	// cancelled, or the node hands it back, not only when we stop.
	runCtx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	release := n.hold(item.MsgID(), item.JobID, promptID(item, attempt), cancel)
	defer release()
	stopWatch := e.watch(runCtx, cancel, n, item)
	defer stopWatch()

	if done, err := e.alreadyTerminal(ctx, item); err == nil && done {
		log.Info("scene already terminal; dropping its redelivery")
		fleet.Ack(ctx, e.log, msg)
		return
	}
	event := func(typ fleet.EventType) fleet.SceneEvent {
		return fleet.SceneEvent{JobID: item.JobID, Index: item.Index, Retry: item.Retry, Type: typ, Attempt: attempt, Node: n.cfg.ID}
	}
	model := fleet.Checkpoint(item.Graph)
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
		loaded = n.start(item.MsgID(), model)
		if err := e.pub.SceneEvent(ctx, event(fleet.EventStarted)); err != nil {
			log.Warn("publish started event", "err", err)
		}
	}
	report := e.progress(ctx, item, attempt, n.cfg.ID)
	onProgress := func(p comfy.Progress) {
		markStarted()
		steps = max(steps, p.Max)
		report(p)
	}

	res, err := e.execute(runCtx, n, item, attempt, log, onProgress)
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
		e.requeue(context.WithoutCancel(ctx), msg, item.Requeue(delivered), n.cfg.ID, 0, log)
		return
	}
	if errors.Is(context.Cause(runCtx), errCancelled) {
		log.Info("scene cancelled: attempt stopped", "seconds", elapsed.Seconds())
		e.metrics.attempt(ctx, n.cfg.ID, "cancelled")
		fleet.Ack(ctx, e.log, msg)
		return
	}
	if err != nil {
		err = attemptError(runCtx, n, err)
	}
	if err == nil {
		ev := event(fleet.EventCompleted)
		ev.Outputs, ev.Duration = outputs, elapsed
		ev.Workflow, ev.Model, ev.ModelLoaded = item.Workflow, model, loaded
		if err := e.pub.SceneEvent(ctx, ev); err != nil {
			log.Warn("publish completed event; the scene will run again", "err", err)
			_ = msg.NakWithDelay(e.cfg.Settings.RetryDelay(attempt))
			return
		}
		n.finished(item.Workflow, elapsed, steps, loaded)
		e.metrics.attempt(ctx, n.cfg.ID, "completed")
		e.metrics.duration.Record(ctx, elapsed.Seconds(), metric.WithAttributes(attribute.String("node", n.cfg.ID)))
		fleet.Ack(ctx, e.log, msg)
		log.Info("scene completed", "outputs", len(outputs), "seconds", elapsed.Seconds())
		return
	}

	span.RecordError(err)
	span.SetStatus(codes.Error, err.Error())
	permanent := isPermanent(err)
	if !permanent {
		e.probe(ctx, n)
	}
	if permanent || attempt-item.AttemptBase >= e.cfg.Settings.MaxAttempts {
		ev := event(fleet.EventFailed)
		ev.Error = err.Error()
		if err := e.pub.SceneEvent(ctx, ev); err != nil {
			log.Warn("publish failed event", "err", err)
			_ = msg.NakWithDelay(e.cfg.Settings.RetryDelay(attempt))
			return
		}
		e.metrics.attempt(ctx, n.cfg.ID, "failed")
		_ = msg.TermWithReason("failed")
		log.Warn("scene failed", "permanent", permanent, "err", err)
		return
	}
	ev := event(fleet.EventRetrying)
	ev.Error = err.Error()
	if err := e.pub.SceneEvent(ctx, ev); err != nil {
		log.Warn("publish retrying event", "err", err)
	}
	delay := e.cfg.Settings.RetryDelay(attempt)
	e.metrics.attempt(ctx, n.cfg.ID, "retrying")
	e.freeAfterOOM(ctx, n, err)
	e.requeue(ctx, msg, item.Requeue(delivered), n.cfg.ID, delay, log)
	log.Warn("scene attempt failed; retrying", "in", delay, "err", err)
}

// requeue puts item back in the queue, to be placed again after delay and
// elsewhere than avoid if possible, then acknowledges msg. If the queue cannot be
// reached, msg is redelivered to this node instead.
func (e *executor) requeue(ctx context.Context, msg jetstream.Msg, item fleet.WorkItem, avoid string, delay time.Duration, log *slog.Logger) {
	item.Avoid = avoid
	if delay > 0 {
		item.NotBefore = time.Now().Add(delay).UTC()
	}
	if err := e.pub.JSON(ctx, fleet.QueueSubject(item.Pool), item.PlacementID(), item); err != nil {
		log.Warn("put the scene back in the queue; it comes back to this node", "err", err)
		_ = msg.NakWithDelay(max(delay, time.Second))
		return
	}
	fleet.Ack(ctx, e.log, msg)
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

// alreadyTerminal reports whether the scene has ended, as for a redelivery after
// the completion was recorded but the acknowledgement lost, or a scene cancelled
// before it started.
func (e *executor) alreadyTerminal(ctx context.Context, item fleet.WorkItem) (bool, error) {
	if cancelled, err := e.cancelled(ctx, item); err != nil || cancelled {
		return cancelled, err
	}
	job, _, err := e.jobs.Get(ctx, item.JobID)
	if err != nil {
		return false, err
	}
	return item.Index < len(job.Scenes) && job.Scenes[item.Index].Status.Terminal(), nil
}

// progress returns the callback that publishes a scene's progress, at most once per
// ProgressInterval and always for the last step.
func (e *executor) progress(ctx context.Context, item fleet.WorkItem, attempt int, node string) func(comfy.Progress) {
	var last time.Time
	return func(p comfy.Progress) {
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
		if err := e.pub.SceneEvent(ctx, ev); err != nil {
			e.log.Debug("publish progress", "scene", item.MsgID(), "err", err)
		}
	}
}

// store copies the prompt's output files from the node into the object store.
func (e *executor) store(ctx context.Context, n *node, item fleet.WorkItem, outs []comfy.Output) ([]fleet.Output, error) {
	ctx, span := tracer.Start(ctx, "store outputs", trace.WithAttributes(attribute.Int("comfyfleet.outputs", len(outs))))
	defer span.End()
	stored := make([]fleet.Output, 0, len(outs))
	names := newOutputNames(item.Index)
	for _, o := range outs {
		if o.File.Filename == "" {
			continue
		}
		name := names.next(o.NodeID, o.File.Filename)
		body, contentType, err := n.client.View(ctx, o.File)
		if err != nil {
			return nil, &fileError{err: fmt.Errorf("fetch output %s from node %s: %w", o.File.Filename, n.cfg.ID, err)}
		}
		if contentType == "" || contentType == "application/octet-stream" {
			if t := mime.TypeByExtension(path.Ext(name)); t != "" {
				contentType = t
			}
		}
		info, err := e.outputs.Put(ctx, jetstream.ObjectMeta{
			Name:     fleet.OutputKey(item.JobID, item.Index, name),
			Metadata: map[string]string{"content-type": contentType},
		}, body)
		body.Close()
		if err != nil {
			return nil, fmt.Errorf("store output %s: %w", name, err)
		}
		stored = append(stored, fleet.Output{Name: name, ContentType: contentType, Size: int64(info.Size), Kind: o.Kind, NodeID: o.NodeID})
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
		n.setHealth(err, nil)
		return
	}
	n.setHealth(nil, &stats)
}
