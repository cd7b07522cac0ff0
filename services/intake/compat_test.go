package intake_test

import (
	"context"
	"encoding/json"
	"math"
	"net/http"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

func TestDispatchCreatesAOneSceneJob(t *testing.T) {
	t.Parallel()
	natsURL, _ := fleetFor(t)
	base := startIntake(t, natsURL, intake.Config{Templates: shipped})
	for typ, workflow := range map[string]string{"image": "txt2img", "video": "txt2video"} {
		var got struct {
			JobID  string  `json:"job_id"`
			Node   *string `json:"node"`
			Status string  `json:"status"`
		}
		body := map[string]any{"type": typ, "prompt": "a lighthouse in a storm", "priority": 9, "style": "ignored"}
		if code := fleettest.Call(t, http.MethodPost, base+"/api/comfyui/dispatch", body, &got); code != http.StatusAccepted {
			t.Fatalf("dispatch %s: %d", typ, code)
		}
		if got.JobID == "" || got.Node == nil || *got.Node != "" || got.Status != "queued" {
			t.Errorf("dispatch %s answered %+v; want a job id, an empty node and queued", typ, got)
		}
		var job struct {
			Priority int `json:"priority"`
			Scenes   []struct {
				Workflow string `json:"workflow"`
			} `json:"scenes"`
		}
		if code := fleettest.Call(t, http.MethodGet, base+"/v1/jobs/"+got.JobID, nil, &job); code != http.StatusOK {
			t.Fatalf("GET the dispatched job: %d", code)
		}
		if job.Priority != 9 || len(job.Scenes) != 1 || job.Scenes[0].Workflow != workflow {
			t.Errorf("dispatch %s made %+v; want one %s scene at priority 9", typ, job, workflow)
		}
	}
	for name, tc := range map[string]struct {
		body     map[string]any
		location string
	}{
		"unknown type":    {map[string]any{"type": "audio", "prompt": "x"}, "body.type"},
		"no prompt":       {map[string]any{"type": "image"}, "body"},
		"empty prompt":    {map[string]any{"type": "image", "prompt": ""}, "body.prompt"},
		"priority 11":     {map[string]any{"type": "image", "prompt": "x", "priority": 11}, "body.priority"},
		"prompt too long": {map[string]any{"type": "image", "prompt": string(make([]byte, 8001))}, "body.prompt"},
	} {
		var p fleettest.Problem
		if code := fleettest.Call(t, http.MethodPost, base+"/api/comfyui/dispatch", tc.body, &p); code != http.StatusUnprocessableEntity || !p.At(tc.location) {
			t.Errorf("%s: %d %+v, want 422 at %s", name, code, p.Errors, tc.location)
		}
	}
}

func TestCompatNodesAndHealth(t *testing.T) {
	t.Parallel()
	natsURL, js := fleetFor(t)
	base := startIntake(t, natsURL, intake.Config{})
	ctx := context.Background()
	put := func(bucket, key string, v any) {
		kv, err := js.KeyValue(ctx, bucket)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := json.Marshal(v)
		if _, err := kv.Put(ctx, key, b); err != nil {
			t.Fatal(err)
		}
	}
	seen := time.Date(2026, 11, 23, 10, 0, 0, 0, time.UTC)
	put(fleet.BucketRegistry, "a100", fleet.NodeConfig{ID: "a100", URL: "http://10.0.0.5:8188", Pools: []string{"image"}, Weight: 4})
	put(fleet.BucketRegistry, "rtx3060", fleet.NodeConfig{ID: "rtx3060", URL: "http://10.0.0.6:8188", Pools: []string{"image"}, Weight: 1})
	put(fleet.BucketNodes, "a100", fleet.NodeStatus{ID: "a100", State: fleet.NodeBusy, Scene: "j.0", QueueRemaining: 2,
		VRAMTotal: 80 << 30, VRAMFree: 20 << 30, SecondsPerScene: 1.5, Heartbeat: seen})

	var list struct {
		Nodes []struct {
			ID            string     `json:"id"`
			URL           string     `json:"url"`
			Status        string     `json:"status"`
			QueueLength   int        `json:"queue_length"`
			LastHeartbeat *time.Time `json:"last_heartbeat"`
		} `json:"nodes"`
	}
	if code := fleettest.Call(t, http.MethodGet, base+"/api/nodes", nil, &list); code != http.StatusOK || len(list.Nodes) != 2 {
		t.Fatalf("GET /api/nodes: %d %+v", code, list)
	}
	a, r := list.Nodes[0], list.Nodes[1]
	if a.ID != "a100" || a.URL != "http://10.0.0.5:8188" || a.Status != "busy" || a.QueueLength != 2 || a.LastHeartbeat == nil || !a.LastHeartbeat.Equal(seen) {
		t.Errorf("a100 listed as %+v", a)
	}
	if r.ID != "rtx3060" || r.Status != "offline" || r.LastHeartbeat != nil {
		t.Errorf("rtx3060 (never seen) listed as %+v; want offline with a null heartbeat", r)
	}

	var h struct {
		Status          string  `json:"status"`
		GPUUsage        float64 `json:"gpu_usage"`
		MemoryUsage     float64 `json:"memory_usage"`
		QueueLength     int     `json:"queue_length"`
		ProcessingSpeed float64 `json:"processing_speed"`
	}
	if code := fleettest.Call(t, http.MethodGet, base+"/api/nodes/a100/health", nil, &h); code != http.StatusOK {
		t.Fatalf("GET a100 health: %d", code)
	}
	if h.Status != "busy" || h.GPUUsage != 1 || math.Abs(h.MemoryUsage-0.75) > 1e-9 || h.QueueLength != 2 || h.ProcessingSpeed != 1.5 {
		t.Errorf("a100 health %+v; want busy, gpu 1, memory 0.75, queue 2, 1.5 s per image", h)
	}
	if code := fleettest.Call(t, http.MethodGet, base+"/api/nodes/rtx3060/health", nil, &h); code != http.StatusOK || h.Status != "offline" || h.GPUUsage != 0 || h.MemoryUsage != 0 {
		t.Errorf("rtx3060 health: %d %+v; want offline and idle", code, h)
	}
	var p fleettest.Problem
	if code := fleettest.Call(t, http.MethodGet, base+"/api/nodes/nope/health", nil, &p); code != http.StatusNotFound || p.Status != http.StatusNotFound {
		t.Errorf("unknown node health: %d %+v; want 404 problem JSON", code, p)
	}
}
