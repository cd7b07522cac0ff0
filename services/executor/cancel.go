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

// attempts maps the scenes running on this executor's nodes to the cancel functions
// of their attempts, so that a cancelled event can stop them.
type attempts struct {
	mu      sync.Mutex
	running map[string]map[string]context.CancelCauseFunc // scene key → node → cancel
}

// add registers the attempt of scene on node until the returned function is called.
func (a *attempts) add(scene, node string, cancel context.CancelCauseFunc) (remove func()) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.running == nil {
		a.running = map[string]map[string]context.CancelCauseFunc{}
	}
	if a.running[scene] == nil {
		a.running[scene] = map[string]context.CancelCauseFunc{}
	}
	a.running[scene][node] = cancel
	return func() {
		a.mu.Lock()
		defer a.mu.Unlock()
		delete(a.running[scene], node)
		if len(a.running[scene]) == 0 {
			delete(a.running, scene)
		}
	}
}

// cancel ends every running attempt of scene with errCancelled and reports how many.
func (a *attempts) cancel(scene string) int {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, cancel := range a.running[scene] {
		cancel(errCancelled)
	}
	return len(a.running[scene])
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
		key := fleet.SceneKey(ev.JobID, ev.Index)
		if n := e.attempts.cancel(key); n > 0 {
			e.log.Info("scene cancelled; interrupting it", "scene", key)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("executor: follow cancelled events: %w", err)
	}
	return func() { cc.Stop(); <-cc.Closed() }, nil
}

// cancelled reports whether the scene was cancelled, from its event: the jobs bucket
// may not show it yet.
func (e *executor) cancelled(ctx context.Context, item fleet.WorkItem) (bool, error) {
	_, err := e.events.GetLastMsgForSubject(ctx, fleet.SceneEventSubject(item.JobID, item.Index, fleet.EventCancelled))
	switch {
	case errors.Is(err, jetstream.ErrMsgNotFound):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("look up cancellation of scene %s: %w", item.MsgID(), err)
	}
	return true, nil
}
