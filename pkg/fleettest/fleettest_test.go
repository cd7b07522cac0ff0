package fleettest_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

// fatalT records the failure that ends a helper under test, as testing.T's Fatal
// would end the test.
type fatalT struct {
	testing.TB
	failure string
}

func (f *fatalT) Helper() {}

func (f *fatalT) Fatal(args ...any) { f.Fatalf("%s", fmt.Sprint(args...)) }

func (f *fatalT) Fatalf(format string, args ...any) {
	f.failure = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

// failure runs check with a fatalT on a goroutine of its own and returns the
// failure it ended with, "" if none.
func failure(t *testing.T, check func(testing.TB)) string {
	f := &fatalT{TB: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		check(f)
	}()
	<-done
	return f.failure
}

// apiServer answers POST /v1/jobs as the intake does: 202 with the job for a key,
// 401 problem JSON without one, and echoes the request's headers on GET /echo.
func apiServer(t *testing.T) string {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case r.URL.Path == "/echo":
			w.Header().Set("Content-Type", "application/json")
			_ = json.NewEncoder(w).Encode(map[string]string{"authorization": r.Header.Get("Authorization"),
				"prefer": r.Header.Get("Prefer"), "content_type": r.Header.Get("Content-Type")})
		case r.URL.Path == "/v1/jobs" && r.Header.Get("Authorization") == "Bearer cf_key":
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusAccepted)
			_, _ = w.Write([]byte(`{"id":"job-1","status":"queued"}`))
		case r.URL.Path == "/v1/jobs":
			w.Header().Set("Content-Type", "application/problem+json")
			w.WriteHeader(http.StatusUnauthorized)
			_, _ = w.Write([]byte(`{"status":401,"title":"Unauthorized","errors":[{"location":"header.Authorization","message":"no key"}]}`))
		default:
			w.WriteHeader(http.StatusNoContent)
		}
	}))
	t.Cleanup(srv.Close)
	return srv.URL
}

func TestCallsSendKeysAndHeadersAndDecodeByStatus(t *testing.T) {
	t.Parallel()
	base := apiServer(t)
	var echo map[string]string
	fleettest.Call(t, http.MethodPost, base+"/echo", map[string]any{}, &echo, fleettest.Key("cf_key"), fleettest.Header("Prefer", "wait=5"))
	if echo["authorization"] != "Bearer cf_key" || echo["prefer"] != "wait=5" || echo["content_type"] != "application/json" {
		t.Errorf("the request carried %v", echo)
	}
	fleettest.Get(t, base+"/echo", &echo, fleettest.Key(""))
	if echo["authorization"] != "" || echo["content_type"] != "" {
		t.Errorf("a GET without a key or body sent %v", echo)
	}

	if job := fleettest.SubmitJob(t, base, map[string]any{"scenes": []any{}}, fleettest.Key("cf_key")); job.ID != "job-1" || job.Status != "queued" {
		t.Errorf("SubmitJob returned %+v", job)
	}
	// A problem goes into a *Problem, not into another out.
	var p fleettest.Problem
	if code := fleettest.Call(t, http.MethodPost, base+"/v1/jobs", nil, &p); code != http.StatusUnauthorized || p.Status != 401 || !p.At("header.Authorization") {
		t.Errorf("Call without a key: %d, %+v", code, p)
	}
	var job api.Job
	if code := fleettest.Call(t, http.MethodPost, base+"/v1/jobs", nil, &job); code != http.StatusUnauthorized || job.ID != "" {
		t.Errorf("Call without a key decoded the problem into a job: %d, %+v", code, job)
	}
	// An empty answer leaves out alone.
	if code := fleettest.Call(t, http.MethodDelete, base+"/v1/jobs/x", nil, &p); code != http.StatusNoContent {
		t.Errorf("DELETE: %d", code)
	}
	if a := fleettest.Do(t, http.MethodPost, base+"/v1/jobs", []byte(`{"scenes": []}`)); a.Status != http.StatusUnauthorized {
		t.Errorf("Do with a raw body: %v", a)
	}
}

func TestAFailedCallShowsTheProblem(t *testing.T) {
	t.Parallel()
	base := apiServer(t)
	got := failure(t, func(t testing.TB) { fleettest.SubmitJob(t, base, map[string]any{"scenes": []any{}}) })
	if !strings.Contains(got, "POST "+base+"/v1/jobs: 401 Unauthorized: ") || !strings.Contains(got, `"location":"header.Authorization"`) ||
		!strings.Contains(got, "want 202") {
		t.Errorf("failure %q does not show the call, the status, the problem and what was wanted", got)
	}
	got = failure(t, func(t testing.TB) { fleettest.Do(t, http.MethodGet, "http://127.0.0.1:1/", nil) })
	if !strings.Contains(got, "127.0.0.1:1") {
		t.Errorf("a call nothing answers failed with %q", got)
	}
	if _, err := fleettest.Send(context.Background(), http.MethodGet, "http://127.0.0.1:1/", nil); err == nil {
		t.Error("Send to nothing returned no error")
	}
}

func sceneEvent(t *testing.T, job string, index int, typ fleet.EventType) []byte {
	t.Helper()
	ev, err := fleet.SceneEvent{JobID: job, Index: index, Type: typ, Node: "gpu", Attempt: 1, Time: time.Now()}.Envelope("test")
	b, encodeErr := json.Marshal(ev)
	if err := errors.Join(err, encodeErr); err != nil {
		t.Fatal(err)
	}
	return b
}

func TestFollowWaitsForTheEventsAfterAPosition(t *testing.T) {
	t.Parallel()
	_, nc, _ := fleettest.Fleet(t, fleet.Settings{})
	events := fleettest.SceneEvents(t, nc)
	// First, so that it has been read once the others have.
	if err := nc.Publish(fleet.SceneEventSubject("j1", 0, fleet.EventFailed), []byte("not json")); err != nil {
		t.Fatal(err)
	}
	for i, typ := range []fleet.EventType{fleet.EventQueued, fleet.EventStarted, fleet.EventProgress, fleet.EventCompleted} {
		if err := nc.Publish(fleet.SceneEventSubject("j1", i%2, typ), sceneEvent(t, "j1", i%2, typ)); err != nil {
			t.Fatal(err)
		}
	}
	started, pos := events.Next(t, 0, 10*time.Second, "started event", fleettest.OfType(fleet.EventStarted))
	if started.Index != 1 || pos != 2 {
		t.Errorf("started event %+v at position %d, want scene 1 at 2", started, pos)
	}
	if done, _ := events.Next(t, pos, 10*time.Second, "completed event", fleettest.OfType(fleet.EventCompleted)); done.Index != 1 {
		t.Errorf("completed event %+v", done)
	}
	all := events.Wait(t, 10*time.Second, "four events", func(evs []fleet.SceneEvent) bool { return len(evs) == 4 })
	if len(all) != 4 || len(events.All(fleettest.OfType(fleet.EventProgress))) != 1 {
		t.Errorf("events %+v", all)
	}

	got := failure(t, func(tb testing.TB) {
		events.Next(tb, pos, 50*time.Millisecond, "started event after the first", fleettest.OfType(fleet.EventStarted))
	})
	for _, want := range []string{"no started event after the first within 50ms", "4 messages on fleet.evt.scene.> came",
		"completed j1.1 on gpu (attempt 1)", "1 did not decode"} {
		if !strings.Contains(got, want) {
			t.Errorf("failure %q does not say %q", got, want)
		}
	}
}

func TestFollowStreamSeesWhatCameBefore(t *testing.T) {
	t.Parallel()
	_, nc, js := fleettest.Fleet(t, fleet.Settings{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := js.Publish(ctx, fleet.SceneEventSubject("early", 0, fleet.EventQueued), sceneEvent(t, "early", 0, fleet.EventQueued)); err != nil {
		t.Fatal(err)
	}
	events := fleettest.FollowStream(t, js, fleet.StreamEvents, fleet.SceneEventsFilter, fleet.DecodeSceneEvent)
	if err := nc.Publish(fleet.SceneEventSubject("late", 0, fleet.EventQueued), sceneEvent(t, "late", 0, fleet.EventQueued)); err != nil {
		t.Fatal(err)
	}
	all := events.Wait(t, 10*time.Second, "both events", func(evs []fleet.SceneEvent) bool { return len(evs) == 2 })
	if all[0].JobID != "early" || all[1].JobID != "late" {
		t.Errorf("events %+v, want the early one, then the late one", all)
	}
}

func TestWebhooksWaitForEachJobsNextDelivery(t *testing.T) {
	t.Parallel()
	hooks := fleettest.StartWebhooks(t)
	hooks.Refuse(1)
	deliver := func(job, typ string) int {
		t.Helper()
		return fleettest.Call(t, http.MethodPost, hooks.URL, api.Webhook{Type: typ, Job: api.Job{ID: job}}, nil,
			fleettest.Header("webhook-id", job+"."+typ))
	}
	if code := deliver("a", "job.failed"); code != http.StatusConflict {
		t.Errorf("the refused delivery: %d, want 409", code)
	}
	for _, d := range [][2]string{{"a", "job.failed"}, {"b", "job.completed"}, {"a", "job.completed"}} {
		if code := deliver(d[0], d[1]); code != http.StatusOK {
			t.Errorf("delivery %v: %d", d, code)
		}
	}
	// b's delivery came first: a's waits do not lose it.
	if d := hooks.Wait(t, "a", time.Second); d.Body.Type != "job.failed" || d.ID != "a.job.failed" || d.Refused {
		t.Errorf("a's first accepted delivery: %+v", d)
	}
	if d := hooks.Wait(t, "a", time.Second); d.Body.Type != "job.completed" {
		t.Errorf("a's second delivery: %+v", d)
	}
	if d := hooks.Wait(t, "b", time.Second); d.Body.Type != "job.completed" {
		t.Errorf("b's delivery: %+v", d)
	}
	if n := hooks.Count("a"); n != 3 {
		t.Errorf("a got %d deliveries, want 3 with the refused one", n)
	}
	if got := failure(t, func(tb testing.TB) { hooks.Wait(tb, "b", 20*time.Millisecond) }); !strings.Contains(got, "no webhook for job b within 20ms") {
		t.Errorf("a wait for a delivery that does not come failed with %q", got)
	}
}

func TestAClosedLogFailsItsWaitsAtOnce(t *testing.T) {
	t.Parallel()
	lines := fleettest.NewEvents[string]("lines of a process", nil)
	lines.Add("starting")
	lines.Close(errors.New("exit status 2"))
	began := time.Now()
	got := failure(t, func(tb testing.TB) {
		lines.Next(tb, 0, time.Minute, "listening line", func(l string) bool { return l == "listening" })
	})
	if !strings.Contains(got, "no listening line: they ended (exit status 2); 1 lines of a process came, the last: starting") || time.Since(began) > 10*time.Second {
		t.Errorf("a wait on a closed log failed after %s with %q", time.Since(began), got)
	}
	if l, _ := lines.Next(t, 0, time.Minute, "first line", nil); l != "starting" {
		t.Errorf("a closed log lost its lines: %q", l)
	}
}
