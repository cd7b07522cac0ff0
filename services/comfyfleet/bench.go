package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"slices"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
)

func runBench(ctx context.Context, args []string, stdout, _ io.Writer) error {
	if len(args) > 0 {
		switch args[0] {
		case "scheduling":
			return runBenchScheduling(ctx, args[1:], stdout)
		case "throughput":
			return runBenchThroughput(ctx, args[1:], stdout)
		}
	}
	if len(args) == 0 || args[0] != "failover" {
		return fmt.Errorf("bench: name a benchmark: throughput, failover or scheduling")
	}
	fs := flag.NewFlagSet("bench failover", flag.ContinueOnError)
	rounds := fs.Int("rounds", 5, "rounds of each scenario")
	var settings settingsFlags
	settings.register(fs)
	if err := parse(fs, args[1:]); err != nil {
		return err
	}
	st, err := settings.settings()
	if err != nil {
		return err
	}
	return benchFailover(ctx, *rounds, st, stdout)
}

// failoverBench runs a fleet of two simulated nodes, each driven by an executor in
// its own process, and times how long a scene takes to start again on the other
// node after its executor is SIGKILLed or its ComfyUI node dies.
type failoverBench struct {
	stack     *stack.Stack
	settings  fleet.Settings
	events    chan *nats.Msg
	bin       string
	executors map[string]*exec.Cmd
}

func benchFailover(ctx context.Context, rounds int, settings fleet.Settings, stdout io.Writer) error {
	dir, err := os.MkdirTemp("", "comfyfleet-bench-")
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	defer os.RemoveAll(dir)
	bin, err := os.Executable()
	if err != nil {
		return fmt.Errorf("bench: find own binary: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	sims := []comfysim.Config{
		{Name: "gpu-a", StepDuration: 20 * time.Millisecond},
		{Name: "gpu-b", StepDuration: 20 * time.Millisecond},
	}
	s, err := stack.Start(ctx, stack.Config{DataDir: dir, NATSPort: -1, HTTPAddr: "127.0.0.1:0", Sims: sims, Open: true,
		Settings: settings, NoExecutor: true, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		return err
	}
	defer func() { cancel(); _ = s.Wait() }()
	nc, err := nats.Connect(s.NATS.ClientURL())
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	defer nc.Close()
	b := &failoverBench{stack: s, settings: settings, events: make(chan *nats.Msg, 4096), bin: bin, executors: map[string]*exec.Cmd{}}
	sub, err := nc.ChanSubscribe(fleet.SceneEventsFilter, b.events)
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	defer sub.Unsubscribe()
	for _, n := range s.Nodes {
		if err := b.startExecutor(n); err != nil {
			return err
		}
	}
	defer b.stopExecutors()

	fmt.Fprintf(stdout, "failover with ack-wait %s, executor heartbeat 1s (defaults unless flags say otherwise), %d rounds each\n\n", settings.AckWait, rounds)
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "scenario\trounds\tmin\tmedian\tmax\t")
	for _, sc := range []struct {
		name string
		kill func(node string) (revive func() error, err error)
	}{
		{"executor SIGKILL -> scene started on another node", b.killExecutor},
		{"ComfyUI node dies -> scene started on another node", b.killNode},
	} {
		var times []time.Duration
		for range rounds {
			d, err := b.round(ctx, sc.kill)
			if err != nil {
				return fmt.Errorf("bench %q: %w", sc.name, err)
			}
			times = append(times, d)
		}
		slices.Sort(times)
		fmt.Fprintf(tw, "%s\t%d\t%.2fs\t%.2fs\t%.2fs\t\n", sc.name, len(times),
			times[0].Seconds(), times[len(times)/2].Seconds(), times[len(times)-1].Seconds())
	}
	return tw.Flush()
}

// round submits one long scene, kills what runs it once it renders, and returns the
// time until it starts on another node; then it revives the victim and waits for
// the scene to finish.
func (b *failoverBench) round(ctx context.Context, kill func(string) (func() error, error)) (time.Duration, error) {
	job, err := b.submit(ctx)
	if err != nil {
		return 0, err
	}
	rendering, err := b.await(ctx, job, fleet.EventProgress, "")
	if err != nil {
		return 0, err
	}
	revive, err := kill(rendering.Node)
	if err != nil {
		return 0, err
	}
	killed := time.Now()
	if _, err := b.await(ctx, job, fleet.EventStarted, rendering.Node); err != nil {
		return 0, err
	}
	took := time.Since(killed)
	if err := revive(); err != nil {
		return 0, err
	}
	if _, err := b.await(ctx, job, fleet.EventCompleted, ""); err != nil {
		return 0, err
	}
	return took, nil
}

func (b *failoverBench) submit(ctx context.Context) (string, error) {
	body := `{"scenes":[{"workflow":"txt2img","params":{"steps":150,"width":64,"height":64,"seed":` +
		fmt.Sprint(time.Now().UnixNano()%1000000) + `}}]}`
	req, err := newJSONRequest(ctx, b.stack.APIURL+"/v1/jobs", body)
	if err != nil {
		return "", err
	}
	resp, err := benchClient.Do(req)
	if err != nil {
		return "", fmt.Errorf("submit: %w", err)
	}
	defer resp.Body.Close()
	var job struct {
		ID string `json:"id"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&job); err != nil || job.ID == "" {
		return "", fmt.Errorf("submit: %s: %v", resp.Status, err)
	}
	return job.ID, nil
}

// await returns the next event of type typ of job, from a node other than notOn.
func (b *failoverBench) await(ctx context.Context, job string, typ fleet.EventType, notOn string) (fleet.SceneEvent, error) {
	deadline := time.After(2 * time.Minute)
	for {
		select {
		case m := <-b.events:
			ev, err := fleet.DecodeSceneEvent(m.Data)
			if err == nil && ev.JobID == job && ev.Type == typ && (notOn == "" || ev.Node != notOn) {
				return ev, nil
			}
		case <-deadline:
			return fleet.SceneEvent{}, fmt.Errorf("no %s event of job %s within 2 minutes", typ, job)
		case <-ctx.Done():
			return fleet.SceneEvent{}, ctx.Err()
		}
	}
}

func (b *failoverBench) startExecutor(n fleet.NodeConfig) error {
	cmd := exec.Command(b.bin, "executor", "--nats", b.stack.NATS.ClientURL(), "--name", "bench-"+n.ID,
		"--comfy", fmt.Sprintf("%s,id=%s,pool=%s", n.URL, n.ID, strings.Join(n.Pools, "+")),
		"--ack-wait", b.settings.AckWait.String(), "--max-attempts", fmt.Sprint(b.settings.MaxAttempts), "--log-level", "error")
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start executor for %s: %w", n.ID, err)
	}
	b.executors[n.ID] = cmd
	return nil
}

func (b *failoverBench) killExecutor(node string) (func() error, error) {
	cmd := b.executors[node]
	if err := cmd.Process.Signal(syscall.SIGKILL); err != nil {
		return nil, fmt.Errorf("kill executor of %s: %w", node, err)
	}
	_ = cmd.Wait()
	return func() error {
		for _, n := range b.stack.Nodes {
			if n.ID == node {
				return b.startExecutor(n)
			}
		}
		return fmt.Errorf("no node %s", node)
	}, nil
}

func (b *failoverBench) killNode(node string) (func() error, error) {
	for i, n := range b.stack.Nodes {
		if n.ID == node {
			sim := b.stack.Sims[i]
			sim.Kill()
			return sim.Restart, nil
		}
	}
	return nil, fmt.Errorf("no node %s", node)
}

func (b *failoverBench) stopExecutors() {
	for _, cmd := range b.executors {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	}
}

var benchClient = &http.Client{Timeout: 30 * time.Second}

func newJSONRequest(ctx context.Context, url, body string) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("request %s: %w", url, err)
	}
	req.Header.Set("Content-Type", "application/json")
	return req, nil
}
