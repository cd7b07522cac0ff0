package stack_test

import (
	"bytes"
	"image/png"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack/stacktest"
)

func TestJobOfSixScenesRunsOnThreeNodesAndCallsBackOnce(t *testing.T) {
	t.Parallel()
	b := stacktest.Start(t, stacktest.Nodes(1, 1, 2))

	var job api.Job
	accepted := fleettest.Do(t, http.MethodPost, b.APIURL+"/v1/jobs", sceneJob(b.Hooks.URL, 6, 20))
	accepted.Want(t, http.StatusAccepted).Decode(t, &job)
	if loc := accepted.Header.Get("Location"); loc != b.APIURL+"/v1/jobs/"+job.ID {
		t.Errorf("Location = %q", loc)
	}
	if job.Status != "queued" || len(job.Scenes) != 6 {
		t.Fatalf("accepted job = %+v", job)
	}

	hook := b.Hooks.Wait(t, job.ID, 60*time.Second)
	if hook.Body.Type != "job.completed" || hook.Body.Job.Status != "succeeded" {
		t.Fatalf("webhook %s: job %s", hook.Body.Type, hook.Body.Job.Status)
	}
	if hook.ID != "job."+job.ID+".completed" {
		t.Errorf("webhook-id = %q", hook.ID)
	}
	nodes := map[string]int{}
	for _, s := range hook.Body.Job.Scenes {
		if s.Status != "succeeded" || len(s.Outputs) == 0 {
			t.Fatalf("scene %d: %s with %d outputs (%s)", s.Index, s.Status, len(s.Outputs), s.Error)
		}
		nodes[s.Node]++
		for _, o := range s.Outputs {
			res := fleettest.Do(t, http.MethodGet, o.URL, nil)
			if ct := res.Header.Get("Content-Type"); res.Status != http.StatusOK || ct != "image/png" {
				t.Fatalf("%v (%s)", res, ct)
			}
			if _, err := png.Decode(bytes.NewReader(res.Body)); err != nil {
				t.Fatalf("output %s of scene %d is not a PNG: %v", o.Name, s.Index, err)
			}
		}
	}
	if len(nodes) != 3 {
		t.Errorf("scenes ran on %v, want all three nodes", nodes)
	}
	if got := fleettest.GetJob(t, b.APIURL, job.ID); got.Status != "succeeded" || got.FinishedAt == nil {
		t.Errorf("GET job after webhook: %s", got.Status)
	}

	// The completion event is in the events stream, once.
	if n := fleettest.Count(t, b.JS, fleet.StreamEvents, fleet.JobEventSubject(job.ID, fleet.EventCompleted)); n != 1 {
		t.Errorf("%d job-completed events, want 1", n)
	}
	fleettest.Eventually(t, 10*time.Second, func() bool { return settled(t, b.JS) }, "notifier still has deliveries pending")
	if n := b.Hooks.Count(job.ID); n != 1 {
		t.Errorf("webhook delivered %d times, want once", n)
	}

	var listed struct {
		Nodes []struct {
			ID     string `json:"id"`
			Health struct {
				Status     string `json:"status"`
				ScenesDone int    `json:"scenes_done"`
				VRAMTotal  int64  `json:"vram_total"`
			} `json:"health"`
		} `json:"nodes"`
	}
	fleettest.Eventually(t, 10*time.Second, func() bool {
		fleettest.Get(t, b.APIURL+"/v1/nodes", &listed)
		done := 0
		for _, n := range listed.Nodes {
			if n.Health.Status != "online" || n.Health.VRAMTotal == 0 {
				return false
			}
			done += n.Health.ScenesDone
		}
		return len(listed.Nodes) == 3 && done == 6
	}, "GET /v1/nodes: %+v, want 3 online nodes with VRAM that ran 6 scenes", &listed)

	// One trace follows scene 0 from the HTTP request to the webhook.
	var byScope map[string]trace.TraceID
	fleettest.Eventually(t, 10*time.Second, func() bool {
		byScope = sceneTraces(spans.Ended(), job.ID, 0)
		return len(byScope) == 4
	}, "spans of scene 0 by service: %v", func() any { return byScope })
	want := byScope["comfyfleet/intake"]
	for scope, id := range byScope {
		if id != want {
			t.Errorf("%s span of scene 0 is in trace %s, intake's in %s", scope, id, want)
		}
	}

	// The dispatcher's placement of scene 0 is a span of that trace, and the parent
	// of the executor's run of the scene, on the node it names.
	var place, run sdktrace.ReadOnlySpan
	for _, s := range sceneSpans(spans.Ended(), job.ID, 0) {
		switch {
		case s.Name() == "place":
			place = s
		case s.InstrumentationScope().Name == "comfyfleet/executor" && spanAttr(s, "comfyfleet.node") != "":
			run = s
		}
	}
	if place == nil || run == nil {
		t.Fatalf("spans of scene 0: placement %v, run %v; want both", place, run)
	}
	if place.SpanContext().TraceID() != want {
		t.Errorf("placement span in trace %s, intake's in %s", place.SpanContext().TraceID(), want)
	}
	if run.Parent().SpanID() != place.SpanContext().SpanID() {
		t.Errorf("the executor's span of scene 0 has parent %s, want the placement span %s", run.Parent().SpanID(), place.SpanContext().SpanID())
	}
	if got, ran := spanAttr(place, "comfyfleet.node"), spanAttr(run, "comfyfleet.node"); got != ran {
		t.Errorf("placement span names node %q, the scene ran on %q", got, ran)
	}
}

// sceneSpans are the spans of scene index of job.
func sceneSpans(ended []sdktrace.ReadOnlySpan, job string, index int) []sdktrace.ReadOnlySpan {
	var out []sdktrace.ReadOnlySpan
	for _, s := range ended {
		if spanAttr(s, "comfyfleet.job") == job && spanAttr(s, "comfyfleet.scene") == strconv.Itoa(index) {
			out = append(out, s)
		}
	}
	return out
}

// spanAttr is the value of s's attribute key, "" if it has none.
func spanAttr(s sdktrace.ReadOnlySpan, key string) string {
	for _, kv := range s.Attributes() {
		if string(kv.Key) == key {
			return kv.Value.Emit()
		}
	}
	return ""
}

// sceneTraces maps each service's tracer to the trace id of its spans of scene index
// of job (spans about the whole job count for every scene).
func sceneTraces(ended []sdktrace.ReadOnlySpan, job string, index int) map[string]trace.TraceID {
	out := map[string]trace.TraceID{}
	for _, s := range ended {
		if scene := spanAttr(s, "comfyfleet.scene"); spanAttr(s, "comfyfleet.job") == job && (scene == "" || scene == strconv.Itoa(index)) {
			out[s.InstrumentationScope().Name] = s.SpanContext().TraceID()
		}
	}
	return out
}

func TestSceneSurvivesItsNodeDyingMidScene(t *testing.T) {
	t.Parallel()
	b := stacktest.Start(t, stacktest.Nodes(1, 1, 1))
	events := fleettest.SceneEvents(t, b.NC)

	job := fleettest.SubmitJob(t, b.APIURL, sceneJob(b.Hooks.URL, 3, 100))
	victim, _ := events.Next(t, 0, 30*time.Second, "start of a scene", fleettest.OfType(fleet.EventStarted))
	killed := false
	for i, n := range b.Nodes {
		if n.ID == victim.Node {
			b.Sims[i].Kill()
			killed = true
		}
	}
	if !killed {
		t.Fatalf("no simulated node named %q", victim.Node)
	}

	hook := b.Hooks.Wait(t, job.ID, 60*time.Second)
	if hook.Body.Job.Status != "succeeded" {
		t.Fatalf("job %s after its node died: %+v", hook.Body.Job.Status, hook.Body.Job.Scenes)
	}
	s := hook.Body.Job.Scenes[victim.Index]
	if s.Node == victim.Node || s.Attempts < 2 || len(s.Failures) == 0 || s.Failures[0].Node != victim.Node {
		t.Errorf("scene %d: node %s, attempts %d, failures %+v; want it finished elsewhere after failing on %s",
			victim.Index, s.Node, s.Attempts, s.Failures, victim.Node)
	}
	fleettest.Eventually(t, 10*time.Second, func() bool { return settled(t, b.JS) }, "notifier still has deliveries pending")
	for i := range hook.Body.Job.Scenes {
		if n := fleettest.Count(t, b.JS, fleet.StreamEvents, fleet.SceneEventSubject(job.ID, i, fleet.EventCompleted)); n != 1 {
			t.Errorf("scene %d: %d completed events, want 1", i, n)
		}
	}
	if n := b.Hooks.Count(job.ID); n != 1 {
		t.Errorf("webhook delivered %d times, want once", n)
	}
}

func TestProblemDetailsNameTheField(t *testing.T) {
	t.Parallel()
	b := stacktest.Start(t, stacktest.Nodes(1))
	graph := func(g any) map[string]any { return map[string]any{"scenes": []any{map[string]any{"graph": g}}} }
	for name, tc := range map[string]struct {
		body     any
		location string
	}{
		"no scenes":         {map[string]any{"scenes": []any{}}, "body.scenes"},
		"scenes missing":    {map[string]any{"priority": 3}, "body"},
		"unknown workflow":  {map[string]any{"scenes": []any{map[string]any{"workflow": "nope"}}}, "body.scenes[0].workflow"},
		"unknown parameter": {map[string]any{"scenes": []any{map[string]any{"workflow": "txt2img", "params": map[string]any{"colour": 1}}}}, "body.scenes[0].params.colour"},
		"steps too high":    {map[string]any{"scenes": []any{map[string]any{"workflow": "txt2img", "params": map[string]any{"steps": 1000}}}}, "body.scenes[0].params.steps"},
		"graph not comfy":   {graph(map[string]any{"1": map[string]any{"inputs": map[string]any{}}}), "body.scenes[0].graph.1"},
		"graph is a list":   {graph([]any{1, 2}), "body.scenes[0].graph"},
		"priority 11":       {map[string]any{"priority": 11, "scenes": []any{map[string]any{"workflow": "demo"}}}, "body.priority"},
		"priority 0":        {map[string]any{"priority": 0, "scenes": []any{map[string]any{"workflow": "demo"}}}, "body.priority"},
		"callback not url":  {map[string]any{"callback_url": "not a url", "scenes": []any{map[string]any{"workflow": "demo"}}}, "body.callback_url"},
		"callback ftp":      {map[string]any{"callback_url": "ftp://example.com/x", "scenes": []any{map[string]any{"workflow": "demo"}}}, "body.callback_url"},
		"timeout 0":         {map[string]any{"scenes": []any{map[string]any{"workflow": "demo", "timeout_s": 0}}}, "body.scenes[0].timeout_s"},
		"timeout over 24h":  {map[string]any{"scenes": []any{map[string]any{"workflow": "demo", "timeout_s": 86401}}}, "body.scenes[0].timeout_s"},
	} {
		t.Run(name, func(t *testing.T) {
			a := fleettest.Do(t, http.MethodPost, b.APIURL+"/v1/jobs", tc.body)
			var problem fleettest.Problem
			a.Decode(t, &problem)
			if a.Status != http.StatusUnprocessableEntity || a.Header.Get("Content-Type") != "application/problem+json" {
				t.Fatalf("%v (%s), want 422 problem JSON", a, a.Header.Get("Content-Type"))
			}
			for _, e := range problem.Errors {
				// A missing property is reported at its parent, with its name in the message.
				if e.Location == tc.location && (tc.location != "body" || strings.Contains(e.Message, "scenes")) {
					return
				}
			}
			t.Errorf("no error at %s: %+v", tc.location, problem.Errors)
		})
	}
}

func TestExecutorLostWithoutAckHandsSceneToAnother(t *testing.T) {
	t.Parallel()
	f := startParts(t, 2)
	events := fleettest.SceneEvents(t, f.NC)

	job := fleettest.SubmitJob(t, f.APIURL, sceneJob(f.Hooks.URL, 1, 100))
	first, _ := events.Next(t, 0, 30*time.Second, "start of the scene", fleettest.OfType(fleet.EventStarted))
	f.crashExecutorOf(first.Node)
	lostAt := time.Now()

	hook := f.Hooks.Wait(t, job.ID, 60*time.Second)
	s := hook.Body.Job.Scenes[0]
	if hook.Body.Job.Status != "succeeded" || s.Node == first.Node || s.Attempts != 2 {
		t.Fatalf("job %s, scene on %s after %d attempts; want success on the other node after 2", hook.Body.Job.Status, s.Node, s.Attempts)
	}
	t.Logf("scene finished %.1fs after its executor was lost", time.Since(lostAt).Seconds())
	fleettest.Eventually(t, 10*time.Second, func() bool { return settled(t, f.JS) }, "notifier still has deliveries pending")
	if n := fleettest.Count(t, f.JS, fleet.StreamEvents, fleet.SceneEventSubject(job.ID, 0, fleet.EventCompleted)); n != 1 {
		t.Errorf("%d completed events, want 1", n)
	}
	if n := f.Hooks.Count(job.ID); n != 1 {
		t.Errorf("webhook delivered %d times, want once", n)
	}
}

func TestWebhookIsRetriedUntilTheReceiverAcceptsIt(t *testing.T) {
	t.Parallel()
	b := stacktest.Start(t, stacktest.Nodes(1))
	b.Hooks.Refuse(2)
	job := fleettest.SubmitJob(t, b.APIURL, sceneJob(b.Hooks.URL, 1, 5))
	b.Hooks.Wait(t, job.ID, 60*time.Second)
	fleettest.Eventually(t, 10*time.Second, func() bool { return settled(t, b.JS) }, "notifier still has deliveries pending")
	got := b.Hooks.Deliveries(job.ID)
	if len(got) != 3 {
		t.Fatalf("%d delivery attempts, want 2 refused and 1 accepted", len(got))
	}
	for _, d := range got {
		if d.ID != got[0].ID {
			t.Errorf("webhook-id changed between attempts: %q then %q", got[0].ID, d.ID)
		}
	}
}

func TestGraphRejectedByComfyUIFailsOnceWithItsErrors(t *testing.T) {
	t.Parallel()
	b := stacktest.Start(t, stacktest.Nodes(1, 1))
	// Every node has the graph's classes (a class none has is refused at submission):
	// ComfyUI rejects it for an input it lacks.
	body := map[string]any{"callback_url": b.Hooks.URL, "scenes": []any{
		map[string]any{"graph": map[string]any{
			"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"height": 64, "batch_size": 1, "color": 0}},
			"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "x"}},
		}},
		map[string]any{"workflow": "demo"},
	}}
	job := fleettest.SubmitJob(t, b.APIURL, body)
	hook := b.Hooks.Wait(t, job.ID, 60*time.Second)
	if hook.Body.Type != "job.failed" || hook.Body.Job.Status != "failed" {
		t.Fatalf("webhook %s, job %s; want job.failed", hook.Body.Type, hook.Body.Job.Status)
	}
	bad, good := hook.Body.Job.Scenes[0], hook.Body.Job.Scenes[1]
	if bad.Status != "failed" || bad.Attempts != 1 || !strings.Contains(bad.Error, "Required input is missing: width") {
		t.Errorf("rejected scene: %s after %d attempts: %q; want failed at once with the server's message", bad.Status, bad.Attempts, bad.Error)
	}
	if good.Status != "succeeded" {
		t.Errorf("the other scene: %s; a failed scene must not block it", good.Status)
	}
	if n := fleettest.Count(t, b.JS, fleet.StreamEvents, fleet.JobEventSubject(job.ID, fleet.EventFailed)); n != 1 {
		t.Errorf("%d job-failed events, want 1", n)
	}
}
