package stack_test

import (
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
	if a := fleettest.Do(t, http.MethodPost, b.APIURL+"/v1/jobs", map[string]any{"scenes": scenes}); a.Status != http.StatusServiceUnavailable {
		t.Fatalf("%v, want the request to fail after the commit", a)
	}
	var id string
	select {
	case id = <-committed:
	case <-time.After(10 * time.Second):
		t.Fatal("the job was never committed")
	}
	// The job is not found until the router records it.
	fleettest.Eventually(t, 30*time.Second, func() bool {
		var job struct {
			Status string `json:"status"`
		}
		return fleettest.Call(t, http.MethodGet, b.APIURL+"/v1/jobs/"+id, nil, &job) == http.StatusOK && job.Status == "succeeded"
	}, "job %s never succeeded", id)
	job := fleettest.GetJob(t, b.APIURL, id)
	for _, s := range job.Scenes {
		if s.Status != "succeeded" || len(s.Outputs) != 1 {
			t.Errorf("scene %d: %s with %d outputs, want succeeded with one", s.Index, s.Status, len(s.Outputs))
		}
	}
}
