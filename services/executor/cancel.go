package executor

import (
	"context"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// errCancelled ends an attempt whose scene was cancelled through the API.
var errCancelled = errors.New("scene cancelled")

// cancelJob ends every attempt of the scenes of job on this executor's nodes with
// errCancelled, deleting first their prompts still queued inside ComfyUI, so that
// interrupting a running one does not start them; it reports how many it ended.
func (e *executor) cancelJob(ctx context.Context, job string) int {
	ended := 0
	for _, n := range e.live.all() {
		if ids := n.queuedPrompts(job); len(ids) > 0 {
			ctx, cancel := context.WithTimeout(ctx, e.cfg.HeartbeatInterval)
			if err := n.client.DeleteQueued(ctx, ids...); err != nil {
				e.log.Warn("delete cancelled prompts from the queue", "node", n.cfg.ID, "err", err)
			}
			cancel()
		}
	}
	for _, n := range e.live.all() {
		ended += n.cancelJob(job)
	}
	return ended
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
		// A job is cancelled as a whole.
		if n := e.cancelJob(ctx, ev.JobID); n > 0 {
			e.log.Info("job cancelled; interrupting its scenes", "job", ev.JobID, "attempts", n)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("executor: follow cancelled events: %w", err)
	}
	return func() { cc.Stop(); <-cc.Closed() }, nil
}
