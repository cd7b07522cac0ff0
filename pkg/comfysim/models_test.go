package comfysim_test

import (
	"encoding/json"
	"net/http"
	"slices"
	"strings"
	"testing"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
)

// options returns the option list of input of class in an /object_info answer.
func options(t *testing.T, info map[string]json.RawMessage, class, input string) []string {
	t.Helper()
	var entry struct {
		Input map[string]map[string][]json.RawMessage `json:"input"`
	}
	if err := json.Unmarshal(info[class], &entry); err != nil {
		t.Fatalf("object_info %s: %v", class, err)
	}
	spec, ok := entry.Input["required"][input]
	if !ok || len(spec) == 0 {
		t.Fatalf("object_info %s has no input %s", class, input)
	}
	var list []string
	if err := json.Unmarshal(spec[0], &list); err != nil {
		t.Fatalf("object_info %s.%s: %v", class, input, err)
	}
	return list
}

func objectInfo(t *testing.T, c *client) map[string]json.RawMessage {
	t.Helper()
	var info map[string]json.RawMessage
	if err := json.Unmarshal(c.get("/object_info").body, &info); err != nil {
		t.Fatal(err)
	}
	return info
}

func TestConfiguredModelsAndClasses(t *testing.T) {
	t.Parallel()
	sim := startSim(t, comfysim.Config{
		StepDuration:   -1,
		Models:         map[string][]string{"ckpt_name": {"z.safetensors", "v1-5-pruned-emaonly.safetensors"}, "lora_name": {}},
		WithoutClasses: []string{"VHS_VideoCombine"},
	})
	c := newClient(t, sim.URL())
	info := objectInfo(t, c)
	want := []string{"v1-5-pruned-emaonly.safetensors", "z.safetensors"}
	for _, class := range []string{"CheckpointLoaderSimple", "ImageOnlyCheckpointLoader"} {
		if got := options(t, info, class, "ckpt_name"); !slices.Equal(got, want) {
			t.Errorf("%s.ckpt_name offers %v, want %v", class, got, want)
		}
	}
	if got := options(t, info, "LoraLoader", "lora_name"); len(got) != 0 {
		t.Errorf("LoraLoader.lora_name offers %v, want none", got)
	}
	if got := options(t, info, "VAELoader", "vae_name"); len(got) != 2 {
		t.Errorf("VAELoader.vae_name offers %v, want the table's two VAEs", got)
	}
	if _, ok := info["VHS_VideoCombine"]; ok {
		t.Errorf("/object_info lists VHS_VideoCombine, which the node lacks")
	}
	if got := string(c.get("/object_info/VHS_VideoCombine").body); got != "{}" {
		t.Errorf("/object_info/VHS_VideoCombine = %s, want {}", got)
	}

	sdxl := txt2imgWith("sd_xl_base_1.0.safetensors", 1, 1, "x")
	resp := c.postJSON("/prompt", `{"prompt": `+sdxl+`}`)
	if resp.status != http.StatusBadRequest || !strings.Contains(string(resp.body), "value_not_in_list") {
		t.Fatalf("prompt with a checkpoint the node lacks: %d %s, want 400 value_not_in_list", resp.status, resp.body)
	}
	video := `{"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
		"2": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["1", 0], "frame_rate": 8, "loop_count": 0, "filename_prefix": "v", "format": "image/gif", "pingpong": false, "save_output": true}}}`
	resp = c.postJSON("/prompt", `{"prompt": `+video+`}`)
	if resp.status != http.StatusBadRequest || !strings.Contains(string(resp.body), "Cannot execute because node VHS_VideoCombine does not exist.") {
		t.Fatalf("prompt with a class the node lacks: %d %s, want 400 invalid_prompt", resp.status, resp.body)
	}

	if err := sim.AddModel("ckpt_name", "sd_xl_base_1.0.safetensors"); err != nil {
		t.Fatal(err)
	}
	want = []string{"sd_xl_base_1.0.safetensors", "v1-5-pruned-emaonly.safetensors", "z.safetensors"}
	if got := options(t, objectInfo(t, c), "CheckpointLoaderSimple", "ckpt_name"); !slices.Equal(got, want) {
		t.Errorf("after AddModel ckpt_name offers %v, want %v", got, want)
	}
	if resp := c.postJSON("/prompt", `{"prompt": `+sdxl+`}`); resp.status != http.StatusOK {
		t.Errorf("prompt after AddModel: %d %s, want 200", resp.status, resp.body)
	}
	if err := sim.SetModels("ckpt_name", nil); err != nil {
		t.Fatal(err)
	}
	if got := options(t, objectInfo(t, c), "ImageOnlyCheckpointLoader", "ckpt_name"); len(got) != 0 {
		t.Errorf("after SetModels(nil) ckpt_name offers %v, want none", got)
	}
}

func TestConfigRejectsUnknownModelInputsAndClasses(t *testing.T) {
	t.Parallel()
	for name, cfg := range map[string]comfysim.Config{
		"model input": {Models: map[string][]string{"ckpt": {"a.safetensors"}}},
		"class":       {WithoutClasses: []string{"NoSuchNode"}},
	} {
		if s, err := comfysim.Start(cfg); err == nil {
			s.Close()
			t.Errorf("%s: Start accepted an unknown name", name)
		}
	}
	sim := startSim(t, comfysim.Config{})
	if err := sim.AddModel("ckpt", "a.safetensors"); err == nil {
		t.Errorf("AddModel accepted an unknown input")
	}
}
