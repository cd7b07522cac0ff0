package intake

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// maxPreferWait is the longest a POST /v1/jobs with Prefer: wait=N waits.
const maxPreferWait = 60 * time.Second

// preferredWait reads the wait preference of a Prefer header (RFC 7240), e.g.
// "wait=10" or "respond-async, wait=10": how long the client would wait for the
// finished job, at most maxPreferWait; 0 when it asks for no wait. A preference the
// server cannot read is ignored, as the RFC says.
func preferredWait(prefer string) time.Duration {
	for _, pref := range strings.Split(prefer, ",") {
		token, _, _ := strings.Cut(pref, ";")
		name, value, ok := strings.Cut(strings.TrimSpace(token), "=")
		if !ok || !strings.EqualFold(strings.TrimSpace(name), "wait") {
			continue
		}
		n, err := strconv.Atoi(strings.Trim(strings.TrimSpace(value), `"`))
		if err != nil || n <= 0 {
			return 0
		}
		return min(time.Duration(n)*time.Second, maxPreferWait)
	}
	return 0
}

// awaitJob waits up to d for job's terminal event, of the round the job is in, and
// returns the job as it is then; nil when the job has not ended by then or the
// intake stops first. It follows the job's events (an ordered consumer from the
// first one, so that an end before the wait began counts) rather than polling.
func (in *intake) awaitJob(ctx context.Context, job *fleet.Job, d time.Duration) (*fleet.Job, error) {
	if job.Status.Terminal() {
		return job, nil
	}
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	go func() {
		select {
		case <-in.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	cons, err := in.js.OrderedConsumer(ctx, fleet.StreamEvents, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{fleet.JobEventSubject(job.ID, "*")},
	})
	if err != nil {
		return nil, fmt.Errorf("follow the events of job %s: %w", job.ID, err)
	}
	it, err := cons.Messages()
	if err != nil {
		return nil, fmt.Errorf("follow the events of job %s: %w", job.ID, err)
	}
	defer in.dropConsumer(it, cons)
	end := jobEnd{job: job.ID, round: job.Round}
	for {
		msg, err := it.Next(jetstream.NextContext(ctx))
		if ctx.Err() != nil {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("follow the events of job %s: %w", job.ID, err)
		}
		if end.is(msg.Headers().Get(jetstream.MsgIDHeader)) {
			break
		}
	}
	done, err := in.jobs.Get(context.WithoutCancel(ctx), job.ID)
	if err != nil {
		return nil, fmt.Errorf("read the finished job %s: %w", job.ID, err)
	}
	return done, nil
}

// jobView is the job as clients see it: its outputs linked by presigned URLs of the
// outputs store when it gives them, else by the API's download URLs.
func (in *intake) jobView(ctx context.Context, job *fleet.Job) api.Job {
	view := api.FromJob(job, in.cfg.PublicURL)
	if err := api.Presign(ctx, &view, in.outputs, in.cfg.OutputURLTTL); err != nil {
		in.log.Warn("presign output URLs; the API's URLs stay", "job", job.ID, "err", err)
		view = api.FromJob(job, in.cfg.PublicURL)
	}
	return view
}
