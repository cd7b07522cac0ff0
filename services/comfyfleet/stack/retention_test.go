package stack_test

import (
	"encoding/base64"
	"image/color"
	"net/http"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/outputs/outputstest"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack/stacktest"
)

// retentionJob is a finished img2img job with an input image and an output, of which
// the fleet holds every piece (its output in the object store, unless inS3); it
// returns its id.
func retentionJob(t *testing.T, b *stacktest.Fleet, ttl int, inS3 bool) string {
	t.Helper()
	body := map[string]any{"callback_url": b.Hooks.URL, "scenes": []any{map[string]any{
		"workflow": "img2img", "params": map[string]any{"steps": 5, "seed": 7},
		"inputs": map[string]any{"image": map[string]any{"base64": base64.StdEncoding.EncodeToString(pngOf(t, 64, 48, color.NRGBA{}))}},
	}}}
	if ttl > 0 {
		body["ttl_s"] = ttl
	}
	job := fleettest.SubmitJob(t, b.APIURL, body)
	if hook := b.Hooks.Wait(t, job.ID, 30*time.Second); hook.Body.Type != "job.completed" {
		t.Fatalf("job %s: %s", job.ID, hook.Body.Type)
	}
	pieces := fleettest.JobPieces(t, b.JS, job.ID)
	for _, what := range []string{"record", "state", "events", "payloads", "inputs", "outputs"} {
		if pieces[what] == 0 && (what != "outputs" || !inS3) {
			t.Fatalf("the finished job has no %s: %v", what, pieces)
		}
	}
	return job.ID
}

// waitGone waits until nothing is left of job and the API answers 404 for it.
func waitGone(t *testing.T, b *stacktest.Fleet, job string, within time.Duration) {
	t.Helper()
	var left []string
	fleettest.Eventually(t, within, func() bool {
		var gone bool
		gone, left = fleettest.Gone(fleettest.JobPieces(t, b.JS, job))
		return gone
	}, "the expired job's %v are left", &left)
	if a := fleettest.Do(t, http.MethodGet, b.APIURL+"/v1/jobs/"+job, nil); a.Status != http.StatusNotFound {
		t.Errorf("GET the expired job: %v, want 404", a)
	}
}

// TestAJobsTTLDeletesItAndItsFiles: the notifier's janitor deletes a job at the end
// of its ttl_s, long before the fleet's retention.
func TestAJobsTTLDeletesItAndItsFiles(t *testing.T) {
	t.Parallel()
	b := stacktest.Start(t, stacktest.Nodes(1), func(c *stack.Config) { c.Intake.MinJobTTL = time.Second })
	keep := retentionJob(t, b, 0, false)
	job := retentionJob(t, b, 4, false)
	waitGone(t, b, job, 20*time.Second)
	if p := fleettest.JobPieces(t, b.JS, keep); p["record"] != 1 || p["outputs"] == 0 || p["inputs"] == 0 {
		t.Errorf("a job without ttl_s lost pieces: %v", p)
	}
}

// TestTheRetentionRemovesJobsAndTheirFiles: JetStream's age limits remove every piece
// of a job once the fleet's retention has passed.
func TestTheRetentionRemovesJobsAndTheirFiles(t *testing.T) {
	t.Parallel()
	b := stacktest.Start(t, stacktest.Nodes(1), func(c *stack.Config) { c.Settings.Retention = 5 * time.Second })
	job := retentionJob(t, b, 0, false)
	waitGone(t, b, job, 30*time.Second)
}

// TestDeletionRemovesOutputsFromS3: with outputs in an S3-compatible bucket, a job
// deleted through the API and one deleted by the janitor at the end of its ttl_s
// leave nothing there.
func TestDeletionRemovesOutputsFromS3(t *testing.T) {
	s3 := outputstest.Start(t, "renders")
	s3.Env(t)
	b := stacktest.Start(t, stacktest.Nodes(1), func(c *stack.Config) {
		c.Outputs = "s3://renders/studio"
		c.Intake.MinJobTTL = time.Second
	})
	keys := func(job string) []string {
		t.Helper()
		k, err := s3.Keys("renders", "studio/"+job+"/")
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	deleted := retentionJob(t, b, 0, true)
	expiring := retentionJob(t, b, 4, true)
	for _, job := range []string{deleted, expiring} {
		if len(keys(job)) == 0 {
			t.Fatalf("job %s has no output in the bucket", job)
		}
	}
	fleettest.Do(t, http.MethodDelete, b.APIURL+"/v1/jobs/"+deleted, nil).Want(t, http.StatusNoContent)
	if k := keys(deleted); len(k) > 0 {
		t.Errorf("after DELETE, the bucket still holds %v", k)
	}
	waitGone(t, b, expiring, 20*time.Second)
	if k := keys(expiring); len(k) > 0 {
		t.Errorf("after the janitor, the bucket still holds %v", k)
	}
}
