// Package intake is comfyfleet's HTTP API: it validates jobs, records them, hands
// their scenes to the dispatcher, and serves job state, outputs and nodes.
package intake

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/danielgtaylor/huma/v2"
	"github.com/danielgtaylor/huma/v2/adapters/humago"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/metric"

	"github.com/comfyfleet/comfyfleet/pkg/callback"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/outputs"
	"github.com/comfyfleet/comfyfleet/pkg/telemetry"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
	"github.com/comfyfleet/comfyfleet/pkg/workflow"
	"github.com/comfyfleet/comfyfleet/services/intake/panel"
)

var tracer = otel.Tracer("comfyfleet/intake")

// Version is the API version shown in the OpenAPI document.
const Version = "0.1.0"

// Config configures the intake.
type Config struct {
	// Conn is the NATS connection. Required.
	Conn *nats.Conn
	// QueueConn, if set, is a second connection to the same NATS, on which the
	// queuer sends the scenes' queued events and tickets, so that a request's own
	// messages (payloads, commit, record) do not wait behind them in one connection
	// and the server's one reader of it. Nil: Conn. The caller closes it after Run.
	QueueConn *nats.Conn
	// Settings must match the other services'. Defaults to fleet.DefaultSettings.
	Settings fleet.Settings
	// Templates holds workflow templates (*.json) to store in the fleet_workflows
	// bucket at start, each only if the bucket lacks its name: an administrator's
	// version is never replaced. The intake serves the bucket's templates, whatever
	// stored them. Nil stores none.
	Templates fs.FS
	// Listener is where the API is served. Required.
	Listener net.Listener
	// PublicURL is the base URL clients reach the API at, used in Location headers and
	// download links. Defaults to "http://" + the listener's address.
	PublicURL string
	// MaxScenes caps the scenes of one job. Defaults to 1000.
	MaxScenes int
	// Open serves without API keys, every caller acting as the admin of the default
	// tenant: for a single user on loopback only. Defaults to false: every API call
	// needs a key (comfyfleet apikey create).
	Open bool
	// CallbackGuard decides which callback URLs and input-image URLs are accepted.
	// Defaults to a guard that refuses loopback, private, link-local and metadata
	// addresses.
	CallbackGuard *callback.Guard
	// SubmitRate bounds each API key's submissions and other changes (every call but
	// GET and HEAD). Defaults to DefaultSubmitRate: 20 a second, bursts of 40.
	SubmitRate RateLimit
	// ReadRate bounds each API key's reads (GET and HEAD: jobs, events, outputs,
	// nodes, workflows). Defaults to DefaultReadRate: 200 a second, bursts of 400.
	ReadRate RateLimit
	// MaxInputBytes caps the size of one input image sent in base64. Defaults to
	// fleet.MaxInputBytes (20 MiB).
	MaxInputBytes int
	// MinJobTTL is the shortest ttl_s a job may ask for. Defaults to 1 minute;
	// tests lower it.
	MinJobTTL time.Duration
	// ShutdownTimeout bounds how long running requests may finish after ctx ends.
	// Defaults to 10s.
	ShutdownTimeout time.Duration
	// Outputs is where the executors store scene outputs. Defaults to the fleet's
	// JetStream object store (fleet_outputs).
	Outputs outputs.Store
	// OutputURLTTL is how long the presigned URLs of outputs stay valid, when
	// Outputs gives them (an S3-compatible store). Defaults to 1h.
	OutputURLTTL time.Duration
	// AfterCommit, if set, is called once a job is committed and before this intake
	// records it; an error it returns fails the request there, as if the intake had
	// died at that point (tests).
	AfterCommit func(job string) error
	// Logger defaults to slog.Default.
	Logger *slog.Logger
}

func (c *Config) fill() error {
	if c.Conn == nil || c.Listener == nil {
		return errors.New("intake: a NATS connection and a listener are required")
	}
	s, err := c.Settings.Normalize()
	if err != nil {
		return fmt.Errorf("intake: %w", err)
	}
	c.Settings = s
	if c.PublicURL == "" {
		c.PublicURL = "http://" + c.Listener.Addr().String()
	}
	if c.MaxScenes == 0 {
		c.MaxScenes = 1000
	}
	if c.CallbackGuard == nil {
		c.CallbackGuard = callback.NewGuard()
	}
	c.SubmitRate = c.SubmitRate.orDefault(DefaultSubmitRate)
	c.ReadRate = c.ReadRate.orDefault(DefaultReadRate)
	if c.MaxInputBytes == 0 {
		c.MaxInputBytes = fleet.MaxInputBytes
	}
	if c.MinJobTTL == 0 {
		c.MinJobTTL = time.Minute
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = 10 * time.Second
	}
	if c.OutputURLTTL == 0 {
		c.OutputURLTTL = time.Hour
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

// publishWindow bounds the asynchronous publishes in flight on a connection, across
// requests and, on one connection with them, the queuer (which takes at most
// queuerBudget of them): enough for the commits of several jobs of the largest size
// at once.
const publishWindow = 32768

// newJetStream is the intake's JetStream context on nc.
func newJetStream(nc *nats.Conn) (jetstream.JetStream, error) {
	return jetstream.New(nc, jetstream.WithPublishAsyncMaxPending(publishWindow), fleet.PublishAckTimeout)
}

type intake struct {
	cfg      Config
	log      *slog.Logger
	nc       *nats.Conn
	js       jetstream.JetStream
	jobs     *fleet.Jobs
	states   jetstream.KeyValue
	index    *jobIndex
	nodes    jetstream.KeyValue
	registry *fleet.Registry
	// caps mirrors the registered nodes and their inventories.
	caps        capabilities
	inventories jetstream.KeyValue
	dead        jetstream.KeyValue
	outputs     outputs.Store
	inputs      jetstream.ObjectStore
	store       *workflow.Store
	catalog     *workflow.Catalog
	pub         *fleet.Publisher
	keys        *tenancy.Store
	limits      *rateLimits
	accepted    metric.Int64Counter
	// queuer queues the scenes of accepted jobs.
	queuer *queuer
	// done is closed when the intake stops; long-lived responses end then.
	done <-chan struct{}
}

// Run serves the API until ctx is done, then lets running requests finish.
func Run(ctx context.Context, cfg Config) error {
	return fleet.IgnoreStop(ctx, run(ctx, cfg))
}

func run(ctx context.Context, cfg Config) error {
	if err := cfg.fill(); err != nil {
		return err
	}
	var in *intake
	if err := fleet.Retry(ctx, cfg.Logger.With("service", "intake"), "intake start", func(ctx context.Context) error {
		var err error
		in, err = open(ctx, cfg)
		return err
	}); err != nil {
		return err
	}
	in.done = ctx.Done()
	// Stopped below, once the requests have ended; here if the intake stops before.
	defer in.queuer.stop(context.WithoutCancel(ctx))
	followCtx, stopFollowing := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer stopFollowing()
	if err := in.followBuckets(followCtx, &wg); err != nil {
		return err
	}
	if err := in.caps.follow(followCtx, in.js, in.log, &wg); err != nil {
		return err
	}
	mux := http.NewServeMux()
	newAPI(mux, in)
	if err := in.addComfyDoor(followCtx, mux, &wg); err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           otelhttp.NewHandler(mux, "intake", otelhttp.WithSpanNameFormatter(spanName)),
		ReadHeaderTimeout: 10 * time.Second,
		BaseContext:       func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(cfg.Listener) }()
	in.log.Info("intake listening", "addr", cfg.Listener.Addr().String(), "docs", cfg.PublicURL+"/docs")
	if cfg.Open {
		in.log.Warn("the API is open: no API key is needed, every caller is admin of the default tenant; use it on loopback only")
	}
	select {
	case err := <-errc:
		return fmt.Errorf("intake: serve: %w", err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cfg.ShutdownTimeout)
	defer cancel()
	err := srv.Shutdown(shutdownCtx)
	<-errc
	// Queueing still in flight when the requests have ended has what is left of the
	// shutdown's time; the router queues what it leaves.
	in.queuer.stop(shutdownCtx)
	in.log.Info("intake stopped")
	if err != nil {
		return fmt.Errorf("intake: shutdown: %w", err)
	}
	return nil
}

// followBuckets keeps the workflow catalog and the job index equal to their buckets
// until ctx ends; wg waits for them. It returns once both hold their bucket's
// current content.
func (in *intake) followBuckets(ctx context.Context, wg *sync.WaitGroup) error {
	if err := in.follow(ctx, wg, "workflow templates", func(ctx context.Context, ready func()) error {
		return in.store.Follow(ctx, in.catalog, in.log, ready)
	}); err != nil {
		return err
	}
	return in.follow(ctx, wg, "job states", func(ctx context.Context, ready func()) error {
		return in.index.follow(ctx, in.states, in.log, ready)
	})
}

// follow runs run, which keeps a copy of a bucket (what it holds), in a goroutine
// that stops with ctx; wg waits for it. It returns once run calls ready: the copy
// holds the bucket's current content.
func (in *intake) follow(ctx context.Context, wg *sync.WaitGroup, what string, run func(ctx context.Context, ready func()) error) error {
	ready := make(chan struct{})
	stopped := make(chan error, 1)
	wg.Go(func() {
		err := run(ctx, func() { close(ready) })
		if err != nil {
			in.log.Error(what+" no longer follow their bucket", "err", err)
		}
		stopped <- err
	})
	select {
	case <-ready:
		return nil
	case err := <-stopped:
		if err == nil {
			err = ctx.Err()
		}
		return fmt.Errorf("intake: read %s: %w", what, err)
	}
}

func spanName(_ string, r *http.Request) string {
	if r.Pattern != "" {
		return r.Pattern
	}
	return r.Method
}

// open connects the intake to the fleet's streams and buckets; its queuer runs until
// stopped.
func open(ctx context.Context, cfg Config) (*intake, error) {
	in := &intake{cfg: cfg, log: cfg.Logger.With("service", "intake"), nc: cfg.Conn}
	var err error
	if in.js, err = newJetStream(cfg.Conn); err != nil {
		return nil, fmt.Errorf("intake: jetstream: %w", err)
	}
	if err := fleet.Ensure(ctx, in.js, cfg.Settings); err != nil {
		return nil, fmt.Errorf("intake: %w", err)
	}
	if in.jobs, err = fleet.OpenJobs(ctx, in.js); err != nil {
		return nil, fmt.Errorf("intake: %w", err)
	}
	if in.states, err = in.js.KeyValue(ctx, fleet.BucketJobState); err != nil {
		return nil, fmt.Errorf("intake: open job state bucket: %w", err)
	}
	in.index = newJobIndex(cfg.Settings.Retention)
	if in.nodes, err = in.js.KeyValue(ctx, fleet.BucketNodes); err != nil {
		return nil, fmt.Errorf("intake: open nodes bucket: %w", err)
	}
	if in.registry, err = fleet.OpenRegistry(ctx, in.js); err != nil {
		return nil, fmt.Errorf("intake: %w", err)
	}
	if in.dead, err = in.js.KeyValue(ctx, fleet.BucketDeadLetters); err != nil {
		return nil, fmt.Errorf("intake: open dead letters bucket: %w", err)
	}
	if in.outputs = cfg.Outputs; in.outputs == nil {
		if in.outputs, err = outputs.Open(ctx, "", in.js); err != nil {
			return nil, fmt.Errorf("intake: %w", err)
		}
	}
	if in.inventories, err = in.js.KeyValue(ctx, fleet.BucketInventory); err != nil {
		return nil, fmt.Errorf("intake: open inventory bucket: %w", err)
	}
	if in.inputs, err = in.js.ObjectStore(ctx, fleet.ObjectInputs); err != nil {
		return nil, fmt.Errorf("intake: open inputs: %w", err)
	}
	if in.store, err = workflow.OpenStore(ctx, in.js); err != nil {
		return nil, fmt.Errorf("intake: %w", err)
	}
	if cfg.Templates != nil {
		seeded, err := in.store.Seed(ctx, cfg.Templates)
		if err != nil {
			return nil, fmt.Errorf("intake: %w", err)
		}
		if len(seeded) > 0 {
			in.log.Info("workflow templates stored", "templates", seeded)
		}
	}
	in.catalog = workflow.NewCatalog()
	in.pub = fleet.NewPublisher(in.js, "comfyfleet/intake")
	if in.keys, err = tenancy.Open(ctx, in.js); err != nil {
		return nil, fmt.Errorf("intake: %w", err)
	}
	in.limits = newRateLimits(cfg.SubmitRate, cfg.ReadRate)
	if in.accepted, err = otel.Meter("comfyfleet/intake").Int64Counter("comfyfleet.scenes.accepted",
		metric.WithDescription("Scenes accepted, by pool.")); err != nil {
		return nil, fmt.Errorf("intake metrics: %w", err)
	}
	queuePub := in.pub
	if cfg.QueueConn != nil {
		js, err := newJetStream(cfg.QueueConn)
		if err != nil {
			return nil, fmt.Errorf("intake: JetStream on the queuer's connection: %w", err)
		}
		queuePub = fleet.NewPublisher(js, "comfyfleet/intake")
	}
	if in.queuer, err = newQueuer(cfg.Conn, in.jobs, queuePub, in.log); err != nil {
		return nil, fmt.Errorf("intake: %w", err)
	}
	return in, nil
}

// newAPI registers the API's routes, its OpenAPI document (/openapi.json,
// /openapi.yaml), its docs (/docs), the web panel (/) and the metrics (/metrics) on
// mux.
func newAPI(mux *http.ServeMux, in *intake) huma.API {
	config := huma.DefaultConfig("comfyfleet", Version)
	// huma's docs page loads its UI from a CDN; the panel package serves it from the binary.
	config.DocsPath = ""
	panel.Register(mux, config.OpenAPIPath+".json")
	mux.Handle("GET /metrics", telemetry.MetricsHandler())
	config.Info.Description = "One generation service over a fleet of ComfyUI machines: submit jobs of scenes, follow them, download outputs, get a callback when done."
	config.Components.SecuritySchemes = map[string]*huma.SecurityScheme{
		"bearer": {Type: "http", Scheme: "bearer", Description: "An API key: comfyfleet apikey create --tenant NAME --role read|submit|admin."},
	}
	api := humago.New(mux, config)
	api.UseMiddleware(in.authenticate(api))
	in.addRoutes(api)
	in.addAPIKeyRoutes(api)
	return api
}
