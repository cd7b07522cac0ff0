package operator_test

import (
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

// The metrics tests run one at a time, before the parallel tests: every fleet of the
// test process records into the one meter provider that /metrics serves.

// TestMetricsCountScenesAndWebhooks scrapes /metrics after a job with a callback and
// finds each service's series under the names the Grafana dashboard uses.
func TestMetricsCountScenesAndWebhooks(t *testing.T) {
	f := startFleet(t, true, sim("sim-a", 5*time.Millisecond))
	var hooks atomic.Int32
	hook := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { hooks.Add(1) }))
	t.Cleanup(hook.Close)
	before := scrape(t, f)
	f.submit(t, 3, 10, hook.URL)
	fleettest.Eventually(t, 30*time.Second, func() bool { return hooks.Load() > 0 }, "no webhook for the job")

	fleettest.Eventually(t, 10*time.Second, func() bool {
		after := scrape(t, f)
		grew := func(name string, labels map[string]string, by float64) bool {
			return sum(after, name, labels)-sum(before, name, labels) >= by
		}
		return grew("comfyfleet_scenes_accepted_total", map[string]string{"pool": "image"}, 3) &&
			grew("comfyfleet_scene_attempts_total", map[string]string{"outcome": "completed", "node": "sim-a"}, 3) &&
			grew("comfyfleet_scene_duration_seconds", nil, 3) &&
			grew("comfyfleet_webhook_attempts_total", nil, 1) &&
			grew("comfyfleet_placement_decision_seconds", nil, 1) &&
			grew("comfyfleet_placement_decision_cpu_seconds", nil, 1)
	}, "the job's scenes, attempts, durations, placements and webhook are not all counted in /metrics:\n%v", names(scrape(t, f)))

	// A plan's CPU time is within its wall-clock time.
	after := scrape(t, f)
	wall, cpu := sampleSum(after, "comfyfleet_placement_decision_seconds"), sampleSum(after, "comfyfleet_placement_decision_cpu_seconds")
	if cpu <= 0 || cpu > wall+1e-6 {
		t.Errorf("plans took %g s of CPU in %g s", cpu, wall)
	}
}

// sampleSum is the sum of the observations of histogram name.
func sampleSum(families map[string]*dto.MetricFamily, name string) float64 {
	var total float64
	for _, m := range families[name].GetMetric() {
		total += m.GetHistogram().GetSampleSum()
	}
	return total
}

// TestMetricsQueueDepthRisesAndFalls scrapes /metrics while a job waits for the one
// node: comfyfleet_queue_depth of the image pool goes up, then back to 0; and
// comfyfleet_nodes counts the node by status. Both gauges are the dispatcher's.
func TestMetricsQueueDepthRisesAndFalls(t *testing.T) {
	f := startFleet(t, true, sim("sim-a", 10*time.Millisecond))
	image := map[string]string{"pool": "image"}
	f.submit(t, 8, 30, "")
	fleettest.Eventually(t, 20*time.Second, func() bool {
		return sum(scrape(t, f), "comfyfleet_queue_depth", image) > 0
	}, "comfyfleet_queue_depth{pool=\"image\"} never went above 0 while 8 scenes waited for one node")
	fleettest.Eventually(t, 60*time.Second, func() bool {
		m := scrape(t, f)
		_, ok := m["comfyfleet_queue_depth"]
		return ok && sum(m, "comfyfleet_queue_depth", image) == 0
	}, "comfyfleet_queue_depth{pool=\"image\"} did not come back to 0 once the scenes ran")
	if n := sum(scrape(t, f), "comfyfleet_nodes", nil); n < 1 {
		t.Errorf("comfyfleet_nodes counts %g nodes, want the fleet's node", n)
	}
}

// scrape reads the fleet's /metrics.
func scrape(t *testing.T, f *testFleet) map[string]*dto.MetricFamily {
	t.Helper()
	resp, err := fleettest.HTTP.Get(f.APIURL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %s", resp.Status)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	families, err := parser.TextToMetricFamilies(resp.Body)
	if err != nil {
		t.Fatalf("GET /metrics: %v", err)
	}
	return families
}

// sum adds the values of the series of family name whose labels include labels:
// counters and gauges by value, histograms by count.
func sum(families map[string]*dto.MetricFamily, name string, labels map[string]string) float64 {
	var total float64
	for _, m := range families[name].GetMetric() {
		has := map[string]string{}
		for _, l := range m.GetLabel() {
			has[l.GetName()] = l.GetValue()
		}
		match := true
		for k, v := range labels {
			match = match && has[k] == v
		}
		if !match {
			continue
		}
		switch {
		case m.Counter != nil:
			total += m.GetCounter().GetValue()
		case m.Gauge != nil:
			total += m.GetGauge().GetValue()
		case m.Histogram != nil:
			total += float64(m.GetHistogram().GetSampleCount())
		}
	}
	return total
}

func names(families map[string]*dto.MetricFamily) []string {
	var out []string
	for name := range families {
		out = append(out, name)
	}
	return out
}
