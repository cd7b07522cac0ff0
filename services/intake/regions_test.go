package intake_test

import (
	"context"
	"net/http"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

// TestJobRegionsAreCheckedAndRecorded submits jobs that require or prefer regions:
// a required region that no registered node of the scene's pool is in is a 422 at the
// field that named it; a scene's region and prefer_region win over the job's, and both are kept in
// the job record, where the dispatcher's router reads them for the scene's ticket.
func TestJobRegionsAreCheckedAndRecorded(t *testing.T) {
	t.Parallel()
	natsURL, js := fleetFor(t)
	base := startIntake(t, natsURL, intake.Config{Templates: shipped})
	demo := func(extra map[string]any) map[string]any {
		s := map[string]any{"workflow": "demo"}
		for k, v := range extra {
			s[k] = v
		}
		return s
	}
	// No node anywhere yet: every required region is unknown.
	var p fleettest.Problem
	body := map[string]any{"region": "shenzhen", "scenes": []any{demo(nil), demo(map[string]any{"region": "beijing"})}}
	if code := fleettest.Call(t, http.MethodPost, base+"/v1/jobs", body, &p); code != http.StatusUnprocessableEntity ||
		!p.At("body.region") || !p.At("body.scenes[1].region") {
		t.Fatalf("POST requiring regions without nodes: %d %+v, want 422 at body.region and body.scenes[1].region", code, p.Errors)
	}

	registry := bucket(t, js, fleet.BucketRegistry)
	putJSON(t, registry, "sz-1", fleet.NodeConfig{ID: "sz-1", URL: "http://10.1.0.5:8188", Pools: []string{"image"}, Weight: 1, Region: "shenzhen"})
	// The intake follows the registry: the node counts once it has seen it.
	fleettest.Eventually(t, 10*time.Second, func() bool {
		p = fleettest.Problem{}
		code := fleettest.Call(t, http.MethodPost, base+"/v1/jobs", body, &p)
		return code == http.StatusUnprocessableEntity && !p.At("body.region") && p.At("body.scenes[1].region") && len(p.Errors) == 1
	}, "POST requiring shenzhen (a node) and beijing (none): %+v, want 422 at body.scenes[1].region only", p.Errors)
	for name, tc := range map[string]struct {
		body     map[string]any
		location string
	}{
		"region with a space":    {map[string]any{"region": "south china", "scenes": []any{demo(nil)}}, "body.region"},
		"prefer with a dot":      {map[string]any{"scenes": []any{demo(map[string]any{"prefer_region": "cn.south"})}}, "body.scenes[0].prefer_region"},
		"region not a string":    {map[string]any{"scenes": []any{demo(map[string]any{"region": 3})}}, "body.scenes[0].region"},
		"prefer region too long": {map[string]any{"prefer_region": string(make([]byte, 65)), "scenes": []any{demo(nil)}}, "body.prefer_region"},
	} {
		t.Run(name, func(t *testing.T) {
			var p fleettest.Problem
			if code := fleettest.Call(t, http.MethodPost, base+"/v1/jobs", tc.body, &p); code != http.StatusUnprocessableEntity || !p.At(tc.location) {
				t.Errorf("POST: %d %+v, want 422 at %s", code, p.Errors, tc.location)
			}
		})
	}

	// A region only preferred needs no node: its scenes run elsewhere.
	body = map[string]any{"region": "shenzhen", "prefer_region": "shanghai", "scenes": []any{
		demo(nil),
		demo(map[string]any{"prefer_region": "beijing"}),
	}}
	var job struct {
		ID     string `json:"id"`
		Scenes []struct {
			Region       string `json:"region"`
			PreferRegion string `json:"prefer_region"`
		} `json:"scenes"`
	}
	if code := fleettest.Call(t, http.MethodPost, base+"/v1/jobs", body, &job); code != http.StatusAccepted {
		t.Fatalf("POST requiring shenzhen: %d", code)
	}
	if len(job.Scenes) != 2 || job.Scenes[0].Region != "shenzhen" || job.Scenes[0].PreferRegion != "shanghai" ||
		job.Scenes[1].Region != "shenzhen" || job.Scenes[1].PreferRegion != "beijing" {
		t.Errorf("the job shows scenes %+v; want region shenzhen on both, prefer_region shanghai, then the scene's beijing", job.Scenes)
	}
	jobs, err := fleet.OpenJobs(context.Background(), js)
	if err != nil {
		t.Fatal(err)
	}
	rec, err := jobs.Record(context.Background(), job.ID)
	if err != nil {
		t.Fatal(err)
	}
	if s := rec.Scenes; s[0].Region != "shenzhen" || s[0].PreferRegion != "shanghai" || s[1].Region != "shenzhen" || s[1].PreferRegion != "beijing" {
		t.Errorf("the job record holds scenes with regions %q/%q and %q/%q", s[0].Region, s[0].PreferRegion, s[1].Region, s[1].PreferRegion)
	}
}
