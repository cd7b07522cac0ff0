package fleet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/comfyfleet/comfyfleet/pkg/telemetry"
)

// Handler processes one message. What it returns settles the message: nil acks it;
// an error made by RetryAfter naks it with that delay; one made by Permanent
// terminates it with its reason; any other error naks it with a back-off from the
// number of deliveries. A handler never acks, naks or terminates a message itself;
// a handler that panics is recovered, logged with its stack, and its message retried.
type Handler func(ctx context.Context, msg jetstream.Msg) error

// retryAfter is the error of a handler that wants its message again after delay.
type retryAfter struct {
	delay time.Duration
	err   error
}

func (e *retryAfter) Error() string { return e.err.Error() }
func (e *retryAfter) Unwrap() error { return e.err }

// RetryAfter makes a handler's message come again after delay, for err.
func RetryAfter(delay time.Duration, err error) error {
	if err == nil {
		err = errors.New("retry")
	}
	return &retryAfter{delay: delay, err: err}
}

// permanent is the error of a handler whose message can never succeed.
type permanent struct{ err error }

func (e *permanent) Error() string { return e.err.Error() }
func (e *permanent) Unwrap() error { return e.err }

// Permanent makes a handler's message be dropped (terminated) for err: retrying
// cannot help.
func Permanent(err error) error { return &permanent{err: err} }

// unknownJobDeliveries is how often a message about a job that cannot be found is
// tried before it is dropped: a job always exists before anything about it is
// published, so "not found" is a store still recovering, until it persists.
const unknownJobDeliveries = 5

// UnknownJob is what a handler returns for a message about a job that was not found:
// it is tried again a second later, and dropped after a few deliveries.
func UnknownJob(msg jetstream.Msg, job string) error {
	err := fmt.Errorf("job %s: %w", job, ErrJobNotFound)
	if md, mdErr := msg.Metadata(); mdErr == nil && md.NumDelivered < unknownJobDeliveries {
		return RetryAfter(time.Second, err)
	}
	return Permanent(err)
}

// handlerBackoff is the first delay of a message whose handler failed; it doubles
// per delivery up to handlerMaxBackoff.
const (
	handlerBackoff    = 500 * time.Millisecond
	handlerMaxBackoff = 30 * time.Second
)

// Processor runs handlers for the messages of one consumer and settles them by what
// the handlers return, with a span, metrics, logs and panic recovery around each: the
// one place that does so for every consumer of the fleet.
type Processor struct {
	name   string
	log    *slog.Logger
	handle Handler
	tracer trace.Tracer
	count  metric.Int64Counter
	took   metric.Float64Histogram
}

// NewProcessor returns the Processor of the consumer name of service (its spans and
// metrics are the service's: "comfyfleet/<service>") running handle.
func NewProcessor(service, name string, log *slog.Logger, handle Handler) *Processor {
	scope := "comfyfleet/" + service
	meter := otel.Meter(scope)
	count, _ := meter.Int64Counter("comfyfleet.messages",
		metric.WithDescription("Messages handled, by consumer and outcome: ack, retry, term or panic."))
	took, _ := meter.Float64Histogram("comfyfleet.message.duration", metric.WithUnit("s"),
		metric.WithDescription("Time a handler took, by consumer."), metric.WithExplicitBucketBoundaries(telemetry.HandlerBuckets...))
	return &Processor{name: name, log: log, handle: handle, tracer: otel.Tracer(scope), count: count, took: took}
}

// Process handles msg and settles it.
func (p *Processor) Process(ctx context.Context, msg jetstream.Msg) {
	ctx = telemetry.Extract(ctx, msg.Headers())
	ctx, span := p.tracer.Start(ctx, p.name, trace.WithSpanKind(trace.SpanKindConsumer),
		trace.WithAttributes(attribute.String("messaging.destination.name", msg.Subject())))
	defer span.End()
	start := time.Now()
	err := p.run(ctx, msg)
	outcome := p.settle(msg, err)
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	attrs := metric.WithAttributes(attribute.String("consumer", p.name))
	p.took.Record(ctx, time.Since(start).Seconds(), attrs)
	p.count.Add(ctx, 1, attrs, metric.WithAttributes(attribute.String("outcome", outcome)))
}

// errPanicked marks a handler that panicked.
var errPanicked = errors.New("handler panicked")

func (p *Processor) run(ctx context.Context, msg jetstream.Msg) (err error) {
	defer func() {
		if r := recover(); r != nil {
			p.log.Error("handler panicked; its message will be retried", "consumer", p.name, "subject", msg.Subject(),
				"panic", r, "stack", string(debug.Stack()))
			err = fmt.Errorf("%w: %v", errPanicked, r)
		}
	}()
	return p.handle(ctx, msg)
}

// settle acknowledges, retries or terminates msg by err, and names what it did.
func (p *Processor) settle(msg jetstream.Msg, err error) string {
	var ra *retryAfter
	var perm *permanent
	switch {
	case err == nil:
		if err := msg.Ack(); err != nil {
			p.log.Warn("ack", "consumer", p.name, "subject", msg.Subject(), "err", err)
		}
		return "ack"
	case errors.As(err, &perm):
		p.log.Warn("message dropped", "consumer", p.name, "subject", msg.Subject(), "err", err)
		_ = msg.TermWithReason(truncate(err.Error(), 256))
		return "term"
	case errors.As(err, &ra):
		_ = msg.NakWithDelay(ra.delay)
		return "retry"
	}
	delivered := uint64(1)
	if md, mdErr := msg.Metadata(); mdErr == nil {
		delivered = md.NumDelivered
	}
	delay := ExponentialDelay(handlerBackoff, handlerMaxBackoff, int(delivered))
	p.log.Warn("message will be retried", "consumer", p.name, "subject", msg.Subject(), "in", delay.Round(time.Millisecond), "err", err)
	_ = msg.NakWithDelay(delay)
	if errors.Is(err, errPanicked) {
		return "panic"
	}
	return "retry"
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n]
}

// PublishAckTimeout bounds every service's wait for the acknowledgement of an
// asynchronous publish (jetstream.WithPublishAsyncTimeout): nats.go waits for ever
// by default, and the answer of a NATS server killed after it took the message
// never comes. The publisher then fails and tries again, as after any error; the
// message id makes a second copy harmless.
var PublishAckTimeout = jetstream.WithPublishAsyncTimeout(10 * time.Second)

// PullExpiry and PullHeartbeat bound every pull of the fleet's consumers: a pull
// request lost with the NATS server that led its consumer is noticed within a few
// seconds, and sent again to the consumer's new leader, instead of after nats.go's
// default 30 seconds.
var (
	PullExpiry    = jetstream.PullExpiry(5 * time.Second)
	PullHeartbeat = jetstream.PullHeartbeat(time.Second)
)

// ConsumeOption tunes Consume.
type ConsumeOption func(*consumeOptions)

type consumeOptions struct {
	service string
	workers int
}

// Service names the service that consumes, for its spans and metrics.
func Service(name string) ConsumeOption {
	return func(o *consumeOptions) { o.service = name }
}

// Workers handles up to n messages at once, each by the first worker free: a slow
// message holds up no other.
func Workers(n int) ConsumeOption {
	return func(o *consumeOptions) { o.workers = max(n, 1) }
}

// Consume feeds the messages of the durable consumer cfg on stream to handle until
// ctx is done, settling each by what handle returns (see Handler). It creates the
// consumer, and creates it and its iterator again whenever they stop (the consumer
// lost, a NATS server restarted on another store), so a running service never stops
// consuming unnoticed.
func Consume(ctx context.Context, js jetstream.JetStream, stream string, cfg jetstream.ConsumerConfig, log *slog.Logger, handle Handler, opts ...ConsumeOption) error {
	o := consumeOptions{service: "fleet", workers: 1}
	for _, opt := range opts {
		opt(&o)
	}
	proc := NewProcessor(o.service, cfg.Durable, log, handle)
	for ctx.Err() == nil {
		var cons jetstream.Consumer
		err := Retry(ctx, log, "create consumer "+cfg.Durable, func(ctx context.Context) error {
			var err error
			cons, err = js.CreateOrUpdateConsumer(ctx, stream, cfg)
			return err
		})
		if err != nil {
			return IgnoreStop(ctx, fmt.Errorf("create consumer %s: %w", cfg.Durable, err))
		}
		err = consumeUntilStopped(ctx, cons, log, proc, o)
		if ctx.Err() != nil {
			return nil
		}
		log.Warn("consumer stopped; creating it again", "consumer", cfg.Durable, "err", err)
	}
	return nil
}

func consumeUntilStopped(ctx context.Context, cons jetstream.Consumer, log *slog.Logger, proc *Processor, o consumeOptions) error {
	it, err := cons.Messages(jetstream.PullMaxMessages(max(o.workers, 1)), PullExpiry, PullHeartbeat)
	if err != nil {
		return fmt.Errorf("consume %s: %w", cons.CachedInfo().Name, err)
	}
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	defer it.Stop()
	work := make(chan jetstream.Msg)
	var wg sync.WaitGroup
	defer wg.Wait()
	for range o.workers {
		wg.Go(func() {
			for msg := range work {
				proc.Process(ctx, msg)
			}
		})
	}
	defer close(work)
	for {
		msg, err := it.Next()
		if ctx.Err() != nil {
			return nil
		}
		if errors.Is(err, jetstream.ErrMsgIteratorClosed) {
			return err
		}
		if err != nil {
			log.Warn("fetch message", "consumer", cons.CachedInfo().Name, "err", err)
			continue
		}
		work <- msg
	}
}

// IgnoreStop returns nil for an error that only says ctx ended: a service asked to
// stop while it was still starting has stopped cleanly.
func IgnoreStop(ctx context.Context, err error) error {
	if err != nil && ctx.Err() != nil && (errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)) {
		return nil
	}
	return err
}

// NoMessage reports whether err says that a stream message is not there (any more):
// a get or a delete of a message already removed. A delete's answer names the
// server's error only in its text ("sequence N not found", or "no message found").
func NoMessage(err error) bool {
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return true
	}
	return err != nil && (strings.Contains(err.Error(), "no message found") || strings.Contains(err.Error(), errSequenceNotFound))
}

// errSequenceNotFound is how the text of an error carries the server's
// JSSequenceNotFoundErrF, its answer to a delete of a sequence the stream no longer
// holds.
const errSequenceNotFound = "err_code=10043 "
