package main

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"strings"
	"testing"

	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

// TestMetricsFlagServesUntilCancelled is --metrics of dispatcher, executor and
// notifier: /metrics on its own address, gone once the service stops.
func TestMetricsFlagServesUntilCancelled(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	m := metricsFlag{addr: "127.0.0.1:0"}
	addr, stop, err := m.serve(ctx, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := fleettest.HTTP.Get("http://" + addr.String() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.Contains(string(body), "go_goroutines") {
		t.Fatalf("GET /metrics: %s\n%s", resp.Status, body)
	}
	cancel()
	stop()
	if _, err := fleettest.HTTP.Get("http://" + addr.String() + "/metrics"); err == nil {
		t.Error("/metrics still answers after the service stopped")
	}

	off := metricsFlag{}
	addr, stop, err = off.serve(context.Background(), slog.New(slog.DiscardHandler))
	if err != nil || addr != nil {
		t.Errorf("no --metrics: serve gave %v, %v; want nothing", addr, err)
	}
	stop()
}
