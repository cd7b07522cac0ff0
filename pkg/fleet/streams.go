package fleet

import (
	"context"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Ensure creates or updates every stream, bucket and object store of the fleet. It is
// idempotent: every service calls it at start, and whichever comes first creates them.
func Ensure(ctx context.Context, js jetstream.JetStream, s Settings) error {
	s, err := s.Normalize()
	if err != nil {
		return fmt.Errorf("fleet settings: %w", err)
	}
	streams := []jetstream.StreamConfig{
		{
			Name:        StreamSubmit,
			Description: "accepted scenes waiting for the dispatcher",
			Subjects:    []string{submitPrefix + ".>"},
			Retention:   jetstream.WorkQueuePolicy,
			Duplicates:  s.DuplicateWindow,
		},
		{
			Name:        StreamQueue,
			Description: "scenes waiting for the dispatcher to place them on a node",
			Subjects:    []string{queuePrefix + ".>"},
			Retention:   jetstream.LimitsPolicy,
			Duplicates:  s.DuplicateWindow,
		},
		{
			Name:        StreamWork,
			Description: "scenes placed on a node, waiting for its executor",
			Subjects:    []string{workPrefix + ".>"},
			Retention:   jetstream.WorkQueuePolicy,
			Duplicates:  s.DuplicateWindow,
		},
		{
			Name:        StreamEvents,
			Description: "public CloudEvents of scenes and jobs",
			Subjects:    []string{eventPrefix + ".>"},
			Retention:   jetstream.LimitsPolicy,
			MaxAge:      s.EventsMaxAge,
			Duplicates:  s.DuplicateWindow,
		},
		{
			Name:        StreamDone,
			Description: "finished jobs waiting for the notifier",
			Subjects:    []string{donePrefix + ".>"},
			Retention:   jetstream.WorkQueuePolicy,
			Duplicates:  s.DuplicateWindow,
		},
		{
			Name:        StreamDeadLetters,
			Description: "max-deliveries advisories of work messages",
			Subjects:    []string{deadLetterAdvisories},
			Retention:   jetstream.WorkQueuePolicy,
		},
	}
	for _, cfg := range streams {
		cfg.Storage = s.Storage
		cfg.Replicas = s.Replicas
		if _, err := js.CreateOrUpdateStream(ctx, cfg); err != nil {
			return fmt.Errorf("create stream %s: %w", cfg.Name, err)
		}
	}
	buckets := []jetstream.KeyValueConfig{
		{Bucket: BucketJobs, Description: "job state, changed by compare-and-set", History: 1},
		{Bucket: BucketNodes, Description: "observed node state", History: 1, TTL: s.NodeTTL},
		{Bucket: BucketRegistry, Description: "desired node configuration", History: 1},
		{Bucket: BucketDeadLetters, Description: "scenes that failed for good", History: 1},
		{Bucket: BucketAPIKeys, Description: "API keys by hash", History: 1},
		{Bucket: BucketTenants, Description: "tenants and their webhook secrets", History: 1},
		{Bucket: BucketWorkflows, Description: "workflow templates by name", History: 5},
	}
	for _, cfg := range buckets {
		cfg.Storage = s.Storage
		cfg.Replicas = s.Replicas
		if _, err := js.CreateOrUpdateKeyValue(ctx, cfg); err != nil {
			return fmt.Errorf("create bucket %s: %w", cfg.Bucket, err)
		}
	}
	stores := []jetstream.ObjectStoreConfig{
		{Bucket: ObjectOutputs, Description: "scene outputs"},
		{Bucket: ObjectInputs, Description: "input images of scenes"},
	}
	for _, cfg := range stores {
		cfg.Storage = s.Storage
		cfg.Replicas = s.Replicas
		if _, err := js.CreateOrUpdateObjectStore(ctx, cfg); err != nil {
			return fmt.Errorf("create object store %s: %w", cfg.Bucket, err)
		}
	}
	return nil
}

// NodeSlots is how many scenes a node holds at once: the one ComfyUI runs and one
// queued behind it, so that the GPU never waits for us between scenes.
const NodeSlots = 2

// WorkConsumer is the durable pull consumer of the executor driving node. It
// delivers at most NodeSlots scenes at a time; the dispatcher's placements wait in
// the stream behind them.
func WorkConsumer(node string, s Settings) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       WorkConsumerName(node),
		Description:   "the executor driving node " + node,
		FilterSubject: WorkSubject(node),
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       s.AckWait,
		MaxDeliver:    s.MaxAttempts,
		MaxAckPending: NodeSlots,
	}
}

// WorkConsumerName is the name of node's work consumer.
func WorkConsumerName(node string) string { return "node-" + node }

// The dispatcher's handlers take milliseconds; a short AckWait lets a restarted
// dispatcher resume at once the message its dead predecessor held.
const dispatcherAckWait = 5 * time.Second

// SubmitConsumer is the dispatcher's durable consumer of accepted scenes.
func SubmitConsumer() jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:   "dispatcher",
		AckPolicy: jetstream.AckExplicitPolicy,
		AckWait:   dispatcherAckWait,
	}
}

// StateConsumer is the dispatcher's durable consumer of scene events, which it folds
// into the jobs bucket.
func StateConsumer() jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       "dispatcher-state",
		FilterSubject: SceneEventsFilter,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       dispatcherAckWait,
		MaxAckPending: 1,
	}
}

// DeadLetterConsumer is the dispatcher's durable consumer of max-deliveries advisories.
func DeadLetterConsumer() jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:   "dispatcher-deadletters",
		AckPolicy: jetstream.AckExplicitPolicy,
		AckWait:   dispatcherAckWait,
	}
}

// DoneConsumer is the notifier's durable consumer of finished jobs. Webhook retries
// are naks with a delay, so MaxDeliver bounds how long a callback is retried. AckWait
// outlasts one webhook attempt (10s timeout).
func DoneConsumer(maxDeliver int) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:    "notifier",
		AckPolicy:  jetstream.AckExplicitPolicy,
		AckWait:    20 * time.Second,
		MaxDeliver: maxDeliver,
	}
}
