package operator_test

import (
	"context"
	"flag"
	"fmt"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/telemetry"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack/stacktest"
)

var screenshot = flag.String("panel.screenshot", "", "write a screenshot of the panel with a running job to this PNG file (docs/panel.png)")

// TestMain installs the meter provider that /metrics serves, as comfyfleet's commands do.
func TestMain(m *testing.M) {
	flag.Parse()
	shutdown, err := telemetry.Setup(context.Background(), "comfyfleet-test")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	_ = shutdown(context.Background())
	os.Exit(code)
}

// testFleet is a whole fleet on random loopback ports.
type testFleet struct {
	*stacktest.Fleet
	// Key is sent with every call of the test's own; "" on an open API.
	Key string
}

// sim is a simulated node whose sampler step takes step at speed 1.
func sim(name string, step time.Duration) comfysim.Config {
	return comfysim.Config{Name: name, Speed: 1, StepDuration: step}
}

// startFleet runs a fleet of the simulated nodes sims until the test ends; open
// serves the API without keys.
func startFleet(t *testing.T, open bool, sims ...comfysim.Config) *testFleet {
	t.Helper()
	return &testFleet{Fleet: stacktest.Start(t, func(c *stack.Config) { c.Open, c.Sims = open, sims })}
}

// createKey stores an API key of tenant with role, and returns it.
func (f *testFleet) createKey(t *testing.T, tenant string, role tenancy.Role) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	store, err := tenancy.Open(ctx, f.JS)
	if err != nil {
		t.Fatal(err)
	}
	key, _, err := store.CreateKey(ctx, tenant, role, "operator test")
	if err != nil {
		t.Fatal(err)
	}
	return key
}

// call is fleettest.Call of path on the API, with the test's key.
func (f *testFleet) call(t *testing.T, method, path string, body, out any) int {
	t.Helper()
	return fleettest.Call(t, method, f.APIURL+path, body, out, fleettest.Key(f.Key))
}

// seeds makes every scene of the test process differ, so that no simulated node
// answers one from its cache, as ComfyUI does for a prompt it has run.
var seeds atomic.Int64

// submit posts a job of n txt2img scenes of steps sampler steps and returns its id.
func (f *testFleet) submit(t *testing.T, n, steps int, callback string) string {
	t.Helper()
	scenes := make([]map[string]any, n)
	for i := range scenes {
		scenes[i] = map[string]any{"workflow": "txt2img", "params": map[string]any{
			"prompt": "a lighthouse at dusk", "seed": seeds.Add(1), "steps": steps, "width": 256, "height": 256}}
	}
	body := map[string]any{"priority": 5, "scenes": scenes}
	if callback != "" {
		body["callback_url"] = callback
	}
	return fleettest.SubmitJob(t, f.APIURL, body, fleettest.Key(f.Key)).ID
}
