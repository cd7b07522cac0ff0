package executor

import (
	"context"
	"fmt"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/comfyfleet/comfyfleet/pkg/telemetry"
)

// metrics are the executor's OpenTelemetry instruments.
type metrics struct {
	attempts metric.Int64Counter
	duration metric.Float64Histogram
}

func newMetrics() (metrics, error) {
	meter := otel.Meter("comfyfleet/executor")
	var m metrics
	var err error
	if m.attempts, err = meter.Int64Counter("comfyfleet.scene.attempts",
		metric.WithDescription("Scene attempts by outcome: completed, retrying, failed, cancelled or handed_back.")); err != nil {
		return m, fmt.Errorf("executor metrics: %w", err)
	}
	if m.duration, err = meter.Float64Histogram("comfyfleet.scene.duration", metric.WithUnit("s"),
		metric.WithExplicitBucketBoundaries(telemetry.SecondsBuckets...),
		metric.WithDescription("Time from submitting a scene to ComfyUI to its outputs being stored.")); err != nil {
		return m, fmt.Errorf("executor metrics: %w", err)
	}
	return m, nil
}

func (m metrics) attempt(ctx context.Context, node, outcome string) {
	m.attempts.Add(ctx, 1, metric.WithAttributes(attribute.String("node", node), attribute.String("outcome", outcome)))
}
