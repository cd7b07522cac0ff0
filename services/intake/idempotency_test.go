package intake_test

import (
	"context"
	"encoding/json"
	"net"
	"net/http"
	"sync"
	"testing"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

// restartableIntake serves the API alone until the returned stop is called.
func restartableIntake(t *testing.T, nc *nats.Conn) (url string, stop func()) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- intake.Run(ctx, intake.Config{Conn: nc, Templates: shipped, Listener: ln, Open: true,
			Logger: fleettest.Logger(t)})
	}()
	stop = func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("intake: %v", err)
		}
	}
	return "http://" + ln.Addr().String(), stop
}

type reply struct {
	status   int
	id       string
	replayed string
}

// post submits body with the Idempotency-Key key; it fails no test itself, so that
// goroutines may call it.
func post(t *testing.T, url, key string, body any) reply {
	a, err := fleettest.Send(context.Background(), http.MethodPost, url+"/v1/jobs", body, fleettest.Header("Idempotency-Key", key))
	if err != nil {
		t.Error(err)
		return reply{}
	}
	var job struct {
		ID string `json:"id"`
	}
	_ = json.Unmarshal(a.Body, &job)
	return reply{a.Status, job.ID, a.Header.Get("Idempotent-Replayed")}
}

// submitted counts the scene payloads stored.
func submitted(t *testing.T, js jetstream.JetStream) uint64 {
	s, err := js.Stream(context.Background(), fleet.StreamScenes)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}

func TestIdempotencyKeyCreatesOneJobAcrossConcurrentRetriesAndRestarts(t *testing.T) {
	t.Parallel()
	_, nc, js := fleettest.Fleet(t, fleet.Settings{})
	body := map[string]any{"scenes": []any{
		map[string]any{"workflow": "demo"},
		map[string]any{"workflow": "txt2img", "params": map[string]any{"prompt": "fox", "seed": 7}},
	}}
	url, stop := restartableIntake(t, nc)

	const n = 8
	replies := make([]reply, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() { replies[i] = post(t, url, "order-42", body) })
	}
	wg.Wait()
	fresh := 0
	for _, r := range replies {
		if r.status != http.StatusAccepted || r.id != replies[0].id {
			t.Fatalf("concurrent replies %+v: want 202 and one job id", replies)
		}
		if r.replayed == "" {
			fresh++
		}
	}
	if fresh != 1 {
		t.Errorf("%d requests created the job, want exactly 1", fresh)
	}
	if got := submitted(t, js); got != 2 {
		t.Errorf("%d scenes queued, want 2", got)
	}

	stop()
	url, stop = restartableIntake(t, nc)
	defer stop()
	if r := post(t, url, "order-42", body); r.status != http.StatusAccepted || r.id != replies[0].id || r.replayed != "true" {
		t.Errorf("after an intake restart: %+v, want the same job replayed", r)
	}
	if got := submitted(t, js); got != 2 {
		t.Errorf("%d scenes queued after the replay, want still 2", got)
	}

	other := map[string]any{"scenes": []any{map[string]any{"workflow": "demo", "params": map[string]any{"size": 64}}}}
	if r := post(t, url, "order-42", other); r.status != http.StatusConflict {
		t.Errorf("same key, another body: %d, want 409", r.status)
	}
	if r := post(t, url, "order-43", body); r.status != http.StatusAccepted || r.id == replies[0].id {
		t.Errorf("another key: %+v, want a new job", r)
	}
}
