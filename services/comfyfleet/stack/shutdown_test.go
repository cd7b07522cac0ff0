package stack_test

import (
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack/stacktest"
)

// TestStoppedExecutorHandsItsSceneBackAtOnce stops an executor mid-scene with an
// AckWait far longer than the test's deadline: only a scene handed back at once can
// finish elsewhere in time.
func TestStoppedExecutorHandsItsSceneBackAtOnce(t *testing.T) {
	t.Parallel()
	settings := stacktest.Settings()
	settings.AckWait = 30 * time.Second
	spec := simSpec{sim: comfysim.Config{StepDuration: 20 * time.Millisecond}, pools: []string{"image"}}
	f := startPartsSettings(t, settings, spec, spec)
	events := fleettest.SceneEvents(t, f.NC)

	job := fleettest.SubmitJob(t, f.APIURL, sceneJob(f.Hooks.URL, 1, 150))
	first, pos := events.Next(t, 0, 15*time.Second, "progress event", fleettest.OfType(fleet.EventProgress)) // rendering on its node
	f.stopExecutorOf(first.Node)
	second, _ := events.Next(t, pos, 15*time.Second, "started event after it", fleettest.OfType(fleet.EventStarted))
	if second.Node == first.Node || second.Attempt != 2 {
		t.Fatalf("after stopping %s the scene started on %s (attempt %d); want the other node, attempt 2", first.Node, second.Node, second.Attempt)
	}
	hook := f.Hooks.Wait(t, job.ID, 30*time.Second)
	if hook.Body.Job.Status != "succeeded" {
		t.Fatalf("job %s", hook.Body.Job.Status)
	}
	for _, sim := range f.sims {
		if sim.Stats().Interrupted > 0 {
			return
		}
	}
	t.Errorf("no node saw its prompt interrupted: the stopped executor left it rendering")
}
