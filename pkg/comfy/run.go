package comfy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/google/uuid"
)

// Run submits g as promptID (a fresh uuid if empty) and follows it to its end:
// it joins the client's websocket before POST /prompt, once the server has
// greeted (and so registered) the socket, so that no message is missed,
// reports progress messages and node changes through onProgress (called on
// Run's goroutine; may be nil). On success it takes the outputs from the
// executed messages when the socket heard the whole run, from execution_start
// to the end marker, on one connection (the server sends every output node's UI
// output there, cached ones too, as it records them in history); otherwise it
// reads /history.
//
// If the websocket drops, Run reconnects with back-off and meanwhile polls
// /queue and /history; likewise if the socket heard nothing at all, not even
// the status broadcast that follows a submission, within two seconds (the
// server unregistered it). It never submits the prompt twice: if POST /prompt
// fails in transit, Run follows the prompt if the server queued it anyway, and
// otherwise returns the transport error. If ctx is cancelled once the prompt
// may be queued, Run deletes it from the queue or interrupts it, using a short
// context of its own, and returns ctx.Err(); a cancellation during POST /prompt
// waits for the server's answer first (up to a minute).
//
// Errors: *RejectedError (invalid graph), *ExecutionError (a node failed),
// ErrInterrupted, ErrPromptExists (promptID taken on newer servers: use Await),
// ErrPromptLost (the server forgot the prompt), *HTTPError and transport
// errors. See IsPermanent.
func (c *Client) Run(ctx context.Context, g Graph, promptID string, onProgress func(Progress)) (Result, error) {
	if promptID == "" {
		promptID = uuid.NewString()
	}
	w, err := c.watch(ctx, promptID)
	if err != nil {
		return Result{}, err
	}
	defer w.release()
	heard := w.s.mark()
	if err := ctx.Err(); err != nil {
		return Result{}, err
	}
	// A submission is not cut short by a cancellation: the server may have read the
	// whole request and queue the prompt after abandon looked for it and found nothing,
	// to run it unowned. Once the server has answered, abandon finds it.
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), c.submitTimeout)
	sub, err := c.Submit(sctx, g, promptID)
	cancel()
	switch {
	case ctx.Err() != nil:
		c.abandon(ctx, promptID)
		return Result{}, ctx.Err()
	case err == nil:
	case answered(err) || !c.landed(ctx, promptID):
		return Result{}, err
	default:
		c.log.Warn("submission failed in transit but the prompt was queued; following it", "prompt_id", promptID, "error", err)
		sub = SubmitResult{PromptID: promptID}
	}
	f := &follower{c: c, w: w, id: sub.PromptID, onProgress: onProgress, trustWS: true, up: true, listen: &heard}
	if sub.PromptID != promptID {
		c.log.Warn("server assigned its own prompt id", "requested", promptID, "prompt_id", sub.PromptID)
		w.rekey(sub.PromptID)
		f.checkNow = true
	}
	c.log.Debug("prompt queued", "prompt_id", sub.PromptID, "number", sub.Number)
	return f.run(ctx)
}

// answered reports whether err is the server's answer (so the request was
// handled) rather than a failure in transit.
func answered(err error) bool {
	if _, ok := errors.AsType[*HTTPError](err); ok {
		return true
	}
	_, ok := errors.AsType[*RejectedError](err)
	return ok
}

// landed reports whether a prompt whose submission failed in transit reached
// the server anyway.
func (c *Client) landed(ctx context.Context, id string) bool {
	if q, err := c.Queue(ctx); err == nil && q.Contains(id) {
		return true
	}
	h, err := c.History(ctx, id)
	return err == nil && h != nil
}

// Await follows a prompt that was submitted earlier, e.g. after Submit or Run
// reported ErrPromptExists, with the same semantics as Run, including removing
// the prompt from the server if ctx is cancelled. Messages arrive on the
// websocket only for prompts submitted with this client's id; others are
// followed by polling /queue and /history.
func (c *Client) Await(ctx context.Context, promptID string, onProgress func(Progress)) (Result, error) {
	w, err := c.watch(ctx, promptID)
	if err != nil {
		return Result{}, err
	}
	defer w.release()
	f := &follower{c: c, w: w, id: promptID, onProgress: onProgress, up: true, checkNow: true}
	return f.run(ctx)
}

// follower is the state of one Run or Await.
type follower struct {
	c          *Client
	w          *watcher
	id         string
	onProgress func(Progress)

	trustWS bool // the prompt's messages come to our socket
	// listen, until the first check (silenceTimeout after the submission),
	// is where the socket stood before the prompt was submitted: a queued
	// prompt makes the server broadcast a status message to every socket it
	// has registered, so a socket that heard nothing since is deaf.
	listen *earmark
	up     bool
	// reconnected is set once the websocket came back while the prompt ran: the
	// prompt is then also followed by polling. ComfyUI forgets a client's new
	// socket when the old one's close reaches it after the new one registered,
	// and the new one, open but deaf, would leave the prompt to the watchdog.
	reconnected bool
	checkNow    bool
	successSeen bool
	// heardStart is set by execution_start and cleared when the connection
	// drops or comes back: with it, the socket heard every message of the run.
	heardStart bool
	// ran is set once a node of the prompt executed (a run wholly from the
	// cache executes none).
	ran         bool
	node        string
	hints       map[string]map[string]json.RawMessage
	lost        int
	outageSince time.Time
}

// outcome is the result of handling a message or a check: done false means
// keep following, re-checking /queue and /history after recheck if set.
type outcome struct {
	done    bool
	res     Result
	err     error
	recheck time.Duration
}

func (f *follower) interval() time.Duration {
	switch {
	case !f.up || !f.trustWS || f.successSeen || f.lost > 0 || !f.outageSince.IsZero() || f.reconnected:
		return f.c.pollInterval
	case f.listen != nil:
		return f.c.silenceTimeout
	}
	return f.c.watchdogInterval
}

func (f *follower) run(ctx context.Context) (Result, error) {
	timer := time.NewTimer(f.interval())
	defer timer.Stop()
	if f.checkNow {
		timer.Reset(0)
	}
	for {
		var o outcome
		select {
		case <-ctx.Done():
			f.c.abandon(ctx, f.id)
			return Result{}, ctx.Err()
		case <-f.w.notify:
			for _, it := range f.w.take() {
				var step outcome
				switch it.link {
				case linkDown:
					f.up, f.listen, f.heardStart = false, nil, false
					timer.Reset(f.interval())
				case linkUp:
					f.up, f.listen, f.reconnected, f.heardStart = true, nil, true, false
					timer.Reset(0)
				default:
					step = f.handle(ctx, it.ev)
				}
				if step.done {
					o = step
					break
				}
				if step.recheck > 0 {
					timer.Reset(step.recheck)
				}
			}
		case <-timer.C:
			if f.listen != nil && !f.checkNow {
				m := *f.listen
				f.listen = nil
				if !f.w.s.silent(m) {
					timer.Reset(f.interval())
					continue
				}
				f.c.log.Warn("the websocket heard nothing since the prompt was queued: the server no longer sends it this client's messages; reconnecting", "prompt_id", f.id)
				f.w.s.redial(m.conn)
			}
			f.checkNow = false
			o = f.check(ctx)
			timer.Reset(f.interval())
		}
		if o.done {
			return o.res, o.err
		}
	}
}

func (f *follower) report(p Progress) {
	if f.onProgress != nil {
		f.onProgress(p)
	}
}

func (f *follower) handle(ctx context.Context, ev Event) outcome {
	switch ev.Type {
	case "execution_start":
		f.heardStart = true
	case "executing":
		if ev.Node == "" {
			if f.heardStart && f.successSeen {
				return outcome{done: true, res: Result{PromptID: f.id, Outputs: flattenOutputs(f.hints), Cached: !f.ran}}
			}
			return f.fromHistory(ctx)
		}
		f.ran = true
		if ev.Node != f.node {
			f.node = ev.Node
			f.report(Progress{PromptID: f.id, Node: ev.Node})
		}
	case "progress":
		node := ev.Node
		if node == "" {
			node = f.node
		}
		f.report(Progress{PromptID: f.id, Node: node, Value: ev.Value, Max: ev.Max})
	case "executed":
		var d struct {
			Output map[string]json.RawMessage `json:"output"`
		}
		if json.Unmarshal(ev.Data, &d) == nil && ev.Node != "" && len(d.Output) > 0 {
			if f.hints == nil {
				f.hints = map[string]map[string]json.RawMessage{}
			}
			f.hints[ev.Node] = d.Output
		}
	case "execution_success":
		f.successSeen = true
		return outcome{recheck: f.c.endGrace}
	case "execution_error":
		e := &ExecutionError{}
		if err := json.Unmarshal(ev.Data, e); err != nil {
			return outcome{done: true, err: fmt.Errorf("comfy: prompt %s failed: unreadable execution_error: %w", f.id, err)}
		}
		if e.PromptID == "" {
			e.PromptID = f.id
		}
		return outcome{done: true, err: e}
	case "execution_interrupted":
		e := &InterruptedError{}
		_ = json.Unmarshal(ev.Data, e)
		if e.PromptID == "" {
			e.PromptID = f.id
		}
		return outcome{done: true, err: e}
	}
	return outcome{}
}

// fromHistory reads the outcome once the websocket said the prompt ended. The
// server writes history before it sends the executing-null end marker.
func (f *follower) fromHistory(ctx context.Context) outcome {
	h, err := f.c.History(ctx, f.id)
	switch {
	case err != nil:
		f.c.log.Warn("reading history failed", "prompt_id", f.id, "error", err)
	case h != nil:
		return f.finish(h)
	case f.successSeen:
		return f.fromHints()
	}
	return outcome{recheck: f.c.pollInterval}
}

func (f *follower) finish(h *HistoryEntry) outcome {
	if err := h.Err(); err != nil {
		return outcome{done: true, err: err}
	}
	return outcome{done: true, res: Result{PromptID: f.id, Outputs: h.Outputs, Cached: h.AllCached()}}
}

// fromHints builds the result from the executed messages when the prompt
// succeeded but its history entry is gone (cleared, or evicted by max history).
func (f *follower) fromHints() outcome {
	f.c.log.Warn("prompt succeeded but has no history; using websocket outputs", "prompt_id", f.id)
	return outcome{done: true, res: Result{PromptID: f.id, Outputs: flattenOutputs(f.hints)}}
}

// check reads the prompt's fate from /queue, then /history: a prompt leaves
// the queue in the same step that records it in history.
func (f *follower) check(ctx context.Context) outcome {
	q, err := f.c.Queue(ctx)
	if err == nil {
		if it, found := q.Find(f.id); found {
			f.lost, f.outageSince = 0, time.Time{}
			if it.ClientID == f.c.clientID {
				f.trustWS = true
			}
			return outcome{}
		}
		var h *HistoryEntry
		if h, err = f.c.History(ctx, f.id); err == nil {
			f.outageSince = time.Time{}
			switch {
			case h != nil:
				return f.finish(h)
			case f.successSeen:
				return f.fromHints()
			}
			f.lost++
			if f.lost >= 2 {
				return outcome{done: true, err: fmt.Errorf("comfy: prompt %s: %w", f.id, ErrPromptLost)}
			}
			return outcome{}
		}
	}
	if ctx.Err() != nil {
		return outcome{}
	}
	if f.outageSince.IsZero() {
		f.outageSince = time.Now()
	}
	if since := time.Since(f.outageSince); since > f.c.maxOutage {
		return outcome{done: true, err: fmt.Errorf("comfy: prompt %s: server unreachable for %s: %w", f.id, since.Round(time.Second), err)}
	}
	f.c.log.Warn("checking prompt failed", "prompt_id", f.id, "error", err)
	return outcome{}
}

// abandon removes a cancelled prompt from the server: deleted if pending,
// interrupted if running. It only interrupts a prompt seen running, since
// older servers ignore the prompt_id of /interrupt and would stop whatever
// runs.
func (c *Client) abandon(parent context.Context, id string) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(parent), c.cleanupTimeout)
	defer cancel()
	log := c.log.With("prompt_id", id)
	pending := func(q Queue) bool {
		return slices.ContainsFunc(q.Pending, func(it QueueItem) bool { return it.PromptID == id })
	}
	q, err := c.Queue(ctx)
	if err != nil {
		log.Warn("cancelling prompt: queue unreadable, deleting and interrupting blindly", "error", err)
		if err := c.DeleteQueued(ctx, id); err != nil {
			log.Warn("cancelling prompt: delete failed", "error", err)
		}
		if err := c.Interrupt(ctx, id); err != nil {
			log.Warn("cancelling prompt: interrupt failed", "error", err)
		}
		return
	}
	if pending(q) {
		if err := c.DeleteQueued(ctx, id); err != nil {
			log.Warn("cancelling prompt: delete failed", "error", err)
			return
		}
		log.Info("cancelled prompt removed from queue")
		if q, err = c.Queue(ctx); err != nil {
			return
		}
	}
	if q.IsRunning(id) {
		if err := c.Interrupt(ctx, id); err != nil {
			log.Warn("cancelling prompt: interrupt failed", "error", err)
			return
		}
		log.Info("cancelled prompt interrupted")
	}
}
