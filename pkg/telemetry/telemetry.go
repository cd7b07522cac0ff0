// Package telemetry sets up OpenTelemetry for a comfyfleet process from the standard
// OTEL_* environment variables, and carries W3C trace context in NATS headers.
package telemetry

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/exporters/otlp/otlpmetric/otlpmetrichttp"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
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
// exporter's variables, OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES. The returned
// function flushes and stops the providers.
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
	if exporter("OTEL_METRICS_EXPORTER") == "otlp" {
		exp, err := otlpmetrichttp.New(ctx)
		if err != nil {
			return nil, errors.Join(fmt.Errorf("otlp metric exporter: %w", err), shutdown(ctx))
		}
		mp := sdkmetric.NewMeterProvider(sdkmetric.WithReader(sdkmetric.NewPeriodicReader(exp)), sdkmetric.WithResource(res))
		otel.SetMeterProvider(mp)
		stops = append(stops, mp.Shutdown)
	}
	return shutdown, nil
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
