package stack_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
	"github.com/comfyfleet/comfyfleet/services/dispatcher"
	"github.com/comfyfleet/comfyfleet/services/executor"
	"github.com/comfyfleet/comfyfleet/services/notifier"
)

// client has a transport of its own: httptest servers closing in parallel tests
// close the idle connections of http.DefaultTransport, under any request in flight.
var client = &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}

// spans records every span of the test process.
var spans = tracetest.NewSpanRecorder()

func TestMain(m *testing.M) {
	otel.SetTracerProvider(sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans)))
	os.Exit(m.Run())
}

// testLogger shows warnings and errors of the services in a failing test's output.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// loopback lets callbacks reach the tests' receivers.
var loopback = []netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}

// testSettings make failover fast enough for tests.
func testSettings() fleet.Settings {
	return fleet.Settings{AckWait: 2 * time.Second, RetryBackoff: 100 * time.Millisecond, NodeTTL: 3 * time.Second}
}

// testSims are fast simulated nodes: a 20-step scene takes 200ms at speed 1.
func testSims(speeds ...float64) []comfysim.Config {
	out := make([]comfysim.Config, len(speeds))
	for i, s := range speeds {
		out[i] = comfysim.Config{Name: "sim-" + string(rune('a'+i)), Speed: s, StepDuration: 10 * time.Millisecond}
	}
	return out
}

type bundle struct {
	stack *stack.Stack
	js    jetstream.JetStream
	nc    *nats.Conn
	hooks *hookReceiver
}

// startStack runs a whole fleet on random ports for one test.
func startStack(t *testing.T, sims []comfysim.Config) *bundle {
	t.Helper()
	return startStackWith(t, sims, dispatcher.Config{})
}

// startStackWith is startStack with the dispatcher tuned by ds.
func startStackWith(t *testing.T, sims []comfysim.Config, ds dispatcher.Config) *bundle {
	t.Helper()
	return startStackTuned(t, sims, func(c *stack.Config) { c.Dispatcher = ds })
}

// startStackTuned is startStack with its configuration changed by tune.
func startStackTuned(t *testing.T, sims []comfysim.Config, tune func(*stack.Config)) *bundle {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cfg := stack.Config{
		DataDir:       t.TempDir(),
		NATSPort:      -1,
		HTTPAddr:      "127.0.0.1:0",
		Open:          true,
		CallbackAllow: loopback,
		Sims:          sims,
		Settings:      testSettings(),
		Executor:      executor.Config{HeartbeatInterval: 200 * time.Millisecond},
		Notifier:      notifier.Config{WebhookBackoff: 50 * time.Millisecond},
		Logger:        testLogger(t),
	}
	tune(&cfg)
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
	var nc *nats.Conn
	if cfg.Connect != nil {
		nc, err = cfg.Connect("test")
	} else {
		nc, err = nats.Connect(s.NATSURL)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return &bundle{stack: s, js: js, nc: nc, hooks: newHookReceiver(t)}
}

// hookReceiver is a webhook endpoint on a real loopback socket.
type hookReceiver struct {
	URL string
	mu  sync.Mutex
	got []receivedHook
	ch  chan receivedHook
	// refuse answers this many deliveries with 409 "running already", as n8n does
	// before it has parked the execution.
	refuse int
}

type receivedHook struct {
	ID        string
	Timestamp string
	Signature string
	Raw       []byte
	Body      api.Webhook
}

func newHookReceiver(t *testing.T) *hookReceiver {
	h := &hookReceiver{ch: make(chan receivedHook, 100)}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		raw, _ := io.ReadAll(r.Body)
		var body api.Webhook
		if err := json.Unmarshal(raw, &body); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		rh := receivedHook{ID: r.Header.Get("webhook-id"), Timestamp: r.Header.Get("webhook-timestamp"),
			Signature: r.Header.Get("webhook-signature"), Raw: raw, Body: body}
		h.mu.Lock()
		h.got = append(h.got, rh)
		refused := h.refuse > 0
		if refused {
			h.refuse--
		}
		h.mu.Unlock()
		if refused {
			http.Error(w, `{"code":409,"message":"The execution is running already"}`, http.StatusConflict)
			return
		}
		h.ch <- rh
	}))
	t.Cleanup(srv.Close)
	h.URL = srv.URL + "/hook"
	return h
}

// deliveries returns every delivery attempt of job, refused ones included.
func (h *hookReceiver) deliveries(job string) []receivedHook {
	h.mu.Lock()
	defer h.mu.Unlock()
	var out []receivedHook
	for _, g := range h.got {
		if g.Body.Job.ID == job {
			out = append(out, g)
		}
	}
	return out
}

func (h *hookReceiver) count(job string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, g := range h.got {
		if g.Body.Job.ID == job {
			n++
		}
	}
	return n
}

// wait returns the first webhook of job.
func (h *hookReceiver) wait(t *testing.T, job string, within time.Duration) receivedHook {
	t.Helper()
	deadline := time.After(within)
	for {
		select {
		case rh := <-h.ch:
			if rh.Body.Job.ID == job {
				return rh
			}
		case <-deadline:
			t.Fatalf("no webhook for job %s within %s", job, within)
		}
	}
}

func postJob(t *testing.T, apiURL string, body any) (api.Job, *http.Response) {
	t.Helper()
	b, _ := json.Marshal(body)
	resp, err := client.Post(apiURL+"/v1/jobs", "application/json", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("POST /v1/jobs: %s: %s", resp.Status, raw)
	}
	var job api.Job
	if err := json.Unmarshal(raw, &job); err != nil {
		t.Fatal(err)
	}
	return job, resp
}

func getJob(t *testing.T, apiURL, id string) api.Job {
	t.Helper()
	resp, err := client.Get(apiURL + "/v1/jobs/" + id)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var job api.Job
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET job: %s", resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(&job); err != nil {
		t.Fatal(err)
	}
	return job
}

func getJSON(t *testing.T, url string, v any) {
	t.Helper()
	resp, err := client.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	if err := json.NewDecoder(resp.Body).Decode(v); err != nil {
		t.Fatal(err)
	}
}

// countSubject counts the messages stored in stream on subject.
func countSubject(t *testing.T, js jetstream.JetStream, stream, subject string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := js.Stream(ctx, stream)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter(subject))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, c := range info.State.Subjects {
		n += int(c)
	}
	return n
}

// settled reports whether the notifier has nothing left to deliver or redeliver.
func settled(t *testing.T, js jetstream.JetStream) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := js.Consumer(ctx, fleet.StreamDone, fleet.DoneConsumer(0).Durable)
	if err != nil {
		t.Fatal(err)
	}
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return info.NumPending == 0 && info.NumAckPending == 0
}

func sceneJob(callback string, n, steps int) map[string]any {
	scenes := make([]map[string]any, n)
	for i := range scenes {
		scenes[i] = map[string]any{"workflow": "txt2img", "params": map[string]any{"prompt": "storyboard frame", "seed": i, "steps": steps, "width": 256, "height": 256}}
	}
	return map[string]any{"priority": 5, "callback_url": callback, "scenes": scenes}
}
