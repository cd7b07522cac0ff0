package workflow_test

import (
	"errors"
	"os"
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
	for _, name := range []string{"txt2img", "img2video", "demo"} {
		tpl, ok := c.Get(name)
		if !ok {
			t.Fatalf("template %s missing; have %v", name, c.Names())
		}
		defaults := map[string]any{}
		for n, p := range tpl.Params {
			defaults[n] = p.Default
		}
		g, err := tpl.Render(defaults)
		if err != nil {
			t.Fatalf("%s: render defaults: %v", name, err)
		}
		if err := workflow.ValidateGraph(g); err != nil {
			t.Fatalf("%s: rendered graph invalid: %v", name, err)
		}
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
