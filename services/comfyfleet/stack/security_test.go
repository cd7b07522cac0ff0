package stack_test

import (
	"bytes"
	"context"
	"log/slog"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack/stacktest"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

type secureBundle struct {
	*stacktest.Fleet
	keys *tenancy.Store
	// logs holds every log line of the stack, at every level.
	logs *fleettest.Buffer
}

// startSecureStack runs a fleet that needs API keys, allows each key rate reads and
// rate submissions a second (the defaults for 0), and lets callbacks reach loopback
// (the receivers here) and nothing else internal.
func startSecureStack(t *testing.T, rate float64) *secureBundle {
	t.Helper()
	logs := &fleettest.Buffer{}
	var limit intake.RateLimit
	if rate > 0 {
		limit = intake.RateLimit{PerSecond: rate, Burst: max(2, int(2*rate))}
	}
	f := stacktest.Start(t, stacktest.Nodes(1), func(c *stack.Config) {
		c.Open = false
		c.Intake = intake.Config{SubmitRate: limit, ReadRate: limit}
		c.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	keys, err := tenancy.Open(context.Background(), f.JS)
	if err != nil {
		t.Fatal(err)
	}
	return &secureBundle{Fleet: f, keys: keys, logs: logs}
}

func (b *secureBundle) key(t *testing.T, tenant string, role tenancy.Role) string {
	t.Helper()
	k, _, err := b.keys.CreateKey(context.Background(), tenant, role, t.Name())
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func TestKeysRolesAndTenantIsolation(t *testing.T) {
	t.Parallel()
	b := startSecureStack(t, 100)
	aSubmit, aRead, bSubmit := b.key(t, "studio-a", tenancy.RoleSubmit), b.key(t, "studio-a", tenancy.RoleRead), b.key(t, "studio-b", tenancy.RoleSubmit)
	job := map[string]any{"callback_url": b.Hooks.URL, "scenes": []any{map[string]any{"workflow": "demo"}}}

	if a := fleettest.Do(t, "POST", b.APIURL+"/v1/jobs", job); a.Status != http.StatusUnauthorized || a.Header.Get("WWW-Authenticate") == "" {
		t.Errorf("no key: %d, want 401 with WWW-Authenticate", a.Status)
	}
	if st := fleettest.Do(t, "POST", b.APIURL+"/v1/jobs", job, fleettest.Key("cf_not-a-key")).Status; st != http.StatusUnauthorized {
		t.Errorf("unknown key: %d, want 401", st)
	}
	if st := fleettest.Do(t, "POST", b.APIURL+"/v1/jobs", job, fleettest.Key(aRead)).Status; st != http.StatusForbidden {
		t.Errorf("read key submitting: %d, want 403", st)
	}
	if st := fleettest.Do(t, "POST", b.APIURL+"/v1/jobs/any/cancel", nil, fleettest.Key(aRead)).Status; st != http.StatusForbidden {
		t.Errorf("read key cancelling: %d, want 403", st)
	}
	// Admin operations need an admin key; new routes get no free pass.
	if st := fleettest.Do(t, "PUT", b.APIURL+"/v1/workflows/mine", map[string]any{"name": "mine"}, fleettest.Key(aSubmit)).Status; st != http.StatusForbidden {
		t.Errorf("PUT a workflow with a submit key: %d, want 403", st)
	}
	for _, path := range []string{"/v1/workflows", "/v1/workflows/txt2img", "/api/nodes", "/v1/deadletters", "/v1/nodes"} {
		if st := fleettest.Do(t, "GET", b.APIURL+path, nil).Status; st != http.StatusUnauthorized {
			t.Errorf("GET %s without a key: %d, want 401", path, st)
		}
	}
	if st := fleettest.Do(t, "POST", b.APIURL+"/api/comfyui/dispatch", map[string]any{"type": "image", "prompt": "x"}, fleettest.Key(aRead)).Status; st != http.StatusForbidden {
		t.Errorf("compat dispatch with a read key: %d, want 403", st)
	}
	for _, path := range []string{"/healthz", "/readyz", "/openapi.json", "/docs"} {
		if st := fleettest.Do(t, "GET", b.APIURL+path, nil).Status; st != http.StatusOK {
			t.Errorf("GET %s without a key: %d, want 200", path, st)
		}
	}

	created := fleettest.SubmitJob(t, b.APIURL, job, fleettest.Key(aSubmit))
	hook := b.Hooks.Wait(t, created.ID, 60*time.Second)
	out := hook.Body.Job.Scenes[0].Outputs[0].URL

	for _, k := range []string{aSubmit, aRead} {
		if st := fleettest.Do(t, "GET", b.APIURL+"/v1/jobs/"+created.ID, nil, fleettest.Key(k)).Status; st != http.StatusOK {
			t.Errorf("own tenant GET job: %d", st)
		}
		if st := fleettest.Do(t, "GET", out, nil, fleettest.Key(k)).Status; st != http.StatusOK {
			t.Errorf("own tenant GET output: %d", st)
		}
	}
	for name, req := range map[string][2]string{
		"job":    {"GET", b.APIURL + "/v1/jobs/" + created.ID},
		"output": {"GET", out},
		"retry":  {"POST", b.APIURL + "/v1/jobs/" + created.ID + "/scenes/0/retry"},
		"cancel": {"POST", b.APIURL + "/v1/jobs/" + created.ID + "/cancel"},
		"events": {"GET", b.APIURL + "/v1/jobs/" + created.ID + "/events"},
	} {
		if st := fleettest.Do(t, req[0], req[1], nil, fleettest.Key(bSubmit)).Status; st != http.StatusNotFound {
			t.Errorf("another tenant's %s: %d, want 404", name, st)
		}
	}
	// The same Idempotency-Key in two tenants names two jobs.
	if aKey, bKey := idemJob(t, b.APIURL, aSubmit, job), idemJob(t, b.APIURL, bSubmit, job); aKey == bKey {
		t.Errorf("tenants share a job through one Idempotency-Key: %s", aKey)
	}
}

func idemJob(t *testing.T, api, key string, body any) string {
	t.Helper()
	var job struct{ ID string }
	fleettest.Call(t, "POST", api+"/v1/jobs", body, &job, fleettest.Key(key), fleettest.Header("Idempotency-Key", "shared-key"))
	return job.ID
}

func TestWebhooksAreSignedAndSecretsNeverLogged(t *testing.T) {
	t.Parallel()
	b := startSecureStack(t, 100)
	key := b.key(t, "studio-a", tenancy.RoleSubmit)
	created := fleettest.SubmitJob(t, b.APIURL, map[string]any{"callback_url": b.Hooks.URL, "scenes": []any{map[string]any{"workflow": "demo"}}}, fleettest.Key(key))
	hook := b.Hooks.Wait(t, created.ID, 60*time.Second)

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
		a := fleettest.Do(t, "POST", b.APIURL+"/v1/jobs", map[string]any{"callback_url": u, "scenes": []any{map[string]any{"workflow": "demo"}}}, fleettest.Key(key))
		if a.Status != http.StatusUnprocessableEntity || !bytes.Contains(a.Body, []byte("body.callback_url")) {
			t.Errorf("callback %s: %d %s; want 422 naming body.callback_url", u, a.Status, a.Body)
		}
	}
}

func TestRateLimitPerKey(t *testing.T) {
	t.Parallel()
	b := startSecureStack(t, 0.5)
	hot, cold := b.key(t, "studio-a", tenancy.RoleRead), b.key(t, "studio-a", tenancy.RoleRead)
	limited := false
	for range 5 {
		a := fleettest.Do(t, "GET", b.APIURL+"/v1/nodes", nil, fleettest.Key(hot))
		if a.Status == http.StatusTooManyRequests {
			limited = a.Header.Get("Retry-After") != ""
			break
		}
	}
	if !limited {
		t.Fatal("five quick requests on a key allowed 0.5 a second (burst 2) were never refused with 429 and Retry-After")
	}
	if st := fleettest.Do(t, "GET", b.APIURL+"/v1/nodes", nil, fleettest.Key(cold)).Status; st != http.StatusOK {
		t.Errorf("another key: %d, want 200", st)
	}
}
