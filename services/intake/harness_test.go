package intake_test

import (
	"bytes"
	"context"
	"image"
	"image/png"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/callback"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

// shipped are the templates in the repository's workflows directory.
var shipped = os.DirFS("../../workflows")

// fleetFor starts a NATS server with the fleet's streams and buckets for one test,
// and returns its client URL.
func fleetFor(t *testing.T) (string, jetstream.JetStream) {
	t.Helper()
	srv, _, js := fleettest.Fleet(t, fleet.Settings{})
	return srv.ClientURL(), js
}

// startIntake runs an open intake (no API keys) on a loopback socket against the NATS
// server at natsURL until the test ends, and returns its base URL.
func startIntake(t *testing.T, natsURL string, cfg intake.Config) string {
	t.Helper()
	cfg.Open = true
	return serveIntake(t, natsURL, cfg)
}

// serveIntake runs an intake as cfg says, API keys or not, on a loopback socket
// against the NATS server at natsURL until the test ends, and returns its base URL.
func serveIntake(t *testing.T, natsURL string, cfg intake.Config) string {
	t.Helper()
	nc, err := nats.Connect(natsURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Conn, cfg.Listener = nc, ln
	if cfg.CallbackGuard == nil {
		// The tests' image and callback servers listen on loopback.
		cfg.CallbackGuard = callback.NewGuard(netip.MustParsePrefix("127.0.0.0/8"))
	}
	cfg.Logger = fleettest.Logger(t)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := intake.Run(ctx, cfg); err != nil {
			t.Errorf("intake: %v", err)
		}
	})
	t.Cleanup(func() { cancel(); wg.Wait() })
	return "http://" + ln.Addr().String()
}

// pngBytes encodes a small PNG.
func pngBytes(t *testing.T, w, h int) []byte {
	t.Helper()
	var buf bytes.Buffer
	if err := png.Encode(&buf, image.NewGray(image.Rect(0, 0, w, h))); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}
