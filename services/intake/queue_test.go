package intake_test

import (
	"context"
	"encoding/json"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/intake"
	"github.com/nats-io/nats.go"
)

// TestTheIntakeQueuesTheJobsItAccepts runs an intake with no dispatcher: by the time
// it answers 202 the job is recorded, and then its scenes are queued (their queued
// events and tickets) and its commit's schedule removed, so that no router ever
// takes the commit up.
func TestTheIntakeQueuesTheJobsItAccepts(t *testing.T) {
	t.Parallel()
	for _, ownConn := range []bool{false, true} {
		t.Run(map[bool]string{false: "one connection", true: "a queuer connection of its own"}[ownConn], func(t *testing.T) {
			t.Parallel()
			natsURL, js := fleetFor(t)
			cfg := intake.Config{Templates: shipped}
			if ownConn {
				qnc, err := nats.Connect(natsURL)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(qnc.Close)
				cfg.QueueConn = qnc
			}
			base := startIntake(t, natsURL, cfg)
			var job struct {
				ID string `json:"id"`
			}
			body := []byte(`{"scenes": [{"workflow": "demo"}, {"workflow": "demo", "params": {"color": 7}}, {"workflow": "demo", "pool": "video"}]}`)
			if status := fleettest.Call(t, http.MethodPost, base+"/v1/jobs", body, &job); status != http.StatusAccepted {
				t.Fatalf("POST /v1/jobs: %d", status)
			}
			if pieces := fleettest.JobPieces(t, js, job.ID); pieces["record"] != 1 || pieces["state"] != 1 {
				t.Errorf("record %d, state %d when the job was accepted: want it recorded", pieces["record"], pieces["state"])
			}
			pools := []string{"image", "image", "video"}
			// The commit's schedule fires after fleet.CommitGrace: the submit stream would
			// then still hold the commit.
			fleettest.Eventually(t, fleet.CommitGrace, func() bool {
				for i, pool := range pools {
					if fleettest.Count(t, js, fleet.StreamQueue, fleet.QueueSubject(pool, job.ID, i)) != 1 ||
						fleettest.Count(t, js, fleet.StreamEvents, fleet.SceneEventSubject(job.ID, i, fleet.EventQueued)) != 1 {
						return false
					}
				}
				return fleettest.JobPieces(t, js, job.ID)["commands"] == 0
			}, "job %s: its scenes not queued, or its commit left on the submit stream", job.ID)
			if ownConn {
				// Three queued events and three tickets.
				if sent := cfg.QueueConn.Stats().OutMsgs; sent < 6 {
					t.Errorf("the queuer's connection sent %d messages: want the scenes' queued events and tickets on it", sent)
				}
			}
		})
	}
}

// TestLargeJobsAtOnceAreAllQueued posts jobs of a thousand scenes from eight clients
// at once to an intake with no dispatcher, more than its queuer has room for: every
// POST is accepted, and every scene is queued by the intake itself. (Whether a commit
// fires meanwhile, on a machine too busy to queue a job within its grace, is a
// matter of speed: a router would drop what it sent again.)
func TestLargeJobsAtOnceAreAllQueued(t *testing.T) {
	t.Parallel()
	natsURL, js := fleetFor(t)
	base := startIntake(t, natsURL, intake.Config{Templates: shipped, SubmitRate: intake.RateLimit{PerSecond: intake.Unlimited}})
	const clients, jobsEach, scenes = 8, 2, 1000
	list := make([]map[string]any, scenes)
	for i := range list {
		list[i] = map[string]any{"workflow": "demo", "params": map[string]any{"color": i}}
	}
	body, err := json.Marshal(map[string]any{"scenes": list})
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			for range jobsEach {
				if a, err := fleettest.Send(context.Background(), http.MethodPost, base+"/v1/jobs", body); err != nil || a.Status != http.StatusAccepted {
					t.Errorf("POST /v1/jobs: %v %v", a, err)
					return
				}
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	want := clients * jobsEach * scenes
	fleettest.Eventually(t, 30*time.Second, func() bool {
		return fleettest.Count(t, js, fleet.StreamQueue, fleet.QueueFilter) == want &&
			fleettest.Count(t, js, fleet.StreamEvents, fleet.SceneEventFilter(fleet.EventQueued)) == want
	}, "not every scene queued by the intake")
}

// TestAJobTheIntakeCouldNotQueueKeepsItsCommit makes the queue refuse every ticket:
// the intake answers 202 (the job is committed and recorded) but must leave the job's
// commit in place, so that it fires for a router, which queues the job.
func TestAJobTheIntakeCouldNotQueueKeepsItsCommit(t *testing.T) {
	t.Parallel()
	natsURL, js := fleetFor(t)
	base := startIntake(t, natsURL, intake.Config{Templates: shipped})
	// Once the intake answers, its start (which sets the streams as configured) is
	// over.
	fleettest.Do(t, http.MethodGet, base+"/v1/workflows", nil).Want(t, http.StatusOK)
	ctx := context.Background()
	queue, err := js.Stream(ctx, fleet.StreamQueue)
	if err != nil {
		t.Fatal(err)
	}
	cfg := queue.CachedInfo().Config
	cfg.MaxMsgSize = 16
	if _, err := js.UpdateStream(ctx, cfg); err != nil {
		t.Fatal(err)
	}
	var job struct {
		ID string `json:"id"`
	}
	if status := fleettest.Call(t, http.MethodPost, base+"/v1/jobs", []byte(`{"scenes": [{"workflow": "demo"}, {"workflow": "demo"}]}`), &job); status != http.StatusAccepted {
		t.Fatalf("POST /v1/jobs: %d", status)
	}
	fleettest.Eventually(t, fleet.CommitGrace+2*time.Second, func() bool {
		return fleettest.Count(t, js, fleet.StreamSubmit, fleet.SubmitJobSubject(job.ID)) == 1
	}, "job %s: its commit never fired for a router", job.ID)
	if n := fleettest.Count(t, js, fleet.StreamQueue, fleet.QueueFilter); n != 0 {
		t.Errorf("%d tickets in a queue that refuses them", n)
	}
}
