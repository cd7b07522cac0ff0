// Package telemetry sets up OpenTelemetry for a comfyfleet process from the standard
// OTEL_* environment variables, serves its metrics in Prometheus text format, and
// carries W3C trace context in NATS headers.
package telemetry

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"strings"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetrichttp"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	"go.opentelemetry.io/otel/exporters/stdout/stdouttrace"
	"go.opentelemetry.io/otel/propagation"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.26.0"
)

func init() {
	otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator(
		propagation.TraceContext{}, propagation.Baggage{}))
}

// Setup installs global trace and metric providers for service, configured by the
// standard variables: OTEL_TRACES_EXPORTER and OTEL_METRICS_EXPORTER ("otlp",
// "console" for traces, or "none"; default "otlp" when OTEL_EXPORTER_OTLP_ENDPOINT is
// set, else "none"), OTEL_EXPORTER_OTLP_ENDPOINT and the rest of the OTLP/HTTP
// exporter's variables, OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES. Whatever
// those say, the metric provider also feeds MetricsHandler. The returned function
// flushes and stops the providers.
func Setup(ctx context.Context, service string) (shutdown func(context.Context) error, err error) {
	res, err := resource.Merge(resource.Default(), resource.NewSchemaless(semconv.ServiceName(service)))
	if err != nil {
		return nil, fmt.Errorf("telemetry resource: %w", err)
	}
	if env, envErr := resource.New(ctx, resource.WithFromEnv()); envErr == nil {
		if merged, mErr := resource.Merge(res, env); mErr == nil {
			res = merged
		}
	}
	var stops []func(context.Context) error
	shutdown = func(ctx context.Context) error {
		var errs []error
		for _, stop := range stops {
			errs = append(errs, stop(ctx))
		}
		return errors.Join(errs...)
	}

	switch exporter("OTEL_TRACES_EXPORTER") {
	case "otlp":
		exp, err := otlptracehttp.New(ctx)
		if err != nil {
			return nil, fmt.Errorf("otlp trace exporter: %w", err)
		}
		tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
		otel.SetTracerProvider(tp)
		stops = append(stops, tp.Shutdown)
	case "console":
		exp, err := stdouttrace.New(stdouttrace.WithWriter(os.Stderr))
		if err != nil {
			return nil, fmt.Errorf("console trace exporter: %w", err)
		}
		tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(exp), sdktrace.WithResource(res))
		otel.SetTracerProvider(tp)
		stops = append(stops, tp.Shutdown)
	}
	registry := newRegistry()
	scrape, err := otelprom.New(otelprom.WithRegisterer(registry))
	if err != nil {
		return nil, errors.Join(fmt.Errorf("prometheus metric exporter: %w", err), shutdown(ctx))
	}
	// Sizes in bytes (the HTTP instrumentation's request and response bodies) get
	// buckets for images and videos instead of the SDK's default 0 to 10,000.
	bySize := sdkmetric.NewView(sdkmetric.Instrument{Kind: sdkmetric.InstrumentKindHistogram, Unit: "By"},
		sdkmetric.Stream{Aggregation: sdkmetric.AggregationExplicitBucketHistogram{Boundaries: BytesBuckets}})
	readers := []sdkmetric.Option{sdkmetric.WithReader(scrape), sdkmetric.WithResource(res), sdkmetric.WithView(bySize)}
	if exporter("OTEL_METRICS_EXPORTER") == "otlp" {
		exp, err := otlpmetrichttp.New(ctx)
		if err != nil {
			return nil, errors.Join(fmt.Errorf("otlp metric exporter: %w", err), shutdown(ctx))
		}
		readers = append(readers, sdkmetric.WithReader(sdkmetric.NewPeriodicReader(exp)))
	}
	mp := sdkmetric.NewMeterProvider(readers...)
	otel.SetMeterProvider(mp)
	stops = append(stops, mp.Shutdown)
	scraped.Store(registry)
	return shutdown, nil
}

// scraped holds the Prometheus registry of the meter provider Setup installed last.
var scraped atomic.Pointer[prometheus.Registry]

func init() { scraped.Store(newRegistry()) }

// newRegistry returns a registry with the Go runtime's and the process's metrics.
func newRegistry() *prometheus.Registry {
	r := prometheus.NewRegistry()
	r.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return r
}

// MetricsHandler serves the metrics of the meter provider that Setup installed last,
// with the Go runtime's and the process's, in Prometheus text format (as
// comfyfleet_scene_duration_seconds for the OpenTelemetry histogram
// comfyfleet.scene.duration in seconds). Before Setup it serves only the latter.
func MetricsHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		promhttp.HandlerFor(scraped.Load(), promhttp.HandlerOpts{}).ServeHTTP(w, r)
	})
}

func exporter(name string) string {
	if v := strings.TrimSpace(strings.ToLower(os.Getenv(name))); v != "" {
		return v
	}
	if os.Getenv("OTEL_EXPORTER_OTLP_ENDPOINT") != "" {
		return "otlp"
	}
	return "none"
}

// SecondsBuckets are histogram bucket boundaries for durations in seconds, from a
// tenth of a second to an hour: scenes, queue waits. The SDK's default boundaries
// (0, 5, 10, … 10000) suit milliseconds. Use with metric.WithExplicitBucketBoundaries.
var SecondsBuckets = []float64{0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600}

// BytesBuckets are histogram bucket boundaries for sizes in bytes, from 1 KiB to
// 1 GiB by fours: JSON bodies, images, video clips.
var BytesBuckets = []float64{1 << 10, 4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 256 << 20, 1 << 30}

// HandlerBuckets are histogram bucket boundaries for the time a message's handler
// takes, in seconds: from half a millisecond (an event folded into its job) to half
// an hour (a scene run by its executor).
var HandlerBuckets = []float64{0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800}
