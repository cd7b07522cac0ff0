package intake

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/semaphore"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// queue records the committed job and queues its scenes, so that they wait for no
// other service. The record and the state are stored before it returns, so that the
// job can be read as soon as it is accepted; meanwhile the queuer sends the scenes'
// queued events and tickets and, once all is stored, has the commit's schedule
// removed. Should any of it fail, the commit fires for the router when its schedule
// is due, and the router does it all again: whatever was stored is stored once.
func (in *intake) queue(ctx context.Context, job *fleet.Job, c committed) {
	recorded := make(chan error, 1)
	in.queuer.add(ctx, queueing{job: job, held: c.held, commitSeq: c.seq, traced: context.WithoutCancel(ctx), recorded: recorded})
	msgs, err := in.jobs.CreateMessages(job, c.encoded)
	var acks []*jetstream.PubAck
	if err == nil {
		acks, err = in.pub.BatchAcks(ctx, msgs)
	}
	recorded <- err
	if err != nil {
		in.log.Warn("record job; the router records it when its commit fires", "job", job.ID, "err", err)
		return
	}
	if acks[1] != nil {
		// The state (the second message) is new: listed at once here; the watch of
		// the job states brings it to the others.
		in.index.put(fleet.NewJobState(job), 0)
	}
}

// queueing is a job whose scenes the queuer is to queue.
type queueing struct {
	job *fleet.Job
	// held is what the job holds of the queuer's budget (reserve).
	held int64
	// commitSeq is the sequence of the job's commit in the submit stream.
	commitSeq uint64
	// traced carries the trace context of the request that accepted the job.
	traced context.Context
	// recorded receives the outcome of the job's recording, by its request.
	recorded chan error
}

// sentQueue is a job whose scenes the queuer sent to the queue.
type sentQueue struct {
	queueing
	msgs    []fleet.Outgoing
	futures []jetstream.PubAckFuture
}

// queuerWindow bounds the jobs waiting to be queued.
const queuerWindow = 64

// queuerBudget bounds the scenes of committed jobs that the queuer has yet to queue
// or whose queued events and tickets await the server's answers: requests wait for
// room before they commit a job, so that the queuer keeps up with what the intake
// accepts, well within fleet.CommitGrace, and, on the requests' connection, its
// messages take at most a quarter of the window of asynchronous publishes
// (publishWindow), leaving the rest to the requests' commits.
const queuerBudget = publishWindow / 8

// queuer queues the scenes of the jobs that requests accepted, off the requests'
// path, in two stages, like the dispatcher's placer: one goroutine sends each job's
// queued events and tickets, another awaits the server's answers and, once the
// request recorded the job too, has the job's commit schedule removed. The server's
// answers to the removals come to a subscription of its own.
type queuer struct {
	jobs    *fleet.Jobs
	pub     *fleet.Publisher
	log     *slog.Logger
	todo    chan queueing
	sent    chan sentQueue
	answers *nats.Subscription
	// budget holds a unit for each scene being queued.
	budget *semaphore.Weighted
	// abort ends the waits for answers.
	abort             context.CancelFunc
	sending, settling sync.WaitGroup
	stopping          sync.Once
}

// newQueuer starts a queuer that queues until stop.
func newQueuer(nc *nats.Conn, jobs *fleet.Jobs, pub *fleet.Publisher, log *slog.Logger) (*queuer, error) {
	answers, err := nc.Subscribe(nc.NewInbox(), func(m *nats.Msg) {
		switch err := fleet.CommitDropFailed(m.Data); {
		case errors.Is(err, fleet.ErrCommitFired):
			log.Warn("a job's commit fired before its intake had queued the job: the router sent the job's messages again, each stored once")
		case err != nil:
			log.Warn("a job's commit stays; the router takes it up and finds the job queued", "err", err)
		}
	})
	if err != nil {
		return nil, fmt.Errorf("follow the removals of commit schedules: %w", err)
	}
	ctx, abort := context.WithCancel(context.Background())
	q := &queuer{jobs: jobs, pub: pub, log: log, todo: make(chan queueing, queuerWindow), sent: make(chan sentQueue, queuerWindow),
		answers: answers, budget: semaphore.NewWeighted(queuerBudget), abort: abort}
	q.sending.Go(func() {
		for j := range q.todo {
			q.send(j)
		}
	})
	q.settling.Go(func() {
		for s := range q.sent {
			q.settle(ctx, s)
		}
	})
	return q, nil
}

// reserve waits until the queuer has room for a job of n scenes, unless ctx ends
// first, and returns what it reserved.
func (q *queuer) reserve(ctx context.Context, n int) (int64, error) {
	held := min(int64(n), queuerBudget)
	if err := q.budget.Acquire(ctx, held); err != nil {
		return 0, err
	}
	return held, nil
}

// release gives back what reserve reserved for a job that is not to be queued.
func (q *queuer) release(held int64) { q.budget.Release(held) }

// add hands j, for which room was reserved, to the queuer, unless ctx ends first: the
// commit then fires for the router.
func (q *queuer) add(ctx context.Context, j queueing) {
	select {
	case q.todo <- j:
	case <-ctx.Done():
		q.release(j.held)
	}
}

func (q *queuer) send(j queueing) {
	msgs, err := fleet.QueueMessages(q.pub, j.job)
	var futures []jetstream.PubAckFuture
	if err == nil {
		futures, err = q.pub.Send(j.traced, msgs)
	}
	if err != nil {
		q.release(j.held)
		q.log.Warn("queue job; the router queues it when its commit fires", "job", j.job.ID, "err", err)
		return
	}
	q.sent <- sentQueue{queueing: j, msgs: msgs, futures: futures}
}

func (q *queuer) settle(ctx context.Context, s sentQueue) {
	_, err := fleet.Await(ctx, s.msgs, s.futures)
	q.release(s.held)
	if err == nil {
		select {
		case err = <-s.recorded:
		case <-ctx.Done():
			err = ctx.Err()
		}
	}
	if err == nil {
		err = q.jobs.DropCommit(s.commitSeq, q.answers.Subject)
	}
	if err != nil {
		q.log.Warn("queue job; the router queues it when its commit fires", "job", s.job.ID, "err", err)
	}
}

// stop queues what was added, unless ctx ends first, and returns; call it once no
// request adds any more. What ctx cuts short, and the answers to removals still on
// their way, the router takes up when the jobs' commits fire. Calls after the first
// return at once.
func (q *queuer) stop(ctx context.Context) {
	q.stopping.Do(func() {
		defer context.AfterFunc(ctx, q.abort)()
		close(q.todo)
		q.sending.Wait()
		close(q.sent)
		q.settling.Wait()
		q.abort()
		if err := q.answers.Unsubscribe(); err != nil {
			q.log.Debug("stop following the removals of commit schedules", "err", err)
		}
	})
}
