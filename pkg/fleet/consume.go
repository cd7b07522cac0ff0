package fleet

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/telemetry"
)

// Handler decides one message: it must Ack, Nak or Term it. ctx carries the trace
// context found in the message's headers.
type Handler func(ctx context.Context, msg jetstream.Msg)

// Consume feeds the messages of the durable consumer cfg on stream, one at a time, to
// handle until ctx is done. It creates the consumer, and creates it and its
// iterator again whenever they stop (the consumer lost, a NATS server restarted on
// another store), so a running service never stops consuming unnoticed.
func Consume(ctx context.Context, js jetstream.JetStream, stream string, cfg jetstream.ConsumerConfig, log *slog.Logger, handle Handler) error {
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
		err = consumeUntilStopped(ctx, cons, log, handle)
		if ctx.Err() != nil {
			return nil
		}
		log.Warn("consumer stopped; creating it again", "consumer", cfg.Durable, "err", err)
	}
	return nil
}

func consumeUntilStopped(ctx context.Context, cons jetstream.Consumer, log *slog.Logger, handle Handler) error {
	it, err := cons.Messages(jetstream.PullMaxMessages(1))
	if err != nil {
		return fmt.Errorf("consume %s: %w", cons.CachedInfo().Name, err)
	}
	stop := context.AfterFunc(ctx, it.Stop)
	defer stop()
	defer it.Stop()
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
		handle(telemetry.Extract(ctx, msg.Headers()), msg)
	}
}

// unknownJobDeliveries is how often a message about a job that cannot be found is
// tried before it is dropped: a job always exists before anything about it is
// published, so "not found" is a store still recovering, until it persists.
const unknownJobDeliveries = 5

// DropUnknownJob settles a message about a job that was not found: it is tried
// again later, and dropped only after unknownJobDeliveries deliveries. It reports
// whether the message was dropped.
func DropUnknownJob(log *slog.Logger, msg jetstream.Msg, job string) bool {
	if md, err := msg.Metadata(); err == nil && md.NumDelivered < unknownJobDeliveries {
		_ = msg.NakWithDelay(time.Second)
		return false
	}
	log.Warn("drop message of unknown job", "job", job, "subject", msg.Subject())
	_ = msg.TermWithReason("unknown job")
	return true
}

// Ack acknowledges msg and waits for the server to confirm, logging a failure: a lost
// acknowledgement only means the message comes again, which every handler tolerates.
func Ack(ctx context.Context, log *slog.Logger, msg jetstream.Msg) {
	if err := msg.DoubleAck(ctx); err != nil {
		log.Warn("ack", "subject", msg.Subject(), "err", err)
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
// a get or a delete of a message already removed.
func NoMessage(err error) bool {
	return errors.Is(err, jetstream.ErrMsgNotFound) || err != nil && strings.Contains(err.Error(), "no message found")
}
