package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/schedbench"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
	"github.com/comfyfleet/comfyfleet/services/dispatcher"
	"github.com/comfyfleet/comfyfleet/services/executor"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

// schedScenario is one row of the scheduling benchmark, in model seconds: what the
// scenes would take on real GPUs. The benchmark scales time so that the optimum
// lasts --target.
type schedScenario struct {
	name   string
	nodes  []schedbench.Node
	scenes []schedbench.Scene
	// load is the seconds to load a checkpoint that is not resident.
	load float64
	// kill is the index of the node killed halfway through the optimum; -1 none.
	kill int
}

const (
	modelA = "v1-5-pruned-emaonly.safetensors"
	modelB = "sd_xl_base_1.0.safetensors"
)

func equalNodes(pool string, speeds ...float64) []schedbench.Node {
	nodes := make([]schedbench.Node, len(speeds))
	for i, s := range speeds {
		nodes[i] = schedbench.Node{ID: fmt.Sprintf("%s-%d", pool, i+1), Speed: s, Pools: []string{pool}}
	}
	return nodes
}

func sameScenes(n int, seconds float64, pool string) []schedbench.Scene {
	scenes := make([]schedbench.Scene, n)
	for i := range scenes {
		scenes[i] = schedbench.Scene{Duration: seconds, Pool: pool}
	}
	return scenes
}

func alternating(n int, seconds float64) []schedbench.Scene {
	scenes := sameScenes(n, seconds, "image")
	for i := range scenes {
		scenes[i].Model = []string{modelA, modelB}[i%2]
	}
	return scenes
}

func schedScenarios() []schedScenario {
	image := func(n int, speeds ...float64) schedScenario {
		return schedScenario{name: fmt.Sprintf("%d images of 3 s on %v", n, speeds), nodes: equalNodes("image", speeds...),
			scenes: sameScenes(n, 3, "image"), kill: -1}
	}
	mixed := schedScenario{name: "8 images of 3 s on [2,1] + 4 videos of 60 s on [1,1]", kill: -1,
		nodes:  append(equalNodes("image", 2, 1), equalNodes("video", 1, 1)...),
		scenes: append(sameScenes(8, 3, "image"), sameScenes(4, 60, "video")...)}
	models := schedScenario{name: "12 images of 3 s, checkpoints A,B,A,… (load 5 s) on [1,1,1]", kill: -1,
		nodes: equalNodes("image", 1, 1, 1), scenes: alternating(12, 3), load: 5}
	killed := models
	killed.name = "the same, one node killed halfway"
	killed.kill = 2
	return []schedScenario{
		image(6, 1), image(6, 1, 1), image(6, 1, 1, 1), image(6, 1, 1, 1, 1, 1, 1),
		image(6, 3, 1, 1), image(12, 3, 1, 1), image(2, 10, 1), image(100, 4, 4, 2, 2, 1, 1, 1, 1),
		{name: "6 videos of 8 min on [1, 1, 1]", nodes: equalNodes("video", 1, 1, 1), scenes: sameScenes(6, 480, "video"), kill: -1},
		mixed, models, killed,
	}
}

func runBenchScheduling(ctx context.Context, args []string, stdout, _ io.Writer) error {
	fs := flag.NewFlagSet("bench scheduling", flag.ContinueOnError)
	target := fs.Duration("target", 3*time.Second, "real time the optimum of each scenario is scaled to (longer when a scene would last under 300ms)")
	only := fs.String("only", "", "run only the scenarios whose name contains this text")
	policies := fs.String("policies", "", "comma-separated policies to compare (default all)")
	if err := parse(fs, args); err != nil {
		return err
	}
	list := dispatcher.Policies
	if *policies != "" {
		list = nil
		for _, p := range strings.Split(*policies, ",") {
			pol, err := dispatcher.ParsePolicy(strings.TrimSpace(p))
			if err != nil {
				return err
			}
			list = append(list, pol)
		}
	}
	tw := tabwriter.NewWriter(stdout, 2, 4, 2, ' ', tabwriter.AlignRight)
	header := "scenario\toptimum (s)\t"
	for _, p := range list {
		header += string(p) + " (s)\tratio\t"
	}
	fmt.Fprintln(stdout, "makespan in model seconds; ratio = makespan / the optimum for the scene times the simulated nodes took in that run")
	fmt.Fprintln(tw, header)
	for _, sc := range schedScenarios() {
		if !strings.Contains(sc.name, *only) {
			continue
		}
		opt, killAt := sc.optimum()
		row := fmt.Sprintf("%s\t%.2f %s\t", sc.name, opt.Makespan, boundKind(opt))
		for _, p := range list {
			got, best, err := sc.run(ctx, p, *target, opt.Makespan, killAt)
			if err != nil {
				return fmt.Errorf("bench scheduling: %s with %s: %w", sc.name, p, err)
			}
			row += fmt.Sprintf("%.2f\t%.3f\t", got, got/best)
		}
		fmt.Fprintln(tw, row)
		tw.Flush()
	}
	return tw.Flush()
}

func boundKind(b schedbench.Bound) string {
	if b.Exact {
		return "(exact)"
	}
	return "(bound)"
}

// resident is the checkpoint every node holds after the warm-up: the last one it
// warmed up with.
func (sc schedScenario) resident() string {
	models := sc.models()
	return models[len(models)-1]
}

func (sc schedScenario) models() []string {
	var models []string
	for _, s := range sc.scenes {
		if s.Model != "" && !slices.Contains(models, s.Model) {
			models = append(models, s.Model)
		}
	}
	if len(models) == 0 {
		models = []string{"v1-5-pruned-emaonly.safetensors"}
	}
	return models
}

// optimum returns the scenario's optimum in model seconds, and when its node dies.
func (sc schedScenario) optimum() (schedbench.Bound, float64) {
	nodes := slices.Clone(sc.nodes)
	for i := range nodes {
		nodes[i].Model = sc.resident()
	}
	full := schedbench.Optimum(nodes, sc.scenes, sc.load)
	if sc.kill < 0 {
		return full, 0
	}
	nodes[sc.kill].KilledAt = full.Makespan / 2
	return schedbench.Optimum(nodes, sc.scenes, sc.load), full.Makespan / 2
}

// minScene is the least real time a scene lasts on its fastest node.
const minScene = 300 * time.Millisecond

// sceneSteps is the sampler steps of every scene: a node's step time makes its
// duration.
const sceneSteps = 20

// run runs the scenario with policy on a fresh fleet, time scaled so that the
// optimum lasts target, and returns its makespan in model seconds (from the job's
// submission to the end of its last scene) and the optimum for the scene times the
// simulated nodes really took: a simulated scene takes a few milliseconds longer
// than its nominal time (encoding its image, recording its history), and the ratio
// should measure scheduling, not the simulator.
func (sc schedScenario) run(ctx context.Context, policy dispatcher.Policy, target time.Duration, optimum, killAt float64) (makespan, measuredOptimum float64, err error) {
	// Scaled down, a scene should still last long enough that the simulator's own
	// few milliseconds per scene do not swamp it.
	shortest := math.Inf(1)
	for _, scene := range sc.scenes {
		for _, n := range sc.nodes {
			if slices.Contains(n.Pools, scene.Pool) {
				shortest = min(shortest, scene.Duration/n.Speed)
			}
		}
	}
	scale := max(target.Seconds()/optimum, minScene.Seconds()/shortest)
	real := func(modelSeconds float64) time.Duration {
		return time.Duration(modelSeconds * scale * float64(time.Second))
	}
	dir, err := os.MkdirTemp("", "comfyfleet-bench-")
	if err != nil {
		return 0, 0, err
	}
	defer os.RemoveAll(dir)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// Each node's step time makes its pool's scenes last their duration.
	duration := map[string]float64{}
	for _, s := range sc.scenes {
		duration[s.Pool] = s.Duration
	}
	var sims []*comfysim.Server
	var nodes []fleet.NodeConfig
	defer func() {
		for _, s := range sims {
			s.Close()
		}
	}()
	for _, n := range sc.nodes {
		sim, err := comfysim.Start(comfysim.Config{Name: n.ID, Speed: n.Speed, StepDuration: real(duration[n.Pools[0]] / sceneSteps),
			NodeDuration: -1, ModelLoadDuration: real(sc.load), Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			return 0, 0, err
		}
		sims = append(sims, sim)
		nodes = append(nodes, fleet.NodeConfig{ID: n.ID, URL: sim.URL(), Pools: n.Pools, Weight: n.Speed})
	}
	settings := fleet.Settings{AckWait: 2 * time.Second, RetryBackoff: 20 * time.Millisecond, NodeTTL: 3 * time.Second}
	st, err := stack.Start(ctx, stack.Config{DataDir: dir, NATSPort: -1, HTTPAddr: "127.0.0.1:0", Open: true, Sync: "2m",
		Comfy: nodes, Settings: settings, Logger: slog.New(slog.DiscardHandler),
		Intake:     intake.Config{SubmitRate: intake.RateLimit{PerSecond: intake.Unlimited}, ReadRate: intake.RateLimit{PerSecond: intake.Unlimited}},
		Executor:   executor.Config{HeartbeatInterval: 100 * time.Millisecond},
		Dispatcher: dispatcher.Config{Policy: policy, ModelLoadPenalty: real(sc.load)}})
	if err != nil {
		return 0, 0, err
	}
	defer func() { cancel(); _ = st.Wait() }()
	b := &schedRun{api: st.APIURL}

	// Warm-up: every pool's nodes run each checkpoint twice, so that the
	// dispatcher has measured them; the last checkpoint stays resident.
	for _, model := range sc.models() {
		var warm []schedbench.Scene
		for pool := range duration {
			for _, n := range sc.nodes {
				if n.Pools[0] == pool {
					warm = append(warm, schedbench.Scene{Pool: pool, Model: model}, schedbench.Scene{Pool: pool, Model: model})
				}
			}
		}
		if _, err := b.runJob(ctx, warm, 0, nil); err != nil {
			return 0, 0, fmt.Errorf("warm-up: %w", err)
		}
	}
	var kill func()
	if sc.kill >= 0 {
		kill = func() { sims[sc.kill].Kill() }
	}
	start, err := b.runJob(ctx, sc.scenes, real(killAt), kill)
	if err != nil {
		return 0, 0, err
	}
	var end time.Time
	for _, s := range sims {
		for _, r := range s.Stats().Runs {
			if r.Outcome == "success" && r.End.After(end) {
				end = r.End
			}
		}
	}
	if os.Getenv("COMFYFLEET_BENCH_TRACE") != "" {
		for i, s := range sims {
			for _, r := range s.Stats().Runs {
				if r.Start.After(start) {
					fmt.Fprintf(os.Stderr, "%s %s node %s: %6.2f → %6.2f %s loaded=%v\n", policy, sc.name, sc.nodes[i].ID,
						r.Start.Sub(start).Seconds()/scale, r.End.Sub(start).Seconds()/scale, r.Outcome, r.ModelLoaded)
				}
			}
		}
	}
	// Each node's speed as measured: its median scene time without a model load.
	nodesSeen := slices.Clone(sc.nodes)
	for i := range nodesSeen {
		var times []float64
		for _, r := range sims[i].Stats().Runs {
			if r.Outcome == "success" && !r.ModelLoaded {
				times = append(times, r.End.Sub(r.Start).Seconds()/scale)
			}
		}
		if len(times) > 0 {
			slices.Sort(times)
			nodesSeen[i].Speed = duration[nodesSeen[i].Pools[0]] / times[len(times)/2]
		}
		nodesSeen[i].Model = sc.resident()
		if i == sc.kill {
			nodesSeen[i].KilledAt = killAt
		}
	}
	seen := schedbench.Optimum(nodesSeen, sc.scenes, sc.load)
	return end.Sub(start).Seconds() / scale, seen.Makespan, nil
}

// schedRun submits the benchmark's jobs.
type schedRun struct {
	api  string
	jobs int
}

// runJob submits scenes as one job (or several of at most 100 scenes), runs kill
// after killAfter if set, waits until every job has succeeded, and returns when
// they were submitted.
func (b *schedRun) runJob(ctx context.Context, scenes []schedbench.Scene, killAfter time.Duration, kill func()) (time.Time, error) {
	var ids []string
	start := time.Now()
	for first := 0; first < len(scenes); first += 100 {
		chunk := scenes[first:min(first+100, len(scenes))]
		specs := make([]map[string]any, len(chunk))
		for i, s := range chunk {
			b.jobs++
			params := map[string]any{"steps": sceneSteps, "width": 64, "height": 64, "seed": b.jobs*1000 + i, "prompt": "benchmark"}
			if s.Model != "" {
				params["checkpoint"] = s.Model
			}
			specs[i] = map[string]any{"workflow": "txt2img", "pool": s.Pool, "params": params}
		}
		body, err := json.Marshal(map[string]any{"priority": 5, "scenes": specs})
		if err != nil {
			return start, err
		}
		req, err := newJSONRequest(ctx, b.api+"/v1/jobs", string(body))
		if err != nil {
			return start, err
		}
		resp, err := benchClient.Do(req)
		if err != nil {
			return start, fmt.Errorf("submit: %w", err)
		}
		var job struct {
			ID string `json:"id"`
		}
		err = json.NewDecoder(resp.Body).Decode(&job)
		resp.Body.Close()
		if err != nil || job.ID == "" {
			return start, fmt.Errorf("submit: %s: %v", resp.Status, err)
		}
		ids = append(ids, job.ID)
	}
	if kill != nil {
		t := time.AfterFunc(time.Until(start.Add(killAfter)), kill)
		defer t.Stop()
	}
	deadline := time.Now().Add(10 * time.Minute)
	for _, id := range ids {
		for {
			status, err := b.status(ctx, id)
			if err != nil {
				return start, err
			}
			if status == "succeeded" {
				break
			}
			if status == "failed" || status == "cancelled" {
				return start, fmt.Errorf("job %s %s", id, status)
			}
			if time.Now().After(deadline) {
				return start, fmt.Errorf("job %s still %s after 10 minutes", id, status)
			}
			select {
			case <-ctx.Done():
				return start, ctx.Err()
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	return start, nil
}

func (b *schedRun) status(ctx context.Context, id string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, b.api+"/v1/jobs/"+id, nil)
	if err != nil {
		return "", err
	}
	resp, err := benchClient.Do(req)
	if err != nil {
		return "", fmt.Errorf("job %s: %w", id, err)
	}
	defer resp.Body.Close()
	var job struct {
		Status string `json:"status"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&job); err != nil {
		return "", fmt.Errorf("job %s: %s: %w", id, resp.Status, err)
	}
	return job.Status, nil
}
