package fleet_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/metric/metricdata"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

// TestAHandlersTimeIsMeasuredInSeconds checks the buckets of
// comfyfleet.message.duration: a handler of a millisecond is told from one of a
// hundred, which the SDK's default buckets (0, 5, 10, … 10000, made for
// milliseconds) do not.
// Not parallel: it sets the global meter provider.
func TestAHandlersTimeIsMeasuredInSeconds(t *testing.T) {
	reader := sdkmetric.NewManualReader()
	provider := sdkmetric.NewMeterProvider(sdkmetric.WithReader(reader))
	previous := otel.GetMeterProvider()
	otel.SetMeterProvider(provider)
	t.Cleanup(func() { otel.SetMeterProvider(previous) })

	_, _, js := fleettest.Fleet(t, fleet.Settings{})
	ctx, cancel := context.WithCancel(context.Background())
	handled := make(chan struct{}, 1)
	cfg := jetstream.ConsumerConfig{Durable: "timed", AckPolicy: jetstream.AckExplicitPolicy, AckWait: time.Minute}
	done := make(chan error, 1)
	go func() {
		done <- fleet.Consume(ctx, js, fleet.StreamDone, cfg, slog.New(slog.DiscardHandler), func(context.Context, jetstream.Msg) error {
			handled <- struct{}{}
			return nil
		})
	}()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("consume: %v", err)
		}
	})
	if _, err := js.Publish(ctx, fleet.DoneSubject("j"), []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	select {
	case <-handled:
	case <-time.After(10 * time.Second):
		t.Fatal("the message was not handled")
	}

	var hist metricdata.HistogramDataPoint[float64]
	fleettest.Eventually(t, 10*time.Second, func() bool {
		var rm metricdata.ResourceMetrics
		if err := reader.Collect(ctx, &rm); err != nil {
			t.Fatal(err)
		}
		for _, sm := range rm.ScopeMetrics {
			for _, m := range sm.Metrics {
				if h, ok := m.Data.(metricdata.Histogram[float64]); ok && m.Name == "comfyfleet.message.duration" && len(h.DataPoints) == 1 {
					hist = h.DataPoints[0]
					return hist.Count == 1
				}
			}
		}
		return false
	}, "no handler time recorded")
	// A handler that returns at once, acknowledgement included, falls in a bucket
	// ending at 100 ms or less, and the scale goes on to a long scene's run.
	within, below10ms := -1.0, 0
	for i, n := range hist.BucketCounts {
		if n == 1 && i < len(hist.Bounds) {
			within = hist.Bounds[i]
		}
	}
	for _, b := range hist.Bounds {
		if b > 0 && b < 0.01 {
			below10ms++
		}
	}
	if within <= 0 || within > 0.1 || below10ms < 3 || hist.Bounds[len(hist.Bounds)-1] < 600 {
		t.Errorf("a handler of %.6f s counted in the bucket ending at %g, of bounds %v; want seconds: three bounds or more below 10 ms, the last at ten minutes or more",
			hist.Sum, within, hist.Bounds)
	}
}
