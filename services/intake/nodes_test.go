package intake_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

// nodeView is a node as GET /v1/nodes/{id} shows it.
type nodeView struct {
	ID         string            `json:"id"`
	URL        string            `json:"url"`
	Pools      []string          `json:"pools"`
	Weight     float64           `json:"weight"`
	Labels     map[string]string `json:"labels"`
	Region     string            `json:"region"`
	Executor   string            `json:"executor"`
	Drained    bool              `json:"drained"`
	Registered bool              `json:"registered"`
	Health     struct {
		Status          string             `json:"status"`
		Holding         int                `json:"holding"`
		QueueRemaining  int                `json:"queue_remaining"`
		Scene           string             `json:"scene"`
		VRAMTotal       int64              `json:"vram_total"`
		VRAMFree        int64              `json:"vram_free"`
		Device          string             `json:"device"`
		ScenesDone      int                `json:"scenes_done"`
		SecondsPerScene float64            `json:"seconds_per_scene"`
		SecondsPerStep  float64            `json:"seconds_per_step"`
		Workflows       map[string]float64 `json:"workflows"`
		Model           string             `json:"model"`
		SetupSeconds    float64            `json:"setup_seconds"`
		LastHeartbeat   *time.Time         `json:"last_heartbeat"`
		Error           string             `json:"error"`
	} `json:"health"`
}

// nodeFleet is an open intake with direct access to the node buckets.
type nodeFleet struct {
	base     string
	registry jetstream.KeyValue
	nodes    jetstream.KeyValue
}

func startNodeFleet(t *testing.T) nodeFleet {
	t.Helper()
	natsURL, js := fleetFor(t)
	return nodeFleet{base: startIntake(t, natsURL, intake.Config{}), registry: bucket(t, js, fleet.BucketRegistry), nodes: bucket(t, js, fleet.BucketNodes)}
}

func bucket(t *testing.T, js jetstream.JetStream, name string) jetstream.KeyValue {
	t.Helper()
	kv, err := js.KeyValue(context.Background(), name)
	if err != nil {
		t.Fatal(err)
	}
	return kv
}

// putJSON stores v under key, as an executor's heartbeat or registration would.
func putJSON(t *testing.T, kv jetstream.KeyValue, key string, v any) {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(context.Background(), key, b); err != nil {
		t.Fatal(err)
	}
}

// config reads the registry entry of id.
func config(t *testing.T, kv jetstream.KeyValue, id string) fleet.NodeConfig {
	t.Helper()
	e, err := kv.Get(context.Background(), id)
	if err != nil {
		t.Fatalf("registry entry %s: %v", id, err)
	}
	var cfg fleet.NodeConfig
	if err := json.Unmarshal(e.Value(), &cfg); err != nil {
		t.Fatal(err)
	}
	return cfg
}

func TestPutNodeCreatesThenReplacesKeepingDrainedAndExecutor(t *testing.T) {
	t.Parallel()
	f := startNodeFleet(t)
	var n nodeView
	body := map[string]any{"url": "http://10.0.0.5:8188/", "region": "eu-west", "labels": map[string]string{"rack": "r7", "gpu": "a100"}}
	if code := fleettest.Call(t, http.MethodPut, f.base+"/v1/nodes/a100", body, &n); code != http.StatusCreated {
		t.Fatalf("PUT a new node: %d %+v", code, n)
	}
	if n.ID != "a100" || n.URL != "http://10.0.0.5:8188" || strings.Join(n.Pools, ",") != "image" || n.Weight != 1 ||
		n.Labels["rack"] != "r7" || n.Labels["gpu"] != "a100" || n.Region != "eu-west" || n.Drained || !n.Registered || n.Executor != "" {
		t.Errorf("created %+v; want the URL without its trailing slash, pool image, weight 1, the labels and region, not drained", n)
	}
	if n.Health.Status != "offline" || n.Health.LastHeartbeat != nil {
		t.Errorf("a node never seen has health %+v; want offline without a heartbeat", n.Health)
	}
	if cfg := config(t, f.registry, "a100"); cfg.ID != "a100" || cfg.URL != "http://10.0.0.5:8188" || cfg.Weight != 1 || len(cfg.Pools) != 1 || cfg.Region != "eu-west" {
		t.Errorf("registry holds %+v", cfg)
	}

	// An executor adopts the node, and an administrator drains it.
	cfg := config(t, f.registry, "a100")
	cfg.Executor = "exec-1"
	putJSON(t, f.registry, "a100", cfg)
	if code := fleettest.Call(t, http.MethodPost, f.base+"/v1/nodes/a100/drain", nil, &n); code != http.StatusOK || !n.Drained {
		t.Fatalf("drain: %d %+v", code, n)
	}

	body = map[string]any{"url": "https://gpu.example.com:8443", "pools": []string{"image", "video"}, "weight": 4}
	n = nodeView{}
	if code := fleettest.Call(t, http.MethodPut, f.base+"/v1/nodes/a100", body, &n); code != http.StatusOK {
		t.Fatalf("PUT replacing the node: %d %+v", code, n)
	}
	if n.URL != "https://gpu.example.com:8443" || strings.Join(n.Pools, ",") != "image,video" || n.Weight != 4 || len(n.Labels) != 0 || n.Region != "" {
		t.Errorf("replaced as %+v; want the new URL, pools and weight, and no labels nor region", n)
	}
	if !n.Drained || n.Executor != "exec-1" {
		t.Errorf("replacing lost drained or the executor: %+v", n)
	}
	if cfg := config(t, f.registry, "a100"); !cfg.Drained || cfg.Executor != "exec-1" || cfg.Weight != 4 {
		t.Errorf("registry holds %+v after the replacement", cfg)
	}
}

// TestConcurrentPutsNeverUndoADrain checks the compare-and-set: a replacement that
// read the entry before a drain must not write it back undrained.
func TestConcurrentPutsNeverUndoADrain(t *testing.T) {
	t.Parallel()
	f := startNodeFleet(t)
	if code := fleettest.Call(t, http.MethodPut, f.base+"/v1/nodes/n1", map[string]any{"url": "http://10.0.0.7:8188"}, nil); code != http.StatusCreated {
		t.Fatalf("PUT: %d", code)
	}
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Go(func() {
			body := map[string]any{"url": "http://10.0.0.7:8188", "weight": i + 1}
			if code := fleettest.Call(t, http.MethodPut, f.base+"/v1/nodes/n1", body, nil); code != http.StatusOK {
				t.Errorf("concurrent PUT: %d", code)
			}
		})
	}
	wg.Go(func() {
		if code := fleettest.Call(t, http.MethodPost, f.base+"/v1/nodes/n1/drain", nil, nil); code != http.StatusOK {
			t.Errorf("concurrent drain: %d", code)
		}
	})
	wg.Wait()
	if cfg := config(t, f.registry, "n1"); !cfg.Drained {
		t.Errorf("a concurrent PUT undid the drain: %+v", cfg)
	}
}

func TestPutNodeNamesTheBadField(t *testing.T) {
	t.Parallel()
	f := startNodeFleet(t)
	labels := map[string]string{}
	for i := range 33 {
		labels[fmt.Sprintf("l%d", i)] = "x"
	}
	for name, tc := range map[string]struct {
		id       string
		body     map[string]any
		location string
	}{
		"no url":            {"n1", map[string]any{"pools": []string{"image"}}, "body"},
		"relative url":      {"n1", map[string]any{"url": "/comfy"}, "body.url"},
		"ftp url":           {"n1", map[string]any{"url": "ftp://10.0.0.5"}, "body.url"},
		"url without host":  {"n1", map[string]any{"url": "http://"}, "body.url"},
		"unparsable url":    {"n1", map[string]any{"url": "http://[::1"}, "body.url"},
		"pool with a space": {"n1", map[string]any{"url": "http://h:8188", "pools": []string{"image", "big gpu"}}, "body.pools[1]"},
		"pool with a dot":   {"n1", map[string]any{"url": "http://h:8188", "pools": []string{"a.b"}}, "body.pools[0]"},
		"no pools":          {"n1", map[string]any{"url": "http://h:8188", "pools": []string{}}, "body.pools"},
		"weight 0":          {"n1", map[string]any{"url": "http://h:8188", "weight": 0}, "body.weight"},
		"negative weight":   {"n1", map[string]any{"url": "http://h:8188", "weight": -1}, "body.weight"},
		"weight 1001":       {"n1", map[string]any{"url": "http://h:8188", "weight": 1001}, "body.weight"},
		"too many labels":   {"n1", map[string]any{"url": "http://h:8188", "labels": labels}, "body.labels"},
		"bad label name":    {"n1", map[string]any{"url": "http://h:8188", "labels": map[string]string{"gpu type": "a100"}}, "body.labels.gpu type"},
		"long label name":   {"n1", map[string]any{"url": "http://h:8188", "labels": map[string]string{strings.Repeat("k", 64): "x"}}, "body.labels." + strings.Repeat("k", 64)},
		"long label value":  {"n1", map[string]any{"url": "http://h:8188", "labels": map[string]string{"note": strings.Repeat("é", 257)}}, "body.labels.note"},
		"region with a dot": {"n1", map[string]any{"url": "http://h:8188", "region": "cn.south"}, "body.region"},
		"bad id":            {"bad.id", map[string]any{"url": "http://h:8188"}, "path.id"},
		"long id":           {strings.Repeat("n", 129), map[string]any{"url": "http://h:8188"}, "path.id"},
	} {
		t.Run(name, func(t *testing.T) {
			var p fleettest.Problem
			if code := fleettest.Call(t, http.MethodPut, f.base+"/v1/nodes/"+tc.id, tc.body, &p); code != http.StatusUnprocessableEntity || p.Status != http.StatusUnprocessableEntity || !p.At(tc.location) {
				t.Errorf("PUT: %d %+v, want 422 problem JSON at %s", code, p.Errors, tc.location)
			}
		})
	}
	ok := map[string]any{"url": "http://h:8188", "labels": map[string]string{strings.Repeat("k", 63): strings.Repeat("é", 256)}}
	if code := fleettest.Call(t, http.MethodPut, f.base+"/v1/nodes/n2", ok, nil); code != http.StatusCreated {
		t.Errorf("PUT with labels at their limits: %d, want 201", code)
	}
	var list struct {
		Nodes []nodeView `json:"nodes"`
	}
	if code := fleettest.Call(t, http.MethodGet, f.base+"/v1/nodes", nil, &list); code != http.StatusOK || len(list.Nodes) != 1 || list.Nodes[0].ID != "n2" {
		t.Errorf("GET /v1/nodes: %d %+v; want only n2, the refused nodes unstored", code, list.Nodes)
	}
}

func TestDeleteNode(t *testing.T) {
	t.Parallel()
	f := startNodeFleet(t)
	if code := fleettest.Call(t, http.MethodPut, f.base+"/v1/nodes/gone", map[string]any{"url": "http://10.0.0.8:8188"}, nil); code != http.StatusCreated {
		t.Fatalf("PUT: %d", code)
	}
	if code := fleettest.Call(t, http.MethodDelete, f.base+"/v1/nodes/gone", nil, nil); code != http.StatusNoContent {
		t.Fatalf("DELETE: %d, want 204", code)
	}
	var p fleettest.Problem
	if code := fleettest.Call(t, http.MethodGet, f.base+"/v1/nodes/gone", nil, &p); code != http.StatusNotFound || p.Status != http.StatusNotFound {
		t.Errorf("GET a removed node: %d %+v, want 404 problem JSON", code, p)
	}
	if _, err := f.registry.Get(context.Background(), "gone"); err == nil {
		t.Error("the registry still holds the removed node")
	}
	for _, path := range []string{"/v1/nodes/gone", "/v1/nodes/never", "/v1/nodes/bad.id"} {
		if code := fleettest.Call(t, http.MethodDelete, f.base+path, nil, &p); code != http.StatusNotFound {
			t.Errorf("DELETE %s: %d, want 404", path, code)
		}
	}
	// A removed node comes back with PUT.
	if code := fleettest.Call(t, http.MethodPut, f.base+"/v1/nodes/gone", map[string]any{"url": "http://10.0.0.8:8188"}, nil); code != http.StatusCreated {
		t.Errorf("PUT a removed node again: %d, want 201", code)
	}
}

func TestDrainAndUndrain(t *testing.T) {
	t.Parallel()
	f := startNodeFleet(t)
	for _, id := range []string{"busy1", "idle1"} {
		if code := fleettest.Call(t, http.MethodPut, f.base+"/v1/nodes/"+id, map[string]any{"url": "http://10.0.0.9:8188"}, nil); code != http.StatusCreated {
			t.Fatalf("PUT %s: %d", id, code)
		}
	}
	now := time.Now().UTC()
	putJSON(t, f.nodes, "busy1", fleet.NodeStatus{ID: "busy1", Executor: "exec-1", State: fleet.NodeBusy, Scene: "j1.0", Holding: 2, Heartbeat: now})

	var n nodeView
	if code := fleettest.Call(t, http.MethodPost, f.base+"/v1/nodes/busy1/drain", nil, &n); code != http.StatusOK {
		t.Fatalf("drain: %d", code)
	}
	if !n.Drained || n.Health.Status != "draining" || n.Health.Holding != 2 {
		t.Errorf("drained node %+v; want drained, status draining, holding 2", n)
	}
	if cfg := config(t, f.registry, "busy1"); !cfg.Drained || cfg.URL != "http://10.0.0.9:8188" {
		t.Errorf("registry holds %+v after the drain", cfg)
	}
	if code := fleettest.Call(t, http.MethodPost, f.base+"/v1/nodes/busy1/drain", nil, &n); code != http.StatusOK || !n.Drained {
		t.Errorf("draining again: %d %+v", code, n)
	}
	// Idle and drained, the node still reports draining.
	putJSON(t, f.nodes, "busy1", fleet.NodeStatus{ID: "busy1", Executor: "exec-1", State: fleet.NodeOnline, Heartbeat: now})
	if code := fleettest.Call(t, http.MethodGet, f.base+"/v1/nodes/busy1", nil, &n); code != http.StatusOK || n.Health.Status != "draining" || n.Health.Holding != 0 {
		t.Errorf("an idle drained node: %d %+v; want status draining, holding 0", code, n.Health)
	}
	if code := fleettest.Call(t, http.MethodPost, f.base+"/v1/nodes/busy1/undrain", nil, &n); code != http.StatusOK || n.Drained || n.Health.Status != "online" {
		t.Errorf("undrain: %d %+v; want not drained, online", code, n)
	}
	if cfg := config(t, f.registry, "busy1"); cfg.Drained {
		t.Errorf("registry holds %+v after the undrain", cfg)
	}

	// A node without a heartbeat is offline, drained or not.
	if code := fleettest.Call(t, http.MethodPost, f.base+"/v1/nodes/idle1/drain", nil, &n); code != http.StatusOK || !n.Drained || n.Health.Status != "offline" {
		t.Errorf("drain a node never seen: %d %+v; want drained and offline", code, n)
	}
	for _, path := range []string{"/v1/nodes/nope/drain", "/v1/nodes/nope/undrain", "/v1/nodes/bad.id/drain"} {
		var p fleettest.Problem
		if code := fleettest.Call(t, http.MethodPost, f.base+path, nil, &p); code != http.StatusNotFound || p.Status != http.StatusNotFound {
			t.Errorf("POST %s: %d, want 404 problem JSON", path, code)
		}
	}
	if _, err := f.registry.Get(context.Background(), "nope"); err == nil {
		t.Error("draining an unknown node registered it")
	}
}

func TestNodeHealthFromHeartbeats(t *testing.T) {
	t.Parallel()
	f := startNodeFleet(t)
	if code := fleettest.Call(t, http.MethodPut, f.base+"/v1/nodes/a100", map[string]any{"url": "http://10.0.0.5:8188", "pools": []string{"image", "video"}, "weight": 4}, nil); code != http.StatusCreated {
		t.Fatalf("PUT a100: %d", code)
	}
	if code := fleettest.Call(t, http.MethodPut, f.base+"/v1/nodes/rtx3060", map[string]any{"url": "http://10.0.0.6:8188"}, nil); code != http.StatusCreated {
		t.Fatalf("PUT rtx3060: %d", code)
	}
	seen := time.Date(2026, 11, 23, 10, 0, 0, 0, time.UTC)
	putJSON(t, f.nodes, "a100", fleet.NodeStatus{
		ID: "a100", URL: "http://10.0.0.5:8188", Pools: []string{"image", "video"}, Executor: "exec-1", State: fleet.NodeBusy,
		Scene: "j1.3", QueueRemaining: 3, Holding: 2, VRAMTotal: 80 << 30, VRAMFree: 20 << 30, Device: "cuda:0 NVIDIA A100",
		ScenesDone: 41, SecondsPerScene: 2.5, SecondsPerStep: 0.08, Workflows: map[string]float64{"txt2img": 2.1, "txt2video": 95},
		Model: "sd_xl_base_1.0.safetensors", SetupSeconds: 0.12, Heartbeat: seen,
	})
	// An executor still reports a node that is not in the registry.
	putJSON(t, f.nodes, "stray", fleet.NodeStatus{ID: "stray", URL: "http://10.0.0.7:8188", Pools: []string{"video"}, Executor: "exec-2", Region: "beijing",
		State: fleet.NodeOffline, Error: "connection refused", Heartbeat: seen})

	var n nodeView
	if code := fleettest.Call(t, http.MethodGet, f.base+"/v1/nodes/a100", nil, &n); code != http.StatusOK {
		t.Fatalf("GET a100: %d", code)
	}
	h := n.Health
	if n.Executor != "exec-1" || !n.Registered || n.Weight != 4 || h.Status != "busy" || h.Holding != 2 || h.QueueRemaining != 3 || h.Scene != "j1.3" ||
		h.VRAMTotal != 80<<30 || h.VRAMFree != 20<<30 || h.Device != "cuda:0 NVIDIA A100" || h.ScenesDone != 41 ||
		h.SecondsPerScene != 2.5 || h.SecondsPerStep != 0.08 || h.Workflows["txt2video"] != 95 || h.Workflows["txt2img"] != 2.1 ||
		h.Model != "sd_xl_base_1.0.safetensors" || h.SetupSeconds != 0.12 || h.LastHeartbeat == nil || !h.LastHeartbeat.Equal(seen) || h.Error != "" {
		t.Errorf("a100 shown as %+v", n)
	}

	var list struct {
		Nodes []nodeView `json:"nodes"`
	}
	if code := fleettest.Call(t, http.MethodGet, f.base+"/v1/nodes", nil, &list); code != http.StatusOK || len(list.Nodes) != 3 {
		t.Fatalf("GET /v1/nodes: %d %+v; want three nodes", code, list.Nodes)
	}
	a, r, s := list.Nodes[0], list.Nodes[1], list.Nodes[2]
	if a.ID != "a100" || a.Health.Status != "busy" || a.Health.ScenesDone != 41 {
		t.Errorf("listed a100 as %+v", a)
	}
	if r.ID != "rtx3060" || r.Health.Status != "offline" || r.Health.LastHeartbeat != nil || !r.Registered {
		t.Errorf("listed rtx3060 (never seen) as %+v; want offline without a heartbeat", r)
	}
	if s.ID != "stray" || s.Registered || s.URL != "http://10.0.0.7:8188" || strings.Join(s.Pools, ",") != "video" || s.Executor != "exec-2" || s.Region != "beijing" ||
		s.Health.Status != "offline" || s.Health.Error != "connection refused" {
		t.Errorf("listed stray (heartbeat only) as %+v; want it unregistered, offline with its error", s)
	}
	if code := fleettest.Call(t, http.MethodGet, f.base+"/v1/nodes/stray", nil, &n); code != http.StatusOK || n.ID != "stray" || n.Registered {
		t.Errorf("GET stray: %d %+v", code, n)
	}
	var p fleettest.Problem
	if code := fleettest.Call(t, http.MethodGet, f.base+"/v1/nodes/nope", nil, &p); code != http.StatusNotFound {
		t.Errorf("GET an unknown node: %d, want 404", code)
	}

	// The seed-compatible view of a drained node knows no draining.
	if code := fleettest.Call(t, http.MethodPost, f.base+"/v1/nodes/a100/drain", nil, &n); code != http.StatusOK || n.Health.Status != "draining" {
		t.Fatalf("drain a100: %d %+v", code, n.Health)
	}
	var compat struct {
		Status string `json:"status"`
	}
	if code := fleettest.Call(t, http.MethodGet, f.base+"/api/nodes/a100/health", nil, &compat); code != http.StatusOK || compat.Status != "busy" {
		t.Errorf("compat health of a drained node holding scenes: %d %q, want busy", code, compat.Status)
	}
}

func TestNodeAdministrationNeedsAnAdminKey(t *testing.T) {
	t.Parallel()
	natsURL, js := fleetFor(t)
	base := serveIntake(t, natsURL, intake.Config{})
	keys, err := tenancy.Open(context.Background(), js)
	if err != nil {
		t.Fatal(err)
	}
	key := func(role tenancy.Role) string {
		plain, _, err := keys.CreateKey(context.Background(), "studio", role, string(role))
		if err != nil {
			t.Fatal(err)
		}
		return plain
	}
	read, submit, admin := key(tenancy.RoleRead), key(tenancy.RoleSubmit), key(tenancy.RoleAdmin)
	node := map[string]any{"url": "http://10.0.0.5:8188"}

	if code := fleettest.Call(t, http.MethodPut, base+"/v1/nodes/a100", node, nil, fleettest.Key(admin)); code != http.StatusCreated {
		t.Fatalf("PUT with an admin key: %d, want 201", code)
	}
	for _, k := range []struct{ name, key string }{{"submit", submit}, {"read", read}} {
		for _, req := range []struct {
			method, path string
			body         any
		}{
			{http.MethodPut, "/v1/nodes/a100", node},
			{http.MethodPut, "/v1/nodes/new1", node},
			{http.MethodDelete, "/v1/nodes/a100", nil},
			{http.MethodPost, "/v1/nodes/a100/drain", nil},
			{http.MethodPost, "/v1/nodes/a100/undrain", nil},
		} {
			var p fleettest.Problem
			if code := fleettest.Call(t, req.method, base+req.path, req.body, &p, fleettest.Key(k.key)); code != http.StatusForbidden || p.Status != http.StatusForbidden {
				t.Errorf("%s %s with a %s key: %d, want 403 problem JSON", req.method, req.path, k.name, code)
			}
		}
	}
	for _, path := range []string{"/v1/nodes", "/v1/nodes/a100"} {
		if code := fleettest.Call(t, http.MethodGet, base+path, nil, nil, fleettest.Key(read)); code != http.StatusOK {
			t.Errorf("GET %s with a read key: %d, want 200", path, code)
		}
		if code := fleettest.Call(t, http.MethodGet, base+path, nil, nil); code != http.StatusUnauthorized {
			t.Errorf("GET %s without a key: %d, want 401", path, code)
		}
	}
	var n nodeView
	if code := fleettest.Call(t, http.MethodGet, base+"/v1/nodes/a100", nil, &n, fleettest.Key(read)); n.Drained {
		t.Errorf("a refused drain took effect: %d %+v", code, n)
	}
	if code := fleettest.Call(t, http.MethodPost, base+"/v1/nodes/a100/drain", nil, nil, fleettest.Key(admin)); code != http.StatusOK {
		t.Errorf("drain with an admin key: %d", code)
	}
	if code := fleettest.Call(t, http.MethodDelete, base+"/v1/nodes/a100", nil, nil, fleettest.Key(admin)); code != http.StatusNoContent {
		t.Errorf("DELETE with an admin key: %d", code)
	}
}
