package intake_test

import (
	"context"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/workflow"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

// tinyTemplate is a model-free template with one parameter bound by title.
func tinyTemplate(desc string) map[string]any {
	return map[string]any{
		"description": desc,
		"params": map[string]any{
			"size": map[string]any{"type": "integer", "default": 32, "minimum": 8, "maximum": 256, "multiple_of": 8,
				"bind": []any{map[string]any{"node": "Source", "input": "width"}, map[string]any{"node": "1", "input": "height"}}},
		},
		"graph": map[string]any{
			"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 32, "height": 32, "batch_size": 1, "color": 0}, "_meta": map[string]any{"title": "Source"}},
			"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "tiny"}},
		},
	}
}

func TestEveryIntakeServesTheBucketsTemplates(t *testing.T) {
	t.Parallel()
	natsURL, _ := fleetFor(t)
	a := startIntake(t, natsURL, intake.Config{Templates: shipped})
	b := startIntake(t, natsURL, intake.Config{Templates: shipped})

	var list struct {
		Workflows []struct {
			Name   string                    `json:"name"`
			Params map[string]workflow.Param `json:"params"`
		} `json:"workflows"`
	}
	if code := fleettest.Call(t, http.MethodGet, b+"/v1/workflows", nil, &list); code != http.StatusOK {
		t.Fatalf("GET /v1/workflows: %d", code)
	}
	var names []string
	for _, w := range list.Workflows {
		names = append(names, w.Name)
	}
	if got := strings.Join(names, " "); got != "demo img2img img2video txt2img txt2video" {
		t.Fatalf("listed %s", got)
	}

	var got workflow.Template
	if code := fleettest.Call(t, http.MethodPut, a+"/v1/workflows/tiny", tinyTemplate("v1"), &got); code != http.StatusCreated {
		t.Fatalf("PUT new template: %d", code)
	}
	if got.Name != "tiny" || got.Pool != "image" {
		t.Errorf("stored %+v; want the name from the path and the default pool", got)
	}
	description := func(base string) string {
		var tpl workflow.Template
		if fleettest.Call(t, http.MethodGet, base+"/v1/workflows/tiny", nil, &tpl) != http.StatusOK {
			return ""
		}
		return tpl.Description
	}
	if d := description(a); d != "v1" {
		t.Errorf("the intake that stored the template serves %q at once, want v1", d)
	}
	fleettest.Eventually(t, 10*time.Second, func() bool { return description(b) == "v1" }, "the other intake never served tiny v1")

	replaced := tinyTemplate("v2")
	replaced["name"] = "tiny"
	if code := fleettest.Call(t, http.MethodPut, b+"/v1/workflows/tiny", replaced, nil); code != http.StatusOK {
		t.Fatalf("PUT replacing template: %d", code)
	}
	fleettest.Eventually(t, 10*time.Second, func() bool { return description(a) == "v2" }, "the first intake never served tiny v2")

	var tpl workflow.Template
	fleettest.Call(t, http.MethodGet, a+"/v1/workflows/tiny", nil, &tpl)
	if p := tpl.Params["size"]; p.Type != "integer" || *p.Maximum != 256 || p.MultipleOf != 8 || len(p.Bind) != 2 || p.Bind[0].Node != "Source" || tpl.Graph["2"] == nil {
		t.Errorf("GET tiny = %+v; want its params with bounds and bindings, and its graph", tpl)
	}
	job := map[string]any{"scenes": []any{map[string]any{"workflow": "tiny", "params": map[string]any{"size": 64}}}}
	if code := fleettest.Call(t, http.MethodPost, a+"/v1/jobs", job, nil); code != http.StatusAccepted {
		t.Errorf("job with the new template: %d", code)
	}
	job = map[string]any{"scenes": []any{map[string]any{"workflow": "tiny", "params": map[string]any{"size": 260}}}}
	var p fleettest.Problem
	if code := fleettest.Call(t, http.MethodPost, b+"/v1/jobs", job, &p); code != http.StatusUnprocessableEntity || !p.At("body.scenes[0].params.size") {
		t.Errorf("job with size 260: %d %+v, want 422 at body.scenes[0].params.size", code, p)
	}
	if code := fleettest.Call(t, http.MethodGet, a+"/v1/workflows/nope", nil, &p); code != http.StatusNotFound {
		t.Errorf("GET unknown template: %d", code)
	}
}

func TestSeedingKeepsAnAdministratorsTemplate(t *testing.T) {
	t.Parallel()
	natsURL, js := fleetFor(t)
	ctx := context.Background()
	kv, err := js.KeyValue(ctx, fleet.BucketWorkflows)
	if err != nil {
		t.Fatal(err)
	}
	mine := `{"name": "txt2img", "description": "the admin's", "pool": "image", "graph": {"1": {"class_type": "SaveImage", "inputs": {}}}}`
	if _, err := kv.Put(ctx, "txt2img", []byte(mine)); err != nil {
		t.Fatal(err)
	}
	base := startIntake(t, natsURL, intake.Config{Templates: shipped})
	var tpl workflow.Template
	if code := fleettest.Call(t, http.MethodGet, base+"/v1/workflows/txt2img", nil, &tpl); code != http.StatusOK || tpl.Description != "the admin's" {
		t.Errorf("GET txt2img: %d %q; want the administrator's version", code, tpl.Description)
	}
	if code := fleettest.Call(t, http.MethodGet, base+"/v1/workflows/img2img", nil, &tpl); code != http.StatusOK {
		t.Errorf("GET img2img: %d; the missing shipped templates must be seeded", code)
	}
}

func TestPutWorkflowNamesTheBadField(t *testing.T) {
	t.Parallel()
	natsURL, _ := fleetFor(t)
	base := startIntake(t, natsURL, intake.Config{})
	with := func(change func(map[string]any)) map[string]any {
		tpl := tinyTemplate("x")
		change(tpl)
		return tpl
	}
	param := func(tpl map[string]any) map[string]any {
		return tpl["params"].(map[string]any)["size"].(map[string]any)
	}
	for name, tc := range map[string]struct {
		body     map[string]any
		location string
	}{
		"binding to no node": {with(func(tpl map[string]any) {
			param(tpl)["bind"] = []any{map[string]any{"node": "Nowhere", "input": "width"}}
		}), "body.params.size.bind[0].node"},
		"default above maximum": {with(func(tpl map[string]any) { param(tpl)["default"] = 512 }), "body.params.size.default"},
		"default not multiple":  {with(func(tpl map[string]any) { param(tpl)["default"] = 12 }), "body.params.size.default"},
		"unknown type":          {with(func(tpl map[string]any) { param(tpl)["type"] = "colour" }), "body.params.size.type"},
		"no bindings":           {with(func(tpl map[string]any) { param(tpl)["bind"] = []any{} }), "body.params.size.bind"},
		"name differs":          {with(func(tpl map[string]any) { tpl["name"] = "other" }), "body.name"},
		"dangling link": {with(func(tpl map[string]any) {
			tpl["graph"].(map[string]any)["2"].(map[string]any)["inputs"].(map[string]any)["images"] = []any{"9", 0}
		}), "body.graph.2"},
		"no graph": {with(func(tpl map[string]any) { delete(tpl, "graph") }), "body"},
	} {
		t.Run(name, func(t *testing.T) {
			var p fleettest.Problem
			if code := fleettest.Call(t, http.MethodPut, base+"/v1/workflows/tiny", tc.body, &p); code != http.StatusUnprocessableEntity || !p.At(tc.location) {
				t.Errorf("PUT: %d %+v, want 422 at %s", code, p.Errors, tc.location)
			}
		})
	}
	var p fleettest.Problem
	if code := fleettest.Call(t, http.MethodGet, base+"/v1/workflows/tiny", nil, &p); code != http.StatusNotFound {
		t.Errorf("a rejected template was stored: GET %d", code)
	}
}
