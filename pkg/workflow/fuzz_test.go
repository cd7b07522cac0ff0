package workflow_test

import (
	"encoding/json"
	"os"
	"testing"

	"github.com/comfyfleet/comfyfleet/pkg/workflow"
)

// FuzzRender binds arbitrary parameter objects into every shipped template: a
// parameter error is fine, a panic or an invalid graph is not.
func FuzzRender(f *testing.F) {
	c, err := workflow.Load(os.DirFS("../../workflows"))
	if err != nil {
		f.Fatal(err)
	}
	for _, seed := range []string{
		`{}`, `{"prompt":"fox","seed":1}`, `{"steps":150,"width":2048}`, `{"steps":1e308}`, `{"seed":-1}`,
		`{"width":"512"}`, `{"prompt":null}`, `{"cfg":[1]}`, `{"seed":18446744073709551615}`, `{"denoise":0.5}`,
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		var params map[string]any
		if json.Unmarshal([]byte(raw), &params) != nil {
			return
		}
		for _, tpl := range c.List() {
			g, err := tpl.Render(params)
			if err != nil {
				continue
			}
			if err := workflow.ValidateGraph(g); err != nil {
				t.Fatalf("%s rendered %s into an invalid graph: %v", tpl.Name, raw, err)
			}
		}
	})
}

// FuzzValidateGraph checks arbitrary JSON as a graph without panicking.
func FuzzValidateGraph(f *testing.F) {
	for _, seed := range []string{
		`{"1":{"class_type":"SaveImage","inputs":{"images":["2",0]}},"2":{"class_type":"EmptyImage","inputs":{}}}`,
		`{"1":{"class_type":"X","inputs":{"a":["1",-1]}}}`, `{"1":{"inputs":[]}}`, `{"1":null}`, `[]`, `{}`,
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, raw string) {
		var g map[string]any
		if json.Unmarshal([]byte(raw), &g) != nil {
			return
		}
		_ = workflow.ValidateGraph(g)
	})
}
