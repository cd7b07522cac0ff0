package stack_test

import (
	"context"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

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

	mu        sync.Mutex
	executors map[string]*lostExecutor
}

type lostExecutor struct {
	nc     *nats.Conn
	cancel context.CancelFunc
}

func startParts(t *testing.T, executors int) *parts {
	t.Helper()
	settings := testSettings()
	log := testLogger(t)
	srv, nc, js := fleettest.Fleet(t, settings)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })
	connect := func() *nats.Conn {
		c, err := nats.Connect(srv.ClientURL())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
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
	p := &parts{apiURL: "http://" + ln.Addr().String(), nc: nc, js: js, hooks: newHookReceiver(t), executors: map[string]*lostExecutor{}}
	dc, nt, in := connect(), connect(), connect()
	run("dispatcher", func() error { return dispatcher.Run(ctx, dispatcher.Config{Conn: dc, Settings: settings, Logger: log}) })
	run("notifier", func() error {
		return notifier.Run(ctx, notifier.Config{Conn: nt, Settings: settings, PublicURL: p.apiURL, WebhookBackoff: 50 * time.Millisecond, Logger: log})
	})
	run("intake", func() error {
		return intake.Run(ctx, intake.Config{Conn: in, Settings: settings, Templates: workflows.FS, Listener: ln, Logger: log})
	})
	for i := range executors {
		sim, err := comfysim.Start(comfysim.Config{Name: fmt.Sprintf("sim-%d", i), StepDuration: 10 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { sim.Close() })
		node := fleet.NodeConfig{ID: fmt.Sprintf("sim-%d", i), URL: sim.URL(), Pools: []string{"image", "video"}, Weight: 1}
		ec := connect()
		ectx, ecancel := context.WithCancel(ctx)
		p.executors[node.ID] = &lostExecutor{nc: ec, cancel: ecancel}
		run("executor "+node.ID, func() error {
			return executor.Run(ectx, executor.Config{Conn: ec, Settings: settings, Nodes: []fleet.NodeConfig{node},
				Name: fmt.Sprintf("exec-%d", i), HeartbeatInterval: 200 * time.Millisecond, Logger: log})
		})
	}
	return p
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
