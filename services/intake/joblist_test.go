package intake_test

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

// demoJob is a job of n scenes of the model-free demo template.
func demoJob(n int) map[string]any {
	scenes := make([]any, n)
	for i := range scenes {
		scenes[i] = map[string]any{"workflow": "demo", "params": map[string]any{"size": 64 + 8*i}}
	}
	return map[string]any{"scenes": scenes}
}

// submitAs posts body with key and returns the job's id.
func submitAs(t *testing.T, key, base string, body any) string {
	t.Helper()
	var job api.Job
	if code := fleettest.Call(t, http.MethodPost, base+"/v1/jobs", body, &job, fleettest.Key(key)); code != http.StatusAccepted {
		t.Fatalf("POST /v1/jobs: %d", code)
	}
	return job.ID
}

// listAs returns the ids of a page of GET /v1/jobs?query, and its next cursor.
func listAs(t *testing.T, key, base, query string) ([]string, string) {
	t.Helper()
	var page api.JobPage
	if code := fleettest.Call(t, http.MethodGet, base+"/v1/jobs?"+query, nil, &page, fleettest.Key(key)); code != http.StatusOK {
		t.Fatalf("GET /v1/jobs?%s: %d", query, code)
	}
	ids := []string{}
	for _, j := range page.Jobs {
		ids = append(ids, j.ID)
	}
	return ids, page.NextCursor
}

func TestJobListShowsTheTenantsJobsNewestFirst(t *testing.T) {
	t.Parallel()
	natsURL, js := fleetFor(t)
	base := serveIntake(t, natsURL, intake.Config{Templates: shipped})
	keys, err := tenancy.Open(context.Background(), js)
	if err != nil {
		t.Fatal(err)
	}
	create := func(tenant string, role tenancy.Role) string {
		plain, _, err := keys.CreateKey(context.Background(), tenant, role, tenant+"-"+string(role))
		if err != nil {
			t.Fatal(err)
		}
		return plain
	}
	studio, agency, admin := create("studio", tenancy.RoleSubmit), create("agency", tenancy.RoleSubmit), create("ops", tenancy.RoleAdmin)

	var mine []string
	for i := range 5 {
		mine = append(mine, submitAs(t, studio, base, demoJob(i+1)))
	}
	slices.Reverse(mine)
	theirs := submitAs(t, agency, base, demoJob(1))

	// Pages of two, through the cursor, newest first.
	var all []string
	query := "limit=2"
	for range 5 {
		page, next := listAs(t, studio, base, query)
		all = append(all, page...)
		if next == "" {
			break
		}
		query = "limit=2&cursor=" + url.QueryEscape(next)
	}
	if !slices.Equal(all, mine) {
		t.Errorf("pages of studio's jobs: %v, want %v", all, mine)
	}
	var page api.JobPage
	fleettest.Call(t, http.MethodGet, base+"/v1/jobs", nil, &page, fleettest.Key(studio))
	if len(page.Jobs) != 5 || page.NextCursor != "" {
		t.Fatalf("GET /v1/jobs: %d jobs, cursor %q; want 5 and no cursor", len(page.Jobs), page.NextCursor)
	}
	if j := page.Jobs[0]; j.Tenant != "studio" || j.Status != "queued" || j.Scenes != 5 || j.Priority != 5 || j.CreatedAt.IsZero() || j.ExpiresAt == nil {
		t.Errorf("newest job listed as %+v", j)
	}

	for query, want := range map[string][]string{
		"status=queued":                mine,
		"status=running&status=failed": {},
		"status=running,succeeded":     {},
		"since=" + url.QueryEscape(time.Now().Add(time.Hour).UTC().Format(time.RFC3339)): {},
		"until=" + url.QueryEscape(time.Now().Add(time.Hour).UTC().Format(time.RFC3339)): mine,
	} {
		if got, _ := listAs(t, studio, base, query); !slices.Equal(got, want) {
			t.Errorf("GET /v1/jobs?%s: %v, want %v", query, got, want)
		}
	}
	for query, loc := range map[string]string{"status=done": "query.status", "cursor=nonsense": "query.cursor", "limit=1001": "query.limit",
		"since=2026-12-02T00:00:00Z&until=2026-12-01T00:00:00Z": "query.until"} {
		var p fleettest.Problem
		if code := fleettest.Call(t, http.MethodGet, base+"/v1/jobs?"+query, nil, &p, fleettest.Key(studio)); code != http.StatusUnprocessableEntity || !p.At(loc) {
			t.Errorf("GET /v1/jobs?%s: %d %+v; want 422 at %s", query, code, p, loc)
		}
	}

	// Another tenant's jobs: an admin's to see.
	if got, _ := listAs(t, agency, base, ""); !slices.Equal(got, []string{theirs}) {
		t.Errorf("agency's jobs: %v, want %v", got, []string{theirs})
	}
	if code := fleettest.Call(t, http.MethodGet, base+"/v1/jobs?tenant=agency", nil, nil, fleettest.Key(studio)); code != http.StatusForbidden {
		t.Errorf("GET /v1/jobs?tenant=agency with studio's key: %d, want 403", code)
	}
	if got, _ := listAs(t, admin, base, "tenant=agency"); !slices.Equal(got, []string{theirs}) {
		t.Errorf("agency's jobs for an admin: %v, want %v", got, []string{theirs})
	}
	if got, _ := listAs(t, admin, base, ""); len(got) != 0 {
		t.Errorf("an admin's own tenant's jobs: %v, want none", got)
	}

	// Another intake lists the same jobs: it follows the job states.
	other := serveIntake(t, natsURL, intake.Config{Templates: shipped})
	if got, _ := listAs(t, studio, other, "limit=10"); !slices.Equal(got, mine) {
		t.Errorf("another intake lists %v, want %v", got, mine)
	}
	last := submitAs(t, studio, base, demoJob(1))
	fleettest.Eventually(t, 10*time.Second, func() bool {
		got, _ := listAs(t, studio, other, "limit=1")
		return slices.Equal(got, []string{last})
	}, "the other intake does not list the job submitted to the first")
}

func TestDeleteJobRemovesItAndItsInputs(t *testing.T) {
	t.Parallel()
	natsURL, js := fleetFor(t)
	base := startIntake(t, natsURL, intake.Config{Templates: shipped})
	other := startIntake(t, natsURL, intake.Config{Templates: shipped})
	img := pngBytes(t, 16, 16)
	id := submitAs(t, "", base, map[string]any{"scenes": []any{
		map[string]any{"workflow": "img2img", "inputs": map[string]any{"image": map[string]any{"base64": base64.StdEncoding.EncodeToString(img)}}},
	}})
	ctx := context.Background()
	inputs, err := js.ObjectStore(ctx, fleet.ObjectInputs)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := inputs.GetInfo(ctx, fleet.InputKey(id, 0, "image")); err != nil {
		t.Fatalf("input image of the job: %v", err)
	}
	fleettest.Eventually(t, 10*time.Second, func() bool {
		got, _ := listAs(t, "", other, "")
		return slices.Equal(got, []string{id})
	}, "the other intake does not list the job")

	var p fleettest.Problem
	if code := fleettest.Call(t, http.MethodDelete, base+"/v1/jobs/"+id, nil, &p); code != http.StatusConflict {
		t.Fatalf("DELETE a queued job: %d, want 409", code)
	}
	if code := fleettest.Call(t, http.MethodDelete, base+"/v1/jobs/"+id+"?cancel=true", nil, nil); code != http.StatusNoContent {
		t.Fatalf("DELETE ?cancel=true: %d, want 204", code)
	}
	if code := fleettest.Call(t, http.MethodGet, base+"/v1/jobs/"+id, nil, nil); code != http.StatusNotFound {
		t.Errorf("GET a deleted job: %d, want 404", code)
	}
	if got, _ := listAs(t, "", base, ""); len(got) != 0 {
		t.Errorf("the intake that deleted the job lists %v", got)
	}
	fleettest.Eventually(t, 10*time.Second, func() bool {
		got, _ := listAs(t, "", other, "")
		return len(got) == 0
	}, "the other intake still lists the deleted job")
	if _, err := inputs.GetInfo(ctx, fleet.InputKey(id, 0, "image")); !errors.Is(err, jetstream.ErrObjectNotFound) {
		t.Errorf("input image of the deleted job: %v, want it gone", err)
	}
	if code := fleettest.Call(t, http.MethodDelete, base+"/v1/jobs/"+id, nil, nil); code != http.StatusNotFound {
		t.Errorf("DELETE a deleted job: %d, want 404", code)
	}
}

func TestJobTTLIsCheckedAndAnExpiredJobAnswers404(t *testing.T) {
	t.Parallel()
	natsURL, js := fleetFor(t)
	base := startIntake(t, natsURL, intake.Config{Templates: shipped})
	for _, ttl := range []int{59, -1, int(fleet.DefaultRetention/time.Second) + 1} {
		body := demoJob(1)
		body["ttl_s"] = ttl
		var p fleettest.Problem
		if code := fleettest.Call(t, http.MethodPost, base+"/v1/jobs", body, &p); code != http.StatusUnprocessableEntity || !p.At("body.ttl_s") {
			t.Errorf("ttl_s %d: %d %+v; want 422 at body.ttl_s", ttl, code, p)
		}
	}

	short := startIntake(t, natsURL, intake.Config{Templates: shipped, MinJobTTL: time.Second})
	body := demoJob(1)
	body["ttl_s"] = 1
	var job api.Job
	if code := fleettest.Call(t, http.MethodPost, short+"/v1/jobs", body, &job); code != http.StatusAccepted {
		t.Fatalf("POST ttl_s 1: %d", code)
	}
	if job.ExpiresAt == nil || job.ExpiresAt.Sub(job.CreatedAt) < time.Second || job.ExpiresAt.Sub(job.CreatedAt) > 2*time.Second {
		t.Fatalf("job created %s expires %v; want a second or two later", job.CreatedAt, job.ExpiresAt)
	}
	// The server fires the job's expiry schedule for the notifier's janitor.
	expiries, err := js.Stream(context.Background(), fleet.StreamExpiry)
	if err != nil {
		t.Fatal(err)
	}
	var msg *jetstream.RawStreamMsg
	fleettest.Eventually(t, 10*time.Second, func() bool {
		msg, err = expiries.GetLastMsgForSubject(context.Background(), fleet.ExpiryDueSubject(job.ID))
		return err == nil
	}, "no expiry fired for the job: %v", err)
	var expiry fleet.JobExpiry
	if err := json.Unmarshal(msg.Data, &expiry); err != nil || expiry.JobID != job.ID || !expiry.ExpiresAt.Equal(*job.ExpiresAt) {
		t.Errorf("expiry %s (%v), want job %s at %s", msg.Data, err, job.ID, job.ExpiresAt)
	}
	if early := job.ExpiresAt.Sub(msg.Time); early > 0 {
		t.Errorf("the expiry fired %s early", early)
	}
	// Not deleted (no janitor here), yet gone for the API.
	if code := fleettest.Call(t, http.MethodGet, short+"/v1/jobs/"+job.ID, nil, nil); code != http.StatusNotFound {
		t.Errorf("GET an expired job: %d, want 404", code)
	}
	if got, _ := listAs(t, "", short, ""); len(got) != 0 {
		t.Errorf("expired job listed: %v", got)
	}
}

func TestQueuesAnswerWithADispatchersSummaryOr503(t *testing.T) {
	t.Parallel()
	natsURL, _ := fleetFor(t)
	base := startIntake(t, natsURL, intake.Config{Templates: shipped})
	start := time.Now()
	var p fleettest.Problem
	if code := fleettest.Call(t, http.MethodGet, base+"/v1/queues", nil, &p); code != http.StatusServiceUnavailable {
		t.Fatalf("GET /v1/queues with no dispatcher: %d, want 503", code)
	}
	if took := time.Since(start); took > 3*time.Second {
		t.Errorf("the 503 took %s", took)
	}

	// A dispatcher's side of the request, as services/dispatcher answers it.
	nc, err := nats.Connect(natsURL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	summary := fleet.QueueSummary{Dispatcher: "d1", Leading: true, At: time.Now().UTC().Truncate(time.Second), Nodes: map[string]int{"online": 2},
		Pools: []fleet.PoolQueue{{Pool: "image", Depth: 12, ByPriority: map[string]int{"5": 12}, ByTenant: map[string]int{"studio": 12}, OldestAgeS: 3}},
		Rates: fleet.QueueRates{AcceptedPerS: 1.5}}
	sub, err := nc.QueueSubscribe(fleet.QueuesSubject, "dispatchers", func(m *nats.Msg) {
		b, _ := json.Marshal(summary)
		_ = m.Respond(b)
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	// The server knows of the subscription before the intake asks.
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	var got fleet.QueueSummary
	if code := fleettest.Call(t, http.MethodGet, base+"/v1/queues", nil, &got); code != http.StatusOK {
		t.Fatalf("GET /v1/queues: %d", code)
	}
	if fmt.Sprint(got) != fmt.Sprint(summary) {
		t.Errorf("GET /v1/queues: %+v, want %+v", got, summary)
	}
}
