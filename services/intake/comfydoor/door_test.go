package comfydoor

import (
	"encoding/json"
	"testing"

	"github.com/danielgtaylor/huma/v2"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
)

func TestUniteOffersEveryClassAndEveryModelFileOfTheNodes(t *testing.T) {
	t.Parallel()
	sdxl := []byte(`{"CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["sd_xl_base_1.0.safetensors", "v1-5.safetensors"], {"tooltip": "x"}]}}, "output": ["MODEL"], "output_node": false},
		"SaveImage": {"input": {"required": {"images": ["IMAGE", {}]}}, "output": [], "output_node": true},
		"LoadImage": {"input": {"required": {"image": [["a.png"], {"image_upload": true}]}}, "output": ["IMAGE", "MASK"], "output_node": false},
		"VHS_VideoCombine": {"input": {"required": {"format": ["COMBO", {"options": ["image/gif"], "default": "image/gif"}]}}, "output": [], "output_node": true}}`)
	video := []byte(`{"VHS_VideoCombine": {"input": {"required": {"format": ["COMBO", {"options": ["video/h264-mp4"]}]}}, "output": [], "output_node": true},
		"CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["svd.safetensors", "v1-5.safetensors"], {"tooltip": "x"}]}}, "output": ["MODEL"], "output_node": false},
		"LoadImage": {"input": {"required": {"image": [["b.png"], {"image_upload": true}]}}, "output": ["IMAGE", "MASK"], "output_node": false},
		"ModelSink": {"input": {"required": {"model": ["MODEL", {}]}}, "output": [], "output_node": true}}`)
	fi, err := unite([][]byte{sdxl, video})
	if err != nil {
		t.Fatal(err)
	}
	classes, err := pyjson.ParseObject(fi.body)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, c := range classes {
		names = append(names, c.Key)
	}
	if want := []string{"CheckpointLoaderSimple", "SaveImage", "LoadImage", "VHS_VideoCombine", "ModelSink"}; !equal(names, want) {
		t.Errorf("classes %v, want %v", names, want)
	}
	want := `{"CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["sd_xl_base_1.0.safetensors", "svd.safetensors", "v1-5.safetensors"], {"tooltip": "x"}]}}, "output": ["MODEL"], "output_node": false}}`
	if got := `{"CheckpointLoaderSimple": ` + string(fi.classes["CheckpointLoaderSimple"]) + `}`; got != want {
		t.Errorf("joined checkpoints:\n got %s\nwant %s", got, want)
	}
	want = `{"VHS_VideoCombine": {"input": {"required": {"format": ["COMBO", {"options": ["image/gif", "video/h264-mp4"], "default": "image/gif"}]}}, "output": [], "output_node": true}}`
	if got := `{"VHS_VideoCombine": ` + string(fi.classes["VHS_VideoCombine"]) + `}`; got != want {
		t.Errorf("joined options of the newer combo form:\n got %s\nwant %s", got, want)
	}
	if formatted, _ := pyjson.Format(fi.body); string(formatted) != string(fi.body) {
		t.Error("the body is not written as json.dumps writes it")
	}
	if !fi.inputFiles["a.png"] || !fi.inputFiles["b.png"] {
		t.Errorf("input files %v, want both nodes'", fi.inputFiles)
	}
	graph := func(ckpt string) json.RawMessage {
		return json.RawMessage(`{"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "` + ckpt + `"}}, "2": {"class_type": "ModelSink", "inputs": {"model": ["1", 0]}}}`)
	}
	for ckpt, ok := range map[string]bool{"svd.safetensors": true, "sd_xl_base_1.0.safetensors": true, "nope.safetensors": false} {
		v, err := fi.validator.Validate(graph(ckpt), func(string) bool { return false })
		if err != nil || v.OK != ok {
			t.Errorf("checkpoint %s: ok %v (%s), want %v", ckpt, v.OK, v.NodeErrors, ok)
		}
	}

	empty, err := unite(nil)
	if err != nil || string(empty.body) != "{}" || empty.validator != nil {
		t.Errorf("no answers: %s, validator %v, %v", empty.body, empty.validator, err)
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestRejectionNamesTheNodeAndInputTheFleetCannotRun(t *testing.T) {
	t.Parallel()
	g := fleet.Graph{
		"4":   map[string]any{"class_type": "CheckpointLoaderSimple", "inputs": map[string]any{"ckpt_name": "x.safetensors"}},
		"4.1": map[string]any{"class_type": "NoSuchNode", "inputs": map[string]any{}},
		"9":   map[string]any{"class_type": "SaveImage", "inputs": map[string]any{}},
	}
	got, err := pyjson.Marshal(rejection([]*huma.ErrorDetail{
		{Location: "body.scenes[0].graph.4.inputs.ckpt_name", Message: "no node in pool image has checkpoint x.safetensors"},
		{Location: "body.scenes[0].graph.4.1.class_type", Message: "no node in pool image has node class NoSuchNode"},
	}, g, []string{"9"}))
	if err != nil {
		t.Fatal(err)
	}
	want := `{"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}}, "node_errors": {` +
		`"4": {"errors": [{"type": "custom_validation_failed", "message": "Custom validation failed for node", "details": "ckpt_name - no node in pool image has checkpoint x.safetensors", "extra_info": {"input_name": "ckpt_name"}}], "dependent_outputs": ["9"], "class_type": "CheckpointLoaderSimple"}, ` +
		`"4.1": {"errors": [{"type": "custom_validation_failed", "message": "Custom validation failed for node", "details": "no node in pool image has node class NoSuchNode", "extra_info": {}}], "dependent_outputs": ["9"], "class_type": "NoSuchNode"}}}`
	if string(got) != want {
		t.Errorf("\n got %s\nwant %s", got, want)
	}

	got, _ = pyjson.Marshal(rejection([]*huma.ErrorDetail{{Location: "body.scenes[0].pool", Message: "no node serves pool image"}}, g, nil))
	if want := `{"error": {"type": "invalid_prompt", "message": "no node serves pool image", "details": "scenes[0].pool", "extra_info": {}}, "node_errors": {}}`; string(got) != want {
		t.Errorf("\n got %s\nwant %s", got, want)
	}
}

func TestUploadOfResolvesFileNamesAsComfyUI(t *testing.T) {
	t.Parallel()
	for name, want := range map[string]string{
		"a.png":             "comfy/t/a.png",
		"a.png [input]":     "comfy/t/a.png",
		"sub/dir/a.png":     "comfy/t/sub/dir/a.png",
		"../a.png":          "",
		"sub/../../a.png":   "",
		"/etc/passwd":       "",
		"":                  "",
		"sub//a.png":        "",
		"a (1).png [input]": "comfy/t/a (1).png",
	} {
		got, ok := uploadOf("t", name)
		if got != want || ok != (want != "") {
			t.Errorf("uploadOf(%q) = %q, %v; want %q", name, got, ok, want)
		}
	}
}

func TestPoolOfAGraph(t *testing.T) {
	t.Parallel()
	for class, want := range map[string]string{
		"SaveImage": "image", "VHS_VideoCombine": "video", "SaveAnimatedWEBP": "video",
		"SVD_img2vid_Conditioning": "video", "SaveWEBM": "video", "KSampler": "image",
	} {
		if got := poolOf(fleet.Graph{"1": map[string]any{"class_type": class}}); got != want {
			t.Errorf("a graph with %s runs in %s, want %s", class, got, want)
		}
	}
}

func TestExtraDataAsComfyUIKeepsIt(t *testing.T) {
	t.Parallel()
	for body, want := range map[string]string{
		`{"prompt": {}, "client_id": "c1", "extra_data": {"note": "anything"}}`:                                   `{"note": "anything", "client_id": "c1"}`,
		`{"prompt": {}, "client_id": "c1", "extra_data": {"client_id": "old", "api_key_comfy_org": "k", "x": 1}}`: `{"client_id": "c1", "x": 1}`,
		`{"prompt": {}, "extra_data": {"client_id": "c2"}}`:                                                       `{"client_id": "c2"}`,
		`{"prompt": {}}`: `{}`,
	} {
		req, status, _ := readPromptRequest([]byte(body))
		if status != 0 {
			t.Fatalf("%s: status %d", body, status)
		}
		got, _ := pyjson.Format(extraData(req))
		if string(got) != want {
			t.Errorf("%s: extra_data %s, want %s", body, got, want)
		}
	}
}
