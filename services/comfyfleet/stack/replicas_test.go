package stack_test

import (
	"fmt"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack/stacktest"
	"github.com/comfyfleet/comfyfleet/services/executor"
)

// Every service runs twice, as a deployment without a single point of failure does:
// each job is completed, announced and called back exactly once, and each scene
// completes once, whichever intake took the job and whichever executor ran it.
func TestEveryServiceTwiceCompletesAndCallsBackEachJobOnce(t *testing.T) {
	t.Parallel()
	b := stacktest.Start(t, stacktest.Nodes(1, 1, 1, 1), func(c *stack.Config) {
		c.Intakes, c.Dispatchers, c.Notifiers = 2, 2, 2
		c.NoExecutor = true
	})
	if len(b.APIURLs) != 2 {
		t.Fatalf("%d intakes, want 2", len(b.APIURLs))
	}
	for i, nodes := range [][]fleet.NodeConfig{b.Nodes[:2], b.Nodes[2:]} {
		if _, err := b.AddExecutor(fmt.Sprintf("executor-%d", i+1), executor.Config{Nodes: nodes, HeartbeatInterval: 200 * time.Millisecond}); err != nil {
			t.Fatal(err)
		}
	}

	const jobs, scenes = 12, 5
	ids := make([]string, jobs)
	for j := range ids {
		job := fleettest.SubmitJob(t, b.APIURLs[j%2], sceneJob(b.Hooks.URL, scenes, 5))
		ids[j] = job.ID
	}
	for _, id := range ids {
		if hook := b.Hooks.Wait(t, id, 2*time.Minute); hook.Body.Job.Status != "succeeded" {
			t.Fatalf("job %s: %s", id, hook.Body.Job.Status)
		}
	}
	fleettest.Eventually(t, 10*time.Second, func() bool { return settled(t, b.JS) }, "notifiers still have deliveries pending")
	for _, id := range ids {
		if n := b.Hooks.Count(id); n != 1 {
			t.Errorf("job %s: webhook delivered %d times, want once", id, n)
		}
		if n := fleettest.Count(t, b.JS, fleet.StreamEvents, fleet.JobEventSubject(id, fleet.EventCompleted)); n != 1 {
			t.Errorf("job %s: %d completion events, want 1", id, n)
		}
		if n := fleettest.Count(t, b.JS, fleet.StreamEvents, "fleet.evt.scene."+id+".*.completed"); n != scenes {
			t.Errorf("job %s: %d scene completions, want %d", id, n, scenes)
		}
		for _, api := range b.APIURLs {
			if got := fleettest.GetJob(t, api, id); got.Status != "succeeded" {
				t.Errorf("job %s at %s: %s", id, api, got.Status)
			}
		}
	}
	for i, sim := range b.Sims {
		if len(sim.Stats().Runs) == 0 {
			t.Errorf("node %s ran no scene", b.Nodes[i].ID)
		}
	}
}
