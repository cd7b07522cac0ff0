package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net/http"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

// proc is a comfyfleet process whose output lines can be waited on.
type proc struct {
	name  string
	cmd   *exec.Cmd
	lines *fleettest.Events[string]
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
	p := &proc{name: name, cmd: exec.Command(bin, args...), lines: fleettest.NewEvents[string]("lines of "+name, nil), exited: make(chan struct{})}
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
				p.lines.Add(sc.Text())
			}
		})
	}
	go func() {
		wg.Wait()
		p.err = p.cmd.Wait()
		p.lines.Close(fmt.Errorf("%s exited: %v", p.name, p.err))
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
			t.Logf("--- output of %s:\n%s", p.name, p.output())
		}
	})
	return p
}

// output is every line the process printed.
func (p *proc) output() string {
	var b strings.Builder
	for _, l := range p.lines.All(nil) {
		b.WriteString(l + "\n")
	}
	return b.String()
}

// await returns the first submatch of re in the process's output.
func (p *proc) await(t *testing.T, re *regexp.Regexp) string {
	t.Helper()
	line, _ := p.lines.Next(t, 0, 30*time.Second, fmt.Sprintf("line of %s matching %s", p.name, re), re.MatchString)
	return re.FindStringSubmatch(line)[1]
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

	hooks := fleettest.StartWebhooks(t)
	scenes := []map[string]any{}
	for i := range 4 {
		scenes = append(scenes, map[string]any{"workflow": "txt2img", "params": map[string]any{"seed": i, "steps": 10, "width": 64, "height": 64}})
	}
	job := fleettest.SubmitJob(t, apiURL, map[string]any{"callback_url": hooks.URL, "scenes": scenes}, fleettest.Key(key))
	h := hooks.Wait(t, job.ID, 60*time.Second).Body
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
	if out := fleettest.Do(t, http.MethodGet, h.Job.Scenes[0].Outputs[0].URL, nil, fleettest.Key(key)); out.Status != http.StatusOK || out.Header.Get("Content-Type") != "image/png" {
		t.Errorf("download: %d %s", out.Status, out.Header.Get("Content-Type"))
	}
	for _, p := range append(services, sims...) {
		p.stop(t)
	}
}
