package fleet

import (
	"context"
	"encoding/json"
	"fmt"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/telemetry"
)

// Publisher publishes fleet messages to JetStream, each with a message id for
// de-duplication and the caller's trace context in its headers.
type Publisher struct {
	js     jetstream.JetStream
	source string
}

// NewPublisher returns a Publisher whose events name source (e.g.
// "comfyfleet/executor/host-1") as their CloudEvents source.
func NewPublisher(js jetstream.JetStream, source string) *Publisher {
	return &Publisher{js: js, source: source}
}

// JSON publishes v as JSON on subject with message id msgID.
func (p *Publisher) JSON(ctx context.Context, subject, msgID string, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return fmt.Errorf("encode message for %s: %w", subject, err)
	}
	msg := &nats.Msg{Subject: subject, Data: data, Header: nats.Header{}}
	telemetry.Inject(ctx, msg.Header)
	if _, err := p.js.PublishMsg(ctx, msg, jetstream.WithMsgID(msgID)); err != nil {
		return fmt.Errorf("publish %s: %w", subject, err)
	}
	return nil
}

// SceneEvent publishes a scene event as a CloudEvent.
func (p *Publisher) SceneEvent(ctx context.Context, e SceneEvent) error {
	if e.Time.IsZero() {
		e.Time = time.Now().UTC()
	}
	ev, err := e.Envelope(p.source)
	if err != nil {
		return err
	}
	return p.JSON(ctx, SceneEventSubject(e.JobID, e.Index, e.Type), ev.ID, ev)
}

// JobEvent publishes a job event as a CloudEvent.
func (p *Publisher) JobEvent(ctx context.Context, e JobEvent) error {
	ev, err := e.Envelope(p.source)
	if err != nil {
		return err
	}
	return p.JSON(ctx, JobEventSubject(e.Job.ID, e.Type), ev.ID, ev)
}

// RetryDelay is how long to wait before attempt+1 after attempt failed: exponential
// from RetryBackoff, with jitter, capped at 30 times RetryBackoff.
func (s Settings) RetryDelay(attempt int) time.Duration {
	return ExponentialDelay(s.RetryBackoff, 30*s.RetryBackoff, attempt)
}

// ExponentialDelay is the attempt-th delay of an exponential back-off from initial to
// at most limit, with ±20% jitter.
func ExponentialDelay(initial, limit time.Duration, attempt int) time.Duration {
	b := backoff.NewExponentialBackOff()
	b.InitialInterval = initial
	b.MaxInterval = limit
	b.RandomizationFactor = 0.2
	b.MaxElapsedTime = 0
	b.Reset()
	d := initial
	for range max(attempt, 1) {
		d = b.NextBackOff()
	}
	return d
}
