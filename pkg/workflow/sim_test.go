package workflow_test

import (
	"bytes"
	"context"
	"image"
	"image/color"
	"image/png"
	"path"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/comfy"
	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

// TestShippedTemplatesRunOnTheSimulator submits every shipped template, rendered with
// few steps, to a simulated ComfyUI, which validates graphs as ComfyUI does: unknown
// classes, missing inputs, values out of range and LoadImage files that were never
// uploaded are all rejected.
func TestShippedTemplatesRunOnTheSimulator(t *testing.T) {
	t.Parallel()
	sim := fleettest.Sim(t, comfysim.Config{StepDuration: time.Millisecond})
	c := comfy.New(sim.URL(), comfy.WithHTTPClient(fleettest.HTTP))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	img := image.NewNRGBA(image.Rect(0, 0, 64, 48))
	img.Set(1, 1, color.NRGBA{R: 255, A: 255})
	var buf bytes.Buffer
	if err := png.Encode(&buf, img); err != nil {
		t.Fatal(err)
	}
	uploaded, err := c.UploadImage(ctx, "start.png", buf.Bytes(), true)
	if err != nil {
		t.Fatal(err)
	}

	want := map[string]string{"demo": ".png", "txt2img": ".png", "img2img": ".png", "img2video": ".webp", "txt2video": ".webp"}
	for _, tpl := range catalog(t).List() {
		params := map[string]any{}
		for name, p := range tpl.Params {
			switch {
			case p.Type == "image":
				params[name] = uploaded.Filename
			case name == "steps" || name == "frames":
				params[name] = float64(2)
			}
		}
		g, err := tpl.Render(params)
		if err != nil {
			t.Fatalf("%s: %v", tpl.Name, err)
		}
		res, err := c.Run(ctx, g, "", nil)
		if err != nil {
			t.Fatalf("%s on the simulator: %v", tpl.Name, err)
		}
		if len(res.Outputs) != 1 || path.Ext(res.Outputs[0].File.Filename) != want[tpl.Name] {
			t.Errorf("%s: outputs %+v, want one %s file", tpl.Name, res.Outputs, want[tpl.Name])
		}
	}
}
