package intake_test

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"slices"
	"testing"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

func TestSceneInputsAreCheckedFieldByField(t *testing.T) {
	t.Parallel()
	natsURL, _ := fleetFor(t)
	base := startIntake(t, natsURL, intake.Config{Templates: shipped, MaxInputBytes: 4096})
	small := base64.StdEncoding.EncodeToString(pngBytes(t, 8, 8))
	large := base64.StdEncoding.EncodeToString(append(pngBytes(t, 8, 8), make([]byte, 4096)...))
	scene := func(workflow string, params, inputs map[string]any) map[string]any {
		s := map[string]any{"workflow": workflow}
		if params != nil {
			s["params"] = params
		}
		if inputs != nil {
			s["inputs"] = inputs
		}
		return map[string]any{"scenes": []any{map[string]any{"workflow": "demo"}, s}}
	}
	b64 := func(s string) map[string]any { return map[string]any{"base64": s} }
	for name, tc := range map[string]struct {
		body     map[string]any
		location string
	}{
		"image missing":          {scene("img2img", nil, nil), "body.scenes[1].inputs.image"},
		"unknown input":          {scene("img2img", nil, map[string]any{"image": b64(small), "mask": b64(small)}), "body.scenes[1].inputs.mask"},
		"input for a string":     {scene("img2img", nil, map[string]any{"image": b64(small), "prompt": b64(small)}), "body.scenes[1].inputs.prompt"},
		"in params and inputs":   {scene("img2img", map[string]any{"image": "a.png"}, map[string]any{"image": b64(small)}), "body.scenes[1].inputs.image"},
		"base64 and url":         {scene("img2img", nil, map[string]any{"image": map[string]any{"base64": small, "url": "https://example.com/a.png"}}), "body.scenes[1].inputs.image"},
		"neither base64 nor url": {scene("img2img", nil, map[string]any{"image": map[string]any{}}), "body.scenes[1].inputs.image"},
		"not base64":             {scene("img2img", nil, map[string]any{"image": b64("not base64!")}), "body.scenes[1].inputs.image.base64"},
		"not an image":           {scene("img2img", nil, map[string]any{"image": b64(base64.StdEncoding.EncodeToString([]byte("GIF89a, or text")))}), "body.scenes[1].inputs.image.base64"},
		"too large":              {scene("img2video", nil, map[string]any{"image": b64(large)}), "body.scenes[1].inputs.image.base64"},
		"url not http":           {scene("img2img", nil, map[string]any{"image": map[string]any{"url": "file:///etc/passwd"}}), "body.scenes[1].inputs.image.url"},
		"url to cloud metadata":  {scene("img2img", nil, map[string]any{"image": map[string]any{"url": "http://169.254.169.254/latest/meta-data/a.png"}}), "body.scenes[1].inputs.image.url"},
		"url with credentials":   {scene("img2img", nil, map[string]any{"image": map[string]any{"url": "https://u:p@example.com/a.png"}}), "body.scenes[1].inputs.image.url"},
		"unknown field":          {scene("img2img", nil, map[string]any{"image": map[string]any{"path": "/a.png"}}), "body.scenes[1].inputs.image.path"},
		"inputs with a graph": {map[string]any{"scenes": []any{map[string]any{"inputs": map[string]any{"image": b64(small)}, "graph": map[string]any{
			"1": map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": "a.png"}},
			"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "x"}},
		}}}}, "body.scenes[0].inputs"},
		"image param not a name": {scene("img2img", map[string]any{"image": 3}, nil), "body.scenes[1].params.image"},
		"unknown parameter":      {scene("img2img", map[string]any{"colour": 1}, map[string]any{"image": b64(small)}), "body.scenes[1].params.colour"},
		"denoise out of range":   {scene("img2img", map[string]any{"denoise": 1.5}, map[string]any{"image": b64(small)}), "body.scenes[1].params.denoise"},
		"width not multiple of 8": {scene("img2video", map[string]any{"width": 1020}, map[string]any{"image": b64(small)}),
			"body.scenes[1].params.width"},
		"steps above 150": {scene("img2img", map[string]any{"steps": 151}, map[string]any{"image": b64(small)}), "body.scenes[1].params.steps"},
	} {
		t.Run(name, func(t *testing.T) {
			var p fleettest.Problem
			code := fleettest.Call(t, http.MethodPost, base+"/v1/jobs", tc.body, &p)
			if code != http.StatusUnprocessableEntity || !p.At(tc.location) {
				t.Errorf("POST /v1/jobs: %d %+v, want 422 at %s", code, p.Errors, tc.location)
			}
		})
	}
}

func TestInputImagesAreStoredAndReferenced(t *testing.T) {
	t.Parallel()
	natsURL, js := fleetFor(t)
	base := startIntake(t, natsURL, intake.Config{Templates: shipped})
	img := pngBytes(t, 16, 16)
	body := map[string]any{"scenes": []any{
		map[string]any{"workflow": "img2img", "params": map[string]any{"denoise": 0.5},
			"inputs": map[string]any{"image": map[string]any{"base64": "data:image/png;base64," + base64.StdEncoding.EncodeToString(img)}}},
		map[string]any{"workflow": "img2video", "inputs": map[string]any{"image": map[string]any{"url": "https://93.184.215.14/first.png"}}},
		map[string]any{"workflow": "img2video", "params": map[string]any{"image": "on-the-node.png"}},
	}}
	var job struct {
		ID string `json:"id"`
	}
	if code := fleettest.Call(t, http.MethodPost, base+"/v1/jobs", body, &job); code != http.StatusAccepted {
		t.Fatalf("POST /v1/jobs: %d", code)
	}
	ctx := context.Background()
	store, err := js.ObjectStore(ctx, fleet.ObjectInputs)
	if err != nil {
		t.Fatal(err)
	}
	stored, err := store.GetBytes(ctx, fleet.InputKey(job.ID, 0, "image"))
	if err != nil || !bytes.Equal(stored, img) {
		t.Fatalf("stored input: %d bytes, %v; want the %d bytes sent", len(stored), err, len(img))
	}

	stream, err := js.Stream(ctx, fleet.StreamScenes)
	if err != nil {
		t.Fatal(err)
	}
	item := func(i int) fleet.ScenePayload {
		msg, err := stream.GetLastMsgForSubject(ctx, fleet.ScenePayloadSubject(job.ID, i))
		if err != nil {
			t.Fatal(err)
		}
		var w fleet.ScenePayload
		if err := json.Unmarshal(msg.Data, &w); err != nil {
			t.Fatal(err)
		}
		return w
	}
	want := []fleet.Binding{{Node: "10", Input: "image"}}
	if in := item(0).Inputs; len(in) != 1 || in[0].Object != fleet.InputKey(job.ID, 0, "image") || in[0].URL != "" || !slices.Equal(in[0].Bind, want) {
		t.Errorf("scene 0 inputs %+v; want the stored object bound to LoadImage 10 by id", in)
	}
	want = []fleet.Binding{{Node: "2", Input: "image"}}
	if in := item(1).Inputs; len(in) != 1 || in[0].URL != "https://93.184.215.14/first.png" || in[0].Object != "" || !slices.Equal(in[0].Bind, want) {
		t.Errorf("scene 1 inputs %+v; want the URL bound to LoadImage 2 by id", in)
	}
	w := item(2)
	if len(w.Inputs) != 0 || w.Graph["2"].(map[string]any)["inputs"].(map[string]any)["image"] != "on-the-node.png" {
		t.Errorf("scene 2: inputs %+v, LoadImage %v; want the file name in the graph and nothing to upload", w.Inputs, w.Graph["2"])
	}
	if _, err := store.GetInfo(ctx, fleet.InputKey(job.ID, 1, "image")); err != jetstream.ErrObjectNotFound {
		t.Errorf("a URL input was stored: %v", err)
	}
}
