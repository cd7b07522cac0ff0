package executor

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

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

// cancelMemory is how far back the executor reads cancellations when it starts, and
// how long it remembers each: a scene placed before its job was cancelled and
// delivered later is dropped without a look at its events.
const cancelMemory = 10 * time.Minute

// followCancels listens to the cancelled events of every scene, from cancelMemory
// ago on, remembers their jobs, and ends the attempts of those jobs' scenes that run
// here. The consumer is ordered, so it picks up where it was after a lost
// connection. Call the returned function to stop.
func (e *executor) followCancels(ctx context.Context) (stop func(), err error) {
	cons, err := e.events.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{fleet.SceneCancelledFilter},
		DeliverPolicy:  jetstream.DeliverByStartTimePolicy,
		OptStartTime:   new(time.Now().Add(-cancelMemory)),
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
		e.cancels.add(ev.JobID, ev.Time)
		if n := e.cancelJob(ctx, ev.JobID); n > 0 {
			e.log.Info("job cancelled; interrupting its scenes", "job", ev.JobID, "attempts", n)
		}
	}, fleet.PullExpiry, fleet.PullHeartbeat)
	if err != nil {
		return nil, fmt.Errorf("executor: follow cancelled events: %w", err)
	}
	return func() { cc.Stop(); <-cc.Closed() }, nil
}

// cancelledJobs are the jobs cancelled in the last cancelMemory.
type cancelledJobs struct {
	mu   sync.Mutex
	jobs map[string]time.Time
}

func (c *cancelledJobs) add(job string, at time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.jobs == nil {
		c.jobs = map[string]time.Time{}
	}
	for j, t := range c.jobs {
		if time.Since(t) > cancelMemory {
			delete(c.jobs, j)
		}
	}
	c.jobs[job] = at
}

func (c *cancelledJobs) has(job string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, ok := c.jobs[job]
	return ok
}
