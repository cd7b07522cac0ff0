package intake_test

import (
	"net/http"
	"strings"
	"testing"

	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

func TestGraphWithoutAnOutputNodeIsRejected(t *testing.T) {
	t.Parallel()
	natsURL, _ := fleetFor(t)
	base := startIntake(t, natsURL, intake.Config{Templates: shipped})
	noOutput := map[string]any{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 64, "height": 64, "batch_size": 1, "color": 0}},
		"2": map[string]any{"class_type": "ImageInvert", "inputs": map[string]any{"image": []any{"1", 0}}},
	}
	for _, tc := range []struct {
		method, path string
		body         map[string]any
		location     string
	}{
		{http.MethodPost, "/v1/jobs", map[string]any{"scenes": []any{map[string]any{"graph": noOutput}}}, "body.scenes[0].graph"},
		{http.MethodPut, "/v1/workflows/no-output", map[string]any{"graph": noOutput}, "body.graph"},
	} {
		var p fleettest.Problem
		code := fleettest.Call(t, tc.method, base+tc.path, tc.body, &p)
		if code != http.StatusUnprocessableEntity || !p.At(tc.location) || !strings.Contains(p.Errors[0].Message, "Prompt has no outputs") {
			t.Errorf("%s %s: %d %+v, want 422 at %s quoting ComfyUI's reason", tc.method, tc.path, code, p.Errors, tc.location)
		}
	}
}
