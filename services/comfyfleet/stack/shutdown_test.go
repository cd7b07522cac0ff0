package stack_test

import (
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// TestStoppedExecutorHandsItsSceneBackAtOnce stops an executor mid-scene with an
// AckWait far longer than the test's deadline: only a scene handed back at once can
// finish elsewhere in time.
func TestStoppedExecutorHandsItsSceneBackAtOnce(t *testing.T) {
	t.Parallel()
	settings := testSettings()
	settings.AckWait = 30 * time.Second
	spec := simSpec{sim: comfysim.Config{StepDuration: 20 * time.Millisecond}, pools: []string{"image"}}
	f := startPartsSettings(t, settings, spec, spec)
	events := make(chan *nats.Msg, 256)
	sub, err := f.nc.ChanSubscribe("fleet.evt.scene.*.*.*", events)
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()

	job, _ := postJob(t, f.apiURL, sceneJob(f.hooks.URL, 1, 150))
	next := func(typ fleet.EventType) fleet.SceneEvent {
		t.Helper()
		deadline := time.After(15 * time.Second)
		for {
			select {
			case m := <-events:
				ev, err := fleet.DecodeSceneEvent(m.Data)
				if err != nil {
					t.Fatal(err)
				}
				if ev.Type == typ {
					return ev
				}
			case <-deadline:
				t.Fatalf("no %s event within 15s", typ)
			}
		}
	}
	first := next(fleet.EventProgress) // rendering on its node
	f.stopExecutorOf(first.Node)
	second := next(fleet.EventStarted)
	if second.Node == first.Node || second.Attempt != 2 {
		t.Fatalf("after stopping %s the scene started on %s (attempt %d); want the other node, attempt 2", first.Node, second.Node, second.Attempt)
	}
	hook := f.hooks.wait(t, job.ID, 30*time.Second)
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
