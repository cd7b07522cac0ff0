// Package stack composes the whole comfyfleet fleet in one process: an embedded
// nats-server (or an external one), the intake, dispatcher, executor and notifier
// services (several of each if asked), and simulated ComfyUI nodes unless real ones
// are named. It is what `comfyfleet up` runs, and what the tests and benchmarks run.
// The services run in one errgroup: one that stops with an error, or stops at all
// before the stack is asked to, stops the stack with its error.
package stack

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"golang.org/x/sync/errgroup"

	"github.com/comfyfleet/comfyfleet/pkg/callback"
	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/natsembed"
	"github.com/comfyfleet/comfyfleet/pkg/outputs"
	"github.com/comfyfleet/comfyfleet/services/dispatcher"
	"github.com/comfyfleet/comfyfleet/services/executor"
	"github.com/comfyfleet/comfyfleet/services/intake"
	"github.com/comfyfleet/comfyfleet/services/notifier"
	"github.com/comfyfleet/comfyfleet/workflows"
)

// Config configures the all-in-one fleet.
type Config struct {
	// DataDir holds the embedded JetStream file store. Required unless NATSURL names
	// an external NATS.
	DataDir string
	// NATSHost and NATSPort are where the embedded server listens. Default to
	// 127.0.0.1 and 4222; a port of -1 picks a free one.
	NATSHost string
	NATSPort int
	// Sync is the file store's sync policy (see natsembed.Config). Defaults to "2m".
	Sync string
	// NATSURL, if set, names an external NATS (a server or a cluster,
	// comma-separated URLs) to run the services against instead of an embedded one.
	NATSURL string
	// Connect opens the NATS connection of the service named name (e.g.
	// "dispatcher-1", "executor"). Defaults to a connection to the fleet's NATS that
	// reconnects for ever.
	Connect func(name string) (*nats.Conn, error)
	// HTTPAddr is the first intake's listen address; the others listen on free
	// ports of its host. Defaults to "127.0.0.1:8080".
	HTTPAddr string
	// PublicURL is the API's base URL as clients reach it. Defaults to http://HTTPAddr.
	PublicURL string
	// Open serves the API without API keys (see intake.Config.Open).
	Open bool
	// CallbackAllow are the internal addresses that callbacks and input-image URLs
	// may reach anyway (e.g. 127.0.0.0/8 for a local n8n). Defaults to none.
	CallbackAllow []netip.Prefix
	// Comfy names real ComfyUI nodes. When empty, Sims are started instead.
	Comfy []fleet.NodeConfig
	// Sims are the simulated nodes to start when Comfy is empty; each serves the
	// image and video pools. Defaults to DefaultSims.
	Sims []comfysim.Config
	// Outputs is where scene outputs go: "" (or "nats") for the fleet's JetStream
	// object store, or "s3://BUCKET/PREFIX" for an S3-compatible bucket configured by
	// the standard AWS variables (see outputs.Open). Defaults to "".
	Outputs string
	// Settings are shared by every service. Defaults to fleet.DefaultSettings.
	Settings fleet.Settings
	// Intakes, Dispatchers and Notifiers are how many of each run, as a deployment
	// runs several. Default to 1.
	Intakes, Dispatchers, Notifiers int
	// Intake tunes the intakes (MaxScenes, rates, …); the rest is set here.
	Intake intake.Config
	// Dispatcher tunes the dispatchers (Policy, ModelLoadPenalty, OnPlaced); their
	// Conn, Settings, Name and Logger are set here.
	Dispatcher dispatcher.Config
	// Executor tunes the executor; its Conn, Settings, Nodes and Logger are set here.
	// It adopts the nodes registered through the API unless told otherwise by
	// NoAdopt.
	Executor executor.Config
	// NoAdopt keeps the executor from driving nodes registered through the API.
	NoAdopt bool
	// NoExecutor leaves the nodes to executors run elsewhere (as separate processes)
	// or added with AddExecutor.
	NoExecutor bool
	// Notifier tunes the notifiers; their Conn, Settings, PublicURL and Logger are set
	// here.
	Notifier notifier.Config
	// Logger defaults to slog.Default.
	Logger *slog.Logger
}

// DefaultSims are three simulated nodes of speeds 1×, 1× and 2×.
func DefaultSims() []comfysim.Config {
	return []comfysim.Config{{Name: "sim-1", Speed: 1}, {Name: "sim-2", Speed: 1}, {Name: "sim-3", Speed: 2}}
}

// Stack is a running fleet.
type Stack struct {
	// NATS is the embedded server; nil with an external NATS.
	NATS *server.Server
	// NATSURL is where the fleet's NATS is.
	NATSURL string
	// APIURL is the first intake's base URL, APIURLs every intake's.
	APIURL  string
	APIURLs []string
	// Sims are the simulated nodes, if any.
	Sims []*comfysim.Server
	// Nodes are the nodes the executor drives.
	Nodes []fleet.NodeConfig

	cfg   Config
	guard *callback.Guard
	// outputs is the S3 output store the services share, nil for the object store.
	outputs outputs.Store
	ctx     context.Context
	stop    context.CancelFunc
	g       *errgroup.Group
	mu      sync.Mutex
	conns   []*nats.Conn
}

// Start starts the fleet; it runs until ctx is done or a service fails. Wait returns
// once everything has stopped, with the error that stopped it.
func Start(ctx context.Context, cfg Config) (_ *Stack, err error) {
	if cfg.DataDir == "" && cfg.NATSURL == "" {
		return nil, errors.New("stack: a data directory is required for the embedded NATS")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.HTTPAddr == "" {
		cfg.HTTPAddr = "127.0.0.1:8080"
	}
	if cfg.Sims == nil {
		cfg.Sims = DefaultSims()
	}
	cfg.Intakes, cfg.Dispatchers, cfg.Notifiers = max(cfg.Intakes, 1), max(cfg.Dispatchers, 1), max(cfg.Notifiers, 1)
	s := &Stack{cfg: cfg, NATSURL: cfg.NATSURL}
	s.ctx, s.stop = context.WithCancel(ctx)
	s.g, s.ctx = errgroup.WithContext(s.ctx)
	var listeners []net.Listener
	defer func() {
		if err != nil {
			for _, ln := range listeners {
				ln.Close()
			}
			s.stop()
			_ = s.g.Wait()
			s.shutdown()
		}
	}()
	if s.NATSURL == "" {
		if s.NATS, err = natsembed.Start(natsembed.Config{Dir: cfg.DataDir, Host: cfg.NATSHost, Port: cfg.NATSPort, Sync: cfg.Sync}); err != nil {
			return nil, fmt.Errorf("stack: %w", err)
		}
		s.NATSURL = s.NATS.ClientURL()
	}
	if err := s.startSims(); err != nil {
		return nil, err
	}
	for i := range cfg.Intakes {
		addr := cfg.HTTPAddr
		if i > 0 {
			host, _, _ := net.SplitHostPort(cfg.HTTPAddr)
			addr = net.JoinHostPort(host, "0")
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return nil, fmt.Errorf("stack: listen for the API on %s: %w", addr, err)
		}
		listeners = append(listeners, ln)
		s.APIURLs = append(s.APIURLs, "http://"+ln.Addr().String())
	}
	if cfg.PublicURL == "" {
		cfg.PublicURL = s.APIURLs[0]
	}
	s.APIURL = cfg.PublicURL

	// Create the streams once, before the services race to.
	boot, err := s.connect("boot")
	if err != nil {
		return nil, err
	}
	if err := ensure(ctx, boot, cfg.Settings); err != nil {
		return nil, err
	}

	guard := callback.NewGuard(cfg.CallbackAllow...)
	s.guard = guard
	if cfg.Outputs != "" && cfg.Outputs != "nats" {
		if s.outputs, err = outputs.Open(ctx, cfg.Outputs, nil); err != nil {
			return nil, fmt.Errorf("stack: %w", err)
		}
	}
	for i := range cfg.Dispatchers {
		ds := cfg.Dispatcher
		ds.Settings, ds.Logger = cfg.Settings, cfg.Logger
		if ds.Name == "" || cfg.Dispatchers > 1 {
			ds.Name = fmt.Sprintf("dispatcher-%d", i+1)
		}
		if err := s.run(ds.Name, func(ctx context.Context, nc *nats.Conn) error { ds.Conn = nc; return dispatcher.Run(ctx, ds) }); err != nil {
			return nil, err
		}
	}
	for i := range cfg.Notifiers {
		nt := cfg.Notifier
		nt.Settings, nt.PublicURL, nt.Logger, nt.CallbackGuard = cfg.Settings, cfg.PublicURL, cfg.Logger, guard
		if s.outputs != nil {
			nt.Outputs = s.outputs
		}
		if err := s.run(fmt.Sprintf("notifier-%d", i+1), func(ctx context.Context, nc *nats.Conn) error { nt.Conn = nc; return notifier.Run(ctx, nt) }); err != nil {
			return nil, err
		}
	}
	if !cfg.NoExecutor {
		ex := cfg.Executor
		ex.Adopt = !cfg.NoAdopt
		ex.Nodes = s.Nodes
		if _, err := s.AddExecutor("executor", ex); err != nil {
			return nil, err
		}
	}
	for i, ln := range listeners {
		in := cfg.Intake
		in.Settings, in.Templates, in.Listener, in.PublicURL = cfg.Settings, workflows.FS, ln, cfg.PublicURL
		in.Open, in.CallbackGuard, in.Logger = cfg.Open, guard, cfg.Logger
		if s.outputs != nil {
			in.Outputs = s.outputs
		}
		if err := s.run(fmt.Sprintf("intake-%d", i+1), func(ctx context.Context, nc *nats.Conn) error { in.Conn = nc; return intake.Run(ctx, in) }); err != nil {
			return nil, err
		}
	}
	listeners = nil
	return s, nil
}

// startSims starts the simulated nodes unless real ones are named.
func (s *Stack) startSims() error {
	s.Nodes = s.cfg.Comfy
	if len(s.Nodes) > 0 {
		return nil
	}
	for i, sc := range s.cfg.Sims {
		if sc.Name == "" {
			sc.Name = fmt.Sprintf("sim-%d", i+1)
		}
		sim, err := comfysim.Start(sc)
		if err != nil {
			return fmt.Errorf("stack: simulated node %s: %w", sc.Name, err)
		}
		s.Sims = append(s.Sims, sim)
		speed := sc.Speed
		if speed == 0 {
			speed = 1
		}
		s.Nodes = append(s.Nodes, fleet.NodeConfig{ID: sc.Name, URL: sim.URL(), Pools: []string{"image", "video"}, Weight: speed,
			Labels: map[string]string{"simulated": "true"}})
	}
	return nil
}

// connect opens the connection of service name.
func (s *Stack) connect(name string) (*nats.Conn, error) {
	var nc *nats.Conn
	var err error
	if s.cfg.Connect != nil {
		nc, err = s.cfg.Connect(name)
	} else {
		nc, err = nats.Connect(s.NATSURL, nats.Name("comfyfleet-"+name), nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	}
	if err != nil {
		return nil, fmt.Errorf("stack: connect %s to NATS: %w", name, err)
	}
	s.mu.Lock()
	s.conns = append(s.conns, nc)
	s.mu.Unlock()
	return nc, nil
}

// run runs service name in the stack's group, on a connection of its own, until the
// stack stops.
func (s *Stack) run(name string, service func(context.Context, *nats.Conn) error) error {
	_, err := s.runUntil(s.ctx, name, service)
	return err
}

// runUntil is run, stopped also when ctx ends; it returns the service's connection.
func (s *Stack) runUntil(ctx context.Context, name string, service func(context.Context, *nats.Conn) error) (*nats.Conn, error) {
	nc, err := s.connect(name)
	if err != nil {
		return nil, err
	}
	s.g.Go(func() error {
		err := service(ctx, nc)
		if err == nil && s.ctx.Err() == nil && ctx.Err() == nil {
			err = errors.New("stopped on its own")
		}
		if err != nil {
			s.cfg.Logger.Error("service stopped with an error; stopping the fleet", "service", name, "err", err)
			return fmt.Errorf("%s: %w", name, err)
		}
		return nil
	})
	return nc, nil
}

// Executor is an executor added to the stack.
type Executor struct {
	nc     *nats.Conn
	cancel context.CancelFunc
}

// AddExecutor runs an executor of the stack with cfg (its Conn and Settings are set
// here; its Logger and URLGuard default to the stack's), until the stack stops or it
// is stopped.
func (s *Stack) AddExecutor(name string, cfg executor.Config) (*Executor, error) {
	ctx, cancel := context.WithCancel(s.ctx)
	e := &Executor{cancel: cancel}
	cfg.Settings = s.cfg.Settings
	if cfg.Logger == nil {
		cfg.Logger = s.cfg.Logger
	}
	if cfg.URLGuard == nil {
		cfg.URLGuard = s.guard
	}
	if cfg.Outputs == nil && s.outputs != nil {
		cfg.Outputs = s.outputs
	}
	if cfg.Name == "" {
		cfg.Name = name
	}
	nc, err := s.runUntil(ctx, name, func(ctx context.Context, nc *nats.Conn) error {
		cfg.Conn = nc
		return executor.Run(ctx, cfg)
	})
	if err != nil {
		cancel()
		return nil, err
	}
	e.nc = nc
	return e, nil
}

// Stop stops the executor as SIGTERM does: it hands back what it has not finished.
func (e *Executor) Stop() { e.cancel() }

// Crash loses the executor as a crash would: its connection goes first, so it can
// neither acknowledge nor hand back what it runs.
func (e *Executor) Crash() {
	e.nc.Close()
	e.cancel()
}

func ensure(ctx context.Context, nc *nats.Conn, settings fleet.Settings) error {
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("stack: jetstream: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	if err := fleet.Retry(ctx, slog.New(slog.DiscardHandler), "create the fleet's streams", func(ctx context.Context) error {
		return fleet.Ensure(ctx, js, settings)
	}); err != nil {
		return fmt.Errorf("stack: %w", err)
	}
	return nil
}

// Wait blocks until every service has stopped (after the context given to Start is
// done, or a service failed), then stops the simulated nodes and NATS, and returns
// the error of the service that stopped the fleet, if any.
func (s *Stack) Wait() error {
	err := s.g.Wait()
	s.stop()
	s.shutdown()
	return err
}

func (s *Stack) shutdown() {
	s.mu.Lock()
	conns := s.conns
	s.mu.Unlock()
	for _, nc := range conns {
		_ = nc.Drain()
	}
	for _, sim := range s.Sims {
		_ = sim.Close()
	}
	if s.NATS != nil {
		natsembed.Stop(s.NATS)
	}
}
