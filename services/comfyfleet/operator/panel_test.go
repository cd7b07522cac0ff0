package operator_test

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
)

// TestPanelShowsTheFleetAndSteersIt loads the panel as an operator would: it shows
// the nodes, a submitted job's progress moves and its outputs appear, drain from the
// page drains the node, and it fits a phone's screen; the page has no console error
// and makes no request that fails or leaves the fleet.
func TestPanelShowsTheFleetAndSteersIt(t *testing.T) {
	t.Parallel()
	// A 60-step scene takes 2.4 s: long enough to see its progress move.
	f := startFleet(t, true, sim("sim-a", 40*time.Millisecond), sim("sim-b", 40*time.Millisecond))
	b := startBrowser(t, f.APIURL, 1280, 900)
	b.do(t, chromedp.Navigate(f.APIURL+"/"))

	waitFor[bool](t, b, 20*time.Second, "both nodes shown online",
		`[...document.querySelectorAll("article.node")].filter((n) => n.dataset.status === "online").length === 2`)

	job := f.submit(t, 4, 60, "")
	bars := fmt.Sprintf(`[...document.querySelectorAll('progress[data-scene^="%s/"]')]`, job)
	first := waitFor[string](t, b, 30*time.Second, "a scene of the job part done", fmt.Sprintf(
		`(() => { const p = %s.find((p) => p.value > 0 && p.value < 1); return p ? p.dataset.scene + " " + p.value : ""; })()`, bars))
	scene, value, _ := strings.Cut(first, " ")
	v, err := strconv.ParseFloat(value, 64)
	if err != nil {
		t.Fatal(err)
	}
	waitFor[bool](t, b, 30*time.Second, "the scene's progress to move on from "+value, fmt.Sprintf(
		`document.querySelector('progress[data-scene="%s"]').value > %g`, scene, v))
	card := fmt.Sprintf(`document.querySelector('article.job[data-job="%s"]')`, job)
	waitFor[bool](t, b, 60*time.Second, "the job shown succeeded", card+`?.dataset.status === "succeeded"`)
	waitFor[bool](t, b, 20*time.Second, "the 4 outputs shown as images", fmt.Sprintf(
		`(() => { const imgs = [...%s.querySelectorAll(".output img")]; return imgs.length === 4 && imgs.every((i) => i.complete && i.naturalWidth > 0); })()`, card))

	if *screenshot != "" {
		// The picture shows the first job folded, and a second one with scenes done,
		// their outputs, scenes running and scenes waiting in the queue.
		b.do(t, click(fmt.Sprintf(`article.job[data-job="%s"] button.toggle`, job)))
		second := f.submit(t, 12, 60, "")
		bars := fmt.Sprintf(`[...document.querySelectorAll('progress[data-scene^="%s/"]')]`, second)
		waitFor[bool](t, b, 30*time.Second, "a scene done, a scene running and scenes waiting", fmt.Sprintf(
			`%[1]s.some((p) => p.value === 1) && %[1]s.some((p) => p.value > 0.2 && p.value < 1) && document.querySelector('article.job[data-job="%[2]s"] .output img')?.naturalWidth > 0 && Number(document.querySelector('#queues tr[data-pool="image"]')?.dataset.depth) > 0`, bars, second))
		// A window as tall as the page, so that the sticky header stays on top.
		height := eval[int64](t, b, `document.documentElement.scrollHeight`)
		b.do(t, chromedp.EmulateViewport(1280, height))
		png, err := chromedp.Run(b.ctx, chromedp.CaptureScreenshot())
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(*screenshot, png, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Logf("wrote %s", *screenshot)
	}

	b.do(t, click(`button[data-action="drain"][data-node="sim-b"]`))
	waitFor[bool](t, b, 10*time.Second, "the drain button to become undrain",
		`document.querySelector('button[data-node="sim-b"][data-action="undrain"]') !== null`)
	var node struct {
		Drained bool `json:"drained"`
	}
	if status := f.call(t, http.MethodGet, "/v1/nodes/sim-b", nil, &node); status != http.StatusOK || !node.Drained {
		t.Fatalf("after drain on the page, GET /v1/nodes/sim-b: %d, drained %v; want 200, drained", status, node.Drained)
	}
	waitFor[bool](t, b, 10*time.Second, "sim-b shown draining", `document.querySelector('article.node[data-node="sim-b"]').dataset.status === "draining"`)

	b.do(t, chromedp.EmulateViewport(390, 844, chromedp.EmulateMobile))
	waitFor[bool](t, b, 5*time.Second, "the page to fit a phone's width", `document.documentElement.scrollWidth <= window.innerWidth`)
	b.checkClean(t)
}

// TestPanelAsksForTheAPIKey: on a fleet with API keys, the panel asks for one, keeps
// it in the browser and sends it with every call, its job streams included.
func TestPanelAsksForTheAPIKey(t *testing.T) {
	t.Parallel()
	f := startFleet(t, false, sim("sim-a", 40*time.Millisecond))
	f.Key = f.createKey(t, "studio", tenancy.RoleAdmin)
	b := startBrowser(t, f.APIURL, 1024, 768)
	b.expect(func(u *url.URL, status int64) bool {
		return status == 401 && strings.HasPrefix(u.Path, "/v1/")
	})
	b.do(t, chromedp.Navigate(f.APIURL+"/"))
	waitFor[bool](t, b, 10*time.Second, "the key dialog", `document.querySelector("#key-dialog").open`)
	b.do(t,
		chromedp.SendKeys(chromedp.CSS(`#key-dialog input[name="key"]`), f.Key),
		click(`#key-dialog button[value="save"]`),
	)
	waitFor[bool](t, b, 20*time.Second, "the node shown", `document.querySelector('article.node[data-node="sim-a"]') !== null`)

	// A reload keeps the key: nothing is asked again, and the job's events stream
	// with the key (a scene's progress shows only from the stream or a reload of the job).
	b.expect(func(*url.URL, int64) bool { return false })
	b.do(t, chromedp.Reload())
	waitFor[bool](t, b, 20*time.Second, "the node shown after a reload", `document.querySelector('article.node[data-node="sim-a"]') !== null`)
	job := f.submit(t, 1, 150, "")
	waitFor[bool](t, b, 30*time.Second, "the job followed live", fmt.Sprintf(
		`!!document.querySelector('article.job[data-job="%s"] .live:not([hidden])')`, job))
	waitFor[bool](t, b, 30*time.Second, "the job shown succeeded", fmt.Sprintf(
		`document.querySelector('article.job[data-job="%s"]')?.dataset.status === "succeeded"`, job))
	if eval[bool](t, b, `document.querySelector("#key-dialog").open`) {
		t.Error("the key dialog is open again after a reload")
	}
	b.checkClean(t)
}

// TestPanelManagesNodesAndJobs adds a node from the page and removes it, opens a job
// by id, retries its failed scene and cancels a running job, each checked through
// the API.
func TestPanelManagesNodesAndJobs(t *testing.T) {
	t.Parallel()
	f := startFleet(t, true, sim("sim-a", 10*time.Millisecond))
	extra := fleettest.Sim(t, comfysim.Config{Name: "sim-x", StepDuration: 10 * time.Millisecond})
	b := startBrowser(t, f.APIURL, 1280, 900)
	b.do(t, chromedp.Navigate(f.APIURL+"/"))
	waitFor[bool](t, b, 20*time.Second, "sim-a shown", `document.querySelector('article.node[data-node="sim-a"]') !== null`)

	// Add a node: the executor adopts it, and it reports in.
	b.do(t,
		click(`details.add summary`),
		chromedp.SendKeys(chromedp.CSS(`details.add input[name="id"]`), "sim-x"),
		chromedp.SendKeys(chromedp.CSS(`details.add input[name="url"]`), extra.URL()),
		chromedp.SendKeys(chromedp.CSS(`details.add input[name="region"]`), "shenzhen"),
		click(`details.add button.primary`),
	)
	waitFor[bool](t, b, 30*time.Second, "sim-x shown online in shenzhen", `(() => {
		const card = document.querySelector('article.node[data-node="sim-x"]');
		return card?.dataset.status === "online" && card.innerText.includes("shenzhen"); })()`)
	var node struct {
		Registered bool   `json:"registered"`
		Region     string `json:"region"`
	}
	if status := f.call(t, http.MethodGet, "/v1/nodes/sim-x", nil, &node); status != http.StatusOK || node.Region != "shenzhen" {
		t.Fatalf("GET /v1/nodes/sim-x after adding it on the page: %d %+v", status, node)
	}

	// Remove it: two clicks.
	remove := click(`button[data-action="remove"][data-node="sim-x"]`)
	b.do(t, remove)
	waitFor[bool](t, b, 5*time.Second, "the remove button to ask again", `document.querySelector('button[data-action="remove"][data-node="sim-x"]').dataset.armed === "true"`)
	b.do(t, remove)
	waitFor[bool](t, b, 10*time.Second, "sim-x gone or shown unregistered",
		`document.querySelector('button[data-action="remove"][data-node="sim-x"]:not([hidden])') === null`)
	node.Registered = false
	if status := f.call(t, http.MethodGet, "/v1/nodes/sim-x", nil, &node); status != http.StatusNotFound && node.Registered {
		t.Fatalf("GET /v1/nodes/sim-x after removing it on the page: %d, registered %v", status, node.Registered)
	}

	// A job whose graph ComfyUI rejects fails for good: open it by id, find it among
	// the dead letters, and retry its scene.
	var failing struct {
		ID string `json:"id"`
	}
	if status := f.call(t, http.MethodPost, "/v1/jobs", map[string]any{"scenes": []any{map[string]any{"graph": map[string]any{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"height": 64, "batch_size": 1, "color": 0}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "x"}},
	}}}}, &failing); status != http.StatusAccepted {
		t.Fatalf("POST /v1/jobs: %d", status)
	}
	b.do(t, chromedp.SendKeys(chromedp.CSS(`#jobs input[name="open"]`), failing.ID+"\r"))
	card := fmt.Sprintf(`article.job[data-job="%s"]`, failing.ID)
	waitFor[bool](t, b, 20*time.Second, "the opened job shown failed", fmt.Sprintf(`document.querySelector('%s')?.dataset.status === "failed"`, card))
	waitFor[bool](t, b, 20*time.Second, "the dead letter shown", fmt.Sprintf(`document.querySelector("#deadletters").innerText.includes("%s")`, failing.ID))
	b.do(t, click(card+` button[data-action="retry"]`))
	waitFor[bool](t, b, 20*time.Second, "the scene's second attempt shown", fmt.Sprintf(
		`document.querySelector('%s .scene')?.innerText.includes("attempt 2")`, card))
	var job struct {
		Scenes []struct {
			Attempts int `json:"attempts"`
		} `json:"scenes"`
	}
	if status := f.call(t, http.MethodGet, "/v1/jobs/"+failing.ID, nil, &job); status != http.StatusOK || job.Scenes[0].Attempts < 2 {
		t.Fatalf("GET the job after retry on the page: %d, %+v; want a second attempt", status, job)
	}

	// Cancel a running job.
	long := f.submit(t, 4, 150, "")
	card = fmt.Sprintf(`article.job[data-job="%s"]`, long)
	waitFor[bool](t, b, 20*time.Second, "the long job shown running", fmt.Sprintf(`document.querySelector('%s')?.dataset.status === "running"`, card))
	b.do(t, click(card+` button[data-action="cancel"]`))
	waitFor[bool](t, b, 20*time.Second, "the long job shown cancelled", fmt.Sprintf(`document.querySelector('%s')?.dataset.status === "cancelled"`, card))
	// The job's record follows its cancelled events; read it where the API does,
	// without spending the requests the page's key may make.
	jobs, err := fleet.OpenJobs(context.Background(), f.JS)
	if err != nil {
		t.Fatal(err)
	}
	fleettest.Eventually(t, 20*time.Second, func() bool {
		j, err := jobs.Get(context.Background(), long)
		return err == nil && j.Status == fleet.StatusCancelled
	}, "the job cancelled on the page is not cancelled")
	b.checkClean(t)
}

// TestPanelListsJobsAndShowsQueues: the job list comes from GET /v1/jobs (a job that
// ended before the page opened is there), its status filter asks the API for those
// jobs only, a job is deleted from the page, and the queues show the scenes that
// wait while the only node is drained.
func TestPanelListsJobsAndShowsQueues(t *testing.T) {
	t.Parallel()
	f := startFleet(t, true, sim("sim-a", 10*time.Millisecond))
	status := func(id string) string {
		var job struct {
			Status string `json:"status"`
		}
		f.call(t, http.MethodGet, "/v1/jobs/"+id, nil, &job)
		return job.Status
	}
	done := f.submit(t, 1, 5, "")
	var failing struct {
		ID string `json:"id"`
	}
	// A graph that lacks an input: ComfyUI refuses it, the scene fails.
	if code := f.call(t, http.MethodPost, "/v1/jobs", map[string]any{"scenes": []any{map[string]any{"graph": map[string]any{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"height": 64, "batch_size": 1, "color": 0}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "x"}},
	}}}}, &failing); code != http.StatusAccepted {
		t.Fatalf("POST /v1/jobs: %d", code)
	}
	fleettest.Eventually(t, 30*time.Second, func() bool {
		return status(done) == "succeeded" && status(failing.ID) == "failed"
	}, "the jobs did not end")
	if code := f.call(t, http.MethodPost, "/v1/nodes/sim-a/drain", nil, nil); code != http.StatusOK {
		t.Fatalf("drain sim-a: %d", code)
	}
	waiting := f.submit(t, 3, 5, "")

	b := startBrowser(t, f.APIURL, 1280, 900)
	b.do(t, chromedp.Navigate(f.APIURL+"/"))
	card := func(id string) string { return fmt.Sprintf(`document.querySelector('article.job[data-job="%s"]')`, id) }
	waitFor[bool](t, b, 20*time.Second, "the job that ended before the page opened listed, succeeded", card(done)+`?.dataset.status === "succeeded"`)
	waitFor[bool](t, b, 20*time.Second, "the image pool's 3 waiting scenes shown",
		`document.querySelector('#queues tr[data-pool="image"]')?.dataset.depth === "3"`)

	filter := func(value string) {
		t.Helper()
		eval[bool](t, b, fmt.Sprintf(`(() => { const s = document.querySelector('#jobs select[name="status"]');
			s.value = %q; s.dispatchEvent(new Event("change", { bubbles: true })); return true; })()`, value))
	}
	shown := `[...document.querySelectorAll("article.job")].map((c) => c.dataset.job).sort().join(" ")`
	filter("failed")
	waitFor[bool](t, b, 10*time.Second, "only the failed job shown", shown+fmt.Sprintf(` === %q`, failing.ID))
	if !b.requested("/v1/jobs?", "status=failed") {
		t.Error("the page did not ask GET /v1/jobs for the failed jobs")
	}
	filter("queued")
	waitFor[bool](t, b, 10*time.Second, "only the waiting job shown", shown+fmt.Sprintf(` === %q`, waiting))
	filter("")
	waitFor[bool](t, b, 10*time.Second, "the three jobs shown", fmt.Sprintf(`%s !== null && %s !== null && %s !== null`, card(done), card(failing.ID), card(waiting)))

	// A load of the job that the page sent before the delete may come back 404 after
	// it: the page drops the job then, as it does after its own delete.
	b.expect(func(u *url.URL, status int64) bool {
		return status == http.StatusNotFound && strings.HasPrefix(u.Path, "/v1/jobs/"+done)
	})
	del := fmt.Sprintf(`article.job[data-job="%s"] button[data-action="delete"]`, done)
	b.do(t, click(del))
	waitFor[bool](t, b, 5*time.Second, "the delete button to ask again", fmt.Sprintf(`document.querySelector('%s').dataset.armed === "true"`, del))
	b.do(t, click(del))
	waitFor[bool](t, b, 30*time.Second, "the deleted job gone from the page", card(done)+` === null`)
	if code := f.call(t, http.MethodGet, "/v1/jobs/"+done, nil, nil); code != http.StatusNotFound {
		t.Errorf("GET the job deleted on the page: %d, want 404", code)
	}

	if code := f.call(t, http.MethodPost, "/v1/nodes/sim-a/undrain", nil, nil); code != http.StatusOK {
		t.Fatalf("undrain sim-a: %d", code)
	}
	waitFor[bool](t, b, 30*time.Second, "the waiting job shown succeeded", card(waiting)+`?.dataset.status === "succeeded"`)
	waitFor[bool](t, b, 20*time.Second, "the image pool shown empty",
		`document.querySelector('#queues tr[data-pool="image"]')?.dataset.depth === "0"`)
	b.checkClean(t)
}
