package stack_test

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
	"github.com/comfyfleet/comfyfleet/services/executor"
	"github.com/comfyfleet/comfyfleet/services/intake"
	"github.com/comfyfleet/comfyfleet/services/notifier"
)

// lockedBuffer collects every log line of a stack, at every level.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

type secureBundle struct {
	api   string
	js    jetstream.JetStream
	keys  *tenancy.Store
	hooks *hookReceiver
	logs  *lockedBuffer
}

// startSecureStack runs a fleet that needs API keys, allows each key rate reads and
// rate submissions a second (the defaults for 0), and lets callbacks reach loopback
// (the receivers here) and nothing else internal.
func startSecureStack(t *testing.T, rate float64) *secureBundle {
	t.Helper()
	logs := &lockedBuffer{}
	var limit intake.RateLimit
	if rate > 0 {
		limit = intake.RateLimit{PerSecond: rate, Burst: max(2, int(2*rate))}
	}
	ctx, cancel := context.WithCancel(context.Background())
	s, err := stack.Start(ctx, stack.Config{
		DataDir: t.TempDir(), NATSPort: -1, HTTPAddr: "127.0.0.1:0",
		CallbackAllow: loopback,
		Sims:          testSims(1),
		Settings:      testSettings(),
		Intake:        intake.Config{SubmitRate: limit, ReadRate: limit},
		Executor:      executor.Config{HeartbeatInterval: 200 * time.Millisecond},
		Notifier:      notifier.Config{WebhookBackoff: 50 * time.Millisecond},
		Logger:        slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
	})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); _ = s.Wait() })
	_, js := fleettest.Connect(t, s.NATS)
	keys, err := tenancy.Open(context.Background(), js)
	if err != nil {
		t.Fatal(err)
	}
	return &secureBundle{api: s.APIURL, js: js, keys: keys, hooks: newHookReceiver(t), logs: logs}
}

func (b *secureBundle) key(t *testing.T, tenant string, role tenancy.Role) string {
	t.Helper()
	k, _, err := b.keys.CreateKey(context.Background(), tenant, role, t.Name())
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// call sends a request with key (none if empty) and returns the status and body.
func call(t *testing.T, method, url, key string, body any) (int, http.Header, []byte) {
	t.Helper()
	var r *bytes.Reader
	if body != nil {
		b, _ := json.Marshal(body)
		r = bytes.NewReader(b)
	} else {
		r = bytes.NewReader(nil)
	}
	req, _ := http.NewRequest(method, url, r)
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var buf bytes.Buffer
	buf.ReadFrom(resp.Body)
	return resp.StatusCode, resp.Header, buf.Bytes()
}

func TestKeysRolesAndTenantIsolation(t *testing.T) {
	t.Parallel()
	b := startSecureStack(t, 100)
	aSubmit, aRead, bSubmit := b.key(t, "studio-a", tenancy.RoleSubmit), b.key(t, "studio-a", tenancy.RoleRead), b.key(t, "studio-b", tenancy.RoleSubmit)
	job := map[string]any{"callback_url": b.hooks.URL, "scenes": []any{map[string]any{"workflow": "demo"}}}

	if st, h, _ := call(t, "POST", b.api+"/v1/jobs", "", job); st != http.StatusUnauthorized || h.Get("WWW-Authenticate") == "" {
		t.Errorf("no key: %d, want 401 with WWW-Authenticate", st)
	}
	if st, _, _ := call(t, "POST", b.api+"/v1/jobs", "cf_not-a-key", job); st != http.StatusUnauthorized {
		t.Errorf("unknown key: %d, want 401", st)
	}
	if st, _, _ := call(t, "POST", b.api+"/v1/jobs", aRead, job); st != http.StatusForbidden {
		t.Errorf("read key submitting: %d, want 403", st)
	}
	if st, _, _ := call(t, "POST", b.api+"/v1/jobs/any/cancel", aRead, nil); st != http.StatusForbidden {
		t.Errorf("read key cancelling: %d, want 403", st)
	}
	// Admin operations need an admin key; new routes get no free pass.
	if st, _, _ := call(t, "PUT", b.api+"/v1/workflows/mine", aSubmit, map[string]any{"name": "mine"}); st != http.StatusForbidden {
		t.Errorf("PUT a workflow with a submit key: %d, want 403", st)
	}
	for _, path := range []string{"/v1/workflows", "/v1/workflows/txt2img", "/api/nodes", "/v1/deadletters", "/v1/nodes"} {
		if st, _, _ := call(t, "GET", b.api+path, "", nil); st != http.StatusUnauthorized {
			t.Errorf("GET %s without a key: %d, want 401", path, st)
		}
	}
	if st, _, _ := call(t, "POST", b.api+"/api/comfyui/dispatch", aRead, map[string]any{"type": "image", "prompt": "x"}); st != http.StatusForbidden {
		t.Errorf("compat dispatch with a read key: %d, want 403", st)
	}
	for _, path := range []string{"/healthz", "/readyz", "/openapi.json", "/docs"} {
		if st, _, _ := call(t, "GET", b.api+path, "", nil); st != http.StatusOK {
			t.Errorf("GET %s without a key: %d, want 200", path, st)
		}
	}

	st, _, raw := call(t, "POST", b.api+"/v1/jobs", aSubmit, job)
	if st != http.StatusAccepted {
		t.Fatalf("submit: %d %s", st, raw)
	}
	var created struct{ ID string }
	json.Unmarshal(raw, &created)
	hook := b.hooks.wait(t, created.ID, 60*time.Second)
	out := hook.Body.Job.Scenes[0].Outputs[0].URL

	for _, k := range []string{aSubmit, aRead} {
		if st, _, _ := call(t, "GET", b.api+"/v1/jobs/"+created.ID, k, nil); st != http.StatusOK {
			t.Errorf("own tenant GET job: %d", st)
		}
		if st, _, _ := call(t, "GET", out, k, nil); st != http.StatusOK {
			t.Errorf("own tenant GET output: %d", st)
		}
	}
	for name, req := range map[string][2]string{
		"job":    {"GET", b.api + "/v1/jobs/" + created.ID},
		"output": {"GET", out},
		"retry":  {"POST", b.api + "/v1/jobs/" + created.ID + "/scenes/0/retry"},
		"cancel": {"POST", b.api + "/v1/jobs/" + created.ID + "/cancel"},
		"events": {"GET", b.api + "/v1/jobs/" + created.ID + "/events"},
	} {
		if st, _, _ := call(t, req[0], req[1], bSubmit, nil); st != http.StatusNotFound {
			t.Errorf("another tenant's %s: %d, want 404", name, st)
		}
	}
	// The same Idempotency-Key in two tenants names two jobs.
	if aKey, bKey := idemJob(t, b.api, aSubmit, job), idemJob(t, b.api, bSubmit, job); aKey == bKey {
		t.Errorf("tenants share a job through one Idempotency-Key: %s", aKey)
	}
}

func idemJob(t *testing.T, api, key string, body any) string {
	t.Helper()
	b, _ := json.Marshal(body)
	req, _ := http.NewRequest("POST", api+"/v1/jobs", bytes.NewReader(b))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+key)
	req.Header.Set("Idempotency-Key", "shared-key")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var job struct{ ID string }
	json.NewDecoder(resp.Body).Decode(&job)
	return job.ID
}

func TestWebhooksAreSignedAndSecretsNeverLogged(t *testing.T) {
	t.Parallel()
	b := startSecureStack(t, 100)
	key := b.key(t, "studio-a", tenancy.RoleSubmit)
	st, _, raw := call(t, "POST", b.api+"/v1/jobs", key, map[string]any{"callback_url": b.hooks.URL, "scenes": []any{map[string]any{"workflow": "demo"}}})
	if st != http.StatusAccepted {
		t.Fatalf("submit: %d %s", st, raw)
	}
	var created struct{ ID string }
	json.Unmarshal(raw, &created)
	hook := b.hooks.wait(t, created.ID, 60*time.Second)

	ts, err := strconv.ParseInt(hook.Timestamp, 10, 64)
	if err != nil || time.Since(time.Unix(ts, 0)) > time.Minute {
		t.Fatalf("webhook-timestamp %q", hook.Timestamp)
	}
	mine, _ := b.keys.Tenant(context.Background(), "studio-a")
	other, _ := b.keys.Tenant(context.Background(), "studio-b")
	want, _ := tenancy.Sign(mine.WebhookSecret, hook.ID, time.Unix(ts, 0), hook.Raw)
	if hook.Signature != want {
		t.Errorf("webhook-signature %q does not verify with the tenant's secret (want %q)", hook.Signature, want)
	}
	if wrong, _ := tenancy.Sign(other.WebhookSecret, hook.ID, time.Unix(ts, 0), hook.Raw); wrong == hook.Signature {
		t.Error("another tenant's secret verifies the webhook too")
	}
	logs := b.logs.String()
	for name, secret := range map[string]string{"API key": key, "webhook secret": mine.WebhookSecret} {
		if strings.Contains(logs, secret) || strings.Contains(logs, strings.TrimPrefix(secret, "whsec_")) {
			t.Errorf("the %s appears in the logs", name)
		}
	}
}

func TestCallbacksToInternalAddressesAreRefused(t *testing.T) {
	t.Parallel()
	b := startSecureStack(t, 100)
	key := b.key(t, "studio-a", tenancy.RoleSubmit)
	for _, u := range []string{"http://10.0.0.7/hook", "http://169.254.169.254/latest/meta-data/", "http://[::ffff:192.168.1.1]/x", "http://0.0.0.0:80/"} {
		st, _, raw := call(t, "POST", b.api+"/v1/jobs", key, map[string]any{"callback_url": u, "scenes": []any{map[string]any{"workflow": "demo"}}})
		if st != http.StatusUnprocessableEntity || !bytes.Contains(raw, []byte("body.callback_url")) {
			t.Errorf("callback %s: %d %s; want 422 naming body.callback_url", u, st, raw)
		}
	}
}

func TestRateLimitPerKey(t *testing.T) {
	t.Parallel()
	b := startSecureStack(t, 0.5)
	hot, cold := b.key(t, "studio-a", tenancy.RoleRead), b.key(t, "studio-a", tenancy.RoleRead)
	limited := false
	for range 5 {
		st, h, _ := call(t, "GET", b.api+"/v1/nodes", hot, nil)
		if st == http.StatusTooManyRequests {
			limited = h.Get("Retry-After") != ""
			break
		}
	}
	if !limited {
		t.Fatal("five quick requests on a key allowed 0.5 a second (burst 2) were never refused with 429 and Retry-After")
	}
	if st, _, _ := call(t, "GET", b.api+"/v1/nodes", cold, nil); st != http.StatusOK {
		t.Errorf("another key: %d, want 200", st)
	}
}
