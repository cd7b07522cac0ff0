// Package fleettest is comfyfleet's kit for tests: the real parts they need (an
// embedded nats-server per test, the fleet's streams and buckets on it, a webhook
// receiver and simulated ComfyUI nodes on loopback sockets), calls of the HTTP API,
// followers of a subject's events that wait with deadlines, and a logger that shows
// the services' warnings in a failing test's output. Starting a whole stack is stacktest's
// (services/comfyfleet/stack/stacktest), which this module cannot import.
package fleettest

import (
	"bytes"
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/natsembed"
)

// NATS starts a nats-server with JetStream on a random loopback port and a temporary
// store, stopped when the test ends.
func NATS(t testing.TB) *server.Server {
	t.Helper()
	s, err := natsembed.Start(natsembed.Config{Dir: t.TempDir(), Port: -1})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { natsembed.Stop(s) })
	return s
}

// Connect opens a connection to s that reconnects at once, closed when the test
// ends.
func Connect(t testing.TB, s *server.Server) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	return Open(t, func() (*nats.Conn, error) {
		return nats.Connect(s.ClientURL(), nats.MaxReconnects(-1), nats.ReconnectWait(50*time.Millisecond))
	})
}

// Open opens a connection with connect, failing the test if it cannot, closes it
// when the test ends, and returns it with its JetStream.
func Open(t testing.TB, connect func() (*nats.Conn, error)) (*nats.Conn, jetstream.JetStream) {
	t.Helper()
	nc, err := connect()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return nc, js
}

// Fleet starts a server, creates the fleet's streams and buckets with settings, and
// returns a connection to it.
func Fleet(t testing.TB, settings fleet.Settings) (*server.Server, *nats.Conn, jetstream.JetStream) {
	t.Helper()
	s := NATS(t)
	nc, js := Connect(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := fleet.Ensure(ctx, js, settings); err != nil {
		t.Fatal(err)
	}
	return s, nc, js
}

// Sim runs a simulated ComfyUI node of cfg on a loopback port until the test ends.
func Sim(t testing.TB, cfg comfysim.Config) *comfysim.Server {
	t.Helper()
	sim, err := comfysim.Start(cfg)
	if err != nil {
		t.Fatalf("start the simulated node %q: %v", cfg.Name, err)
	}
	t.Cleanup(func() { _ = sim.Close() })
	return sim
}

// Eventually calls cond until it returns true or the deadline passes; then it fails the
// test with msg. It polls at a short interval, never as synchronisation of its own.
func Eventually(t testing.TB, within time.Duration, cond func() bool, msg string, args ...any) {
	t.Helper()
	deadline := time.Now().Add(within)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("after %s: "+msg, append([]any{within}, args...)...)
		}
		<-tick.C
	}
}

// Logger writes the warnings and errors of the services a test runs into the test's
// output, which shows them when the test fails (or runs with -v).
func Logger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// Buffer is a bytes.Buffer that several goroutines may write, such as the log of a
// service that a test reads.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

// Write appends p.
func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String returns what was written so far.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
