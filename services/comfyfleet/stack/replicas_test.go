package stack_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
	"github.com/comfyfleet/comfyfleet/services/executor"
)

// Every service runs twice, as a deployment without a single point of failure does:
// each job is completed, announced and called back exactly once, and each scene
// completes once, whichever intake took the job and whichever executor ran it.
func TestEveryServiceTwiceCompletesAndCallsBackEachJobOnce(t *testing.T) {
	t.Parallel()
	b := startStackTuned(t, testSims(1, 1, 1, 1), func(c *stack.Config) {
		c.Intakes, c.Dispatchers, c.Notifiers = 2, 2, 2
		c.NoExecutor = true
	})
	if len(b.stack.APIURLs) != 2 {
		t.Fatalf("%d intakes, want 2", len(b.stack.APIURLs))
	}
	for i, nodes := range [][]fleet.NodeConfig{b.stack.Nodes[:2], b.stack.Nodes[2:]} {
		if _, err := b.stack.AddExecutor(fmt.Sprintf("executor-%d", i+1), executor.Config{Nodes: nodes, HeartbeatInterval: 200 * time.Millisecond}); err != nil {
			t.Fatal(err)
		}
	}

	const jobs, scenes = 12, 5
	ids := make([]string, jobs)
	for j := range ids {
		job, _ := postJob(t, b.stack.APIURLs[j%2], sceneJob(b.hooks.URL, scenes, 5))
		ids[j] = job.ID
	}
	for _, id := range ids {
		if hook := b.hooks.wait(t, id, 2*time.Minute); hook.Body.Job.Status != "succeeded" {
			t.Fatalf("job %s: %s", id, hook.Body.Job.Status)
		}
	}
	fleettest.Eventually(t, 10*time.Second, func() bool { return settled(t, b.js) }, "notifiers still have deliveries pending")
	for _, id := range ids {
		if n := b.hooks.count(id); n != 1 {
			t.Errorf("job %s: webhook delivered %d times, want once", id, n)
		}
		if n := countSubject(t, b.js, fleet.StreamEvents, fleet.JobEventSubject(id, fleet.EventCompleted)); n != 1 {
			t.Errorf("job %s: %d completion events, want 1", id, n)
		}
		if n := countSubject(t, b.js, fleet.StreamEvents, "fleet.evt.scene."+id+".*.completed"); n != scenes {
			t.Errorf("job %s: %d scene completions, want %d", id, n, scenes)
		}
		for _, api := range b.stack.APIURLs {
			if got := getJob(t, api, id); got.Status != "succeeded" {
				t.Errorf("job %s at %s: %s", id, api, got.Status)
			}
		}
	}
	for i, sim := range b.stack.Sims {
		if len(sim.Stats().Runs) == 0 {
			t.Errorf("node %s ran no scene", b.stack.Nodes[i].ID)
		}
	}
}
