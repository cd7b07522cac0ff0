package stack_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/comfy"
	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack/stacktest"
)

// viewGate holds every output download of the executor that talks through it, so
// that the executor can be lost after ComfyUI finished a prompt and before the scene
// is recorded.
type viewGate struct {
	base http.RoundTripper
	held chan struct{}
}

func (g *viewGate) RoundTrip(req *http.Request) (*http.Response, error) {
	if req.URL.Path == "/view" {
		select {
		case g.held <- struct{}{}:
		default:
		}
		<-req.Context().Done()
		return nil, req.Context().Err()
	}
	return g.base.RoundTrip(req)
}

func TestRedeliveredSceneWhosePromptFinishedIsNotRenderedAgain(t *testing.T) {
	t.Parallel()
	gate := &viewGate{base: http.DefaultTransport.(*http.Transport).Clone(), held: make(chan struct{}, 1)}
	f := startPartsWith(t, simSpec{sim: comfysim.Config{StepDuration: 10 * time.Millisecond}, pools: []string{"image"}, transport: gate})
	node, sim := f.nodes[0], f.sims[0]

	job := fleettest.SubmitJob(t, f.APIURL, sceneJob(f.Hooks.URL, 1, 20))
	select {
	case <-gate.held:
	case <-time.After(30 * time.Second):
		t.Fatal("the executor never fetched the outputs")
	}
	first := comfy.PromptID(job.ID, "0", "1")
	if got := sim.Stats().Rendered; len(got) != 1 || got[0] != first {
		t.Fatalf("rendered %v before the crash, want the first attempt's prompt", got)
	}
	// Lost between ComfyUI's success and the completion event; the same node is the
	// only one left for the redelivery.
	f.crashExecutorOf(node.ID)
	f.startExecutor("successor", node, nil)

	hook := f.Hooks.Wait(t, job.ID, 60*time.Second)
	s := hook.Body.Job.Scenes[0]
	if hook.Body.Job.Status != "succeeded" || s.Attempts != 2 || s.Node != node.ID || len(s.Outputs) == 0 {
		t.Fatalf("job %s: scene %s on %s after %d attempts with %d outputs; want success at attempt 2 with outputs",
			hook.Body.Job.Status, s.Status, s.Node, s.Attempts, len(s.Outputs))
	}
	if st := sim.Stats(); st.Prompts != 1 || len(st.Rendered) != 1 {
		t.Errorf("node took %d prompts and rendered %v; want the one prompt, rendered once", st.Prompts, st.Rendered)
	}
	if res := fleettest.Do(t, http.MethodGet, s.Outputs[0].URL, nil); res.Status != http.StatusOK || res.Header.Get("Content-Type") != "image/png" {
		t.Errorf("%v (%s)", res, res.Header.Get("Content-Type"))
	}
	if n := fleettest.Count(t, f.JS, fleet.StreamEvents, fleet.SceneEventSubject(job.ID, 0, fleet.EventCompleted)); n != 1 {
		t.Errorf("%d completed events, want 1", n)
	}
}

// postCancel cancels job id through the API at apiURL.
func postCancel(t *testing.T, apiURL, id string) fleettest.Answer {
	t.Helper()
	return fleettest.Do(t, http.MethodPost, apiURL+"/v1/jobs/"+id+"/cancel", nil)
}

func TestCancelInterruptsRunningScenesAndDropsQueuedOnes(t *testing.T) {
	t.Parallel()
	b := stacktest.Start(t, stacktest.Nodes(0.5))
	sim := b.Sims[0]
	events := fleettest.SceneEvents(t, b.NC)

	// One node: one scene runs for 3s while the other waits behind it.
	job := fleettest.SubmitJob(t, b.APIURL, sceneJob(b.Hooks.URL, 2, 150))
	running, _ := events.Next(t, 0, 30*time.Second, "progress of a scene", fleettest.OfType(fleet.EventProgress))

	cancelled := postCancel(t, b.APIURL, job.ID)
	answered := time.Now()
	var shown api.Job
	cancelled.Want(t, http.StatusAccepted).Decode(t, &shown)
	if shown.Status != "cancelled" || shown.Scenes[0].Status != "cancelled" || shown.Scenes[1].Status != "cancelled" {
		t.Errorf("cancel answered job %s with scenes %s, %s; want all cancelled", shown.Status, shown.Scenes[0].Status, shown.Scenes[1].Status)
	}
	// Uninterrupted, the prompt would end in its 3 s and count no interrupt: the bound
	// is loose for a loaded machine, not for the behaviour.
	fleettest.Eventually(t, 10*time.Second, func() bool { return sim.Stats().Interrupted == 1 },
		"the running prompt was not interrupted")
	t.Logf("running prompt interrupted %s after the cancel was answered", time.Since(answered).Round(time.Millisecond))

	hook := b.Hooks.Wait(t, job.ID, 30*time.Second)
	if hook.Body.Type != "job.cancelled" || hook.Body.Job.Status != "cancelled" {
		t.Fatalf("webhook %s with job %s; want job.cancelled", hook.Body.Type, hook.Body.Job.Status)
	}
	for _, s := range hook.Body.Job.Scenes {
		if s.Status != "cancelled" {
			t.Errorf("scene %d: %s, want cancelled", s.Index, s.Status)
		}
	}
	queued := 1 - running.Index
	fleettest.Eventually(t, 10*time.Second, func() bool {
		return fleettest.Count(t, b.JS, fleet.StreamWork, fleet.WorkFilter) == 0 && settled(t, b.JS)
	}, "work or webhooks still pending after the cancel")
	if n := fleettest.Count(t, b.JS, fleet.StreamEvents, fleet.SceneEventSubject(job.ID, queued, fleet.EventStarted)); n != 0 {
		t.Errorf("the queued scene %d started %d times after the cancel", queued, n)
	}
	// The queued scene waited inside ComfyUI behind the running one; the cancel
	// took it out of ComfyUI's queue before it ran.
	if st := sim.Stats(); len(st.Runs) != 1 || len(st.Rendered) != 0 {
		t.Errorf("node ran %d prompts and rendered %v; want only the interrupted one", len(st.Runs), st.Rendered)
	}
	for _, typ := range []fleet.EventType{fleet.EventCompleted, fleet.EventRetrying, fleet.EventFailed} {
		if n := fleettest.Count(t, b.JS, fleet.StreamEvents, fleet.SceneEventSubject(job.ID, running.Index, typ)); n != 0 {
			t.Errorf("the interrupted scene has %d %s events", n, typ)
		}
	}
	if n := b.Hooks.Count(job.ID); n != 1 {
		t.Errorf("webhook delivered %d times, want once", n)
	}
	if n := fleettest.Count(t, b.JS, fleet.StreamEvents, fleet.JobEventSubject(job.ID, fleet.EventCancelled)); n != 1 {
		t.Errorf("%d job-cancelled events, want 1", n)
	}

	for name, tc := range map[string]struct {
		id     string
		status int
	}{
		"finished job": {job.ID, http.StatusConflict},
		"unknown job":  {"no-such-job", http.StatusNotFound},
	} {
		a := postCancel(t, b.APIURL, tc.id)
		if a.Status != tc.status || a.Header.Get("Content-Type") != "application/problem+json" {
			t.Errorf("cancel of %s: %v (%s); want %d problem JSON", name, a, a.Header.Get("Content-Type"), tc.status)
		}
	}
}

func TestSceneThatKeepsTimingOutFailsWithTheTimeout(t *testing.T) {
	t.Parallel()
	b := stacktest.Start(t, stacktest.Nodes(0.02))
	job := fleettest.SubmitJob(t, b.APIURL, map[string]any{"callback_url": b.Hooks.URL, "scenes": []any{
		map[string]any{"workflow": "txt2img", "params": map[string]any{"steps": 20, "width": 256, "height": 256}, "timeout_s": 1},
	}})
	if got := job.Scenes[0].TimeoutS; got != 1 {
		t.Errorf("accepted scene has timeout_s %d, want 1", got)
	}
	hook := b.Hooks.Wait(t, job.ID, 60*time.Second)
	s := hook.Body.Job.Scenes[0]
	if hook.Body.Job.Status != "failed" || s.Error != "timed out after 1s" || s.Attempts != 3 || len(s.Failures) != 3 {
		t.Fatalf("job %s: scene %q after %d attempts, failures %+v; want failed, timed out after 1s, three times",
			hook.Body.Job.Status, s.Error, s.Attempts, s.Failures)
	}
	sim := b.Sims[0]
	fleettest.Eventually(t, 5*time.Second, func() bool { return sim.Stats().Interrupted == 3 },
		"the node did not interrupt the three timed-out prompts")
	if st := sim.Stats(); st.Prompts != 3 || len(st.Rendered) != 0 {
		t.Errorf("node took %d prompts and rendered %v; want three, none finished", st.Prompts, st.Rendered)
	}
}

func TestVideoSceneOutputsDownloadWithTheirContentTypes(t *testing.T) {
	t.Parallel()
	b := stacktest.Start(t, stacktest.Nodes(1))
	combine := func(prefix, format string) map[string]any {
		return map[string]any{"class_type": "VHS_VideoCombine", "inputs": map[string]any{
			"images": []any{"1", 0}, "frame_rate": 8, "loop_count": 0, "filename_prefix": prefix,
			"format": format, "pingpong": false, "save_output": true}}
	}
	graph := map[string]any{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 64, "height": 64, "batch_size": 8, "color": 0x3366cc}},
		"2": combine("clip", "video/h264-mp4"),
		"3": combine("loop", "image/gif"),
	}
	job := fleettest.SubmitJob(t, b.APIURL, map[string]any{"callback_url": b.Hooks.URL, "scenes": []any{
		map[string]any{"graph": graph, "pool": "video"},
	}})
	if got := job.Scenes[0].TimeoutS; got != 3600 {
		t.Errorf("video scene has timeout_s %d, want the video default 3600", got)
	}
	hook := b.Hooks.Wait(t, job.ID, 60*time.Second)
	s := hook.Body.Job.Scenes[0]
	if hook.Body.Job.Status != "succeeded" || len(s.Outputs) != 2 {
		t.Fatalf("job %s: scene %s with outputs %+v (%s); want two outputs", hook.Body.Job.Status, s.Status, s.Outputs, s.Error)
	}
	want := map[string]struct {
		contentType string
		magic       func([]byte) bool
	}{
		".mp4": {"video/mp4", func(b []byte) bool { return len(b) > 8 && string(b[4:8]) == "ftyp" }},
		".gif": {"image/gif", func(b []byte) bool { return bytes.HasPrefix(b, []byte("GIF8")) }},
	}
	for _, o := range s.Outputs {
		w, ok := want[o.Name[strings.LastIndex(o.Name, "."):]]
		if !ok || o.Kind != "gifs" || o.ContentType != w.contentType {
			t.Errorf("output %s of kind %s as %s; want an mp4 and a gif from gifs", o.Name, o.Kind, o.ContentType)
			continue
		}
		res := fleettest.Do(t, http.MethodGet, o.URL, nil)
		if body := res.Body; res.Status != http.StatusOK || res.Header.Get("Content-Type") != w.contentType || !w.magic(body) || int64(len(body)) != o.Size {
			t.Errorf("GET %s: %d %s, %d bytes starting %q; want %s of %d bytes", o.URL, res.Status, res.Header.Get("Content-Type"),
				len(body), body[:min(len(body), 12)], w.contentType, o.Size)
		}
	}
}

// sse is one Server-Sent Event.
type sse struct {
	ID, Event string
	Data      fleet.Event
}

// openEvents opens a job's event stream; lastID, if not empty, resumes after it.
func openEvents(ctx context.Context, t *testing.T, apiURL, job, lastID string) *http.Response {
	t.Helper()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, apiURL+"/v1/jobs/"+job+"/events", nil)
	if err != nil {
		t.Fatal(err)
	}
	if lastID != "" {
		req.Header.Set("Last-Event-ID", lastID)
	}
	resp, err := fleettest.HTTP.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("GET events: %s %s", resp.Status, resp.Header.Get("Content-Type"))
	}
	return resp
}

// readEvents parses a Server-Sent Events stream, sending each event on out, until
// the stream ends; it returns the error that ended it (nil at a clean end).
func readEvents(r io.Reader, out chan<- sse) error {
	defer close(out)
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	var ev sse
	var data string
	for sc.Scan() {
		line := sc.Text()
		switch {
		case line == "":
			if data != "" {
				if err := json.Unmarshal([]byte(data), &ev.Data); err != nil {
					return err
				}
				out <- ev
			}
			ev, data = sse{}, ""
		case strings.HasPrefix(line, ":"):
		case strings.HasPrefix(line, "id: "):
			ev.ID = strings.TrimPrefix(line, "id: ")
		case strings.HasPrefix(line, "event: "):
			ev.Event = strings.TrimPrefix(line, "event: ")
		case strings.HasPrefix(line, "data: "):
			data += strings.TrimPrefix(line, "data: ")
		}
	}
	return sc.Err()
}

// collect reads a whole event stream, failing the test if it does not end within
// the context's deadline.
func collect(t *testing.T, resp *http.Response) []sse {
	t.Helper()
	defer resp.Body.Close()
	ch := make(chan sse, 16)
	errc := make(chan error, 1)
	go func() { errc <- readEvents(resp.Body, ch) }()
	var got []sse
	for ev := range ch {
		got = append(got, ev)
	}
	if err := <-errc; err != nil {
		t.Fatalf("event stream ended with %v after %d events", err, len(got))
	}
	return got
}

func TestJobEventsStreamLiveInOrderAndEnd(t *testing.T) {
	t.Parallel()
	b := stacktest.Start(t, stacktest.Nodes(1, 1))
	job := fleettest.SubmitJob(t, b.APIURL, sceneJob(b.Hooks.URL, 2, 60))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	got := collect(t, openEvents(ctx, t, b.APIURL, job.ID, ""))

	if len(got) == 0 || got[len(got)-1].ID != fleet.JobEventID(job.ID, fleet.EventCompleted, 0) {
		t.Fatalf("stream of %d events did not end with the job's completion: %+v", len(got), got)
	}
	if last := got[len(got)-1]; last.Event != "dev.comfyfleet.job.completed" {
		t.Errorf("last event type %q", last.Event)
	}
	type seen struct {
		order    []fleet.EventType
		progress []int
	}
	scenes := map[int]*seen{0: {}, 1: {}}
	for _, ev := range got {
		if ev.Data.ID != ev.ID || ev.Data.Type != ev.Event || ev.Data.SpecVersion != "1.0" {
			t.Errorf("event %s/%s carries CloudEvent %s/%s", ev.ID, ev.Event, ev.Data.ID, ev.Data.Type)
		}
		if !strings.HasPrefix(ev.Event, "dev.comfyfleet.scene.") {
			continue
		}
		var se fleet.SceneEvent
		if err := json.Unmarshal(ev.Data.Data, &se); err != nil {
			t.Fatal(err)
		}
		s := scenes[se.Index]
		if len(s.order) == 0 || s.order[len(s.order)-1] != se.Type {
			s.order = append(s.order, se.Type)
		}
		if se.Type == fleet.EventProgress {
			s.progress = append(s.progress, se.Progress.Value)
		}
	}
	want := []fleet.EventType{fleet.EventQueued, fleet.EventStarted, fleet.EventProgress, fleet.EventCompleted}
	for i, s := range scenes {
		if !slices.Equal(s.order, want) {
			t.Errorf("scene %d: events in order %v, want %v", i, s.order, want)
		}
		if len(s.progress) < 2 {
			t.Errorf("scene %d: progress %v, want several steps", i, s.progress)
		}
		for j := 1; j < len(s.progress); j++ {
			if s.progress[j] <= s.progress[j-1] {
				t.Errorf("scene %d: progress %v does not increase", i, s.progress)
				break
			}
		}
	}

	// A client that reconnects with Last-Event-ID gets the rest, and nothing after
	// the job's last event.
	mid := len(got) / 2
	rest := collect(t, openEvents(ctx, t, b.APIURL, job.ID, got[mid].ID))
	if len(rest) != len(got)-mid-1 || (len(rest) > 0 && rest[0].ID != got[mid+1].ID) {
		t.Errorf("resumed after %s: %d events, want the %d after it", got[mid].ID, len(rest), len(got)-mid-1)
	}
	if after := collect(t, openEvents(ctx, t, b.APIURL, job.ID, got[len(got)-1].ID)); len(after) != 0 {
		t.Errorf("resumed after the job's end: %d events, want none", len(after))
	}
}

func TestJobEventsStreamStopsWhenTheClientLeaves(t *testing.T) {
	t.Parallel()
	b := stacktest.Start(t, stacktest.Nodes(0.25))
	events := fleettest.SceneEvents(t, b.NC)
	job := fleettest.SubmitJob(t, b.APIURL, sceneJob(b.Hooks.URL, 1, 150))
	events.Next(t, 0, 30*time.Second, "start of the scene", fleettest.OfType(fleet.EventStarted))
	consumers := func() int {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s, err := b.JS.Stream(ctx, fleet.StreamEvents)
		if err != nil {
			t.Fatal(err)
		}
		return s.CachedInfo().State.Consumers
	}
	before := consumers()

	ctx, leave := context.WithCancel(context.Background())
	resp := openEvents(ctx, t, b.APIURL, job.ID, "")
	ch := make(chan sse, 64)
	go readEvents(resp.Body, ch)
	select {
	case ev := <-ch:
		if ev.ID != "scene."+job.ID+".0.queued" {
			t.Errorf("first event %s, want the scene's queued event", ev.ID)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no event on the stream")
	}
	if n := consumers(); n != before+1 {
		t.Errorf("%d consumers of the events stream while it is followed, want %d", n, before+1)
	}
	leave()
	resp.Body.Close()
	fleettest.Eventually(t, 5*time.Second, func() bool { return consumers() == before },
		"the stream's consumer outlived its client")
	for range ch {
	}
}

func TestCancelStopsARetriedScene(t *testing.T) {
	t.Parallel()
	f := startPartsWith(t, simSpec{sim: comfysim.Config{StepDuration: time.Millisecond, OOMRate: 1}, pools: []string{"cursed"}})
	job := fleettest.SubmitJob(t, f.APIURL, map[string]any{"callback_url": f.Hooks.URL, "scenes": []any{
		map[string]any{"workflow": "txt2img", "pool": "cursed", "params": map[string]any{"steps": 150}},
	}})
	if first := f.Hooks.Wait(t, job.ID, 60*time.Second); first.Body.Type != "job.failed" {
		t.Fatalf("first webhook %s, want job.failed", first.Body.Type)
	}

	// The pool gets a sound but slow node instead, and the scene runs again there.
	f.stopExecutorOf(f.nodes[0].ID)
	slow := fleettest.Sim(t, comfysim.Config{Name: "slow", StepDuration: 10 * time.Millisecond, Speed: 0.5})
	f.startExecutor("exec-slow", fleet.NodeConfig{ID: "slow", URL: slow.URL(), Pools: []string{"cursed"}, Weight: 1}, nil)
	events := fleettest.SceneEvents(t, f.NC)
	if status := fleettest.Call(t, http.MethodPost, f.APIURL+"/v1/jobs/"+job.ID+"/scenes/0/retry", nil, nil); status != http.StatusAccepted {
		t.Fatalf("retry: %d, want 202", status)
	}
	events.Next(t, 0, 30*time.Second, "progress of the retried scene", func(ev fleet.SceneEvent) bool {
		return ev.JobID == job.ID && ev.Index == 0 && ev.Type == fleet.EventProgress
	})

	postCancel(t, f.APIURL, job.ID).Want(t, http.StatusAccepted)
	// As above: uninterrupted, it would end in its 3 s and count no interrupt.
	fleettest.Eventually(t, 10*time.Second, func() bool { return slow.Stats().Interrupted == 1 },
		"the retried scene was not interrupted")
	second := f.Hooks.Wait(t, job.ID, 30*time.Second)
	if s := second.Body.Job.Scenes[0]; second.Body.Type != "job.cancelled" || s.Status != "cancelled" {
		t.Fatalf("second webhook %s with scene %s; want job.cancelled", second.Body.Type, s.Status)
	}

	// The job's event stream runs past the end of its first round to the end of its
	// second.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	got := collect(t, openEvents(ctx, t, f.APIURL, job.ID, ""))
	ids := make([]string, len(got))
	for i, ev := range got {
		ids[i] = ev.ID
	}
	failed, cancelled := fleet.JobEventID(job.ID, fleet.EventFailed, 0), fleet.JobEventID(job.ID, fleet.EventCancelled, 1)
	if !slices.Contains(ids, failed) || len(ids) == 0 || ids[len(ids)-1] != cancelled {
		t.Errorf("event stream %v; want %s on the way and %s last", ids, failed, cancelled)
	}
}
