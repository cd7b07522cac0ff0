package stack_test

import (
	"encoding/base64"
	"encoding/json"
	"image/color"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack/stacktest"
)

// loadImageChoices returns the files a node's LoadImage offers: its input folder.
func loadImageChoices(t *testing.T, simURL string) []string {
	t.Helper()
	var info map[string]struct {
		Input struct {
			Required struct {
				Image []json.RawMessage `json:"image"`
			} `json:"required"`
		} `json:"input"`
	}
	fleettest.Get(t, simURL+"/object_info/LoadImage", &info)
	var files []string
	if spec := info["LoadImage"].Input.Required.Image; len(spec) > 0 {
		if err := json.Unmarshal(spec[0], &files); err != nil {
			t.Fatal(err)
		}
	}
	return files
}

// loadedImages returns the images that the LoadImage nodes of a node's recorded
// prompts loaded, from its history.
func loadedImages(t *testing.T, simURL string) []string {
	t.Helper()
	var history map[string]struct {
		Prompt []json.RawMessage `json:"prompt"`
	}
	fleettest.Get(t, simURL+"/history", &history)
	var out []string
	for _, h := range history {
		var graph map[string]struct {
			ClassType string         `json:"class_type"`
			Inputs    map[string]any `json:"inputs"`
		}
		if len(h.Prompt) < 3 || json.Unmarshal(h.Prompt[2], &graph) != nil {
			t.Fatalf("history entry without a prompt: %v", h.Prompt)
		}
		for _, n := range graph {
			if name, ok := n.Inputs["image"].(string); ok && n.ClassType == "LoadImage" {
				out = append(out, name)
			}
		}
	}
	return out
}

func TestScenesWithInputImagesRunWithTheImagesUploaded(t *testing.T) {
	t.Parallel()
	b := stacktest.Start(t, stacktest.Nodes(1))
	img := pngOf(t, 64, 48, color.NRGBA{})
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "image/png")
		w.Write(img)
	}))
	t.Cleanup(web.Close)

	job := fleettest.SubmitJob(t, b.APIURL, map[string]any{"callback_url": b.Hooks.URL, "scenes": []any{
		map[string]any{"workflow": "img2video", "params": map[string]any{"steps": 3, "frames": 4, "width": 256, "height": 144},
			"inputs": map[string]any{"image": map[string]any{"base64": base64.StdEncoding.EncodeToString(img)}}},
		map[string]any{"workflow": "img2img", "params": map[string]any{"steps": 3, "denoise": 0.6},
			"inputs": map[string]any{"image": map[string]any{"url": web.URL + "/start.png"}}},
	}})
	hook := b.Hooks.Wait(t, job.ID, 60*time.Second)
	if hook.Body.Job.Status != "succeeded" {
		t.Fatalf("job %s: %+v", hook.Body.Job.Status, hook.Body.Job.Scenes)
	}

	// The node's input folder holds the uploads, and the prompts it ran loaded them
	// (the simulator, like ComfyUI, rejects a LoadImage file it does not have).
	files := loadImageChoices(t, b.Sims[0].URL())
	loaded := loadedImages(t, b.Sims[0].URL())
	for _, want := range []string{"comfyfleet_" + job.ID + "_0_image.png", "comfyfleet_" + job.ID + "_1_image.png"} {
		if !slices.Contains(files, want) {
			t.Errorf("node input folder %v lacks %s", files, want)
		}
		if !slices.Contains(loaded, want) {
			t.Errorf("the node's prompts loaded %v, not %s", loaded, want)
		}
	}

	for i, want := range []string{"image/webp", "image/png"} {
		s := hook.Body.Job.Scenes[i]
		if len(s.Outputs) != 1 || s.Outputs[0].ContentType != want {
			t.Fatalf("scene %d outputs %+v, want one %s", i, s.Outputs, want)
		}
		res := fleettest.Do(t, http.MethodGet, s.Outputs[0].URL, nil)
		if body := res.Body; res.Status != http.StatusOK || res.Header.Get("Content-Type") != want || http.DetectContentType(body) != want {
			t.Errorf("scene %d output: %d %s, %d bytes sniffed as %s; want %s", i, res.Status, res.Header.Get("Content-Type"),
				len(body), http.DetectContentType(body), want)
		}
	}

	// The heartbeats feed the seed-compatible health: measured speed and VRAM in use.
	node := b.Nodes[0].ID
	var h struct {
		Status          string  `json:"status"`
		MemoryUsage     float64 `json:"memory_usage"`
		ProcessingSpeed float64 `json:"processing_speed"`
	}
	fleettest.Eventually(t, 10*time.Second, func() bool {
		fleettest.Get(t, b.APIURL+"/api/nodes/"+node+"/health", &h)
		return h.Status == "online" && h.ProcessingSpeed > 0 && h.MemoryUsage > 0 && h.MemoryUsage < 1
	}, "health of %s: %+v; want online with a measured speed and VRAM in use", node, &h)
}

func TestInputDownloadsRetryOnlyWhatCanSucceed(t *testing.T) {
	t.Parallel()
	b := stacktest.Start(t, stacktest.Nodes(1, 1))
	img := pngOf(t, 64, 48, color.NRGBA{})
	var flakyCalls atomic.Int32
	web := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/flaky.png":
			if flakyCalls.Add(1) == 1 {
				http.Error(w, "warming up", http.StatusServiceUnavailable)
				return
			}
			w.Write(img)
		case "/text.png":
			io.WriteString(w, "not an image")
		default:
			http.NotFound(w, r)
		}
	}))
	t.Cleanup(web.Close)
	scene := func(path string) map[string]any {
		return map[string]any{"workflow": "img2img", "params": map[string]any{"steps": 2},
			"inputs": map[string]any{"image": map[string]any{"url": web.URL + path}}}
	}
	job := fleettest.SubmitJob(t, b.APIURL, map[string]any{"callback_url": b.Hooks.URL,
		"scenes": []any{scene("/flaky.png"), scene("/gone.png"), scene("/text.png")}})
	hook := b.Hooks.Wait(t, job.ID, 60*time.Second)
	flaky, gone, text := hook.Body.Job.Scenes[0], hook.Body.Job.Scenes[1], hook.Body.Job.Scenes[2]
	if flaky.Status != "succeeded" || flaky.Attempts != 2 || len(flaky.Failures) != 1 || !strings.Contains(flaky.Failures[0].Error, "503") {
		t.Errorf("flaky download: %s after %d attempts, failures %+v; want success on the second attempt", flaky.Status, flaky.Attempts, flaky.Failures)
	}
	if gone.Status != "failed" || gone.Attempts != 1 || !strings.Contains(gone.Error, "404") {
		t.Errorf("missing image: %s after %d attempts: %q; want failed at once with the 404", gone.Status, gone.Attempts, gone.Error)
	}
	if text.Status != "failed" || text.Attempts != 1 || !strings.Contains(text.Error, "not a PNG, JPEG or WEBP") {
		t.Errorf("text as image: %s after %d attempts: %q; want failed at once", text.Status, text.Attempts, text.Error)
	}
}
