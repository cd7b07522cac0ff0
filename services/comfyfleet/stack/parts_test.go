package stack_test

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/callback"
	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/dispatcher"
	"github.com/comfyfleet/comfyfleet/services/executor"
	"github.com/comfyfleet/comfyfleet/services/intake"
	"github.com/comfyfleet/comfyfleet/services/notifier"
	"github.com/comfyfleet/comfyfleet/workflows"
)

// parts is a fleet assembled service by service, with one executor per simulated
// node, so that a test can lose one executor alone.
type parts struct {
	apiURL string
	nc     *nats.Conn
	js     jetstream.JetStream
	hooks  *hookReceiver

	sims      []*comfysim.Server
	nodes     []fleet.NodeConfig
	mu        sync.Mutex
	executors map[string]*lostExecutor

	t        *testing.T
	ctx      context.Context
	settings fleet.Settings
	connect  func() *nats.Conn
	run      func(name string, f func() error)
}

type lostExecutor struct {
	nc     *nats.Conn
	cancel context.CancelFunc
}

// simSpec is one simulated node of startPartsWith, driven by an executor of its own.
type simSpec struct {
	sim   comfysim.Config
	pools []string
	// transport, if not nil, carries the executor's calls to the node.
	transport http.RoundTripper
}

func startParts(t *testing.T, executors int) *parts {
	t.Helper()
	specs := make([]simSpec, executors)
	for i := range specs {
		specs[i] = simSpec{sim: comfysim.Config{StepDuration: 10 * time.Millisecond}, pools: []string{"image", "video"}}
	}
	return startPartsWith(t, specs...)
}

func startPartsWith(t *testing.T, specs ...simSpec) *parts {
	t.Helper()
	return startPartsSettings(t, testSettings(), specs...)
}

func startPartsSettings(t *testing.T, settings fleet.Settings, specs ...simSpec) *parts {
	t.Helper()
	log := testLogger(t)
	srv, nc, js := fleettest.Fleet(t, settings)
	ctx, cancel := context.WithCancel(context.Background())
	var (
		wg    sync.WaitGroup
		conns []*nats.Conn
	)
	// Services stop before their connections close.
	t.Cleanup(func() {
		cancel()
		wg.Wait()
		for _, c := range conns {
			c.Close()
		}
	})
	connect := func() *nats.Conn {
		c, err := nats.Connect(srv.ClientURL())
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
		return c
	}
	run := func(name string, f func() error) {
		wg.Go(func() {
			if err := f(); err != nil {
				t.Errorf("%s: %v", name, err)
			}
		})
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &parts{apiURL: "http://" + ln.Addr().String(), nc: nc, js: js, hooks: newHookReceiver(t), executors: map[string]*lostExecutor{},
		t: t, ctx: ctx, settings: settings, connect: connect, run: run}
	dc, nt, in := connect(), connect(), connect()
	run("dispatcher", func() error { return dispatcher.Run(ctx, dispatcher.Config{Conn: dc, Settings: settings, Logger: log}) })
	run("notifier", func() error {
		return notifier.Run(ctx, notifier.Config{Conn: nt, Settings: settings, PublicURL: p.apiURL, WebhookBackoff: 50 * time.Millisecond,
			CallbackGuard: callback.NewGuard(loopback...), Logger: log})
	})
	run("intake", func() error {
		return intake.Run(ctx, intake.Config{Conn: in, Settings: settings, Templates: workflows.FS, Listener: ln, Open: true,
			CallbackGuard: callback.NewGuard(loopback...), Logger: log})
	})
	for i, spec := range specs {
		spec.sim.Name = fmt.Sprintf("sim-%d", i)
		sim, err := comfysim.Start(spec.sim)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sim.Close() })
		node := fleet.NodeConfig{ID: spec.sim.Name, URL: sim.URL(), Pools: spec.pools, Weight: 1}
		p.sims, p.nodes = append(p.sims, sim), append(p.nodes, node)
		p.startExecutor(fmt.Sprintf("exec-%d", i), node, spec.transport)
	}
	return p
}

// startExecutor runs an executor of its own for node, talking to it through
// transport if not nil; it becomes the one that stopExecutorOf and crashExecutorOf
// stop.
func (p *parts) startExecutor(name string, node fleet.NodeConfig, transport http.RoundTripper) {
	cfg := executor.Config{Conn: p.connect(), Settings: p.settings, Nodes: []fleet.NodeConfig{node},
		Name: name, HeartbeatInterval: 200 * time.Millisecond, Logger: testLogger(p.t)}
	if transport != nil {
		cfg.HTTPClient = &http.Client{Transport: transport}
	}
	ctx, cancel := context.WithCancel(p.ctx)
	p.mu.Lock()
	p.executors[node.ID] = &lostExecutor{nc: cfg.Conn, cancel: cancel}
	p.mu.Unlock()
	p.run("executor "+name, func() error { return executor.Run(ctx, cfg) })
}

// stopExecutorOf stops the executor driving node as SIGTERM does.
func (p *parts) stopExecutorOf(node string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.executors[node].cancel()
}

// crashExecutorOf loses the executor driving node as a crash would: its connection
// goes first, so it can neither acknowledge nor hand back its scene.
func (p *parts) crashExecutorOf(node string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	e := p.executors[node]
	e.nc.Close()
	e.cancel()
}
