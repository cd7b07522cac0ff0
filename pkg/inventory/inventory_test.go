package inventory_test

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/comfy"
	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/inventory"
	"github.com/comfyfleet/comfyfleet/pkg/workflow"
)

// sim starts a simulated node that the test closes, and reads its inventory.
func sim(t *testing.T, cfg comfysim.Config) (*comfysim.Server, *comfy.Client) {
	t.Helper()
	cfg.StepDuration, cfg.NodeDuration = -1, -1
	s := fleettest.Sim(t, cfg)
	return s, comfy.New(s.URL())
}

func read(t *testing.T, c *comfy.Client) *inventory.Inventory {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := c.ObjectInfo(ctx, "")
	if err != nil {
		t.Fatal(err)
	}
	inv, err := inventory.FromObjectInfo(info)
	if err != nil {
		t.Fatal(err)
	}
	return inv
}

func templates(t *testing.T) *workflow.Catalog {
	t.Helper()
	c, err := workflow.Load(os.DirFS("../../workflows"))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func rendered(t *testing.T, name string, params map[string]any) (*workflow.Template, fleet.Graph) {
	t.Helper()
	tpl, ok := templates(t).Get(name)
	if !ok {
		t.Fatalf("no template %s", name)
	}
	g, err := tpl.Render(params)
	if err != nil {
		t.Fatal(err)
	}
	return tpl, g
}

func TestInventoryOfARealServersObjectInfo(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile("../comfy/testdata/transcripts/06_get_object_info_full.json")
	if err != nil {
		t.Fatal(err)
	}
	var tr struct {
		Response struct {
			Body map[string]json.RawMessage `json:"body"`
		} `json:"response"`
	}
	if err := json.Unmarshal(raw, &tr); err != nil {
		t.Fatal(err)
	}
	inv, err := inventory.FromObjectInfo(tr.Response.Body)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"EmptyImage", "ImageInvert", "ImageScale", "ImageToMask", "MaskToImage", "PreviewImage", "SaveImage", "SaveImageWebsocket"}
	if !slices.Equal(inv.Classes, want) {
		t.Errorf("classes %v, want %v", inv.Classes, want)
	}
	if want := []string{"PreviewImage", "SaveImage", "SaveImageWebsocket"}; !slices.Equal(inv.Outputs, want) {
		t.Errorf("outputs %v, want %v", inv.Outputs, want)
	}
	if len(inv.Models) != 0 {
		t.Errorf("models %+v: the combos of a model-free server (upscale_method, crop, channel) are no model files", inv.Models)
	}
}

func TestInventoryOfTheSimulator(t *testing.T) {
	t.Parallel()
	_, c := sim(t, comfysim.Config{})
	inv := read(t, c)
	kinds := map[string]inventory.Models{}
	for _, m := range inv.Models {
		kinds[m.Kind] = m
	}
	if got := slices.Sorted(func(yield func(string) bool) {
		for k := range kinds {
			if !yield(k) {
				return
			}
		}
	}); !slices.Equal(got, []string{"ckpt_name", "lora_name", "vae_name"}) {
		t.Fatalf("model kinds %v, want ckpt_name, lora_name, vae_name", got)
	}
	ckpt := kinds["ckpt_name"]
	if len(ckpt.Inputs) != 2 || len(ckpt.Inputs["CheckpointLoaderSimple"]) != 1 || len(ckpt.Inputs["ImageOnlyCheckpointLoader"]) != 1 {
		t.Errorf("checkpoint list used by %v, want both checkpoint loaders sharing one list", ckpt.Inputs)
	}
	if !slices.Contains(ckpt.Files, "v1-5-pruned-emaonly.safetensors") || !slices.Contains(ckpt.Files, "svd_xt.safetensors") {
		t.Errorf("checkpoints %v", ckpt.Files)
	}
	for _, name := range templates(t).Names() {
		_, g := rendered(t, name, nil)
		if lacks := inv.Lacks(inventory.Require(g)); len(lacks) != 0 {
			t.Errorf("the simulator lacks %v for template %s", lacks, name)
		}
	}

	b, err := json.Marshal(inv)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("inventory of the simulator (%d classes, %d model lists): %d bytes of JSON", len(inv.Classes), len(inv.Models), len(b))
	var back inventory.Inventory
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.Version != inv.Version || !back.Has("VHS_VideoCombine") || back.Has("NoSuchNode") {
		t.Errorf("decoded inventory %s differs from %s", back.Version, inv.Version)
	}
	if files, ok := back.Files("ImageOnlyCheckpointLoader", "ckpt_name"); !ok || !slices.Equal(files, ckpt.Files) {
		t.Errorf("decoded ImageOnlyCheckpointLoader.ckpt_name = %v, %v", files, ok)
	}
	if again := read(t, c); again.Version != inv.Version {
		t.Errorf("the same node read twice has versions %s and %s", inv.Version, again.Version)
	}
}

func TestFromObjectInfoFindsModelInputs(t *testing.T) {
	t.Parallel()
	info := map[string]json.RawMessage{
		"CheckpointLoader": json.RawMessage(`{"input": {"required": {
			"config_name": [["v1-inference.yaml", "v2-inference.yaml"]],
			"ckpt_name": [["b.safetensors", "a.ckpt"]]}}}`),
		"UNETLoader": json.RawMessage(`{"input": {"required": {
			"unet_name": ["COMBO", {"options": ["flux1-dev.safetensors", "wan.gguf"], "multiselect": false}],
			"weight_dtype": ["COMBO", {"options": ["default", "fp8_e4m3fn"]}]}}}`),
		"DualCLIPLoader": json.RawMessage(`{"input": {"required": {
			"clip_name1": [["t5xxl.safetensors", "clip_l.safetensors"]],
			"clip_name2": [["t5xxl.safetensors", "clip_l.safetensors"]],
			"type": [["sdxl", "flux"]]}}}`),
		"LoraLoader": json.RawMessage(`{"input": {"required": {"lora_name": [[], {"tooltip": "x"}]}}}`),
		"KSampler": json.RawMessage(`{"input": {"required": {
			"sampler_name": [["euler", "dpmpp_2m"]], "steps": ["INT", {"default": 20}]}}}`),
		"Power Lora Loader (rgthree)": json.RawMessage(`{"input": {"optional": {"lora_1": [["None", "detail.safetensors"]]}, "hidden": {"prompt": "PROMPT"}}}`),
		"UpscaleModelLoader":          json.RawMessage(`{"input": {"required": {"model_name": [["4x-UltraSharp.pth"]]}}}`),
		"SaveImage":                   json.RawMessage(`{"input": {"required": {"images": ["IMAGE"]}}, "output_node": true}`),
		"LoadImage":                   json.RawMessage(`{"input": {"required": {"image": [["a.png", "b.webp"], {"image_upload": true}]}}}`),
	}
	inv, err := inventory.FromObjectInfo(info)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]string{}
	for _, m := range inv.Models {
		var users []string
		for class, inputs := range m.Inputs {
			for _, in := range inputs {
				users = append(users, class+"."+in)
			}
		}
		slices.Sort(users)
		got[m.Kind] = strings.Join(users, ",") + " = " + strings.Join(m.Files, ",")
	}
	want := map[string]string{
		"ckpt_name":  "CheckpointLoader.ckpt_name = a.ckpt,b.safetensors",
		"unet_name":  "UNETLoader.unet_name = flux1-dev.safetensors,wan.gguf",
		"clip_name1": "DualCLIPLoader.clip_name1,DualCLIPLoader.clip_name2 = clip_l.safetensors,t5xxl.safetensors",
		"lora_name":  "LoraLoader.lora_name = ",
		"lora_1":     "Power Lora Loader (rgthree).lora_1 = None,detail.safetensors",
		"model_name": "UpscaleModelLoader.model_name = 4x-UltraSharp.pth",
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("model lists\n got %v\nwant %v", got, want)
	}
	if o, known := inv.Output("SaveImage"); !o || !known {
		t.Errorf("SaveImage: output %v known %v", o, known)
	}
	if o, known := inv.Output("KSampler"); o || !known {
		t.Errorf("KSampler: output %v known %v", o, known)
	}
	if _, err := inventory.FromObjectInfo(map[string]json.RawMessage{"X": json.RawMessage(`[1]`)}); err == nil {
		t.Errorf("FromObjectInfo accepted a class that is not an object")
	}
}

func TestRequire(t *testing.T) {
	t.Parallel()
	_, g := rendered(t, "txt2video", map[string]any{"checkpoint": "x.safetensors", "prompt": "a fox.ckpt in the snow\n"})
	req := inventory.Require(g)
	wantClasses := []string{"CLIPTextEncode", "CheckpointLoaderSimple", "EmptyLatentImage", "ImageOnlyCheckpointLoader", "KSampler",
		"SVD_img2vid_Conditioning", "SaveAnimatedWEBP", "VAEDecode", "VideoLinearCFGGuidance"}
	var classes []string
	for c := range req.Classes {
		classes = append(classes, c)
	}
	slices.Sort(classes)
	if !slices.Equal(classes, wantClasses) || !slices.Equal(req.Classes["KSampler"], []string{"5", "10"}) {
		t.Errorf("classes %v, want %v with KSampler at 5 and 10", req.Classes, wantClasses)
	}
	want := []inventory.Model{
		{Class: "CheckpointLoaderSimple", Input: "ckpt_name", File: "x.safetensors", Nodes: []string{"1"}},
		{Class: "ImageOnlyCheckpointLoader", Input: "ckpt_name", File: "svd_xt.safetensors", Nodes: []string{"7"}},
	}
	if fmt.Sprint(req.Models) != fmt.Sprint(want) {
		t.Errorf("models %+v, want %+v", req.Models, want)
	}

	b, err := json.Marshal(req)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("requirements of txt2video: %d bytes of JSON: %s", len(b), b)
	if len(b) > 600 {
		t.Errorf("requirements of txt2video take %d bytes, want them small enough for a ticket", len(b))
	}

	// Node ids do not change the key; another checkpoint does.
	renumbered := fleet.Graph{}
	for id, n := range g {
		renumbered["n"+id] = n
	}
	if inventory.Require(renumbered).Key != req.Key {
		t.Errorf("the same needs under other node ids have another key")
	}
	_, other := rendered(t, "txt2video", map[string]any{"checkpoint": "y.safetensors"})
	if inventory.Require(other).Key == req.Key {
		t.Errorf("another checkpoint has the same key")
	}
	_, same := rendered(t, "txt2video", map[string]any{"checkpoint": "x.safetensors", "seed": 7})
	if inventory.Require(same).Key != req.Key {
		t.Errorf("another seed changed the key")
	}
}

// fleetOf builds inventories from the simulator's table with configured models and
// classes, through real sockets.
func fleetOf(t *testing.T, cfgs ...comfysim.Config) []*inventory.Inventory {
	t.Helper()
	var out []*inventory.Inventory
	for _, cfg := range cfgs {
		_, c := sim(t, cfg)
		out = append(out, read(t, c))
	}
	return out
}

func TestLacksAndCheckPool(t *testing.T) {
	t.Parallel()
	sd15 := comfysim.Config{Models: map[string][]string{"ckpt_name": {"v1-5-pruned-emaonly.safetensors"}}}
	sdxl := comfysim.Config{Models: map[string][]string{"ckpt_name": {"sd_xl_base_1.0.safetensors"}}}
	noVideo := comfysim.Config{Models: map[string][]string{"ckpt_name": {"x.safetensors", "svd_xt.safetensors"}}, WithoutClasses: []string{"SaveAnimatedWEBP", "VHS_VideoCombine"}}
	video := comfysim.Config{Models: map[string][]string{"ckpt_name": {"svd_xt.safetensors"}}}
	invs := fleetOf(t, sd15, sdxl, noVideo, video)
	sd15Node, sdxlNode, noVideoNode, videoNode := invs[0], invs[1], invs[2], invs[3]

	_, img := rendered(t, "txt2img", map[string]any{"checkpoint": "sd_xl_base_1.0.safetensors"})
	_, x := rendered(t, "txt2img", map[string]any{"checkpoint": "x.safetensors"})
	_, vid := rendered(t, "txt2video", map[string]any{"checkpoint": "x.safetensors"})
	imgReq, xReq, vidReq := inventory.Require(img), inventory.Require(x), inventory.Require(vid)
	promptText := inventory.Require(fleet.Graph{
		"1": map[string]any{"class_type": "CLIPTextEncode", "inputs": map[string]any{"text": "model.ckpt"}},
	})

	for _, tc := range []struct {
		name string
		inv  *inventory.Inventory
		req  *inventory.Requirements
		want string
	}{
		{"has everything", sdxlNode, imgReq, "[]"},
		{"lacks the checkpoint", sd15Node, imgReq, "[checkpoint sd_xl_base_1.0.safetensors]"},
		{"lacks a class, and its model is not judged", noVideoNode, vidReq, "[node class SaveAnimatedWEBP]"},
		{"lacks both checkpoints", sdxlNode, vidReq, "[checkpoint x.safetensors checkpoint svd_xt.safetensors]"},
		{"a model name in a prompt text is no model", sd15Node, promptText, "[]"},
	} {
		lacks := tc.inv.Lacks(tc.req)
		if got := fmt.Sprint(lacks); got != tc.want {
			t.Errorf("%s: lacks %s, want %s", tc.name, got, tc.want)
		}
		if tc.inv.Runs(tc.req) != (len(lacks) == 0) || tc.inv.Runs(tc.req) != (len(lacks) == 0) {
			t.Errorf("%s: Runs disagrees with Lacks", tc.name)
		}
	}
	if !(*inventory.Inventory)(nil).Runs(imgReq) {
		t.Errorf("a node not read yet must be given the benefit of the doubt")
	}

	for _, tc := range []struct {
		name string
		invs []*inventory.Inventory
		req  *inventory.Requirements
		want string
	}{
		{"no node inventoried yet", nil, imgReq, ""},
		{"one node not read yet", []*inventory.Inventory{sd15Node, nil}, imgReq, ""},
		{"one node can", []*inventory.Inventory{sd15Node, sdxlNode}, imgReq, ""},
		{"none has the checkpoint", []*inventory.Inventory{sd15Node, sdxlNode}, xReq, "no node in pool image has checkpoint x.safetensors"},
		{"each has a part, none all", []*inventory.Inventory{noVideoNode, videoNode}, vidReq,
			"no node in pool image has node class SaveAnimatedWEBP together with everything else the graph needs"},
		{"several missing everywhere", []*inventory.Inventory{sd15Node, sdxlNode}, vidReq,
			"no node in pool image has checkpoint x.safetensors; no node in pool image has checkpoint svd_xt.safetensors"},
	} {
		err := inventory.CheckPool("image", tc.invs, tc.req)
		got := ""
		if err != nil {
			got = err.Error()
		}
		if got != tc.want {
			t.Errorf("%s: CheckPool = %q, want %q", tc.name, got, tc.want)
		}
	}
	if err := inventory.CheckOnline("image", []*inventory.Inventory{sd15Node}, imgReq); err == nil ||
		err.Error() != "no online node in pool image has checkpoint sd_xl_base_1.0.safetensors" {
		t.Errorf("CheckOnline = %v, want it to say no online node has the checkpoint", err)
	}
}

func TestField(t *testing.T) {
	t.Parallel()
	tpl, g := rendered(t, "txt2video", map[string]any{"checkpoint": "x.safetensors"})
	lacks := fleetOf(t, comfysim.Config{Models: map[string][]string{"ckpt_name": {}}})[0].Lacks(inventory.Require(g))
	var fields, rawFields []string
	for _, m := range lacks {
		fields = append(fields, inventory.TemplateField(m, tpl))
		rawFields = append(rawFields, inventory.GraphField(m))
	}
	if want := []string{"params.checkpoint", "workflow"}; !slices.Equal(fields, want) {
		t.Errorf("template fields %v, want %v (%v)", fields, want, lacks)
	}
	if want := []string{"graph.1.inputs.ckpt_name", "graph.7.inputs.ckpt_name"}; !slices.Equal(rawFields, want) {
		t.Errorf("raw graph fields %v, want %v", rawFields, want)
	}
	if got := inventory.GraphField(inventory.Missing{Class: "VHS_VideoCombine", Nodes: []string{"12"}}); got != "graph.12.class_type" {
		t.Errorf("missing class field %s", got)
	}
}

func TestRefreshSeesANewCheckpoint(t *testing.T) {
	t.Parallel()
	node, c := sim(t, comfysim.Config{Models: map[string][]string{"ckpt_name": {"v1-5-pruned-emaonly.safetensors"}}})
	_, g := rendered(t, "txt2img", map[string]any{"checkpoint": "sd_xl_base_1.0.safetensors"})
	req := inventory.Require(g)
	before := read(t, c)
	if before.Runs(req) {
		t.Fatal("a node without the SDXL checkpoint runs an SDXL scene")
	}
	if err := node.AddModel("ckpt_name", "sd_xl_base_1.0.safetensors"); err != nil {
		t.Fatal(err)
	}
	after := read(t, c)
	if after.Version == before.Version || !after.Runs(req) {
		t.Errorf("after the checkpoint was added: version %s (was %s), runs %v", after.Version, before.Version, after.Runs(req))
	}
}

func TestClassesTellOutputs(t *testing.T) {
	t.Parallel()
	invs := fleetOf(t, comfysim.Config{WithoutClasses: []string{"VHS_VideoCombine"}}, comfysim.Config{})
	for _, tc := range []struct {
		graph fleet.Graph
		ok    bool
	}{
		{fleet.Graph{"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{}}}, false},
		{fleet.Graph{"1": map[string]any{"class_type": "VHS_VideoCombine", "inputs": map[string]any{}}}, true},
		{fleet.Graph{"1": map[string]any{"class_type": "MyCustomSaver", "inputs": map[string]any{}}}, true},
	} {
		err := workflow.CheckGraph(tc.graph, inventory.Classes(invs))
		if (err == nil) != tc.ok {
			t.Errorf("CheckGraph(%v) = %v, want ok %v", tc.graph, err, tc.ok)
		}
	}
}

// TestPublishedSize measures the published form of an inventory the size of a real
// server's (377 classes) with a large model library.
func TestPublishedSize(t *testing.T) {
	t.Parallel()
	info := map[string]json.RawMessage{}
	for i := range 377 {
		info[fmt.Sprintf("StockClassNumber%03d", i)] = json.RawMessage(`{"input": {"required": {"x": ["INT", {"default": 1}]}}}`)
	}
	list := func(n int, format string) string {
		names := make([]string, n)
		for i := range names {
			names[i] = fmt.Sprintf(format, i)
		}
		b, _ := json.Marshal(names)
		return string(b)
	}
	ckpts, loras := list(100, "SDXL/checkpoint_%03d_v1.0.safetensors"), list(2000, "styles/lora_of_some_style_%04d.safetensors")
	for _, c := range []string{"CheckpointLoaderSimple", "CheckpointLoader", "ImageOnlyCheckpointLoader", "unCLIPCheckpointLoader"} {
		info[c] = json.RawMessage(`{"input": {"required": {"ckpt_name": [` + ckpts + `]}}}`)
	}
	for _, c := range []string{"LoraLoader", "LoraLoaderModelOnly", "CreateHookLora"} {
		info[c] = json.RawMessage(`{"input": {"required": {"lora_name": [` + loras + `]}}}`)
	}
	var raw int
	for _, v := range info {
		raw += len(v)
	}
	start := time.Now()
	inv, err := inventory.FromObjectInfo(info)
	if err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	b, _ := json.Marshal(inv)
	var gz bytes.Buffer
	w := gzip.NewWriter(&gz)
	w.Write(b)
	w.Close()
	t.Logf("object_info of %d classes, 100 checkpoints (4 loaders), 2000 LoRAs (3 loaders): %d bytes; inventory %d bytes of JSON, %d gzipped; built in %s",
		len(info), raw, len(b), gz.Len(), took)
	if len(b) > 200<<10 {
		t.Errorf("inventory takes %d bytes: each list must be kept once", len(b))
	}
}
