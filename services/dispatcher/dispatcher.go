// Package dispatcher is comfyfleet's scheduler. Its router turns committed jobs into
// queued scenes; its scheduler places queued scenes on nodes as capacity frees (by
// priority, fairly between tenants, on the node that finishes them first) and has
// its rescuer move the scenes of lost nodes back to the queue; it turns scenes that
// exhausted their deliveries into failures. Any number of dispatchers run at once:
// all route, all keep the scheduler's state warm, and the one holding a lease
// places and rescues.
package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

const source = "comfyfleet/dispatcher"

// Config configures the dispatcher.
type Config struct {
	// Conn is the NATS connection. Required.
	Conn *nats.Conn
	// Settings must match the other services'. Defaults to fleet.DefaultSettings.
	Settings fleet.Settings
	// Name identifies this dispatcher in logs, its lease and queue summaries.
	// Defaults to host-pid.
	Name string
	// Policy is the scheduling policy. Defaults to FastestFinish.
	Policy Policy
	// ModelLoadPenalty is the time FastestFinish assumes a node takes to load a
	// checkpoint other than the one it ran last, until it has measured the node doing
	// so. Defaults to 5s.
	ModelLoadPenalty time.Duration
	// RegionPenalty is the time FastestFinish adds to a scene on a node outside the
	// region the scene prefers: how much longer it is willing to wait for a node
	// there. Defaults to 10s.
	RegionPenalty time.Duration
	// RouterWorkers is how many commands of the submit stream the router handles at
	// once. Defaults to 16.
	RouterWorkers int
	// OnPlaced, if set, is called after each placement of a scene on a node (tests
	// and benchmarks).
	OnPlaced func(node string, t fleet.Ticket)
	// Logger defaults to slog.Default.
	Logger *slog.Logger
}

func (c *Config) fill() error {
	if c.Conn == nil {
		return errors.New("dispatcher: a NATS connection is required")
	}
	settings, err := c.Settings.Normalize()
	if err != nil {
		return fmt.Errorf("dispatcher: %w", err)
	}
	c.Settings = settings
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Name == "" {
		host, _ := os.Hostname()
		c.Name = fmt.Sprintf("%s-%d", host, os.Getpid())
	}
	if c.Policy, err = ParsePolicy(string(c.Policy)); err != nil {
		return fmt.Errorf("dispatcher: %w", err)
	}
	if c.ModelLoadPenalty == 0 {
		c.ModelLoadPenalty = 5 * time.Second
	}
	if c.RegionPenalty == 0 {
		c.RegionPenalty = 10 * time.Second
	}
	if c.RouterWorkers == 0 {
		c.RouterWorkers = 16
	}
	return nil
}

// Run runs the dispatcher until ctx is done, then stops consuming, releases its
// lease if it holds it, and returns.
func Run(ctx context.Context, cfg Config) error {
	if err := cfg.fill(); err != nil {
		return err
	}
	log := cfg.Logger.With("service", "dispatcher", "dispatcher", cfg.Name)
	js, err := jetstream.New(cfg.Conn, jetstream.WithPublishAsyncMaxPending(placerWindow), fleet.PublishAckTimeout)
	if err != nil {
		return fmt.Errorf("dispatcher: jetstream: %w", err)
	}
	var jobs *fleet.Jobs
	var ls *lease
	if err := fleet.Retry(ctx, log, "dispatcher start", func(ctx context.Context) error {
		if err := fleet.Ensure(ctx, js, cfg.Settings); err != nil {
			return err
		}
		if jobs, err = fleet.OpenJobs(ctx, js); err != nil {
			return err
		}
		ls, err = openLease(ctx, js, cfg.Name, cfg.Settings.LeaseTTL, log)
		return err
	}); err != nil {
		return fleet.IgnoreStop(ctx, fmt.Errorf("dispatcher: %w", err))
	}
	m, err := newMetrics(cfg.Name)
	if err != nil {
		return err
	}
	pub := fleet.NewPublisher(js, source)
	rt := &router{jobs: jobs, pub: pub, log: log, payloadWait: cfg.Settings.DuplicateWindow}
	dl := &deadLetters{log: log, js: js, pub: pub, metrics: m}
	sched := newScheduler(cfg.Name, log, cfg.Conn, js, cfg.Settings, planner{policy: cfg.Policy, loadPenalty: cfg.ModelLoadPenalty, regionPenalty: cfg.RegionPenalty}, m)
	sched.onPlaced = cfg.OnPlaced

	summaries, err := cfg.Conn.QueueSubscribe(fleet.QueuesSubject, "dispatchers", func(msg *nats.Msg) {
		if b, err := json.Marshal(m.snapshot()); err == nil {
			_ = msg.Respond(b)
		}
	})
	if err != nil {
		return fmt.Errorf("dispatcher: answer queue summaries: %w", err)
	}
	defer summaries.Unsubscribe()

	var wg sync.WaitGroup
	errs := make(chan error, 3)
	wg.Go(func() {
		errs <- fleet.Consume(ctx, js, fleet.StreamSubmit, fleet.RouterConsumer(), log, rt.route, fleet.Service("dispatcher"), fleet.Workers(cfg.RouterWorkers))
	})
	wg.Go(func() {
		errs <- fleet.Consume(ctx, js, fleet.StreamDeadLetters, fleet.DeadLetterConsumer(), log, dl.handle, fleet.Service("dispatcher"))
	})
	wg.Go(func() { ls.run(ctx, sched.setLeading) })
	wg.Go(func() { errs <- schedule(ctx, sched, log) })
	log.Info("dispatcher running", "policy", cfg.Policy)
	wg.Wait()
	close(errs)
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	log.Info("dispatcher stopped")
	return errors.Join(all...)
}

// schedule runs the scheduler until ctx is done, starting it again if it fails.
func schedule(ctx context.Context, s *scheduler, log *slog.Logger) error {
	for ctx.Err() == nil {
		err := s.run(ctx)
		if ctx.Err() != nil {
			return nil
		}
		log.Warn("scheduler stopped; starting it again", "err", err)
		fleet.Pause(ctx, time.Second)
	}
	return nil
}
