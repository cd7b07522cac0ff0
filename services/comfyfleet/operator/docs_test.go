package operator_test

import (
	"testing"
	"time"

	"github.com/chromedp/chromedp"
)

// TestDocsRenderOffline: /docs shows the API's operations with every file served by
// the intake; the browser reaches nothing else.
func TestDocsRenderOffline(t *testing.T) {
	t.Parallel()
	f := startFleet(t, true, sim("sim-a", 10*time.Millisecond))
	b := startBrowser(t, f.APIURL, 1280, 900)
	b.do(t, chromedp.Navigate(f.APIURL+"/docs#/operations/create-job"))
	waitFor[bool](t, b, 30*time.Second, "the create-job operation rendered",
		`document.body.innerText.includes("Submit a job of scenes") && document.body.innerText.includes("/v1/jobs")`)
	b.do(t, chromedp.Navigate(f.APIURL+"/docs#/operations/drain-node"))
	waitFor[bool](t, b, 30*time.Second, "the drain-node operation rendered",
		`document.body.innerText.includes("Drain a ComfyUI node (admin)")`)
	b.checkClean(t)
}
