package executor

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// errCancelled ends an attempt whose scene was cancelled through the API.
var errCancelled = errors.New("scene cancelled")

// sceneRun names one run of a scene: its first, or one started by hand after it
// failed.
type sceneRun struct {
	job   string
	index int
	retry int
}

// attempts maps the scenes running on this executor's nodes to the cancel functions
// of their attempts, so that a cancelled event can stop them.
type attempts struct {
	mu      sync.Mutex
	running map[sceneRun]map[string]context.CancelCauseFunc // by node
}

// add registers the attempt of r on node until the returned function is called.
func (a *attempts) add(r sceneRun, node string, cancel context.CancelCauseFunc) (remove func()) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.running == nil {
		a.running = map[sceneRun]map[string]context.CancelCauseFunc{}
	}
	if a.running[r] == nil {
		a.running[r] = map[string]context.CancelCauseFunc{}
	}
	a.running[r][node] = cancel
	return func() {
		a.mu.Lock()
		defer a.mu.Unlock()
		delete(a.running[r], node)
		if len(a.running[r]) == 0 {
			delete(a.running, r)
		}
	}
}

// cancelJob ends every running attempt of the scenes of job with errCancelled and
// reports how many.
func (a *attempts) cancelJob(job string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	n := 0
	for r, byNode := range a.running {
		if r.job != job {
			continue
		}
		for _, cancel := range byNode {
			cancel(errCancelled)
			n++
		}
	}
	return n
}

// cancel ends every running attempt of r with errCancelled and reports how many.
func (a *attempts) cancel(r sceneRun) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, cancel := range a.running[r] {
		cancel(errCancelled)
	}
	return len(a.running[r])
}

// followCancels listens to the cancelled events of every scene from now on and ends
// the attempts of those scenes that run here. The consumer is ordered, so it picks up
// where it was after a lost connection. Call the returned function to stop.
func (e *executor) followCancels(ctx context.Context) (stop func(), err error) {
	info, err := e.events.Info(ctx)
	if err != nil {
		return nil, fmt.Errorf("executor: events stream: %w", err)
	}
	cons, err := e.events.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{fleet.SceneCancelledFilter},
		DeliverPolicy:  jetstream.DeliverByStartSequencePolicy,
		OptStartSeq:    info.State.LastSeq + 1,
	})
	if err != nil {
		return nil, fmt.Errorf("executor: consumer of cancelled events: %w", err)
	}
	cc, err := cons.Consume(func(msg jetstream.Msg) {
		ev, err := fleet.DecodeSceneEvent(msg.Data())
		if err != nil {
			e.log.Warn("drop undecodable cancelled event", "subject", msg.Subject(), "err", err)
			return
		}
		// A job is cancelled as a whole. Its prompts waiting inside ComfyUI go first,
		// so that interrupting the running one does not start them.
		e.dropQueued(ctx, ev.JobID)
		if n := e.attempts.cancelJob(ev.JobID); n > 0 {
			e.log.Info("job cancelled; interrupting its scenes", "job", ev.JobID, "attempts", n)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("executor: follow cancelled events: %w", err)
	}
	return func() { cc.Stop(); <-cc.Closed() }, nil
}

// cancelled reports whether the item's run of its scene was cancelled, from its
// event: the jobs bucket may not show it yet.
func (e *executor) cancelled(ctx context.Context, item fleet.WorkItem) (bool, error) {
	raw, err := e.events.GetLastMsgForSubject(ctx, fleet.SceneEventSubject(item.JobID, item.Index, fleet.EventCancelled))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("look up cancellation of scene %s: %w", item.MsgID(), err)
	}
	ev, err := fleet.DecodeSceneEvent(raw.Data)
	if err != nil {
		return false, fmt.Errorf("look up cancellation of scene %s: %w", item.MsgID(), err)
	}
	return ev.Retry >= item.Retry, nil
}
