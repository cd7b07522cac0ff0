package fleet

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Ensure creates or updates every stream, bucket and object store of the fleet. It is
// idempotent: every service calls it at start, and whichever comes first creates them.
func Ensure(ctx context.Context, js jetstream.JetStream, s Settings) error {
	streams, buckets, stores, err := configs(s)
	if err != nil {
		return err
	}
	for _, cfg := range streams {
		if _, err := js.CreateOrUpdateStream(ctx, cfg); err != nil {
			return fmt.Errorf("create stream %s: %w", cfg.Name, err)
		}
	}
	for _, cfg := range buckets {
		if _, err := js.CreateOrUpdateKeyValue(ctx, cfg); err != nil {
			return fmt.Errorf("create bucket %s: %w", cfg.Bucket, err)
		}
	}
	for _, cfg := range stores {
		if _, err := js.CreateOrUpdateObjectStore(ctx, cfg); err != nil {
			return fmt.Errorf("create object store %s: %w", cfg.Bucket, err)
		}
	}
	return nil
}

// EnsureExists is Ensure for a service far from the JetStream servers (an executor
// in another region, behind a leaf node): when every stream, bucket and object
// store exists, it costs one round trip, where Ensure costs a few dozen. It creates
// them all, as Ensure does, if any is missing; it updates none (the services near
// the servers do).
func EnsureExists(ctx context.Context, js jetstream.JetStream, s Settings) error {
	streams, buckets, stores, err := configs(s)
	if err != nil {
		return err
	}
	have := map[string]bool{}
	names := js.StreamNames(ctx)
	for name := range names.Name() {
		have[name] = true
	}
	if err := names.Err(); err != nil {
		return fmt.Errorf("list streams: %w", err)
	}
	for _, cfg := range streams {
		if !have[cfg.Name] {
			return Ensure(ctx, js, s)
		}
	}
	for _, cfg := range buckets {
		if !have["KV_"+cfg.Bucket] {
			return Ensure(ctx, js, s)
		}
	}
	for _, cfg := range stores {
		if !have["OBJ_"+cfg.Bucket] {
			return Ensure(ctx, js, s)
		}
	}
	return nil
}

// configs are the fleet's streams, buckets and object stores under settings s.
func configs(s Settings) ([]jetstream.StreamConfig, []jetstream.KeyValueConfig, []jetstream.ObjectStoreConfig, error) {
	s, err := s.Normalize()
	if err != nil {
		return nil, nil, nil, fmt.Errorf("fleet settings: %w", err)
	}
	streams := []jetstream.StreamConfig{
		{
			Name:              StreamSubmit,
			Description:       "job commits (scheduled, and fired for the router when their intake did not queue the job) and scene retries",
			Subjects:          []string{submitPrefix + ".>"},
			Retention:         jetstream.WorkQueuePolicy,
			AllowMsgSchedules: true,
			Duplicates:        s.DuplicateWindow,
		},
		{
			Name:              StreamScenes,
			Description:       "scene payloads: rendered graphs, inputs, timeouts",
			Subjects:          []string{scenePrefix + ".>"},
			Retention:         jetstream.LimitsPolicy,
			MaxAge:            s.Retention,
			MaxMsgsPerSubject: 1,
			AllowDirect:       true,
			Duplicates:        s.DuplicateWindow,
		},
		{
			Name:              StreamQueue,
			Description:       "tickets of the scenes waiting to be placed on a node, and tombstones of those placed",
			Subjects:          []string{queuePrefix + ".>"},
			Retention:         jetstream.LimitsPolicy,
			MaxMsgsPerSubject: 1,
			AllowMsgTTL:       true,
			AllowDirect:       true,
			Duplicates:        s.DuplicateWindow,
		},
		{
			Name:        StreamWork,
			Description: "scenes placed on a node, waiting for its executor",
			Subjects:    []string{workPrefix + ".>"},
			Retention:   jetstream.WorkQueuePolicy,
			AllowDirect: true,
			Duplicates:  s.DuplicateWindow,
		},
		{
			Name:        StreamEvents,
			Description: "public CloudEvents of scenes and jobs",
			Subjects:    []string{eventPrefix + ".>"},
			Retention:   jetstream.LimitsPolicy,
			MaxAge:      s.Retention,
			AllowDirect: true,
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
		{
			Name:              StreamExpiry,
			Description:       "schedules of the jobs that expire before the retention, and the messages they fire when a job is due for deletion",
			Subjects:          []string{expiryPrefix + ".>"},
			Retention:         jetstream.WorkQueuePolicy,
			AllowMsgSchedules: true,
			MaxAge:            s.Retention,
			Duplicates:        s.DuplicateWindow,
		},
	}
	for i := range streams {
		streams[i].Storage, streams[i].Replicas = s.Storage, s.Replicas
	}
	buckets := []jetstream.KeyValueConfig{
		{Bucket: BucketJobs, Description: "jobs as submitted", History: 1, TTL: s.Retention},
		{Bucket: BucketJobState, Description: "job progress, changed by compare-and-set", History: 1, TTL: s.Retention},
		{Bucket: BucketNodes, Description: "observed node state", History: 1, TTL: s.NodeTTL},
		{Bucket: BucketRegistry, Description: "desired node configuration", History: 1},
		{Bucket: BucketInventory, Description: "what each node can run: node classes and model files", History: 1},
		{Bucket: BucketDeadLetters, Description: "scenes that failed for good", History: 1},
		{Bucket: BucketAPIKeys, Description: "API keys by hash", History: 1},
		{Bucket: BucketTenants, Description: "tenants and their webhook secrets", History: 1},
		{Bucket: BucketWorkflows, Description: "workflow templates by name", History: 5},
		{Bucket: BucketLeases, Description: "leases electing one instance of a service", History: 1, TTL: s.LeaseTTL},
		{Bucket: BucketComfyPrompts, Description: "prompts of the ComfyUI-compatible API and their jobs", History: 1, TTL: s.Retention},
	}
	for i := range buckets {
		buckets[i].Storage, buckets[i].Replicas = s.Storage, s.Replicas
	}
	stores := []jetstream.ObjectStoreConfig{
		{Bucket: ObjectOutputs, Description: "scene outputs", TTL: s.Retention},
		{Bucket: ObjectInputs, Description: "input images of scenes", TTL: s.Retention},
		{Bucket: ObjectNodeInfo, Description: "each node's /object_info, as its executor read it last"},
	}
	for i := range stores {
		stores[i].Storage, stores[i].Replicas = s.Storage, s.Replicas
	}
	return streams, buckets, stores, nil
}

// NodeSlots is how many scenes a node holds at once: the one ComfyUI runs and one
// queued behind it, so that the GPU never waits for us between scenes.
const NodeSlots = 2

// WorkConsumer is the durable pull consumer of the executor driving node. It
// delivers at most NodeSlots scenes at a time; the dispatcher's placements wait in
// the stream behind them.
//
// Its state is kept in memory (replicated in a cluster): the work stream is a work
// queue, so what a consumer lost with a restarted server would have held is what the
// stream still holds, delivered again to the consumer created anew. Kept on file, the
// state of 500 nodes' consumers cost the server half its CPU in small atomic file
// writes (bench backlog).
func WorkConsumer(node string, s Settings) jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       WorkConsumerName(node),
		Description:   "the executor driving node " + node,
		FilterSubject: WorkSubject(node),
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       s.AckWait,
		MaxDeliver:    s.MaxAttempts,
		MaxAckPending: NodeSlots,
		MemoryStorage: true,
	}
}

// EnsureWorkConsumer creates node's work consumer, or updates it to the present
// configuration. One kept on file by an earlier version is replaced: its storage
// cannot change, and what it held is still in the work stream.
func EnsureWorkConsumer(ctx context.Context, js jetstream.JetStream, node string, s Settings) (jetstream.Consumer, error) {
	cfg := WorkConsumer(node, s)
	cons, err := js.CreateOrUpdateConsumer(ctx, StreamWork, cfg)
	if err != nil && strings.Contains(err.Error(), "storage type can not be updated") {
		if err := js.DeleteConsumer(ctx, StreamWork, cfg.Durable); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
			return nil, fmt.Errorf("replace the work consumer of node %s: %w", node, err)
		}
		cons, err = js.CreateOrUpdateConsumer(ctx, StreamWork, cfg)
	}
	if err != nil {
		return nil, fmt.Errorf("work consumer of node %s: %w", node, err)
	}
	return cons, nil
}

// WorkConsumerName is the name of node's work consumer.
func WorkConsumerName(node string) string { return "node-" + node }

// The dispatcher's and notifier's handlers take milliseconds; a short AckWait lets a
// surviving instance resume at once the messages a dead one held.
const serviceAckWait = 5 * time.Second

// RouterConsumer is the durable consumer, shared by every dispatcher, of the submit
// stream: the router records and queues the committed jobs that their intake did not
// queue, and queues the retries of scenes.
func RouterConsumer() jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:        "router",
		FilterSubjects: routerFilters,
		AckPolicy:      jetstream.AckExplicitPolicy,
		AckWait:        serviceAckWait,
		MaxAckPending:  256,
	}
}

// TrackerConsumer is the durable consumer, shared by every notifier, of the scene
// events that change a job's state: starts and ends.
func TrackerConsumer() jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable: "tracker",
		FilterSubjects: []string{
			SceneEventFilter(EventStarted), SceneEventFilter(EventCompleted),
			SceneEventFilter(EventFailed), SceneEventFilter(EventCancelled),
		},
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       serviceAckWait,
		MaxAckPending: 1024,
	}
}

// JanitorConsumer is the notifier's durable consumer of the jobs due for deletion
// (ExpiryDueFilter). AckWait outlasts the deletion of a large job.
func JanitorConsumer() jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:       "janitor",
		FilterSubject: ExpiryDueFilter,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       time.Minute,
		MaxAckPending: 64,
	}
}

// QueueTombstoneTTL is how long the tombstone of a placed scene stays in the queue
// stream: long enough for every dispatcher following the stream to see it.
const QueueTombstoneTTL = 2 * time.Minute

// DeadLetterConsumer is the dispatcher's durable consumer of max-deliveries advisories.
func DeadLetterConsumer() jetstream.ConsumerConfig {
	return jetstream.ConsumerConfig{
		Durable:   "dispatcher-deadletters",
		AckPolicy: jetstream.AckExplicitPolicy,
		AckWait:   serviceAckWait,
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
