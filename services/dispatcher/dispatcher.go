// Package dispatcher is comfyfleet's scheduler: it queues accepted scenes, places
// them on nodes as capacity frees (by priority, fairly between tenants, on the node
// that finishes them first), folds scene events into job state, turns scenes that
// exhausted their deliveries into dead letters, and keeps the observed node state
// from executor heartbeats.
package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/telemetry"
)

const source = "comfyfleet/dispatcher"

var tracer = otel.Tracer("comfyfleet/dispatcher")

// Config configures the dispatcher.
type Config struct {
	// Conn is the NATS connection. Required.
	Conn *nats.Conn
	// Settings must match the other services'. Defaults to fleet.DefaultSettings.
	Settings fleet.Settings
	// Policy is the scheduling policy. Defaults to FastestFinish.
	Policy Policy
	// ModelLoadPenalty is the time FastestFinish assumes a node takes to load a
	// checkpoint other than the one it ran last, until it has measured the node doing
	// so. Defaults to 5s.
	ModelLoadPenalty time.Duration
	// OnPlaced, if set, is called after each placement of a scene on a node (tests
	// and benchmarks).
	OnPlaced func(node string, item fleet.WorkItem)
	// Logger defaults to slog.Default.
	Logger *slog.Logger
}

type dispatcher struct {
	cfg   Config
	log   *slog.Logger
	js    jetstream.JetStream
	jobs  *fleet.Jobs
	nodes jetstream.KeyValue
	dead  jetstream.KeyValue
	work  jetstream.Stream
	pub   *fleet.Publisher
	sched *scheduler
	// deadLetters counts scenes failed because every delivery went unacknowledged.
	deadLetters metric.Int64Counter
}

// Run runs the dispatcher until ctx is done, then stops consuming and returns.
func Run(ctx context.Context, cfg Config) error {
	return fleet.IgnoreStop(ctx, run(ctx, cfg))
}

func run(ctx context.Context, cfg Config) error {
	if cfg.Conn == nil {
		return errors.New("dispatcher: a NATS connection is required")
	}
	settings, err := cfg.Settings.Normalize()
	if err != nil {
		return fmt.Errorf("dispatcher: %w", err)
	}
	cfg.Settings = settings
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Policy, err = ParsePolicy(string(cfg.Policy)); err != nil {
		return fmt.Errorf("dispatcher: %w", err)
	}
	if cfg.ModelLoadPenalty == 0 {
		cfg.ModelLoadPenalty = 5 * time.Second
	}
	d := &dispatcher{cfg: cfg, log: cfg.Logger.With("service", "dispatcher")}
	if d.js, err = jetstream.New(cfg.Conn); err != nil {
		return fmt.Errorf("dispatcher: jetstream: %w", err)
	}
	if err := fleet.Retry(ctx, d.log, "dispatcher start", d.open); err != nil {
		return fmt.Errorf("dispatcher: %w", err)
	}
	d.pub = fleet.NewPublisher(d.js, source)
	d.sched = newScheduler(d.log, cfg.Conn, d.js, d.pub, cfg.Settings, cfg.Policy, cfg.ModelLoadPenalty)
	d.sched.onPlaced = cfg.OnPlaced
	if d.deadLetters, err = otel.Meter("comfyfleet/dispatcher").Int64Counter("comfyfleet.scene.dead_letters",
		metric.WithDescription("Scenes failed because every delivery went unacknowledged.")); err != nil {
		return fmt.Errorf("dispatcher metrics: %w", err)
	}

	consumers := []struct {
		stream string
		cfg    jetstream.ConsumerConfig
		handle fleet.Handler
	}{
		{fleet.StreamSubmit, fleet.SubmitConsumer(), d.route},
		{fleet.StreamEvents, fleet.StateConsumer(), d.applyEvent},
		{fleet.StreamDeadLetters, fleet.DeadLetterConsumer(), d.deadLetter},
	}
	hb, err := cfg.Conn.Subscribe(fleet.HeartbeatFilter, func(m *nats.Msg) { d.heartbeat(ctx, m) })
	if err != nil {
		return fmt.Errorf("dispatcher: subscribe heartbeats: %w", err)
	}
	defer hb.Unsubscribe()

	var wg sync.WaitGroup
	errs := make(chan error, len(consumers)+1)
	for _, c := range consumers {
		wg.Go(func() { errs <- fleet.Consume(ctx, d.js, c.stream, c.cfg, d.log, c.handle) })
	}
	wg.Go(func() { errs <- d.schedule(ctx) })
	d.log.Info("dispatcher running", "policy", cfg.Policy)
	wg.Wait()
	close(errs)
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	d.log.Info("dispatcher stopped")
	return errors.Join(all...)
}

// open creates the fleet's streams and buckets if need be and binds to those the
// dispatcher uses.
func (d *dispatcher) open(ctx context.Context) error {
	var err error
	if err = fleet.Ensure(ctx, d.js, d.cfg.Settings); err != nil {
		return err
	}
	if d.jobs, err = fleet.OpenJobs(ctx, d.js); err != nil {
		return err
	}
	if d.nodes, err = d.js.KeyValue(ctx, fleet.BucketNodes); err != nil {
		return fmt.Errorf("open nodes bucket: %w", err)
	}
	if d.dead, err = d.js.KeyValue(ctx, fleet.BucketDeadLetters); err != nil {
		return fmt.Errorf("open dead letters bucket: %w", err)
	}
	if d.work, err = d.js.Stream(ctx, fleet.StreamWork); err != nil {
		return fmt.Errorf("open work stream: %w", err)
	}
	return nil
}

// schedule runs the scheduler until ctx is done, starting it again if it fails.
func (d *dispatcher) schedule(ctx context.Context) error {
	for ctx.Err() == nil {
		err := d.sched.run(ctx)
		if ctx.Err() != nil {
			return nil
		}
		d.log.Warn("scheduler stopped; starting it again", "err", err)
		fleet.Pause(ctx, time.Second)
	}
	return nil
}

// route queues an accepted scene in its pool's queue.
func (d *dispatcher) route(ctx context.Context, msg jetstream.Msg) {
	var item fleet.WorkItem
	if err := json.Unmarshal(msg.Data(), &item); err != nil {
		d.log.Error("drop undecodable submit message", "subject", msg.Subject(), "err", err)
		_ = msg.TermWithReason("undecodable")
		return
	}
	ctx, span := tracer.Start(ctx, "dispatch scene", trace.WithAttributes(telemetry.SceneAttrs(item.JobID, item.Index)...),
		trace.WithAttributes(attribute.String("comfyfleet.pool", item.Pool)))
	defer span.End()
	// Queued first: once the scene is placed, an executor may start it at once, and
	// the events stream must show queued before started.
	err := d.pub.SceneEvent(ctx, fleet.SceneEvent{JobID: item.JobID, Index: item.Index, Retry: item.Retry, Type: fleet.EventQueued, Pool: item.Pool})
	if err == nil {
		err = d.pub.JSON(ctx, fleet.QueueSubject(item.Pool), item.PlacementID(), item)
	}
	if err != nil {
		d.fail(span, msg, fmt.Errorf("route scene %s: %w", item.MsgID(), err))
		return
	}
	fleet.Ack(ctx, d.log, msg)
}

// applyEvent folds a scene event into its job and announces a job that is done.
func (d *dispatcher) applyEvent(ctx context.Context, msg jetstream.Msg) {
	ev, err := fleet.DecodeSceneEvent(msg.Data())
	if err != nil {
		d.log.Error("drop undecodable scene event", "subject", msg.Subject(), "err", err)
		_ = msg.TermWithReason("undecodable")
		return
	}
	if ev.Type == fleet.EventProgress || ev.Type == fleet.EventQueued {
		d.applyQuiet(ctx, msg, ev)
		return
	}
	ctx, span := tracer.Start(ctx, "apply scene "+string(ev.Type), trace.WithAttributes(telemetry.SceneAttrs(ev.JobID, ev.Index)...))
	defer span.End()
	job, err := d.update(ctx, ev)
	if errors.Is(err, fleet.ErrJobNotFound) {
		fleet.DropUnknownJob(d.log, msg, ev.JobID)
		return
	}
	if err == nil && ev.Type == fleet.EventFailed && job.Scenes[ev.Index].Status == fleet.StatusFailed {
		err = d.recordDeadLetter(ctx, job, ev.Index)
	}
	if err == nil && job.Status.Terminal() {
		done := fleet.DoneMsg{JobID: job.ID, Round: job.Round}
		err = d.pub.JSON(ctx, fleet.DoneSubject(job.ID), done.MsgID(), done)
	}
	if err != nil {
		d.fail(span, msg, fmt.Errorf("apply %s event of scene %s: %w", ev.Type, fleet.SceneKey(ev.JobID, ev.Index), err))
		return
	}
	fleet.Ack(ctx, d.log, msg)
}

// applyQuiet folds frequent events without a span of their own.
func (d *dispatcher) applyQuiet(ctx context.Context, msg jetstream.Msg, ev fleet.SceneEvent) {
	if _, err := d.update(ctx, ev); err != nil && !errors.Is(err, fleet.ErrJobNotFound) {
		d.log.Warn("apply event", "type", ev.Type, "scene", fleet.SceneKey(ev.JobID, ev.Index), "err", err)
		_ = msg.NakWithDelay(time.Second)
		return
	}
	fleet.Ack(ctx, d.log, msg)
}

func (d *dispatcher) update(ctx context.Context, ev fleet.SceneEvent) (*fleet.Job, error) {
	return d.jobs.Update(ctx, ev.JobID, func(j *fleet.Job) error {
		if !j.Apply(ev) {
			return fleet.ErrNoChange
		}
		return nil
	})
}

// recordDeadLetter keeps a failed scene where GET /v1/deadletters finds it. It runs
// again for a redelivered event, so the record survives a crash after the update.
func (d *dispatcher) recordDeadLetter(ctx context.Context, job *fleet.Job, index int) error {
	s := job.Scenes[index]
	dl := fleet.DeadLetter{
		JobID: job.ID, Index: index, Tenant: job.Tenant, Workflow: s.Spec.Workflow, Pool: s.Pool,
		Error: s.Error, Attempts: s.Attempts, Failures: s.Failures, FailedAt: job.UpdatedAt,
	}
	b, err := json.Marshal(dl)
	if err != nil {
		return fmt.Errorf("encode dead letter: %w", err)
	}
	if _, err := d.dead.Put(ctx, fleet.DeadLetterKey(job.ID, index), b); err != nil {
		return fmt.Errorf("record dead letter: %w", err)
	}
	return nil
}

// maxDeliveriesAdvisory is the part of the server's max-deliveries advisory we use.
type maxDeliveriesAdvisory struct {
	Stream     string `json:"stream"`
	Consumer   string `json:"consumer"`
	StreamSeq  uint64 `json:"stream_seq"`
	Deliveries int    `json:"deliveries"`
}

// deadLetter fails a scene whose work message was delivered MaxAttempts times
// without an acknowledgement: every executor that took it died or hung.
func (d *dispatcher) deadLetter(ctx context.Context, msg jetstream.Msg) {
	var adv maxDeliveriesAdvisory
	if err := json.Unmarshal(msg.Data(), &adv); err != nil || adv.Stream != fleet.StreamWork {
		_ = msg.TermWithReason("not a work advisory")
		return
	}
	raw, err := d.work.GetMsg(ctx, adv.StreamSeq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		fleet.Ack(ctx, d.log, msg)
		return
	}
	if err != nil {
		d.log.Warn("read dead work message", "seq", adv.StreamSeq, "err", err)
		_ = msg.NakWithDelay(time.Second)
		return
	}
	var item fleet.WorkItem
	if err := json.Unmarshal(raw.Data, &item); err != nil {
		_ = d.work.DeleteMsg(ctx, adv.StreamSeq)
		_ = msg.TermWithReason("undecodable work message")
		return
	}
	ctx, span := tracer.Start(ctx, "dead letter", trace.WithAttributes(telemetry.SceneAttrs(item.JobID, item.Index)...))
	defer span.End()
	err = d.pub.SceneEvent(ctx, fleet.SceneEvent{
		JobID:   item.JobID,
		Index:   item.Index,
		Retry:   item.Retry,
		Type:    fleet.EventFailed,
		Attempt: item.Attempt(adv.Deliveries),
		Error:   fmt.Sprintf("given up after %d deliveries that were never acknowledged: every node that took the scene was lost", adv.Deliveries),
	})
	if err == nil {
		err = d.work.DeleteMsg(ctx, adv.StreamSeq)
		if fleet.NoMessage(err) {
			err = nil
		}
	}
	if err != nil {
		d.fail(span, msg, fmt.Errorf("dead letter %s: %w", item.MsgID(), err))
		return
	}
	d.log.Warn("scene dead-lettered", "scene", item.MsgID(), "deliveries", adv.Deliveries)
	d.deadLetters.Add(ctx, 1)
	fleet.Ack(ctx, d.log, msg)
}

// heartbeat records a node's observed state; the bucket's TTL forgets nodes whose
// heartbeats stop.
func (d *dispatcher) heartbeat(ctx context.Context, m *nats.Msg) {
	var st fleet.NodeStatus
	if err := json.Unmarshal(m.Data, &st); err != nil || !fleet.ValidToken(st.ID) {
		d.log.Warn("drop malformed heartbeat", "subject", m.Subject)
		return
	}
	d.sched.heartbeat(st)
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := d.nodes.Put(ctx, st.ID, m.Data); err != nil && ctx.Err() == nil {
		d.log.Warn("record heartbeat", "node", st.ID, "err", err)
	}
}

func (d *dispatcher) fail(span trace.Span, msg jetstream.Msg, err error) {
	span.RecordError(err)
	span.SetStatus(codes.Error, err.Error())
	d.log.Warn("retry message", "subject", msg.Subject(), "err", err)
	_ = msg.NakWithDelay(time.Second)
}
