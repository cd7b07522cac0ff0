package stack_test

import (
	"context"
	"os"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// spans records every span of the test process.
var spans = tracetest.NewSpanRecorder()

func TestMain(m *testing.M) {
	otel.SetTracerProvider(sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(spans)))
	os.Exit(m.Run())
}

// settled reports whether the notifier has nothing left to deliver or redeliver.
func settled(t *testing.T, js jetstream.JetStream) bool {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := js.Consumer(ctx, fleet.StreamDone, fleet.DoneConsumer(0).Durable)
	if err != nil {
		t.Fatal(err)
	}
	info, err := c.Info(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return info.NumPending == 0 && info.NumAckPending == 0
}

func sceneJob(callback string, n, steps int) map[string]any {
	scenes := make([]map[string]any, n)
	for i := range scenes {
		scenes[i] = map[string]any{"workflow": "txt2img", "params": map[string]any{"prompt": "storyboard frame", "seed": i, "steps": steps, "width": 256, "height": 256}}
	}
	return map[string]any{"priority": 5, "callback_url": callback, "scenes": scenes}
}
