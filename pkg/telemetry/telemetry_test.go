package telemetry_test

import (
	"context"
	"io"
	"net/http/httptest"
	"strings"
	"testing"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/metric"

	"github.com/comfyfleet/comfyfleet/pkg/telemetry"
)

// TestMetricsHandlerServesTheMeterProvider checks the names the Prometheus exporter
// gives our instruments: the Grafana dashboard in deploy/grafana relies on them.
func TestMetricsHandlerServesTheMeterProvider(t *testing.T) {
	t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "")
	ctx := context.Background()
	shutdown, err := telemetry.Setup(ctx, "comfyfleet-test")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = shutdown(ctx) })
	meter := otel.Meter("comfyfleet/test")
	attempts, err := meter.Int64Counter("comfyfleet.scene.attempts")
	if err != nil {
		t.Fatal(err)
	}
	duration, err := meter.Float64Histogram("comfyfleet.scene.duration", metric.WithUnit("s"))
	if err != nil {
		t.Fatal(err)
	}
	size, err := meter.Int64Histogram("http.server.response.body.size", metric.WithUnit("By"))
	if err != nil {
		t.Fatal(err)
	}
	attempts.Add(ctx, 2)
	duration.Record(ctx, 1.5)
	size.Record(ctx, 3<<20)

	rec := httptest.NewRecorder()
	telemetry.MetricsHandler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Body)
	for _, want := range []string{
		"comfyfleet_scene_attempts_total{",
		"comfyfleet_scene_duration_seconds_bucket{",
		"comfyfleet_scene_duration_seconds_count{",
		`service_name="comfyfleet-test"`,
		// A 3 MiB image's body counted in a bucket of its size, not past 10,000.
		`http_server_response_body_size_bytes_bucket{otel_scope_name="comfyfleet/test",otel_scope_schema_url="",otel_scope_version="",le="1.048576e+06"} 0`,
		`http_server_response_body_size_bytes_bucket{otel_scope_name="comfyfleet/test",otel_scope_schema_url="",otel_scope_version="",le="4.194304e+06"} 1`,
		"go_goroutines ",
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %q:\n%s", want, body)
		}
	}
}
