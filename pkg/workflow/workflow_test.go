package workflow_test

import (
	"errors"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/workflow"
)

func catalog(t *testing.T) *workflow.Catalog {
	t.Helper()
	c, err := workflow.Load(os.DirFS("../../workflows"))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestShippedTemplatesLoadAndRenderTheirDefaults(t *testing.T) {
	t.Parallel()
	c := catalog(t)
	if got, want := c.Names(), []string{"demo", "img2img", "img2video", "txt2img", "txt2video"}; !slices.Equal(got, want) {
		t.Fatalf("shipped templates %v, want %v", got, want)
	}
	for _, tpl := range c.List() {
		g, err := tpl.Render(nil)
		if err != nil {
			t.Fatalf("%s: render defaults: %v", tpl.Name, err)
		}
		if err := workflow.ValidateGraph(g); err != nil {
			t.Fatalf("%s: rendered graph invalid: %v", tpl.Name, err)
		}
	}
}

func TestRenderAppliesDefaultsOfUnsetParams(t *testing.T) {
	t.Parallel()
	tpl, _ := catalog(t).Get("txt2img")
	g, err := tpl.Render(map[string]any{"negative": "text"})
	if err != nil {
		t.Fatal(err)
	}
	inputs := func(node string) map[string]any { return g[node].(map[string]any)["inputs"].(map[string]any) }
	if got := inputs("6")["text"]; got != tpl.Params["prompt"].Default {
		t.Errorf("positive text = %v, want the prompt's default %v", got, tpl.Params["prompt"].Default)
	}
	if got := inputs("7")["text"]; got != "text" {
		t.Errorf("negative text = %v, want the given value", got)
	}
}

func TestRenderBindsByTitleAndID(t *testing.T) {
	t.Parallel()
	tpl, _ := catalog(t).Get("txt2img")
	g, err := tpl.Render(map[string]any{"prompt": "a red fox at dawn", "seed": float64(42), "width": float64(768)})
	if err != nil {
		t.Fatal(err)
	}
	input := func(node, name string) any { return g[node].(map[string]any)["inputs"].(map[string]any)[name] }
	if got := input("6", "text"); got != "a red fox at dawn" {
		t.Errorf("positive text = %v", got)
	}
	if got := input("3", "seed"); got != int64(42) {
		t.Errorf("seed = %#v, want int64 42", got)
	}
	if got := input("5", "width"); got != int64(768) {
		t.Errorf("width = %#v", got)
	}
	if got := tpl.Graph["6"].(map[string]any)["inputs"].(map[string]any)["text"]; got != "" {
		t.Errorf("Render changed the template itself: %v", got)
	}
}

func TestRenderRejectsBadParams(t *testing.T) {
	t.Parallel()
	tpl, _ := catalog(t).Get("txt2img")
	for _, tc := range []struct {
		params map[string]any
		param  string
	}{
		{map[string]any{"colour": "red"}, "colour"},
		{map[string]any{"steps": float64(0)}, "steps"},
		{map[string]any{"steps": float64(151)}, "steps"},
		{map[string]any{"steps": 2.5}, "steps"},
		{map[string]any{"width": float64(500)}, "width"},
		{map[string]any{"prompt": 3.0}, "prompt"},
	} {
		_, err := tpl.Render(tc.params)
		var pe *workflow.ParamError
		if !errors.As(err, &pe) || pe.Param != tc.param {
			t.Errorf("Render(%v) = %v, want a ParamError naming %q", tc.params, err, tc.param)
		}
	}
}

func TestValidateGraph(t *testing.T) {
	t.Parallel()
	for name, g := range map[string]fleet.Graph{
		"empty":         {},
		"not an object": {"1": "x"},
		"no class_type": {"1": map[string]any{"inputs": map[string]any{}}},
		"dangling link": {"1": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"9", 0.0}}}},
		"bad link":      {"1": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", "x"}}}},
	} {
		if err := workflow.ValidateGraph(g); err == nil {
			t.Errorf("%s: ValidateGraph accepted %v", name, g)
		}
	}
}

func TestGraphNeedsAnOutputNode(t *testing.T) {
	t.Parallel()
	node := func(class string, inputs map[string]any) map[string]any {
		return map[string]any{"class_type": class, "inputs": inputs}
	}
	image := node("EmptyImage", map[string]any{"width": 8, "height": 8, "batch_size": 1, "color": 0})
	for _, tc := range []struct {
		name  string
		graph fleet.Graph
		ok    bool
	}{
		{"as ComfyUI's transcript 29", fleet.Graph{"1": image}, false},
		{"a sampler without a saver", fleet.Graph{"1": image, "2": node("ImageInvert", map[string]any{"image": []any{"1", 0.0}})}, false},
		{"saved", fleet.Graph{"1": image, "2": node("SaveImage", map[string]any{"images": []any{"1", 0.0}})}, true},
		{"previewed", fleet.Graph{"1": image, "2": node("PreviewImage", map[string]any{"images": []any{"1", 0.0}})}, true},
		{"a video saved by VideoHelperSuite", fleet.Graph{"1": image, "2": node("VHS_VideoCombine", map[string]any{"images": []any{"1", 0.0}})}, true},
		{"a custom class that may be an output", fleet.Graph{"1": image, "2": node("Image Save", map[string]any{"images": []any{"1", 0.0}})}, true},
	} {
		err := workflow.ValidateGraph(tc.graph)
		var ge *workflow.GraphError
		switch {
		case tc.ok && err != nil:
			t.Errorf("%s: ValidateGraph = %v", tc.name, err)
		case !tc.ok && (!errors.As(err, &ge) || ge.Node != "" || !strings.Contains(err.Error(), "Prompt has no outputs")):
			t.Errorf("%s: ValidateGraph = %v, want a graph error quoting ComfyUI's \"Prompt has no outputs\"", tc.name, err)
		}
	}
	if err := workflow.CheckGraph(fleet.Graph{"1": image}, nil); err != nil {
		t.Errorf("CheckGraph without classes = %v, want the shape checked only", err)
	}
}

func TestParamAt(t *testing.T) {
	t.Parallel()
	tpl, _ := catalog(t).Get("txt2video")
	for _, tc := range []struct{ node, input, want string }{
		{"1", "ckpt_name", "checkpoint"},
		{"10", "seed", "seed"},
		{"7", "ckpt_name", ""},
		{"1", "text", ""},
	} {
		if got, ok := tpl.ParamAt(tc.node, tc.input); got != tc.want || ok != (tc.want != "") {
			t.Errorf("ParamAt(%s, %s) = %q, %v; want %q", tc.node, tc.input, got, ok, tc.want)
		}
	}
}

func TestImageParamsTakeAFileNameOnly(t *testing.T) {
	t.Parallel()
	for _, name := range []string{"img2img", "img2video"} {
		tpl, _ := catalog(t).Get(name)
		if p := tpl.Params["image"]; p.Type != workflow.TypeImage || p.Default != nil {
			t.Fatalf("%s image param: type %q default %v; want a required image", name, p.Type, p.Default)
		}
		g, err := tpl.Render(map[string]any{"image": "mine.png"})
		if err != nil {
			t.Fatal(err)
		}
		binds := tpl.Bindings("image")
		if len(binds) != 1 || g[binds[0].Node].(map[string]any)["class_type"] != "LoadImage" || binds[0].Input != "image" {
			t.Fatalf("%s: image binds to %+v, want the LoadImage node's image input by id", name, binds)
		}
		if got := g[binds[0].Node].(map[string]any)["inputs"].(map[string]any)["image"]; got != "mine.png" {
			t.Errorf("%s: LoadImage image = %v", name, got)
		}
		_, err = tpl.Render(map[string]any{"image": 3.0})
		var pe *workflow.ParamError
		if !errors.As(err, &pe) || pe.Param != "image" || !strings.Contains(pe.Message, "inputs") {
			t.Errorf("%s: Render(image: 3) = %v, want a ParamError pointing at inputs", name, err)
		}
	}
}

func TestImg2imgDenoiseBounds(t *testing.T) {
	t.Parallel()
	tpl, _ := catalog(t).Get("img2img")
	for _, v := range []float64{-0.1, 1.5} {
		_, err := tpl.Render(map[string]any{"denoise": v})
		var pe *workflow.ParamError
		if !errors.As(err, &pe) || pe.Param != "denoise" {
			t.Errorf("Render(denoise: %v) = %v, want a ParamError", v, err)
		}
	}
	g, err := tpl.Render(map[string]any{"denoise": 0.4})
	if err != nil {
		t.Fatal(err)
	}
	if got := g["3"].(map[string]any)["inputs"].(map[string]any)["denoise"]; got != 0.4 {
		t.Errorf("KSampler denoise = %v", got)
	}
}

func TestValidateNamesEveryBadField(t *testing.T) {
	t.Parallel()
	const tpl = `{
  "name": "bad",
  "params": {
    "steps": {"type": "integer", "default": 200, "minimum": 1, "maximum": 150, "bind": [{"node": "KSampler", "input": "steps"}]},
    "ghost": {"type": "string", "bind": [{"node": "No Such Node", "input": "text"}]},
    "colour": {"type": "colour", "bind": [{"node": "1", "input": "color"}]},
    "loose": {"type": "number", "bind": []},
    "upside": {"type": "number", "minimum": 5, "maximum": 1, "bind": [{"node": "1", "input": "width"}]}
  },
  "graph": {
    "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0}, "_meta": {"title": "KSampler"}},
    "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}
  }
}`
	_, err := workflow.Parse([]byte(tpl))
	var inv workflow.InvalidError
	if !errors.As(err, &inv) {
		t.Fatalf("Parse = %v, want an InvalidError", err)
	}
	var fields []string
	for _, f := range inv {
		fields = append(fields, f.Field)
	}
	want := []string{"params.colour.type", "params.ghost.bind[0].node", "params.loose.bind", "params.steps.default", "params.upside.minimum"}
	if !slices.Equal(fields, want) {
		t.Errorf("bad fields %v, want %v (%v)", fields, want, err)
	}
}

func TestParseFillsThePoolAndRejectsBadGraphs(t *testing.T) {
	t.Parallel()
	tpl, err := workflow.Parse([]byte(`{"name": "x", "graph": {"1": {"class_type": "SaveImage", "inputs": {}}}}`))
	if err != nil || tpl.Pool != workflow.DefaultPool {
		t.Fatalf("Parse = %+v, %v; want pool %s", tpl, err, workflow.DefaultPool)
	}
	_, err = workflow.Parse([]byte(`{"name": "x", "graph": {"1": {"class_type": "SaveImage", "inputs": {"images": ["9", 0]}}}}`))
	var inv workflow.InvalidError
	if !errors.As(err, &inv) || len(inv) != 1 || inv[0].Field != "graph.1" {
		t.Errorf("Parse(dangling link) = %v, want an error at graph.1", err)
	}
}
