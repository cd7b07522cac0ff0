package intake_test

import (
	"net/http"
	"testing"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

// TestTheIntakeQueuesTheJobsItAccepts runs an intake with no dispatcher: by the time
// it answers 202 the job is recorded, and then its scenes are queued (their queued
// events and tickets) and its commit's schedule removed, so that no router ever
// takes the commit up.
func TestTheIntakeQueuesTheJobsItAccepts(t *testing.T) {
	t.Parallel()
	natsURL, js := fleetFor(t)
	base := startIntake(t, natsURL, intake.Config{Templates: shipped})
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
}
