package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// router turns the commands of the submit stream into queued scenes: a committed
// job that its intake did not queue is recorded and its scenes queued, a retried
// scene is reopened and queued again. Every dispatcher routes, the standbys too; each
// command goes to one of them, and a command routed twice changes nothing (message
// ids).
type router struct {
	jobs *fleet.Jobs
	pub  *fleet.Publisher
	log  *slog.Logger
	// payloadWait is how long after its commit fired a job whose scenes' payloads are
	// not all stored waits for them: the submit stream's duplicate window.
	payloadWait time.Duration
}

// route handles one command of the submit stream.
func (r *router) route(ctx context.Context, msg jetstream.Msg) error {
	switch fleet.SubmitKind(msg.Subject()) {
	case fleet.SubmitJob:
		var j fleet.Job
		if err := json.Unmarshal(msg.Data(), &j); err != nil || !fleet.ValidToken(j.ID) {
			return fleet.Permanent(fmt.Errorf("undecodable job: %v", err))
		}
		if err := r.payloadsStored(ctx, msg, &j); err != nil {
			return err
		}
		return r.queueJob(ctx, &j, msg.Data())
	case fleet.SubmitRetry:
		var cmd fleet.SceneRetry
		if err := json.Unmarshal(msg.Data(), &cmd); err != nil {
			return fleet.Permanent(fmt.Errorf("undecodable retry: %w", err))
		}
		return r.retry(ctx, msg, cmd)
	}
	return fleet.Permanent(fmt.Errorf("unknown command subject %s", msg.Subject()))
}

// payloadRecheck is how soon the router looks again for the payloads of a job whose
// commit fired before they were all stored: well within the five seconds that a
// request repeating the commit waits for the job's record.
const payloadRecheck = time.Second

// payloadsStored returns nil once the payload of every scene of j, committed by msg,
// is stored. The request that committed j sent the payloads with the commit and
// failed, with an error to its client, if one of them was not stored: a commit
// that fires without them belongs to a request that failed. Its client may send it
// again, with the same Idempotency-Key, which stores the payloads (the commit is then
// a duplicate): so the commit waits for them, and is dropped once a repeat would no
// longer be a duplicate but a commit of its own. Queued without its payloads, the job
// would use up its scenes' attempts on payloads that are not there.
func (r *router) payloadsStored(ctx context.Context, msg jetstream.Msg, j *fleet.Job) error {
	stored, err := r.jobs.PayloadsStored(ctx, j.ID)
	if err != nil {
		return err
	}
	if stored >= len(j.Scenes) {
		return nil
	}
	missing := fmt.Errorf("job %s committed with %d of its %d scenes' payloads stored", j.ID, stored, len(j.Scenes))
	md, err := msg.Metadata()
	if err != nil {
		return err
	}
	if waited := time.Since(md.Timestamp); waited < r.payloadWait {
		return fleet.RetryAfter(payloadRecheck, missing)
	}
	r.log.Warn("commit of a job whose payloads never came dropped: the request that committed it failed", "job", j.ID, "err", missing)
	return fleet.Permanent(missing)
}

// queueJob records and queues j, committed by an intake that did not queue it
// itself (it stopped first, or could not), with the same messages as that intake:
// whatever it stored before is stored once. encoded is j as its commit carried it:
// the record as the intake meant to write it.
func (r *router) queueJob(ctx context.Context, j *fleet.Job, encoded []byte) error {
	trace.SpanFromContext(ctx).SetAttributes(attribute.String("comfyfleet.job", j.ID), attribute.Int("comfyfleet.scenes", len(j.Scenes)))
	msgs, err := r.jobs.CreateMessages(j, encoded)
	if err != nil {
		return err
	}
	queue, err := fleet.QueueMessages(r.pub, j)
	if err != nil {
		return err
	}
	if err := r.pub.Batch(ctx, append(msgs, queue...)); err != nil {
		return fmt.Errorf("queue job %s: %w", j.ID, err)
	}
	return nil
}

// retry reopens the scene in the job's state and queues its new run.
func (r *router) retry(ctx context.Context, msg jetstream.Msg, cmd fleet.SceneRetry) error {
	j, err := r.jobs.Record(ctx, cmd.JobID)
	if errors.Is(err, fleet.ErrJobNotFound) {
		return fleet.UnknownJob(msg, cmd.JobID)
	}
	if err != nil {
		return err
	}
	if cmd.Index < 0 || cmd.Index >= len(j.Scenes) {
		return fleet.Permanent(fmt.Errorf("job %s has no scene %d", j.ID, cmd.Index))
	}
	if _, err := r.jobs.UpdateState(ctx, j.ID, func(st *fleet.JobState) error {
		if !st.Reopen(cmd.Index, cmd.Retry, cmd.At) {
			return fleet.ErrNoChange
		}
		return nil
	}); err != nil {
		return err
	}
	s := j.Scenes[cmd.Index]
	ev := fleet.SceneEvent{JobID: j.ID, Index: cmd.Index, Retry: cmd.Retry, Type: fleet.EventQueued, Pool: s.Pool, Time: cmd.At}
	if err := r.pub.SceneEvent(ctx, ev); err != nil {
		return err
	}
	t := j.Ticket(cmd.Index)
	t.SubmittedAt, t.Retry, t.AttemptBase = cmd.At, cmd.Retry, cmd.AttemptBase
	return r.pub.JSON(ctx, fleet.QueueSubject(s.Pool, j.ID, cmd.Index), t.PlacementID(), t)
}
