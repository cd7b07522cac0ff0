package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"path/filepath"
	"regexp"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

// proc is a comfyfleet process whose output lines can be waited on.
type proc struct {
	name  string
	cmd   *exec.Cmd
	mu    sync.Mutex
	out   bytes.Buffer
	lines chan string
	// exited is closed once the process has exited, with its error in err.
	exited chan struct{}
	err    error
}

func startProc(t *testing.T, bin, name string, args ...string) *proc {
	t.Helper()
	return startProcEnv(t, bin, name, nil, args...)
}

// startProcEnv is startProc with the environment env; nil inherits the test's.
func startProcEnv(t *testing.T, bin, name string, env []string, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, cmd: exec.Command(bin, args...), lines: make(chan string, 1024), exited: make(chan struct{})}
	p.cmd.Env = env
	stdout, _ := p.cmd.StdoutPipe()
	stderr, _ := p.cmd.StderrPipe()
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for _, r := range []io.Reader{stdout, stderr} {
		wg.Go(func() {
			sc := bufio.NewScanner(r)
			for sc.Scan() {
				p.mu.Lock()
				p.out.WriteString(sc.Text() + "\n")
				p.mu.Unlock()
				select {
				case p.lines <- sc.Text():
				default:
				}
			}
		})
	}
	go func() {
		wg.Wait()
		p.err = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() {
		select {
		case <-p.exited:
		default:
			_ = p.cmd.Process.Kill()
			<-p.exited
		}
		if t.Failed() {
			p.mu.Lock()
			t.Logf("--- output of %s:\n%s", p.name, p.out.String())
			p.mu.Unlock()
		}
	})
	return p
}

// await returns the first submatch of re in the process's output.
func (p *proc) await(t *testing.T, re *regexp.Regexp) string {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		select {
		case line := <-p.lines:
			if m := re.FindStringSubmatch(line); m != nil {
				return m[1]
			}
		case <-p.exited:
			t.Fatalf("%s exited (%v) before printing %s", p.name, p.err, re)
		case <-deadline:
			t.Fatalf("%s did not print %s within 30s", p.name, re)
		}
	}
}

// stop sends SIGTERM and expects a clean exit.
func (p *proc) stop(t *testing.T) {
	t.Helper()
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		if p.err != nil {
			t.Errorf("%s exited with %v after SIGTERM", p.name, p.err)
		}
	case <-time.After(15 * time.Second):
		t.Errorf("%s still running 15s after SIGTERM", p.name)
	}
}

func buildBinary(t *testing.T) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "comfyfleet")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// TestServicesAsSeparateProcesses runs each service as its own OS process against one
// external NATS, as they are deployed, and stops each with SIGTERM.
func TestServicesAsSeparateProcesses(t *testing.T) {
	t.Parallel()
	bin := buildBinary(t)
	natsURL := fleettest.NATS(t).ClientURL()
	common := []string{"--nats", natsURL, "--ack-wait", "2s", "--retry-backoff", "100ms", "--log-format", "json"}

	simURL := regexp.MustCompile(`listening on (http://\S+)`)
	var nodes []string
	var sims []*proc
	for i := range 2 {
		sim := startProc(t, bin, fmt.Sprintf("sim-%d", i), "sim", "--addr", "127.0.0.1:0", "--step", "10ms", "--name", fmt.Sprintf("gpu%d", i))
		sims = append(sims, sim)
		nodes = append(nodes, "--comfy", fmt.Sprintf("%s,id=gpu%d", sim.await(t, simURL), i))
	}
	keyOut := startProc(t, bin, "apikey", "apikey", "create", "--nats", natsURL, "--tenant", "studio", "--role", "submit")
	key := keyOut.await(t, regexp.MustCompile(`^\s+(cf_\S+)$`))
	intake := startProc(t, bin, "intake", append([]string{"intake", "--http", "127.0.0.1:0", "--allow-callback", "127.0.0.1"}, common...)...)
	apiURL := "http://" + intake.await(t, regexp.MustCompile(`"msg":"intake listening".*"addr":"([^"]+)"`))
	services := []*proc{
		intake,
		startProc(t, bin, "dispatcher", append([]string{"dispatcher"}, common...)...),
		startProc(t, bin, "notifier", append([]string{"notifier", "--public-url", apiURL, "--allow-callback", "127.0.0.1"}, common...)...),
		startProc(t, bin, "executor", append(append([]string{"executor", "--name", "ex1"}, common...), nodes...)...),
	}

	hooks := make(chan api.Webhook, 4)
	receiver := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var h api.Webhook
		if err := json.NewDecoder(r.Body).Decode(&h); err == nil {
			hooks <- h
		}
	}))
	defer receiver.Close()

	scenes := []map[string]any{}
	for i := range 4 {
		scenes = append(scenes, map[string]any{"workflow": "txt2img", "params": map[string]any{"seed": i, "steps": 10, "width": 64, "height": 64}})
	}
	body, _ := json.Marshal(map[string]any{"callback_url": receiver.URL, "scenes": scenes})
	req, _ := http.NewRequest(http.MethodPost, apiURL+"/v1/jobs", bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+key)
	resp, err := testClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		t.Fatalf("POST /v1/jobs: %s", resp.Status)
	}
	select {
	case h := <-hooks:
		if h.Job.Status != "succeeded" {
			t.Fatalf("job %s: %+v", h.Job.Status, h.Job.Scenes)
		}
		ran := map[string]bool{}
		for _, s := range h.Job.Scenes {
			ran[s.Node] = true
		}
		if len(ran) != 2 {
			t.Errorf("scenes ran on %v, want both nodes", ran)
		}
		get, _ := http.NewRequest(http.MethodGet, h.Job.Scenes[0].Outputs[0].URL, nil)
		get.Header.Set("Authorization", "Bearer "+key)
		out, err := testClient.Do(get)
		if err != nil {
			t.Fatal(err)
		}
		out.Body.Close()
		if out.StatusCode != http.StatusOK || out.Header.Get("Content-Type") != "image/png" {
			t.Errorf("download: %s %s", out.Status, out.Header.Get("Content-Type"))
		}
	case <-time.After(60 * time.Second):
		t.Fatal("no webhook within 60s")
	}
	for _, p := range append(services, sims...) {
		p.stop(t)
	}
}
