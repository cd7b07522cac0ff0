package stack_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/outputs/outputstest"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack/stacktest"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

// postJobWaiting posts a job with Prefer: wait=seconds and returns the status, the
// headers and the job answered.
func postJobWaiting(t *testing.T, apiURL string, body any, seconds int) (int, http.Header, api.Job) {
	t.Helper()
	a := fleettest.Do(t, http.MethodPost, apiURL+"/v1/jobs", body, fleettest.Header("Prefer", fmt.Sprintf("wait=%d", seconds)))
	var job api.Job
	if a.Status == http.StatusOK || a.Status == http.StatusAccepted {
		a.Decode(t, &job)
	} else {
		t.Logf("%v", a)
	}
	return a.Status, a.Header, job
}

// nodeInventory returns node's inventory as GET /v1/nodes/{id} shows it, nil while
// there is none.
func nodeInventory(t *testing.T, apiURL, node string) *intake.NodeInventory {
	t.Helper()
	var n intake.Node
	fleettest.Get(t, apiURL+"/v1/nodes/"+node, &n)
	return n.Inventory
}

// checkpointsOf are the checkpoint files of an inventory.
func checkpointsOf(inv *intake.NodeInventory) []string {
	if inv == nil {
		return nil
	}
	for _, m := range inv.Models {
		if m.Input == "ckpt_name" {
			return m.Files
		}
	}
	return nil
}

const (
	sd15 = "v1-5-pruned-emaonly.safetensors"
	sdxl = "sd_xl_base_1.0.safetensors"
)

// videoGraph is a raw graph that needs VideoHelperSuite's VHS_VideoCombine: frames
// blank frames of 64×64 combined into an mp4.
func videoGraph(frames int) map[string]any {
	return map[string]any{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 64, "height": 64, "batch_size": frames, "color": 0}},
		"2": map[string]any{"class_type": "VHS_VideoCombine", "inputs": map[string]any{"images": []any{"1", 0}, "frame_rate": 8,
			"loop_count": 0, "filename_prefix": "clip", "format": "video/h264-mp4", "pingpong": false, "save_output": true}},
	}
}

// TestScenesRunOnlyWhereTheyCan is issue 13's fleet of unlike nodes: every scene runs
// on a node that has what it needs, a scene no node can run is refused naming the
// field, a scene whose only capable node is offline waits and says why, and a node
// that gains the checkpoint (read again on request) takes it.
func TestScenesRunOnlyWhereTheyCan(t *testing.T) {
	t.Parallel()
	sims := stacktest.Sims(1, 1, 1)
	sims[0].Models = map[string][]string{"ckpt_name": {sd15, sdxl}}
	sims[1].Models = map[string][]string{"ckpt_name": {sd15}}
	sims[1].WithoutClasses = []string{"VHS_VideoCombine"}
	sims[2].Models = map[string][]string{"ckpt_name": {sd15}}
	b := stacktest.Start(t, func(c *stack.Config) { c.Sims = sims })
	api := b.APIURL
	a, bee, c := b.Sims[0], b.Sims[1], b.Sims[2]
	for _, n := range b.Nodes {
		fleettest.Eventually(t, 20*time.Second, func() bool { return nodeInventory(t, api, n.ID) != nil }, "no inventory of node %s", n.ID)
	}
	if got := checkpointsOf(nodeInventory(t, api, "sim-a")); !slices.Equal(got, []string{sdxl, sd15}) {
		t.Errorf("GET /v1/nodes/sim-a: checkpoints %v", got)
	}

	// A mixed job: each kind of scene runs only where it can.
	capable := map[string][]string{"sd15": {"sim-a", "sim-b", "sim-c"}, "sdxl": {"sim-a"}, "video": {"sim-a", "sim-c"}}
	var scenes []any
	var kinds []string
	for i := range 4 {
		txt := func(ckpt string) map[string]any {
			return map[string]any{"workflow": "txt2img", "params": map[string]any{"checkpoint": ckpt, "seed": i, "steps": 5, "width": 64, "height": 64}}
		}
		scenes = append(scenes, txt(sd15), txt(sdxl), map[string]any{"graph": videoGraph(2 + i)})
		kinds = append(kinds, "sd15", "sdxl", "video")
	}
	code, _, job := postJobWaiting(t, api, map[string]any{"scenes": scenes}, 60)
	if code != http.StatusOK || job.Status != "succeeded" {
		t.Fatalf("mixed job: %d, %s", code, job.Status)
	}
	for i, s := range job.Scenes {
		if !slices.Contains(capable[kinds[i]], s.Node) || len(s.Failures) > 0 {
			t.Errorf("scene %d (%s) ran on %s after %d failures; it can run on %v only", i, kinds[i], s.Node, len(s.Failures), capable[kinds[i]])
		}
	}
	for i, sim := range []*comfysim.Server{a, bee, c} {
		if st := sim.Stats(); st.Failed > 0 {
			t.Errorf("node %s failed %d prompts", b.Nodes[i].ID, st.Failed)
		}
	}

	// No node has it: 422 at the parameter that names it.
	var problem fleettest.Problem
	st := fleettest.Call(t, http.MethodPost, api+"/v1/jobs", map[string]any{"scenes": []any{
		map[string]any{"workflow": "txt2img", "params": map[string]any{"checkpoint": "x.safetensors"}}}}, &problem)
	if st != http.StatusUnprocessableEntity || len(problem.Errors) != 1 || problem.Errors[0].Location != "body.scenes[0].params.checkpoint" ||
		problem.Errors[0].Message != "no node in pool image has checkpoint x.safetensors" {
		t.Errorf("a checkpoint no node has: %d %+v", st, problem)
	}

	// The only node with SDXL goes offline: an SDXL scene is accepted (sim-a is
	// registered and has it), waits, and says why.
	a.Kill()
	fleettest.Eventually(t, 10*time.Second, func() bool { return observedState(t, b.JS, "sim-a") == fleet.NodeOffline }, "sim-a not offline")
	waiting := fleettest.SubmitJob(t, api, map[string]any{"scenes": []any{
		map[string]any{"workflow": "txt2img", "params": map[string]any{"checkpoint": sdxl, "steps": 5, "width": 64, "height": 64}}}})
	view := fleettest.GetJob(t, api, waiting.ID)
	if s := view.Scenes[0]; s.Status != "queued" || s.WaitingFor != "no online node in pool image has checkpoint "+sdxl {
		t.Errorf("SDXL scene while sim-a is offline: %s, waiting for %q", s.Status, s.WaitingFor)
	}

	// sim-b gains the checkpoint; read again on request, it takes the scene.
	if err := bee.AddModel("ckpt_name", sdxl); err != nil {
		t.Fatal(err)
	}
	var refreshed intake.Node
	if a := fleettest.Do(t, http.MethodPost, api+"/v1/nodes/sim-b/refresh", nil); json.Unmarshal(a.Body, &refreshed) != nil || a.Status != http.StatusOK ||
		!slices.Contains(checkpointsOf(refreshed.Inventory), sdxl) {
		t.Fatalf("POST /v1/nodes/sim-b/refresh: %v", a)
	}
	fleettest.Eventually(t, 30*time.Second, func() bool { return fleettest.GetJob(t, api, waiting.ID).Status == "succeeded" },
		"the SDXL scene did not run once sim-b had the checkpoint")
	if s := fleettest.GetJob(t, api, waiting.ID).Scenes[0]; s.Node != "sim-b" || s.WaitingFor != "" {
		t.Errorf("the SDXL scene ran on %s (waiting for %q), want sim-b", s.Node, s.WaitingFor)
	}

	// A refresh of a node whose ComfyUI is down says so; of an unknown node, 404.
	if a := fleettest.Do(t, http.MethodPost, api+"/v1/nodes/sim-a/refresh", nil); a.Status != http.StatusBadGateway {
		t.Errorf("refresh of a dead node: %v, want 502", a)
	}
	if st := fleettest.Do(t, http.MethodPost, api+"/v1/nodes/nobody/refresh", nil).Status; st != http.StatusNotFound {
		t.Errorf("refresh of an unknown node: %d, want 404", st)
	}
}

// TestPreferWaitAnswersTheFinishedJob is the synchronous mode: a job that ends within
// the wait comes back finished with 200; one that does not, 202 as without it.
func TestPreferWaitAnswersTheFinishedJob(t *testing.T) {
	t.Parallel()
	b := stacktest.Start(t, stacktest.Nodes(1, 1))
	api := b.APIURL
	start := time.Now()
	code, h, job := postJobWaiting(t, api, sceneJob("", 2, 5), 30)
	if code != http.StatusOK || h.Get("Preference-Applied") != "wait=30" || job.Status != "succeeded" || h.Get("Location") == "" {
		t.Fatalf("job within the wait: %d, Preference-Applied %q, %s", code, h.Get("Preference-Applied"), job.Status)
	}
	for _, s := range job.Scenes {
		if s.Status != "succeeded" || len(s.Outputs) == 0 {
			t.Errorf("scene %d: %s with %d outputs", s.Index, s.Status, len(s.Outputs))
		}
	}
	t.Logf("2 scenes of 5 steps answered finished after %s", time.Since(start).Round(time.Millisecond))

	// 150 steps of 10ms take longer than the 1 s waited.
	start = time.Now()
	code, h, job = postJobWaiting(t, api, sceneJob("", 1, 150), 1)
	took := time.Since(start)
	if code != http.StatusAccepted || h.Get("Preference-Applied") != "wait=1" || job.Status == "succeeded" || took < time.Second {
		t.Errorf("job longer than the wait: %d, Preference-Applied %q, %s after %s", code, h.Get("Preference-Applied"), job.Status, took)
	}
	// Asked beyond 60 s, it waits 60 s at most.
	code, h, _ = postJobWaiting(t, api, sceneJob("", 1, 5), 600)
	if code != http.StatusOK || h.Get("Preference-Applied") != "wait=60" {
		t.Errorf("wait=600: %d, Preference-Applied %q", code, h.Get("Preference-Applied"))
	}
}

// TestOutputsGoToS3 is a whole fleet with --outputs
// s3://renders/studio/2026?part_size=5MiB against a real S3-protocol server on
// loopback: outputs land in the bucket under the prefix, the job's presigned URLs (in
// the job, its webhook and the API's redirect) download the same bytes, and a video
// larger than a part goes up in parts and arrives whole. Parts of S3's smallest size
// keep the video small: the race detector makes every copy of it costly.
func TestOutputsGoToS3(t *testing.T) {
	s3 := outputstest.Start(t, "renders")
	s3.Env(t)
	sims := stacktest.Sims(1, 1)
	for i := range sims {
		// 6 frames of 1 MiB: a clip of 6 MiB and a little, two parts.
		sims[i].VideoFrameBytes = 1 << 20
	}
	b := stacktest.Start(t, func(c *stack.Config) { c.Sims, c.Outputs = sims, "s3://renders/studio/2026?part_size=5MiB" })
	apiURL := b.APIURL
	body := map[string]any{"callback_url": b.Hooks.URL, "scenes": []any{
		map[string]any{"workflow": "txt2img", "params": map[string]any{"seed": 7, "steps": 5, "width": 64, "height": 64}},
		map[string]any{"graph": videoGraph(6)},
	}}
	code, _, job := postJobWaiting(t, apiURL, body, 60)
	if code != http.StatusOK || job.Status != "succeeded" {
		t.Fatalf("job: %d %s", code, job.Status)
	}
	hook := b.Hooks.Wait(t, job.ID, 30*time.Second)

	var video *api.Output
	for si, s := range job.Scenes {
		for oi, o := range s.Outputs {
			key := "studio/2026/" + fleet.OutputKey(job.ID, s.Index, o.Name)
			stored, err := s3.Object("renders", key)
			if err != nil {
				t.Fatalf("output %s is not in the bucket under the prefix: %v", key, err)
			}
			if !strings.HasPrefix(o.URL, s3.URL+"/renders/"+key+"?") || !strings.Contains(o.URL, "X-Amz-Signature=") {
				t.Errorf("output %s: URL %s, want a presigned URL of the bucket", o.Name, o.URL)
			}
			if hooked := hook.Body.Job.Scenes[si].Outputs[oi].URL; !strings.HasPrefix(hooked, s3.URL+"/renders/"+key+"?") {
				t.Errorf("output %s: webhook URL %s, want a presigned URL of the bucket", o.Name, hooked)
			}
			res, err := http.Get(o.URL)
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(res.Body)
			res.Body.Close()
			if err != nil || res.StatusCode != http.StatusOK || !bytes.Equal(got, stored) || int64(len(got)) != o.Size {
				t.Errorf("GET presigned URL of %s: %s, %d bytes; want the %d bytes in the bucket", o.Name, res.Status, len(got), o.Size)
			}
			if o.ContentType == "video/mp4" {
				video = &job.Scenes[si].Outputs[oi]
			}
		}
	}
	if video == nil {
		t.Fatal("the video scene has no mp4 output")
	}
	// 6 frames of 1 MiB, and the file's boxes.
	if video.Size < 6<<20 {
		t.Errorf("video of %d bytes, want the whole clip of more than 6 MiB", video.Size)
	}
	// Each attempt at the video scene completes at most one upload: more than one
	// only where an attempt was cut short (its node starved on a loaded machine, say)
	// and the scene ran again. The S3 client may start more than it completes (it
	// retries a request whose answer timed out, a completion too: an upload is counted
	// once however often it was completed). Every upload that completed did so in two
	// parts.
	attempts := job.Scenes[1].Attempts
	var multipart int
	parts := map[string]int{}
	completed := map[string]bool{}
	for _, r := range s3.Requests() {
		method, uri, _ := strings.Cut(r, " ")
		_, query, _ := strings.Cut(uri, "?")
		q, _ := url.ParseQuery(query)
		switch {
		case method == http.MethodPost && q.Has("uploads"):
			multipart++
		case method == http.MethodPost && q.Has("uploadId"):
			completed[q.Get("uploadId")] = true
		case method == http.MethodPut && q.Has("partNumber"):
			parts[q.Get("uploadId")]++
		}
	}
	if len(completed) < 1 || len(completed) > attempts || multipart < len(completed) {
		t.Errorf("%d multipart uploads, %d completed, in %d attempts; want one completed upload an attempt, the video alone; the store's requests:\n%s",
			multipart, len(completed), attempts, strings.Join(s3.Requests(), "\n"))
	}
	for id := range completed {
		if parts[id] != 2 {
			t.Errorf("a completed upload of the video in %d parts, want 2: 5 MiB and the rest", parts[id])
		}
	}
	t.Logf("video of %d bytes, %d multipart uploads in %d attempts", video.Size, multipart, attempts)

	// The API's download link sends the client to the store.
	noRedirect := &http.Client{Transport: fleettest.HTTP.Transport, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	res, err := noRedirect.Get(apiURL + api.OutputPath(job.ID, 1, video.Name))
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if loc := res.Header.Get("Location"); res.StatusCode != http.StatusTemporaryRedirect || !strings.HasPrefix(loc, s3.URL+"/renders/studio/2026/") {
		t.Errorf("GET the API's output URL: %s to %q, want 307 to a presigned URL", res.Status, loc)
	}
	if got := fleettest.Do(t, http.MethodGet, apiURL+api.OutputPath(job.ID, 1, video.Name), nil); got.Status != http.StatusOK || int64(len(got.Body)) != video.Size {
		t.Errorf("GET the API's output URL, following it: %d, %d bytes of %d", got.Status, len(got.Body), video.Size)
	}
}
