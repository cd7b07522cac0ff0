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
	return p.publish(ctx, subject, msgID, data)
}

// publish stores data on subject with msgID and awaits the server's acknowledgement.
func (p *Publisher) publish(ctx context.Context, subject, msgID string, data []byte) error {
	msg := &nats.Msg{Subject: subject, Data: data, Header: nats.Header{}}
	telemetry.Inject(ctx, msg.Header)
	if _, err := p.js.PublishMsg(ctx, msg, jetstream.WithMsgID(msgID)); err != nil {
		return fmt.Errorf("publish %s: %w", subject, err)
	}
	return nil
}

// Outgoing is one message of a Batch.
type Outgoing struct {
	Subject string
	MsgID   string
	Value   any
	// Data, if not nil, is the message's body as it is, in place of Value as JSON.
	Data []byte
	// Header holds further headers.
	Header map[string]string
	// Opts are further publish options, e.g. an expected last sequence.
	Opts []jetstream.PublishOpt
	// IfAbsent stores the message only if its subject holds none (a key created in
	// a bucket); one there already is no error, and the message's ack is nil.
	IfAbsent bool
}

// Batch publishes msgs asynchronously, each as JSON with its message id and the
// caller's trace context, and waits until the server has stored every one of them
// or one failed. It is how a job's scenes go out: together, awaited together.
func (p *Publisher) Batch(ctx context.Context, msgs []Outgoing) error {
	_, err := p.BatchAcks(ctx, msgs)
	return err
}

// BatchAcks is Batch, returning the server's acknowledgement of each message.
func (p *Publisher) BatchAcks(ctx context.Context, msgs []Outgoing) ([]*jetstream.PubAck, error) {
	futures, err := p.Send(ctx, msgs)
	if err != nil {
		return nil, err
	}
	return Await(ctx, msgs, futures)
}

// Send publishes msgs as Batch does, without waiting for the server's answers: Await
// waits for them.
func (p *Publisher) Send(ctx context.Context, msgs []Outgoing) ([]jetstream.PubAckFuture, error) {
	futures := make([]jetstream.PubAckFuture, 0, len(msgs))
	for _, m := range msgs {
		data := m.Data
		if data == nil {
			var err error
			if data, err = json.Marshal(m.Value); err != nil {
				return nil, fmt.Errorf("encode message for %s: %w", m.Subject, err)
			}
		}
		msg := &nats.Msg{Subject: m.Subject, Data: data, Header: nats.Header{}}
		telemetry.Inject(ctx, msg.Header)
		for k, v := range m.Header {
			msg.Header.Set(k, v)
		}
		opts := append([]jetstream.PublishOpt{jetstream.WithMsgID(m.MsgID)}, m.Opts...)
		if m.IfAbsent {
			opts = append(opts, jetstream.WithExpectLastSequencePerSubject(0))
		}
		f, err := p.js.PublishMsgAsync(msg, opts...)
		if err != nil {
			return nil, fmt.Errorf("publish %s: %w", m.Subject, err)
		}
		futures = append(futures, f)
	}
	return futures, nil
}

// Await waits until the server has stored each of msgs, sent by Send with futures, or
// one failed, and returns the server's acknowledgement of each (nil for an IfAbsent
// message whose subject held one).
func Await(ctx context.Context, msgs []Outgoing, futures []jetstream.PubAckFuture) ([]*jetstream.PubAck, error) {
	acks := make([]*jetstream.PubAck, len(futures))
	for i, f := range futures {
		select {
		case ack := <-f.Ok():
			acks[i] = ack
		case err := <-f.Err():
			if msgs[i].IfAbsent && WrongLastSequence(err) {
				continue
			}
			return nil, fmt.Errorf("publish %s: %w", f.Msg().Subject, err)
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return acks, nil
}

// SceneEvents publishes scene events as CloudEvents, as one Batch.
func (p *Publisher) SceneEvents(ctx context.Context, events []SceneEvent) error {
	msgs, err := p.SceneEventMessages(events)
	if err != nil {
		return err
	}
	return p.Batch(ctx, msgs)
}

// SceneEventMessages are the messages of scene events as CloudEvents, for a Batch
// that sends them with others.
func (p *Publisher) SceneEventMessages(events []SceneEvent) ([]Outgoing, error) {
	msgs := make([]Outgoing, 0, len(events))
	now := time.Now().UTC()
	for _, e := range events {
		if e.Time.IsZero() {
			e.Time = now
		}
		ev, err := e.Envelope(p.source)
		if err != nil {
			return nil, err
		}
		data, err := ev.Encode()
		if err != nil {
			return nil, err
		}
		msgs = append(msgs, Outgoing{Subject: SceneEventSubject(e.JobID, e.Index, e.Type), MsgID: ev.ID, Data: data})
	}
	return msgs, nil
}

// Requeue puts t back in the queue, as Ticket.Requeue made it: after a failed
// attempt, a lost node, or a hand-back. Its message id makes a repeat a no-op.
func (p *Publisher) Requeue(ctx context.Context, t Ticket) error {
	return p.JSON(ctx, QueueSubject(t.Pool, t.JobID, t.Index), t.PlacementID(), t)
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
	data, err := ev.Encode()
	if err != nil {
		return err
	}
	return p.publish(ctx, SceneEventSubject(e.JobID, e.Index, e.Type), ev.ID, data)
}

// JobEvent publishes a job event as a CloudEvent.
func (p *Publisher) JobEvent(ctx context.Context, e JobEvent) error {
	ev, err := e.Envelope(p.source)
	if err != nil {
		return err
	}
	data, err := ev.Encode()
	if err != nil {
		return err
	}
	return p.publish(ctx, JobEventSubject(e.Job.ID, e.Type), ev.ID, data)
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
