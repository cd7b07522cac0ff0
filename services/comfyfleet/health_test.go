package main

import (
	"context"
	"io"
	"strings"
	"testing"

	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

func TestHealthProbesFollowTheNATSConnection(t *testing.T) {
	t.Parallel()
	srv := fleettest.NATS(t)
	nc, _ := fleettest.Connect(t, srv)
	h, err := startHealth("127.0.0.1:0", nc)
	if err != nil {
		t.Fatal(err)
	}
	defer h.stop()
	check := func(path string) error {
		return run(context.Background(), []string{"healthcheck", "--url", "http://" + h.addr.String() + path}, io.Discard, io.Discard)
	}
	for _, path := range []string{"/healthz", "/readyz"} {
		if err := check(path); err != nil {
			t.Errorf("connected: %s: %v", path, err)
		}
	}
	nc.Close()
	if err := check("/healthz"); err != nil {
		t.Errorf("disconnected: /healthz: %v", err)
	}
	if err := check("/readyz"); err == nil || !strings.Contains(err.Error(), "503") {
		t.Errorf("disconnected: /readyz gave %v, want a 503", err)
	}
	if err := check("/nothing"); err == nil {
		t.Error("healthcheck of a 404 succeeded")
	}
}
