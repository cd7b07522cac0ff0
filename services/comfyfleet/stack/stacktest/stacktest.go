// Package stacktest starts a whole fleet (stack.Start) for one test, on random
// loopback ports, with the settings that make failover fast enough for tests; the
// rest of the test kit is pkg/fleettest.
package stacktest

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
	"github.com/comfyfleet/comfyfleet/services/executor"
	"github.com/comfyfleet/comfyfleet/services/notifier"
)

// Fleet is a running stack and what a test reaches it with.
type Fleet struct {
	*stack.Stack
	// NC and JS are a connection of the test's own (admin's, where the stack's
	// Connect tells users apart).
	NC *nats.Conn
	JS jetstream.JetStream
	// Hooks receives the callbacks of jobs that name Hooks.URL.
	Hooks *fleettest.Webhooks
}

// Loopback is where callbacks may go: the tests' receivers.
var Loopback = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}

// Settings make failover fast enough for tests: an ack wait of 2 s, retries after
// 100 ms, nodes silent for 3 s offline.
func Settings() fleet.Settings {
	return fleet.Settings{AckWait: 2 * time.Second, RetryBackoff: 100 * time.Millisecond, NodeTTL: 3 * time.Second}
}

// Sims are fast simulated nodes sim-a, sim-b… of the speeds given: a 20-step scene
// takes 200 ms at speed 1.
func Sims(speeds ...float64) []comfysim.Config {
	out := make([]comfysim.Config, len(speeds))
	for i, s := range speeds {
		out[i] = comfysim.Config{Name: "sim-" + string(rune('a'+i)), Speed: s, StepDuration: 10 * time.Millisecond}
	}
	return out
}

// Nodes is a tune for Start that runs Sims(speeds...).
func Nodes(speeds ...float64) func(*stack.Config) {
	return func(c *stack.Config) { c.Sims = Sims(speeds...) }
}

// Start runs a stack until the test ends and fails the test if it stops with an
// error. The stack serves an open API (no keys) on a loopback port, lets callbacks
// reach loopback, uses Settings, heartbeats every 200 ms, retries webhooks after
// 50 ms, runs the stack's default simulated nodes, and logs warnings into the test's output; each tune
// changes that configuration, in order.
func Start(t *testing.T, tune ...func(*stack.Config)) *Fleet {
	t.Helper()
	cfg := stack.Config{
		DataDir:       t.TempDir(),
		NATSPort:      -1,
		HTTPAddr:      "127.0.0.1:0",
		Open:          true,
		CallbackAllow: Loopback,
		Settings:      Settings(),
		Executor:      executor.Config{HeartbeatInterval: 200 * time.Millisecond},
		Notifier:      notifier.Config{WebhookBackoff: 50 * time.Millisecond},
		Logger:        fleettest.Logger(t),
	}
	for _, tn := range tune {
		tn(&cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	s, err := stack.Start(ctx, cfg)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		if err := s.Wait(); err != nil {
			t.Errorf("stack stopped with: %v", err)
		}
	})
	connect := func() (*nats.Conn, error) { return nats.Connect(s.NATSURL) }
	if cfg.Connect != nil {
		connect = func() (*nats.Conn, error) { return cfg.Connect("test") }
	}
	nc, js := fleettest.Open(t, connect)
	return &Fleet{Stack: s, NC: nc, JS: js, Hooks: fleettest.StartWebhooks(t)}
}
