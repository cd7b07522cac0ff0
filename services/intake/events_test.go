package intake_test

import (
	"context"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

func TestEventStreamEndsWhenTheIntakeStops(t *testing.T) {
	t.Parallel()
	_, nc, _ := fleettest.Fleet(t, fleet.Settings{})
	url, stop := restartableIntake(t, nc)
	job := post(t, url, "", map[string]any{"scenes": []any{map[string]any{"workflow": "demo"}}})
	if job.status != http.StatusAccepted {
		t.Fatalf("POST job: %d", job.status)
	}

	for name, tc := range map[string]struct {
		id     string
		status int
	}{
		"unknown job": {"no-such-job", http.StatusNotFound},
		"bad id":      {"a.b", http.StatusNotFound},
	} {
		resp, err := fleettest.HTTP.Get(url + "/v1/jobs/" + tc.id + "/events")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.status || resp.Header.Get("Content-Type") != "application/problem+json" {
			t.Errorf("%s: %s %s, want %d problem JSON", name, resp.Status, resp.Header.Get("Content-Type"), tc.status)
		}
	}

	// Nothing runs the job, so its stream stays open with nothing to send.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, http.MethodGet, url+"/v1/jobs/"+job.id+"/events", nil)
	resp, err := fleettest.HTTP.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("GET events: %s %s", resp.Status, resp.Header.Get("Content-Type"))
	}
	ended := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, resp.Body)
		ended <- err
	}()

	stopped := make(chan struct{})
	began := time.Now()
	go func() { stop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		t.Fatal("the intake did not stop within 5s while an event stream was open")
	}
	if err := <-ended; err != nil {
		t.Errorf("event stream ended with %v, want a clean end", err)
	}
	t.Logf("intake stopped %s after it was asked to, closing the open stream", time.Since(began).Round(time.Millisecond))
}
