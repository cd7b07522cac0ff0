package intake_test

import (
	"context"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/comfy"
	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/inventory"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

// registerNode registers node id in pools, and publishes the inventory of a simulated
// node of cfg as its executor would; a nil cfg publishes none.
func registerNode(t *testing.T, js jetstream.JetStream, id string, pools []string, cfg *comfysim.Config) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	reg, err := fleet.OpenRegistry(ctx, js)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := reg.Change(ctx, id, func(*fleet.NodeConfig) (*fleet.NodeConfig, error) {
		return &fleet.NodeConfig{ID: id, URL: "http://127.0.0.1:1", Pools: pools, Weight: 1}, nil
	}); err != nil {
		t.Fatal(err)
	}
	if cfg == nil {
		return
	}
	sim, err := comfysim.Start(*cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer sim.Close()
	c := comfy.New(sim.URL())
	defer c.Close()
	info, err := c.ObjectInfo(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	inv, err := inventory.FromObjectInfo(info)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(inv)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(ctx, fleet.BucketInventory)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, id, b); err != nil {
		t.Fatal(err)
	}
}

func TestScenesNoNodeCanRunAreRejectedNamingTheField(t *testing.T) {
	t.Parallel()
	natsURL, js := fleetFor(t)
	sd15 := &comfysim.Config{Models: map[string][]string{"ckpt_name": {"v1-5-pruned-emaonly.safetensors"}}}
	sdxl := &comfysim.Config{Models: map[string][]string{"ckpt_name": {"sd_xl_base_1.0.safetensors"}}, WithoutClasses: []string{"VHS_VideoCombine"}}
	registerNode(t, js, "sd15", []string{"image"}, sd15)
	registerNode(t, js, "sdxl", []string{"image"}, sdxl)
	// A pool whose only node has not been read yet accepts anything.
	registerNode(t, js, "unread", []string{"video"}, nil)
	base := startIntake(t, natsURL, intake.Config{Templates: shipped})

	txt2img := func(checkpoint string) map[string]any {
		return map[string]any{"workflow": "txt2img", "params": map[string]any{"checkpoint": checkpoint}}
	}
	combine := map[string]any{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 64, "height": 64, "batch_size": 4, "color": 0}},
		"2": map[string]any{"class_type": "VHS_VideoCombine", "inputs": map[string]any{"images": []any{"1", 0}, "frame_rate": 8,
			"loop_count": 0, "filename_prefix": "clip", "format": "video/h264-mp4", "pingpong": false, "save_output": true}},
	}
	custom := map[string]any{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 64, "height": 64, "batch_size": 1, "color": 0}},
		"7": map[string]any{"class_type": "FancyUpscaler", "inputs": map[string]any{"image": []any{"1", 0}}},
		"9": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"7", 0}, "filename_prefix": "x"}},
	}
	noOutput := map[string]any{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 64, "height": 64, "batch_size": 1, "color": 0}},
		"2": map[string]any{"class_type": "CheckpointLoaderSimple", "inputs": map[string]any{"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
	}
	for _, tc := range []struct {
		name     string
		scene    map[string]any
		location string
		message  string
	}{
		{"a checkpoint no node has", txt2img("x.safetensors"), "body.scenes[0].params.checkpoint",
			"no node in pool image has checkpoint x.safetensors"},
		{"a class no node has", map[string]any{"graph": custom}, "body.scenes[0].graph.7.class_type",
			"no node in pool image has node class FancyUpscaler"},
		{"each need met somewhere, never together", map[string]any{"graph": map[string]any{
			"1": map[string]any{"class_type": "CheckpointLoaderSimple", "inputs": map[string]any{"ckpt_name": "sd_xl_base_1.0.safetensors"}},
			"2": combine["1"], "3": combine["2"]}}, "body.scenes[0].graph.1.inputs.ckpt_name",
			"no node in pool image has checkpoint sd_xl_base_1.0.safetensors together with everything else the graph needs"},
		{"no output node, as the nodes tell", map[string]any{"graph": noOutput}, "body.scenes[0].graph", "Prompt has no outputs"},
	} {
		var p fleettest.Problem
		code := fleettest.Call(t, http.MethodPost, base+"/v1/jobs", map[string]any{"scenes": []any{tc.scene}}, &p)
		if code != http.StatusUnprocessableEntity || !p.At(tc.location) || !strings.Contains(p.Errors[0].Message, tc.message) {
			t.Errorf("%s: %d %+v, want 422 at %s: %s", tc.name, code, p.Errors, tc.location, tc.message)
		}
	}

	for _, tc := range []struct {
		name  string
		scene map[string]any
	}{
		{"a checkpoint one node has", txt2img("sd_xl_base_1.0.safetensors")},
		{"a class one node has", map[string]any{"graph": combine}},
		{"a pool whose node was not read yet", map[string]any{"workflow": "txt2img", "pool": "video", "params": map[string]any{"checkpoint": "x.safetensors"}}},
		{"a pool without nodes", map[string]any{"graph": custom, "pool": "nobody"}},
	} {
		var job struct {
			ID string `json:"id"`
		}
		if code := fleettest.Call(t, http.MethodPost, base+"/v1/jobs", map[string]any{"scenes": []any{tc.scene}}, &job); code != http.StatusAccepted {
			t.Errorf("%s: %d, want 202", tc.name, code)
		}
	}
}

func TestPreferWaitAnswers202WithPreferenceAppliedWhenTheJobRunsOn(t *testing.T) {
	t.Parallel()
	natsURL, _ := fleetFor(t)
	base := startIntake(t, natsURL, intake.Config{Templates: shipped})
	start := time.Now()
	a := fleettest.Do(t, http.MethodPost, base+"/v1/jobs", []byte(`{"scenes": [{"workflow": "demo"}]}`), fleettest.Header("Prefer", "respond-async, wait=1"))
	took := time.Since(start)
	// No executor runs here: the job cannot end.
	if a.Status != http.StatusAccepted || a.Header.Get("Preference-Applied") != "wait=1" || took < time.Second {
		t.Errorf("%v, Preference-Applied %q after %s; want 202, wait=1, after a second", a, a.Header.Get("Preference-Applied"), took)
	}
}
