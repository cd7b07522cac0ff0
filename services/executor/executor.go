// Package executor drives ComfyUI nodes: for each node it pulls scenes from the work
// subjects of the node's pools, runs them with the ComfyUI client while keeping the
// work message alive, stores the outputs, and publishes the scene's events. It also
// reports each node's state as heartbeats.
package executor

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"os"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel"

	"github.com/comfyfleet/comfyfleet/pkg/callback"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/outputs"
)

var tracer = otel.Tracer("comfyfleet/executor")

// Config configures an executor.
type Config struct {
	// Conn is the NATS connection. Required.
	Conn *nats.Conn
	// Settings must match the other services'. Defaults to fleet.DefaultSettings.
	Settings fleet.Settings
	// Nodes are the ComfyUI servers this executor drives; it registers them at start.
	// At least one is required, unless Adopt is set.
	Nodes []fleet.NodeConfig
	// Adopt makes the executor also drive the nodes registered through the API
	// (PUT /v1/nodes/{id}) that no executor drives yet, from the moment they are
	// registered.
	Adopt bool
	// Name identifies this executor in node state and logs. Defaults to host-pid.
	Name string
	// Region is where this executor and its nodes are, e.g. shenzhen: the region of
	// each node of Nodes that names none, and of each node it adopts without one.
	// Empty for a fleet in one place.
	Region string
	// HeartbeatInterval is how often each node is probed and its state reported.
	// Defaults to 1s.
	HeartbeatInterval time.Duration
	// ProgressInterval is the least time between two progress events of a scene.
	// Defaults to 250ms.
	ProgressInterval time.Duration
	// HTTPClient talks to ComfyUI and downloads input images given by URL. Defaults
	// to an instrumented client without a timeout (prompts run for minutes; each call
	// carries its own context).
	HTTPClient *http.Client
	// URLGuard decides which addresses input images given by URL may be downloaded
	// from, checked at connect time for every connection and redirect. Defaults to
	// a guard that refuses loopback, private, link-local and metadata addresses.
	URLGuard *callback.Guard
	// InputTimeout bounds the download of one input image, from its URL or from
	// the fleet's store. Defaults to 1m.
	InputTimeout time.Duration
	// InventoryInterval is how often each node's inventory (/object_info: node
	// classes, model files) is read again; it is also read whenever the node comes
	// up, and on request (POST /v1/nodes/{id}/refresh). Defaults to 5m.
	InventoryInterval time.Duration
	// Outputs is where scene outputs are stored. Defaults to the fleet's JetStream
	// object store (fleet_outputs).
	Outputs outputs.Store
	// Logger defaults to slog.Default.
	Logger *slog.Logger
}

func (c *Config) fill() error {
	if c.Conn == nil {
		return errors.New("executor: a NATS connection is required")
	}
	if len(c.Nodes) == 0 && !c.Adopt {
		return errors.New("executor: no ComfyUI node to drive; name one with --comfy URL, or adopt those registered through the API")
	}
	if c.Region != "" && !fleet.ValidToken(c.Region) {
		return fmt.Errorf("executor: region %q: use letters, digits, '-' and '_'", c.Region)
	}
	// Filled in with the region below, so the caller's slice stays as it was.
	c.Nodes = slices.Clone(c.Nodes)
	seen := map[string]bool{}
	for i, n := range c.Nodes {
		if n.Region == "" {
			c.Nodes[i].Region = c.Region
		} else if !fleet.ValidToken(n.Region) {
			return fmt.Errorf("executor: node %s: region %q: use letters, digits, '-' and '_'", n.ID, n.Region)
		}
		if !fleet.ValidToken(n.ID) {
			return fmt.Errorf("executor: node %d: id %q: use letters, digits, '-' and '_'", i, n.ID)
		}
		if seen[n.ID] {
			return fmt.Errorf("executor: node id %q given twice", n.ID)
		}
		seen[n.ID] = true
		if len(n.Pools) == 0 {
			return fmt.Errorf("executor: node %s serves no pool", n.ID)
		}
		for _, p := range n.Pools {
			if !fleet.ValidToken(p) {
				return fmt.Errorf("executor: node %s: pool %q: use letters, digits, '-' and '_'", n.ID, p)
			}
		}
	}
	s, err := c.Settings.Normalize()
	if err != nil {
		return fmt.Errorf("executor: %w", err)
	}
	c.Settings = s
	if c.Name == "" {
		host, _ := os.Hostname()
		c.Name = fmt.Sprintf("%s-%d", host, os.Getpid())
	}
	if c.HeartbeatInterval == 0 {
		c.HeartbeatInterval = time.Second
	}
	if c.ProgressInterval == 0 {
		c.ProgressInterval = 250 * time.Millisecond
	}
	if c.InputTimeout == 0 {
		c.InputTimeout = time.Minute
	}
	if c.InventoryInterval == 0 {
		c.InventoryInterval = 5 * time.Minute
	}
	if c.URLGuard == nil {
		c.URLGuard = callback.NewGuard()
	}
	if c.HTTPClient == nil {
		c.HTTPClient = &http.Client{Transport: otelhttp.NewTransport(http.DefaultTransport.(*http.Transport).Clone())}
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

type executor struct {
	// downloads fetches input images given by URL, through the URL guard.
	downloads *http.Client
	cfg       Config
	log       *slog.Logger
	nc        *nats.Conn
	jobs      *fleet.Jobs
	outputs   outputs.Store
	inputs    jetstream.ObjectStore
	// inventories and objectInfo keep what the executor reads of its nodes.
	inventories jetstream.KeyValue
	objectInfo  jetstream.ObjectStore
	pub         *fleet.Publisher
	js          jetstream.JetStream
	registry    *fleet.Registry
	nodes       jetstream.KeyValue
	events      jetstream.Stream
	payloads    jetstream.Stream
	live        liveNodes
	cancels     cancelledJobs
	metrics     metrics
}

// Run drives the nodes until ctx is done. Then it stops pulling, hands running scenes
// back for redelivery at once (interrupting them on their nodes), and returns.
func Run(ctx context.Context, cfg Config) error {
	return fleet.IgnoreStop(ctx, run(ctx, cfg))
}

func run(ctx context.Context, cfg Config) error {
	if err := cfg.fill(); err != nil {
		return err
	}
	js, err := jetstream.New(cfg.Conn, fleet.PublishAckTimeout)
	if err != nil {
		return fmt.Errorf("executor: jetstream: %w", err)
	}
	e := &executor{
		cfg: cfg,
		log: cfg.Logger.With("service", "executor", "executor", cfg.Name),
		nc:  cfg.Conn,
		pub: fleet.NewPublisher(js, "comfyfleet/executor/"+cfg.Name),
		js:  js,
	}
	if e.metrics, err = newMetrics(); err != nil {
		return err
	}
	e.downloads = cfg.URLGuard.Client(0, func(rt http.RoundTripper) http.RoundTripper { return otelhttp.NewTransport(rt) })
	if err := fleet.Retry(ctx, e.log, "executor start", func(ctx context.Context) error { return e.open(ctx, js) }); err != nil {
		return fmt.Errorf("executor: %w", err)
	}
	stopCancels, err := e.followCancels(ctx)
	if err != nil {
		return err
	}
	defer stopCancels()
	// Dispatchers ask whether this executor lives: the subscription is the answer.
	// Once its connection is gone their requests meet no responders, and its scenes
	// move on at once; while it lives they time out. (No reply: across a region's
	// leaf node, an executor may not publish to a dispatcher's inbox.)
	alive, err := e.nc.Subscribe(fleet.ExecutorAliveSubject(cfg.Name), func(*nats.Msg) {})
	if err != nil {
		return fmt.Errorf("executor: answer liveness requests: %w", err)
	}
	defer alive.Unsubscribe()
	var wg sync.WaitGroup
	wg.Go(func() { e.drive(ctx) })
	e.log.Info("executor running", "nodes", len(cfg.Nodes), "adopt", cfg.Adopt)
	wg.Wait()
	e.log.Info("executor stopped")
	return nil
}

// open creates the fleet's streams and buckets if need be, binds to those the
// executor uses, registers its nodes and creates the work consumers of their pools.
func (e *executor) open(ctx context.Context, js jetstream.JetStream) error {
	var err error
	if err = fleet.EnsureExists(ctx, js, e.cfg.Settings); err != nil {
		return err
	}
	if e.jobs, err = fleet.OpenJobs(ctx, js); err != nil {
		return err
	}
	if e.outputs = e.cfg.Outputs; e.outputs == nil {
		if e.outputs, err = outputs.Open(ctx, "", js); err != nil {
			return err
		}
	}
	if e.inventories, err = js.KeyValue(ctx, fleet.BucketInventory); err != nil {
		return fmt.Errorf("open inventory bucket: %w", err)
	}
	if e.objectInfo, err = js.ObjectStore(ctx, fleet.ObjectNodeInfo); err != nil {
		return fmt.Errorf("open object store %s: %w", fleet.ObjectNodeInfo, err)
	}
	if e.events, err = js.Stream(ctx, fleet.StreamEvents); err != nil {
		return fmt.Errorf("open events: %w", err)
	}
	if e.payloads, err = js.Stream(ctx, fleet.StreamScenes); err != nil {
		return fmt.Errorf("open scene payloads: %w", err)
	}
	if e.nodes, err = js.KeyValue(ctx, fleet.BucketNodes); err != nil {
		return fmt.Errorf("open nodes bucket: %w", err)
	}
	if err := e.openInputs(ctx, js); err != nil {
		return err
	}
	if e.registry, err = fleet.OpenRegistry(ctx, js); err != nil {
		return err
	}
	for _, nc := range e.cfg.Nodes {
		nc.Executor = e.cfg.Name
		if _, _, err := e.registry.Change(ctx, nc.ID, func(cur *fleet.NodeConfig) (*fleet.NodeConfig, error) {
			// A drain set through the API outlives the executor's restarts.
			if cur != nil {
				nc.Drained = cur.Drained
			}
			return &nc, nil
		}); err != nil {
			return fmt.Errorf("register node %s: %w", nc.ID, err)
		}
	}
	return nil
}

// recreateIfGone returns n's work consumer created anew if cons is gone (a NATS
// server restarted without it: its state is kept in memory), else cons.
func (e *executor) recreateIfGone(ctx context.Context, n *node, cons jetstream.Consumer) jetstream.Consumer {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if _, err := cons.Info(ctx); !errors.Is(err, jetstream.ErrConsumerNotFound) {
		return cons
	}
	fresh, err := fleet.EnsureWorkConsumer(ctx, e.js, n.cfg.ID, e.cfg.Settings)
	if err != nil {
		e.log.Warn("create the work consumer again", "node", n.cfg.ID, "err", err)
		return cons
	}
	e.log.Info("work consumer created again", "node", n.cfg.ID)
	return fresh
}

// fetchWait is how long one pull for a node's next scene waits on the server; its
// heartbeats every second reveal a pull lost with a NATS server sooner.
const fetchWait = 5 * time.Second

// serve pulls scenes for n and runs them while n is healthy: up to NodeSlots at
// once, so that ComfyUI holds the next prompt queued behind the running one.
func (e *executor) serve(ctx context.Context, n *node, cons jetstream.Consumer) {
	proc := fleet.NewProcessor("executor", fleet.WorkConsumerName(n.cfg.ID), e.log, e.handler(n))
	slots := make(chan struct{}, fleet.NodeSlots)
	var wg sync.WaitGroup
	defer wg.Wait()
	// Nothing is pulled before the node's inventory has been read once: the
	// dispatchers place scenes by it.
	select {
	case <-n.inv.first:
	case <-ctx.Done():
		return
	}
	for ctx.Err() == nil {
		if !n.waitHealthy(ctx) || n.isRetired() {
			return
		}
		select {
		case slots <- struct{}{}:
		case <-ctx.Done():
			return
		}
		msg, err := e.next(ctx, n, cons)
		if err != nil || msg == nil {
			<-slots
			if err != nil {
				e.log.Warn("fetch work", "node", n.cfg.ID, "err", err)
				cons = e.recreateIfGone(ctx, n, cons)
				fleet.Pause(ctx, time.Second)
			}
			continue
		}
		wg.Go(func() {
			defer func() { <-slots }()
			proc.Process(ctx, msg)
		})
	}
}

// next waits for n's next scene, at most fetchWait, and less when n goes down.
func (e *executor) next(ctx context.Context, n *node, cons jetstream.Consumer) (jetstream.Msg, error) {
	var wg sync.WaitGroup
	defer wg.Wait()
	fctx, cancel := context.WithTimeout(ctx, fetchWait)
	defer cancel()
	lost := n.lost()
	wg.Go(func() {
		select {
		case <-lost:
			cancel()
		case <-fctx.Done():
		}
	})
	batch, err := cons.Fetch(1, jetstream.FetchContext(fctx), jetstream.FetchHeartbeat(time.Second))
	if err != nil {
		if fctx.Err() != nil {
			return nil, nil
		}
		return nil, err
	}
	for msg := range batch.Messages() {
		return msg, nil
	}
	if err := batch.Error(); err != nil && fctx.Err() == nil && !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, context.Canceled) {
		return nil, err
	}
	return nil, nil
}
