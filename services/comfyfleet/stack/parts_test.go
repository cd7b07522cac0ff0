package stack_test

import (
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack/stacktest"
	"github.com/comfyfleet/comfyfleet/services/executor"
)

// parts is a fleet whose nodes each have an executor of their own, so that a test
// can lose one executor alone.
type parts struct {
	*stacktest.Fleet

	sims      []*comfysim.Server
	nodes     []fleet.NodeConfig
	mu        sync.Mutex
	executors map[string]*stack.Executor

	t *testing.T
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
	return startPartsSettings(t, stacktest.Settings(), specs...)
}

func startPartsSettings(t *testing.T, settings fleet.Settings, specs ...simSpec) *parts {
	t.Helper()
	p := &parts{executors: map[string]*stack.Executor{}, t: t}
	for i, spec := range specs {
		spec.sim.Name = fmt.Sprintf("sim-%d", i)
		sim := fleettest.Sim(t, spec.sim)
		p.sims = append(p.sims, sim)
		p.nodes = append(p.nodes, fleet.NodeConfig{ID: spec.sim.Name, URL: sim.URL(), Pools: spec.pools, Weight: 1})
	}
	p.Fleet = stacktest.Start(t, func(c *stack.Config) {
		c.Settings, c.Comfy, c.NoExecutor = settings, p.nodes, true
	})
	for i, spec := range specs {
		p.startExecutor(fmt.Sprintf("exec-%d", i), p.nodes[i], spec.transport)
	}
	return p
}

// startExecutor runs an executor of its own for node, talking to it through
// transport if not nil; it becomes the one that stopExecutorOf and crashExecutorOf
// stop.
func (p *parts) startExecutor(name string, node fleet.NodeConfig, transport http.RoundTripper) {
	cfg := executor.Config{Nodes: []fleet.NodeConfig{node}, HeartbeatInterval: 200 * time.Millisecond, Logger: fleettest.Logger(p.t)}
	if transport != nil {
		cfg.HTTPClient = &http.Client{Transport: transport}
	}
	e, err := p.AddExecutor(name, cfg)
	if err != nil {
		p.t.Fatal(err)
	}
	p.mu.Lock()
	p.executors[node.ID] = e
	p.mu.Unlock()
}

// stopExecutorOf stops the executor driving node as SIGTERM does.
func (p *parts) stopExecutorOf(node string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.executors[node].Stop()
}

// crashExecutorOf loses the executor driving node as a crash would: its connection
// goes first, so it can neither acknowledge nor hand back its scene.
func (p *parts) crashExecutorOf(node string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.executors[node].Crash()
}
