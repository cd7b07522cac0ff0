package operator_test

import (
	"fmt"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/chromedp"

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
	b := startBrowser(t, f.API, 1280, 900)
	b.expected = unserved
	b.do(t, chromedp.Navigate(f.API+"/"))

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
		// their outputs, and scenes running.
		b.do(t, chromedp.Click(chromedp.CSS(fmt.Sprintf(`article.job[data-job="%s"] button.toggle`, job))))
		second := f.submit(t, 4, 60, "")
		bars := fmt.Sprintf(`[...document.querySelectorAll('progress[data-scene^="%s/"]')]`, second)
		waitFor[bool](t, b, 30*time.Second, "a scene done and a scene running", fmt.Sprintf(
			`%[1]s.some((p) => p.value === 1) && %[1]s.some((p) => p.value > 0.2 && p.value < 1) && document.querySelector('article.job[data-job="%[2]s"] .output img')?.naturalWidth > 0`, bars, second))
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

	b.do(t, chromedp.Click(chromedp.CSS(`button[data-action="drain"][data-node="sim-b"]`)))
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
	b := startBrowser(t, f.API, 1024, 768)
	b.expected = func(u *url.URL, status int64) bool {
		return unserved(u, status) || status == 401 && strings.HasPrefix(u.Path, "/v1/")
	}
	b.do(t, chromedp.Navigate(f.API+"/"))
	waitFor[bool](t, b, 10*time.Second, "the key dialog", `document.querySelector("#key-dialog").open`)
	b.do(t,
		chromedp.SendKeys(chromedp.CSS(`#key-dialog input[name="key"]`), f.Key),
		chromedp.Click(chromedp.CSS(`#key-dialog button[value="save"]`)),
	)
	waitFor[bool](t, b, 20*time.Second, "the node shown", `document.querySelector('article.node[data-node="sim-a"]') !== null`)

	// A reload keeps the key: nothing is asked again, and the job's events stream
	// with the key (a scene's progress shows only from the stream or a reload of the job).
	b.expected = unserved
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
