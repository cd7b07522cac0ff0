// Package stack composes the whole comfyfleet fleet in one process: an embedded
// nats-server, the intake, dispatcher, executor and notifier services, and simulated
// ComfyUI nodes unless real ones are named. It is what `comfyfleet up` runs.
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
	// DataDir holds the JetStream file store. Required.
	DataDir string
	// NATSHost and NATSPort are where the embedded server listens. Default to
	// 127.0.0.1 and 4222; a port of -1 picks a free one.
	NATSHost string
	NATSPort int
	// Sync is the file store's sync policy (see natsembed.Config). Defaults to "2m".
	Sync string
	// HTTPAddr is the API's listen address. Defaults to "127.0.0.1:8080".
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
	// Intake tunes the intake (MaxScenes, SubmitRate, ReadRate); the rest is set here.
	Intake intake.Config
	// Dispatcher tunes the dispatcher (Policy, ModelLoadPenalty, OnPlaced); its Conn,
	// Settings and Logger are set here.
	Dispatcher dispatcher.Config
	// Executor tunes the executor; its Conn, Settings, Nodes and Logger are set here.
	// It adopts the nodes registered through the API unless told otherwise by
	// NoAdopt.
	Executor executor.Config
	// NoAdopt keeps the executor from driving nodes registered through the API.
	NoAdopt bool
	// NoExecutor leaves the nodes to executors run elsewhere (as separate processes).
	NoExecutor bool
	// Notifier tunes the notifier; its Conn, Settings, PublicURL and Logger are set here.
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
	// NATS is the embedded server.
	NATS *server.Server
	// APIURL is the API's base URL.
	APIURL string
	// Sims are the simulated nodes, if any.
	Sims []*comfysim.Server
	// Nodes are the nodes the executor drives.
	Nodes []fleet.NodeConfig

	conns []*nats.Conn
	wg    sync.WaitGroup
	mu    sync.Mutex
	errs  []error
}

// Start starts the fleet; it runs until ctx is done. Wait returns once everything
// has stopped.
func Start(ctx context.Context, cfg Config) (_ *Stack, err error) {
	if cfg.DataDir == "" {
		return nil, errors.New("stack: a data directory is required")
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
	s := &Stack{}
	defer func() {
		if err != nil {
			s.shutdown()
		}
	}()
	if s.NATS, err = natsembed.Start(natsembed.Config{Dir: cfg.DataDir, Host: cfg.NATSHost, Port: cfg.NATSPort, Sync: cfg.Sync}); err != nil {
		return nil, fmt.Errorf("stack: %w", err)
	}
	s.Nodes = cfg.Comfy
	if len(s.Nodes) == 0 {
		for i, sc := range cfg.Sims {
			if sc.Name == "" {
				sc.Name = fmt.Sprintf("sim-%d", i+1)
			}
			sim, err := comfysim.Start(sc)
			if err != nil {
				return nil, fmt.Errorf("stack: simulated node %s: %w", sc.Name, err)
			}
			s.Sims = append(s.Sims, sim)
			speed := sc.Speed
			if speed == 0 {
				speed = 1
			}
			s.Nodes = append(s.Nodes, fleet.NodeConfig{ID: sc.Name, URL: sim.URL(), Pools: []string{"image", "video"}, Weight: speed,
				Labels: map[string]string{"simulated": "true"}})
		}
	}
	ln, err := net.Listen("tcp", cfg.HTTPAddr)
	if err != nil {
		return nil, fmt.Errorf("stack: listen for the API on %s: %w", cfg.HTTPAddr, err)
	}
	if cfg.PublicURL == "" {
		cfg.PublicURL = "http://" + ln.Addr().String()
	}
	s.APIURL = cfg.PublicURL

	connect := func(name string) (*nats.Conn, error) {
		nc, err := nats.Connect(s.NATS.ClientURL(), nats.Name("comfyfleet-"+name), nats.MaxReconnects(-1))
		if err != nil {
			return nil, fmt.Errorf("stack: connect %s to NATS: %w", name, err)
		}
		s.conns = append(s.conns, nc)
		return nc, nil
	}
	// Create the streams once, before four services race to.
	boot, err := connect("boot")
	if err != nil {
		ln.Close()
		return nil, err
	}
	if err := ensure(ctx, boot, cfg.Settings); err != nil {
		ln.Close()
		return nil, err
	}

	guard := callback.NewGuard(cfg.CallbackAllow...)
	in, ds, ex, nt := cfg.Intake, cfg.Dispatcher, cfg.Executor, cfg.Notifier
	if cfg.Outputs != "" && cfg.Outputs != "nats" {
		store, err := outputs.Open(ctx, cfg.Outputs, nil)
		if err != nil {
			ln.Close()
			return nil, fmt.Errorf("stack: %w", err)
		}
		in.Outputs, ex.Outputs, nt.Outputs = store, store, store
	}
	ds.Settings, ds.Logger = cfg.Settings, cfg.Logger
	ex.Adopt = !cfg.NoAdopt
	in.Settings, in.Templates, in.Listener, in.PublicURL = cfg.Settings, workflows.FS, ln, cfg.PublicURL
	in.Open, in.CallbackGuard, in.Logger = cfg.Open, guard, cfg.Logger
	ex.Settings, ex.Nodes, ex.Logger, ex.URLGuard = cfg.Settings, s.Nodes, cfg.Logger, guard
	nt.Settings, nt.PublicURL, nt.Logger, nt.CallbackGuard = cfg.Settings, cfg.PublicURL, cfg.Logger, guard
	services := []struct {
		name string
		run  func(context.Context, *nats.Conn) error
	}{
		{"dispatcher", func(ctx context.Context, nc *nats.Conn) error {
			ds.Conn = nc
			return dispatcher.Run(ctx, ds)
		}},
		{"notifier", func(ctx context.Context, nc *nats.Conn) error { nt.Conn = nc; return notifier.Run(ctx, nt) }},
		{"executor", func(ctx context.Context, nc *nats.Conn) error { ex.Conn = nc; return executor.Run(ctx, ex) }},
		{"intake", func(ctx context.Context, nc *nats.Conn) error { in.Conn = nc; return intake.Run(ctx, in) }},
	}
	for _, svc := range services {
		if svc.name == "executor" && cfg.NoExecutor {
			continue
		}
		nc, err := connect(svc.name)
		if err != nil {
			ln.Close()
			return nil, err
		}
		s.wg.Go(func() {
			if err := svc.run(ctx, nc); err != nil {
				cfg.Logger.Error("service stopped with an error", "service", svc.name, "err", err)
				s.mu.Lock()
				s.errs = append(s.errs, fmt.Errorf("%s: %w", svc.name, err))
				s.mu.Unlock()
			}
		})
	}
	return s, nil
}

func ensure(ctx context.Context, nc *nats.Conn, settings fleet.Settings) error {
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("stack: jetstream: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := fleet.Ensure(ctx, js, settings); err != nil {
		return fmt.Errorf("stack: %w", err)
	}
	return nil
}

// Wait blocks until every service has stopped (after the context given to Start is
// done), then stops the simulated nodes and NATS.
func (s *Stack) Wait() error {
	s.wg.Wait()
	s.shutdown()
	s.mu.Lock()
	defer s.mu.Unlock()
	return errors.Join(s.errs...)
}

func (s *Stack) shutdown() {
	for _, nc := range s.conns {
		_ = nc.Drain()
	}
	for _, sim := range s.Sims {
		_ = sim.Close()
	}
	if s.NATS != nil {
		natsembed.Stop(s.NATS)
	}
}
