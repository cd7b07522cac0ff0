package intake_test

import (
	"bytes"
	"context"
	"encoding/json"
	"image"
	"image/png"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/callback"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

// client has a transport of its own: httptest servers closing in parallel tests
// close the idle connections of http.DefaultTransport.
var client = &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone(), Timeout: 30 * time.Second}

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
	cfg.Logger = slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
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

// call sends body (JSON-encoded unless nil) and decodes a JSON answer into out
// (when not nil); it returns the status.
func call(t *testing.T, method, url string, body, out any) int {
	t.Helper()
	return callAs(t, "", method, url, body, out)
}

// callAs is call with the API key key, none if "".
func callAs(t *testing.T, key, method, url string, body, out any) int {
	t.Helper()
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			t.Fatal(err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Content-Type", "application/json")
	if key != "" {
		req.Header.Set("Authorization", "Bearer "+key)
	}
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if out != nil {
		if err := json.Unmarshal(raw, out); err != nil {
			t.Fatalf("%s %s: %s: decode %s: %v", method, url, resp.Status, raw, err)
		}
	}
	return resp.StatusCode
}

// problem is an RFC 9457 problem document as huma writes it.
type problem struct {
	Status int `json:"status"`
	Errors []struct {
		Location string `json:"location"`
		Message  string `json:"message"`
	} `json:"errors"`
}

// at reports whether the problem names location.
func (p problem) at(location string) bool {
	for _, e := range p.Errors {
		if e.Location == location {
			return true
		}
	}
	return false
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
