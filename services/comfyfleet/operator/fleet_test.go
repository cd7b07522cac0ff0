package operator_test

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/netip"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/telemetry"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
	"github.com/comfyfleet/comfyfleet/services/executor"
	"github.com/comfyfleet/comfyfleet/services/notifier"
)

var screenshot = flag.String("panel.screenshot", "", "write a screenshot of the panel with a running job to this PNG file (docs/panel.png)")

// TestMain installs the meter provider that /metrics serves, as comfyfleet's commands do.
func TestMain(m *testing.M) {
	flag.Parse()
	shutdown, err := telemetry.Setup(context.Background(), "comfyfleet-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	_ = shutdown(context.Background())
	os.Exit(code)
}

// client has a transport of its own: servers closing in parallel tests close the idle
// connections of http.DefaultTransport.
var client = &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone(), Timeout: 30 * time.Second}

// testFleet is a whole fleet on random loopback ports.
type testFleet struct {
	API   string
	JS    jetstream.JetStream
	Stack *stack.Stack
	// Key is sent with every call of the test's own; "" on an open API.
	Key string
}

// sim is a simulated node whose sampler step takes step at speed 1.
func sim(name string, step time.Duration) comfysim.Config {
	return comfysim.Config{Name: name, Speed: 1, StepDuration: step}
}

// startFleet runs a fleet of the simulated nodes sims until the test ends; open
// serves the API without keys.
func startFleet(t *testing.T, open bool, sims ...comfysim.Config) *testFleet {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	s, err := stack.Start(ctx, stack.Config{
		DataDir:       t.TempDir(),
		NATSPort:      -1,
		HTTPAddr:      "127.0.0.1:0",
		Open:          open,
		CallbackAllow: []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")},
		Sims:          sims,
		Settings:      fleet.Settings{AckWait: 2 * time.Second, RetryBackoff: 100 * time.Millisecond, NodeTTL: 3 * time.Second},
		Executor:      executor.Config{HeartbeatInterval: 200 * time.Millisecond},
		Notifier:      notifier.Config{WebhookBackoff: 50 * time.Millisecond},
		Logger:        slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		if err := s.Wait(); err != nil {
			t.Errorf("fleet stopped with: %v", err)
		}
	})
	nc, err := nats.Connect(s.NATS.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return &testFleet{API: s.APIURL, JS: js, Stack: s}
}

// createKey stores an API key of tenant with role, and returns it.
func (f *testFleet) createKey(t *testing.T, tenant string, role tenancy.Role) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	store, err := tenancy.Open(ctx, f.JS)
	if err != nil {
		t.Fatal(err)
	}
	key, _, err := store.CreateKey(ctx, tenant, role, "operator test")
	if err != nil {
		t.Fatal(err)
	}
	return key
}

// call sends body (JSON-encoded unless nil) to the API and decodes a JSON answer
// into out (when not nil); it returns the status.
func (f *testFleet) call(t *testing.T, method, path string, body, out any) int {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, f.API+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if f.Key != "" {
		req.Header.Set("Authorization", "Bearer "+f.Key)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if out != nil && resp.StatusCode < 300 {
		if err := json.Unmarshal(raw, out); err != nil {
			t.Fatalf("%s %s: %s: decode %s: %v", method, path, resp.Status, raw, err)
		}
	}
	return resp.StatusCode
}

// seeds makes every scene of the test process differ, so that no simulated node
// answers one from its cache, as ComfyUI does for a prompt it has run.
var seeds atomic.Int64

// submit posts a job of n txt2img scenes of steps sampler steps and returns its id.
func (f *testFleet) submit(t *testing.T, n, steps int, callback string) string {
	t.Helper()
	scenes := make([]map[string]any, n)
	for i := range scenes {
		scenes[i] = map[string]any{"workflow": "txt2img", "params": map[string]any{
			"prompt": "a lighthouse at dusk", "seed": seeds.Add(1), "steps": steps, "width": 256, "height": 256}}
	}
	body := map[string]any{"priority": 5, "scenes": scenes}
	if callback != "" {
		body["callback_url"] = callback
	}
	var job struct {
		ID string `json:"id"`
	}
	if status := f.call(t, http.MethodPost, "/v1/jobs", body, &job); status != http.StatusAccepted {
		t.Fatalf("POST /v1/jobs: %d", status)
	}
	return job.ID
}
