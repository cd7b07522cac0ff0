package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"image/png"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack/stacktest"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

// cliFleet starts a whole fleet for a test of the client commands: embedded NATS,
// the four services, and simulated nodes sim-a, sim-b… whose 20-step scene takes
// 200 ms. The API is open (no keys) unless keys is set.
func cliFleet(t *testing.T, keys bool, sims int) *stacktest.Fleet {
	t.Helper()
	speeds := make([]float64, sims)
	for i := range speeds {
		speeds[i] = 1
	}
	return stacktest.Start(t, stacktest.Nodes(speeds...), func(c *stack.Config) {
		c.Open = !keys
		c.Intake.ReadRate = intake.RateLimit{PerSecond: intake.Unlimited}
	})
}

// comfyfleet runs the command line args in-process, as main does, and returns its
// stdout, its stderr and its error.
func comfyfleet(t *testing.T, args ...string) (string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var stdout, stderr bytes.Buffer
	err := run(ctx, args, &stdout, &stderr)
	return stdout.String(), stderr.String(), err
}

func TestSubmitWaitDownloadsEveryOutput(t *testing.T) {
	t.Parallel()
	s := cliFleet(t, false, 3)
	out := filepath.Join(t.TempDir(), "frames")
	stdout, stderr, err := comfyfleet(t, "submit", "--api", s.APIURL, "--workflow", "txt2img",
		"--param", "prompt=a lighthouse at dawn", "--param", "seed=1", "--param", "steps=4", "--count", "6", "--wait", "--out", out)
	if err != nil {
		t.Fatalf("submit --wait --out: %v\nstdout:\n%s\nstderr:\n%s", err, stdout, stderr)
	}
	files, err := os.ReadDir(out)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, f := range files {
		names = append(names, f.Name())
		b, err := os.ReadFile(filepath.Join(out, f.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := png.Decode(bytes.NewReader(b)); err != nil {
			t.Errorf("%s is not a PNG: %v", f.Name(), err)
		}
	}
	if len(names) != 6 {
		t.Fatalf("--out holds %v, want the six scenes' images", names)
	}
	for i, name := range names {
		if want := "s" + string(rune('0'+i)) + "_"; !strings.HasPrefix(name, want) {
			t.Errorf("file %q: want the scene index first (%s…)", name, want)
		}
	}
	if !strings.Contains(stdout, "succeeded") || !strings.Contains(stdout, "6 files saved in "+out) {
		t.Errorf("stdout does not tell the outcome:\n%s", stdout)
	}
	// No terminal: plain progress lines, one per scene's end at least.
	for i := range 6 {
		if line := "scene " + string(rune('0'+i)) + ": succeeded"; !strings.Contains(stderr, line) {
			t.Errorf("stderr has no line %q:\n%s", line, stderr)
		}
	}
	if strings.Contains(stderr, "\x1b[") {
		t.Errorf("stderr is not a terminal, yet it got escape sequences:\n%q", stderr)
	}
}

func TestSubmitWaitExitsNonZeroWithTheSceneError(t *testing.T) {
	t.Parallel()
	s := cliFleet(t, false, 2)
	job := filepath.Join(t.TempDir(), "job.json")
	// Scene 1's graph lacks an input: ComfyUI refuses the prompt, a failure no retry
	// cures. (A checkpoint or class no node has is refused at submission.)
	if err := os.WriteFile(job, []byte(`{"priority": 7, "scenes": [
		{"workflow": "txt2img", "params": {"steps": 2, "seed": 42}},
		{"graph": {"1": {"class_type": "EmptyImage", "inputs": {"height": 64, "batch_size": 1, "color": 0}},
			"2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, err := comfyfleet(t, "submit", "--api", s.APIURL, "-f", job, "--wait")
	var failed *jobFailedError
	if !errors.As(err, &failed) || failed.ExitCode() != 1 {
		t.Fatalf("submit of a job whose scene fails: %v, want a failed job (exit 1)\nstdout:\n%s\nstderr:\n%s", err, stdout, stderr)
	}
	if !strings.Contains(err.Error(), "1 of 2 scenes failed") {
		t.Errorf("error %q does not count the failed scene", err)
	}
	if !regexp.MustCompile(`scene 1 failed: .*Required input is missing: width`).MatchString(stdout) {
		t.Errorf("stdout does not give scene 1's error:\n%s", stdout)
	}
	if !strings.Contains(stderr, "scene 1: failed: ") {
		t.Errorf("the progress lines do not show the failure:\n%s", stderr)
	}
}

func TestCancelledJobExitsNonZero(t *testing.T) {
	t.Parallel()
	s := cliFleet(t, false, 1)
	stdout, _, err := comfyfleet(t, "submit", "--api", s.APIURL, "--workflow", "txt2img", "--param", "steps=150", "--count", "3")
	if err != nil {
		t.Fatal(err)
	}
	id := strings.TrimSpace(stdout)
	if _, _, err := comfyfleet(t, "jobs", "cancel", id, "--api", s.APIURL); err != nil {
		t.Fatalf("jobs cancel: %v", err)
	}
	stdout, _, err = comfyfleet(t, "jobs", "watch", id, "--api", s.APIURL)
	var failed *jobFailedError
	if !errors.As(err, &failed) || !strings.Contains(err.Error(), "cancelled") {
		t.Fatalf("jobs watch of a cancelled job: %v, want a failed job (exit 1) that says cancelled\n%s", err, stdout)
	}
	if _, _, err := comfyfleet(t, "jobs", "cancel", id, "--api", s.APIURL); !isStatus(err, http.StatusConflict) {
		t.Errorf("cancelling it again: %v, want the API's 409", err)
	}
}

// TestCommandGroupsListTheirCommands asks each command that groups others (bench,
// jobs, nodes) for help, and names none: both list every member, and the main usage
// names every benchmark.
func TestCommandGroupsListTheirCommands(t *testing.T) {
	t.Parallel()
	for group, members := range map[string][]string{
		"bench": {"backlog", "burst", "failover", "scheduling", "throughput"},
		"jobs":  {"cancel", "delete", "get", "list", "retry", "watch"},
		"nodes": {"add", "drain", "list", "rm", "undrain"},
	} {
		_, stderr, err := comfyfleet(t, group, "-h")
		if want := "usage: comfyfleet " + group + " " + strings.Join(members, "|") + " [flags]"; !errors.Is(err, flag.ErrHelp) || !strings.HasPrefix(stderr, want) {
			t.Errorf("%s -h: %v, %q; want flag.ErrHelp and %q", group, err, stderr, want)
		}
		if _, _, err := comfyfleet(t, group); err == nil || !strings.Contains(err.Error(), "give one of "+strings.Join(members, ", ")) {
			t.Errorf("%s alone: %v; want the list of its commands", group, err)
		}
	}
	_, usage, _ := comfyfleet(t, "--help")
	if !strings.Contains(usage, "run a benchmark and print its table: throughput, backlog, burst, failover or scheduling") {
		t.Errorf("usage lists benchmarks as %q", usage)
	}
}

func TestProblemsNameTheOffendingField(t *testing.T) {
	t.Parallel()
	s := cliFleet(t, false, 1)
	_, _, err := comfyfleet(t, "submit", "--api", s.APIURL, "--workflow", "txt2img", "--param", "colour=red")
	if err == nil || !strings.Contains(err.Error(), "422 Unprocessable Entity") ||
		!strings.Contains(err.Error(), "\n  body.scenes[0].params.colour: unknown") {
		t.Errorf("an unknown parameter: %v; want the 422 and the field on a line of its own", err)
	}
	if _, _, err := comfyfleet(t, "submit", "--api", s.APIURL, "--workflow", "txt2img", "--param", "steps=many"); err == nil ||
		!strings.Contains(err.Error(), "steps=many: the template wants an integer") {
		t.Errorf("a parameter of the wrong type: %v", err)
	}
	if _, _, err := comfyfleet(t, "jobs", "get", "no-such-job", "--api", s.APIURL); !isStatus(err, http.StatusNotFound) ||
		!strings.Contains(err.Error(), "404 Not Found: no job no-such-job") {
		t.Errorf("an unknown job: %v", err)
	}
}

func TestNodesCommands(t *testing.T) {
	t.Parallel()
	s := cliFleet(t, false, 2)
	api := "--api=" + s.APIURL
	node := func(id string) intake.Node {
		t.Helper()
		var n intake.Node
		c, err := (&clientFlags{api: s.APIURL}).client()
		if err != nil {
			t.Fatal(err)
		}
		if err := c.call(context.Background(), "GET", "/v1/nodes/"+id, nil, &n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	// The executor registers its nodes as it starts.
	fleettest.Eventually(t, 10*time.Second, func() bool {
		stdout, _, err := comfyfleet(t, "nodes", "list", api)
		return err == nil && strings.Contains(stdout, "sim-b")
	}, "nodes list never showed sim-b")
	if stdout, _, err := comfyfleet(t, "nodes", "drain", "sim-a", api); err != nil || !strings.Contains(stdout, "node sim-a drained") {
		t.Fatalf("nodes drain: %v, %q", err, stdout)
	}
	if !node("sim-a").Drained || node("sim-b").Drained {
		t.Error("after nodes drain sim-a, the registry does not have sim-a, and only sim-a, drained")
	}
	stdout, _, err := comfyfleet(t, "nodes", "list", api)
	if err != nil || !regexp.MustCompile(`(?m)^sim-a\s+[^\n]*drain`).MatchString(stdout) || !regexp.MustCompile(`(?m)^sim-b\s`).MatchString(stdout) {
		t.Errorf("nodes list: %v\n%s", err, stdout)
	}
	if _, _, err := comfyfleet(t, "nodes", "undrain", "sim-a", api); err != nil || node("sim-a").Drained {
		t.Errorf("nodes undrain: %v; drained %v", err, node("sim-a").Drained)
	}

	if _, _, err := comfyfleet(t, "nodes", "add", "gpu-7", "--url", "http://127.0.0.1:9", "--pool", "image,video", "--weight", "2", "--region", "lab", "--label", "gpu=a100", api); err != nil {
		t.Fatalf("nodes add: %v", err)
	}
	if n := node("gpu-7"); n.URL != "http://127.0.0.1:9" || !slices.Equal(n.Pools, []string{"image", "video"}) || n.Weight != 2 || n.Region != "lab" || n.Labels["gpu"] != "a100" {
		t.Errorf("nodes add registered %+v", n)
	}
	if _, _, err := comfyfleet(t, "nodes", "rm", "gpu-7", api); err != nil {
		t.Fatalf("nodes rm: %v", err)
	}
	if _, _, err := comfyfleet(t, "nodes", "rm", "gpu-7", api); !isStatus(err, http.StatusNotFound) {
		t.Errorf("removing it again: %v, want the API's 404", err)
	}
}

// TestWatchResumesAfterTheStreamBreaks cuts the event stream in the middle of a job:
// the watch reconnects with the id of the last event it got, and ends with the job.
func TestWatchResumesAfterTheStreamBreaks(t *testing.T) {
	t.Parallel()
	s := cliFleet(t, false, 1)
	target, err := url.Parse(s.APIURL)
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu          sync.Mutex
		streams     int
		lastEventID []string
	)
	proxy := httputil.NewSingleHostReverseProxy(target)
	proxy.FlushInterval = -1
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !strings.HasSuffix(r.URL.Path, "/events") {
			proxy.ServeHTTP(w, r)
			return
		}
		mu.Lock()
		streams++
		first := streams == 1
		lastEventID = append(lastEventID, r.Header.Get("Last-Event-ID"))
		mu.Unlock()
		if !first {
			proxy.ServeHTTP(w, r)
			return
		}
		// The first stream breaks after its first events.
		proxy.ServeHTTP(&breakingWriter{ResponseWriter: w, left: 2000}, r)
	}))
	t.Cleanup(srv.Close)

	stdout, stderr, err := comfyfleet(t, "submit", "--api", srv.URL, "--workflow", "txt2img", "--param", "steps=60", "--count", "2", "--wait")
	if err != nil {
		t.Fatalf("submit --wait through a stream that breaks: %v\nstdout:\n%s\nstderr:\n%s", err, stdout, stderr)
	}
	mu.Lock()
	defer mu.Unlock()
	if streams < 2 || lastEventID[0] != "" || !strings.HasPrefix(lastEventID[1], "scene.") {
		t.Errorf("event streams opened with Last-Event-ID %q; want a first without, then one naming the last event got", lastEventID)
	}
}

// breakingWriter passes on left bytes of an answer, then aborts the connection.
type breakingWriter struct {
	http.ResponseWriter
	left int
}

func (b *breakingWriter) Write(p []byte) (int, error) {
	if len(p) > b.left {
		_, _ = b.ResponseWriter.Write(p[:b.left])
		b.Flush()
		panic(http.ErrAbortHandler)
	}
	b.left -= len(p)
	return b.ResponseWriter.Write(p)
}

func (b *breakingWriter) Flush() {
	if f, ok := b.ResponseWriter.(http.Flusher); ok {
		f.Flush()
	}
}

func TestAPIKeyCommandsListAndRevoke(t *testing.T) {
	t.Parallel()
	s := cliFleet(t, true, 1)
	nats := "--nats=" + s.NATS.ClientURL()
	stdout, _, err := comfyfleet(t, "apikey", "create", "--tenant", "studio", "--role", "admin", "--name", "ops", nats)
	if err != nil {
		t.Fatalf("apikey create: %v", err)
	}
	key := regexp.MustCompile(`(?m)^\s+(cf_\S+)$`).FindStringSubmatch(stdout)
	id := regexp.MustCompile(`(?m)^id ([0-9a-f]{12}),`).FindStringSubmatch(stdout)
	if key == nil || id == nil {
		t.Fatalf("apikey create printed no key and id:\n%s", stdout)
	}
	if _, _, err := comfyfleet(t, "nodes", "list", "--api", s.APIURL, "--key", key[1]); err != nil {
		t.Fatalf("nodes list with the new key: %v", err)
	}
	stdout, _, err = comfyfleet(t, "apikey", "list", nats)
	if err != nil || !regexp.MustCompile(`(?m)^`+id[1]+`\s+studio\s+admin\s+ops\s`).MatchString(stdout) || strings.Contains(stdout, key[1]) {
		t.Fatalf("apikey list: %v\n%s", err, stdout)
	}
	if _, _, err := comfyfleet(t, "apikey", "revoke", id[1], nats); err != nil {
		t.Fatalf("apikey revoke: %v", err)
	}
	if _, _, err := comfyfleet(t, "nodes", "list", "--api", s.APIURL, "--key", key[1]); !isStatus(err, http.StatusUnauthorized) {
		t.Errorf("the revoked key: %v, want the API's 401", err)
	}
	if stdout, _, err := comfyfleet(t, "apikey", "list", nats); err != nil || strings.Contains(stdout, id[1]) {
		t.Errorf("apikey list after the revocation: %v\n%s", err, stdout)
	}
}

func TestJobsListFiltersPagesAndDeletes(t *testing.T) {
	t.Parallel()
	s := cliFleet(t, false, 2)
	stdout, stderr, err := comfyfleet(t, "submit", "--api", s.APIURL, "--workflow", "txt2img", "--param", "steps=2", "--count", "2", "--wait")
	if err != nil {
		t.Fatalf("submit: %v\n%s", err, stderr)
	}
	ok := regexp.MustCompile(`[0-9a-f-]{36}`).FindString(stdout)
	job := filepath.Join(t.TempDir(), "job.json")
	// A graph that lacks an input: ComfyUI refuses it, the scene fails.
	if err := os.WriteFile(job, []byte(`{"scenes": [{"graph": {"1": {"class_type": "EmptyImage", "inputs": {"height": 64, "batch_size": 1, "color": 0}},
		"2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "x"}}}}]}`), 0o600); err != nil {
		t.Fatal(err)
	}
	stdout, _, err = comfyfleet(t, "submit", "--api", s.APIURL, "-f", job, "--wait")
	var failed *jobFailedError
	if !errors.As(err, &failed) {
		t.Fatalf("submit of a failing job: %v", err)
	}
	bad := regexp.MustCompile(`[0-9a-f-]{36}`).FindString(stdout)
	if ok == "" || bad == "" || ok == bad {
		t.Fatalf("job ids %q and %q", ok, bad)
	}
	list := func(args ...string) string {
		t.Helper()
		stdout, stderr, err := comfyfleet(t, append([]string{"jobs", "list", "--api", s.APIURL}, args...)...)
		if err != nil {
			t.Fatalf("jobs list %v: %v\n%s", args, err, stderr)
		}
		return stdout
	}
	// Newest first, with the scenes' outcomes.
	out := list()
	if i, j := strings.Index(out, bad), strings.Index(out, ok); i < 0 || j < 0 || i > j {
		t.Errorf("jobs list does not show the failed job, then the other:\n%s", out)
	}
	if !regexp.MustCompile(bad+`\s+default\s+failed\s+5\s+0/1 \(1 failed\)`).MatchString(out) ||
		!regexp.MustCompile(ok+`\s+default\s+succeeded\s+5\s+2/2\s`).MatchString(out) {
		t.Errorf("jobs list rows:\n%s", out)
	}
	if out := list("--status", "failed"); !strings.Contains(out, bad) || strings.Contains(out, ok) {
		t.Errorf("jobs list --status failed:\n%s", out)
	}
	if out := list("--since", "2099-01-01T00:00:00Z"); strings.Contains(out, ok) || strings.Contains(out, bad) {
		t.Errorf("jobs list --since a future time:\n%s", out)
	}
	// Pages of one, the next one through the cursor printed.
	out = list("--limit", "1")
	cursor := regexp.MustCompile(`more: --cursor (\S+)`).FindStringSubmatch(out)
	if !strings.Contains(out, bad) || strings.Contains(out, ok) || cursor == nil {
		t.Fatalf("jobs list --limit 1:\n%s", out)
	}
	if out := list("--limit", "1", "--cursor", cursor[1]); !strings.Contains(out, ok) || strings.Contains(out, "more:") {
		t.Errorf("the page after %s:\n%s", cursor[1], out)
	}
	var page api.JobPage
	if err := json.Unmarshal([]byte(list("--json")), &page); err != nil || len(page.Jobs) != 2 || page.Jobs[0].ID != bad || page.Jobs[0].Failed != 1 {
		t.Errorf("jobs list --json: %+v, %v", page, err)
	}

	if _, _, err := comfyfleet(t, "jobs", "delete", ok, "--api", s.APIURL); err != nil {
		t.Fatalf("jobs delete: %v", err)
	}
	if out := list(); strings.Contains(out, ok) || !strings.Contains(out, bad) {
		t.Errorf("jobs list after deleting %s:\n%s", ok, out)
	}
	if _, _, err := comfyfleet(t, "jobs", "get", ok, "--api", s.APIURL); !isStatus(err, http.StatusNotFound) {
		t.Errorf("jobs get of a deleted job: %v, want the API's 404", err)
	}
}
