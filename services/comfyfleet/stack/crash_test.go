package stack_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack/stacktest"
)

// TestACommittedJobRunsThoughItsIntakeStopsBeforeRecordingIt stops the intake's
// request right after the job's commit, before the intake records the job or
// answers: the dispatcher's router records it and queues its scenes, and the job
// runs to its end.
func TestACommittedJobRunsThoughItsIntakeStopsBeforeRecordingIt(t *testing.T) {
	t.Parallel()
	committed := make(chan string, 1)
	b := stacktest.Start(t, stacktest.Nodes(1, 1), func(c *stack.Config) {
		c.Intake.AfterCommit = func(job string) error {
			committed <- job
			return errors.New("the intake died here")
		}
	})
	scenes := []map[string]any{}
	for i := range 6 {
		scenes = append(scenes, map[string]any{"workflow": "demo", "params": map[string]any{"size": 64, "color": i}})
	}
	body, _ := json.Marshal(map[string]any{"scenes": scenes})
	resp, err := fleettest.HTTP.Post(b.APIURL+"/v1/jobs", "application/json", bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("POST /v1/jobs: %s, want the request to fail after the commit", resp.Status)
	}
	var id string
	select {
	case id = <-committed:
	case <-time.After(10 * time.Second):
		t.Fatal("the job was never committed")
	}
	// The job is not found until the router records it.
	fleettest.Eventually(t, 30*time.Second, func() bool {
		resp, err := fleettest.HTTP.Get(b.APIURL + "/v1/jobs/" + id)
		if err != nil {
			t.Fatal(err)
		}
		var job struct {
			Status string `json:"status"`
		}
		_ = json.NewDecoder(resp.Body).Decode(&job)
		resp.Body.Close()
		return resp.StatusCode == http.StatusOK && job.Status == "succeeded"
	}, "job %s never succeeded", id)
	job := fleettest.GetJob(t, b.APIURL, id)
	for _, s := range job.Scenes {
		if s.Status != "succeeded" || len(s.Outputs) != 1 {
			t.Errorf("scene %d: %s with %d outputs, want succeeded with one", s.Index, s.Status, len(s.Outputs))
		}
	}
}
