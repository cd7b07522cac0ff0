package stack_test

import (
	"fmt"
	"image/color"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

type deadLetters struct {
	DeadLetters []fleet.DeadLetter `json:"dead_letters"`
}

func (dl deadLetters) find(job string, index int) *fleet.DeadLetter {
	for i, d := range dl.DeadLetters {
		if d.JobID == job && d.Index == index {
			return &dl.DeadLetters[i]
		}
	}
	return nil
}

func TestTransientFailuresExhaustAttemptsWithoutBlockingOthers(t *testing.T) {
	t.Parallel()
	f := startPartsWith(t,
		simSpec{sim: comfysim.Config{StepDuration: time.Millisecond, OOMRate: 1}, pools: []string{"cursed"}},
		simSpec{sim: comfysim.Config{StepDuration: time.Millisecond}, pools: []string{"image"}},
	)
	job := fleettest.SubmitJob(t, f.APIURL, map[string]any{"callback_url": f.Hooks.URL, "scenes": []any{
		map[string]any{"workflow": "txt2img", "pool": "cursed", "params": map[string]any{"steps": 2}},
		map[string]any{"workflow": "txt2img", "params": map[string]any{"steps": 2}},
	}})
	hook := f.Hooks.Wait(t, job.ID, 60*time.Second)
	bad, good := hook.Body.Job.Scenes[0], hook.Body.Job.Scenes[1]
	if hook.Body.Job.Status != "failed" || good.Status != "succeeded" {
		t.Fatalf("job %s, scenes %s and %s; want the cursed one failed and the other succeeded", hook.Body.Job.Status, bad.Status, good.Status)
	}
	if bad.Status != "failed" || bad.Attempts != 3 || len(bad.Failures) != 3 {
		t.Fatalf("cursed scene: %s after %d attempts, failures %+v; want failed after 3", bad.Status, bad.Attempts, bad.Failures)
	}
	for _, a := range bad.Failures {
		if a.Node != "sim-0" || !strings.Contains(a.Error, "out of memory") {
			t.Errorf("failure %+v: want sim-0 running out of memory", a)
		}
	}
	var dl deadLetters
	fleettest.Get(t, f.APIURL+"/v1/deadletters", &dl)
	if d := dl.find(job.ID, 0); d == nil || len(d.Failures) != 3 || d.Pool != "cursed" {
		t.Errorf("dead letters %+v: want scene 0 with its 3 failures", dl)
	}
}

func TestDeadLetterRetriedAfterItsCauseIsFixed(t *testing.T) {
	t.Parallel()
	f := startParts(t, 1)
	loadMissing := map[string]any{
		"1": map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": "storyboard_ref.png"}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "ref"}},
	}
	job := fleettest.SubmitJob(t, f.APIURL, map[string]any{"callback_url": f.Hooks.URL, "scenes": []any{
		map[string]any{"graph": loadMissing},
		map[string]any{"workflow": "demo"},
	}})
	first := f.Hooks.Wait(t, job.ID, 60*time.Second)
	if first.Body.Type != "job.failed" {
		t.Fatalf("first webhook %s, want job.failed", first.Body.Type)
	}
	var dl deadLetters
	fleettest.Get(t, f.APIURL+"/v1/deadletters", &dl)
	d := dl.find(job.ID, 0)
	if d == nil || d.Attempts != 1 || !strings.Contains(d.Error, "storyboard_ref.png") {
		t.Fatalf("dead letters %+v: want scene 0, rejected once for its missing image", dl)
	}

	// Retrying a scene that has not failed is refused.
	if resp := fleettest.Call(t, http.MethodPost, fmt.Sprintf("%s/v1/jobs/%s/scenes/1/retry", f.APIURL, job.ID), nil, nil); resp != http.StatusConflict {
		t.Errorf("retry of a succeeded scene: %d, want 409", resp)
	}
	if status, body := postUpload(t, f.sims[0].URL(), "storyboard_ref.png", pngOf(t, 8, 8, color.NRGBA{}), true); status != http.StatusOK {
		t.Fatalf("upload: %d %s", status, body)
	}
	if resp := fleettest.Call(t, http.MethodPost, fmt.Sprintf("%s/v1/jobs/%s/scenes/0/retry", f.APIURL, job.ID), nil, nil); resp != http.StatusAccepted {
		t.Fatalf("retry: %d, want 202", resp)
	}

	second := f.Hooks.Wait(t, job.ID, 60*time.Second)
	s := second.Body.Job.Scenes[0]
	if second.Body.Type != "job.completed" || s.Status != "succeeded" || s.Attempts != 2 || len(s.Failures) != 1 {
		t.Fatalf("after the retry: %s, scene %s after %d attempts with failures %+v", second.Body.Type, s.Status, s.Attempts, s.Failures)
	}
	if second.ID == first.ID {
		t.Errorf("the second ending reused webhook-id %q", first.ID)
	}
	fleettest.Get(t, f.APIURL+"/v1/deadletters", &dl)
	if dl.find(job.ID, 0) != nil {
		t.Errorf("the retried scene is still a dead letter")
	}
}
