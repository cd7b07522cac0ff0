package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"runtime/pprof"
	"slices"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/comfyfleet/comfyfleet/pkg/comfy"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

func runBenchThroughput(ctx context.Context, args []string, stdout, _ io.Writer) error {
	fs := flag.NewFlagSet("bench throughput", flag.ContinueOnError)
	var (
		jobs        = fs.Int("jobs", 100, "jobs submitted under load")
		scenes      = fs.Int("scenes", 100, "scenes per job")
		clients     = fs.Int("clients", 8, "concurrent clients submitting")
		nodes       = fs.Int("nodes", 16, "simulated ComfyUI nodes")
		executors   = fs.Int("executors", 1, "executor processes driving the nodes")
		dispatchers = fs.Int("dispatchers", 1, "dispatcher processes")
		notifiers   = fs.Int("notifiers", 1, "notifier processes")
		sceneTime   = fs.Duration("scene-time", time.Millisecond, "time a simulated node takes for one scene")
		idle        = fs.Int("idle", 200, "one-scene jobs submitted one at a time on the idle fleet first, for the latency to ComfyUI")
		profile     = fs.String("profile", "", "directory to write a CPU profile (10 s under load) and a heap profile of every service")
		keep        = fs.Bool("keep", false, "keep the fleet's NATS store and the services' logs, and print where")
		servers     = fs.Int("nats-servers", 1, "NATS servers; more than one form a cluster whose streams keep a copy on each, as deploy/k8s/nats.yaml's three do")
	)
	if err := parse(fs, args); err != nil {
		return err
	}
	if *servers < 1 {
		return fmt.Errorf("bench throughput: --nats-servers %d: want at least 1", *servers)
	}
	sims := fastSims(*nodes, *sceneTime)
	f, err := startBenchFleet(ctx, benchFleetOptions{Nodes: sims, Executors: *executors, Dispatchers: *dispatchers,
		Notifiers: *notifiers, Settings: fleet.DefaultSettings(), Profile: *profile != "", Keep: *keep, NATSServers: *servers})
	if err != nil {
		return err
	}
	defer f.stop()
	rec, err := newEventRecorder(f.natsURL)
	if err != nil {
		return err
	}
	defer rec.close()

	fmt.Fprintf(stdout, "throughput: %d jobs of %d scenes from %d clients; %d simulated nodes of %s scenes driven by %d executor(s); %d dispatcher(s), %d notifier(s), %d NATS server(s); every service its own process\n\n",
		*jobs, *scenes, *clients, *nodes, *sceneTime, *executors, *dispatchers, *notifiers, *servers)

	latency, err := idleLatency(ctx, f, rec, *idle)
	if err != nil {
		return err
	}
	// Warm up: one job through every node.
	if _, err := runLoad(ctx, f, rec, 1, *scenes, 1, 1_000_000); err != nil {
		return fmt.Errorf("warm-up: %w", err)
	}
	var profiles sync.WaitGroup
	if *profile != "" {
		if err := os.MkdirAll(*profile, 0o755); err != nil {
			return err
		}
		for _, p := range f.procs {
			if p.pprof != "" {
				profiles.Go(func() { fetchProfile(p, "profile?seconds=10", filepath.Join(*profile, p.name+".cpu.pprof")) })
			}
		}
		profiles.Go(func() { profileSelf(ctx, 10*time.Second, filepath.Join(*profile, "bench.cpu.pprof")) })
	}
	before, trafficBefore := f.usage(), f.traffic(ctx)
	res, err := runLoad(ctx, f, rec, *jobs, *scenes, *clients, 0)
	if err != nil {
		return err
	}
	after, trafficAfter := f.usage(), f.traffic(ctx)
	if *profile != "" {
		profiles.Wait()
		for _, p := range f.procs {
			if p.pprof != "" {
				fetchProfile(p, "heap", filepath.Join(*profile, p.name+".heap.pprof"))
			}
		}
		fmt.Fprintf(stdout, "profiles written to %s\n\n", *profile)
	}

	total := *jobs * *scenes
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "measure\tvalue\t")
	fmt.Fprintf(tw, "scenes accepted a second (POSTs of %d-scene jobs)\t%.0f\t\n", *scenes, float64(total)/res.acceptedIn.Seconds())
	fmt.Fprintf(tw, "POST p50 / p99\t%s / %s\t\n", ms(pct(res.posts, 50)), ms(pct(res.posts, 99)))
	fmt.Fprintf(tw, "scenes queued a second\t%.0f\t\n", float64(total)/res.queuedIn.Seconds())
	fmt.Fprintf(tw, "scenes completed a second, end to end\t%.0f\t\n", float64(total)/res.completedIn.Seconds())
	fmt.Fprintf(tw, "job event after its last scene p50 / p99\t%s / %s\t\n", ms(pct(res.jobLags, 50)), ms(pct(res.jobLags, 99)))
	fmt.Fprintf(tw, "scenes lost / completed twice\t%d / %d\t\n", res.lost, res.twice)
	if len(latency) > 0 {
		fmt.Fprintf(tw, "idle fleet: submit -> ComfyUI runs the prompt p50 / p99 (%d jobs)\t%s / %s\t\n", len(latency), ms(pct(latency, 50)), ms(pct(latency, 99)))
	}
	if trafficAfter.In > 0 && *servers == 1 {
		fmt.Fprintf(tw, "NATS messages per scene, in / out (out: the recorder's too)\t%.1f / %.1f\t\n",
			float64(trafficAfter.In-trafficBefore.In)/float64(total), float64(trafficAfter.Out-trafficBefore.Out)/float64(total))
	}
	names := make([]string, 0, len(after))
	for name := range after {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		cpu := after[name].cpu - before[name].cpu
		fmt.Fprintf(tw, "%s: CPU per scene, peak RSS\t%.3f ms, %d MiB\t\n", name, float64(cpu.Microseconds())/1000/float64(total), after[name].rssMax>>20)
	}
	return tw.Flush()
}

// loadResult is what a load run measured.
type loadResult struct {
	acceptedIn, queuedIn, completedIn time.Duration
	// endedIn is when the last job's terminal event came.
	endedIn        time.Duration
	posts, jobLags []time.Duration
	lost, twice    int
	// slowest is the longest time a scene took from its queued event to its
	// first completed event.
	slowest time.Duration
}

// runLoad posts jobs of scenes from clients at once and waits until every job has
// its completion event. colorBase makes the scenes differ from other runs', so that
// no node serves them from its cache.
func runLoad(ctx context.Context, f *benchFleet, rec *eventRecorder, jobs, scenes, clients, colorBase int) (loadResult, error) {
	bodies := make([][]byte, jobs)
	for j := range bodies {
		list := make([]map[string]any, scenes)
		for i := range list {
			list[i] = map[string]any{"workflow": "demo", "params": map[string]any{"width": 8, "height": 8, "size": 8,
				"color": (colorBase + j*scenes + i + int(time.Now().UnixNano()%1000)*100000) % 0xffffff}}
		}
		bodies[j], _ = json.Marshal(map[string]any{"scenes": list})
	}
	rec.reset()
	work := make(chan int, jobs)
	for j := range jobs {
		work <- j
	}
	close(work)
	var (
		mu    sync.Mutex
		ids   []string
		posts []time.Duration
		first error
	)
	start := time.Now()
	var wg sync.WaitGroup
	for range clients {
		wg.Go(func() {
			for j := range work {
				t0 := time.Now()
				id, err := f.post(ctx, bodies[j])
				took := time.Since(t0)
				mu.Lock()
				if err != nil && first == nil {
					first = err
				}
				ids = append(ids, id)
				posts = append(posts, took)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if first != nil {
		return loadResult{}, first
	}
	accepted := time.Since(start)
	if err := rec.awaitJobs(ctx, ids, 5*time.Minute); err != nil {
		return loadResult{}, err
	}
	return rec.result(start, accepted, ids, scenes, posts), nil
}

// idleLatency submits n one-scene jobs one at a time and returns, for each, the time
// from its submission to its simulated node starting its prompt.
func idleLatency(ctx context.Context, f *benchFleet, rec *eventRecorder, n int) ([]time.Duration, error) {
	submitted := map[string]time.Time{}
	for i := range n {
		body := fmt.Sprintf(`{"scenes":[{"workflow":"demo","params":{"width":8,"height":8,"size":8,"color":%d}}]}`, 1_000_000+i)
		rec.reset()
		t0 := time.Now()
		id, err := f.post(ctx, []byte(body))
		if err != nil {
			return nil, err
		}
		submitted[comfy.PromptID(id, "0", "1")] = t0
		if err := rec.awaitJobs(ctx, []string{id}, 30*time.Second); err != nil {
			return nil, err
		}
	}
	var out []time.Duration
	for _, sim := range f.sims {
		for _, run := range sim.Stats().Runs {
			if t0, ok := submitted[run.PromptID]; ok {
				out = append(out, run.Start.Sub(t0))
			}
		}
	}
	return out, nil
}

// eventRecorder keeps the arrival time of every event the fleet publishes.
type eventRecorder struct {
	nc  *nats.Conn
	sub *nats.Subscription

	mu      sync.Mutex
	queued  map[string]time.Time
	done    map[string][]time.Time
	jobs    map[string]time.Time
	waiters map[string]chan struct{}
}

func newEventRecorder(url string) (*eventRecorder, error) {
	nc, err := nats.Connect(url)
	if err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	r := &eventRecorder{nc: nc}
	r.reset()
	r.sub, err = nc.Subscribe("fleet.evt.>", r.take)
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("bench: %w", err)
	}
	_ = r.sub.SetPendingLimits(-1, -1)
	return r, nc.Flush()
}

func (r *eventRecorder) reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.queued, r.done, r.jobs, r.waiters = map[string]time.Time{}, map[string][]time.Time{}, map[string]time.Time{}, map[string]chan struct{}{}
}

func (r *eventRecorder) take(m *nats.Msg) {
	at := time.Now()
	// fleet.evt.scene.<job>.<index>.<type> or fleet.evt.job.<job>.<type>
	parts := strings.Split(m.Subject, ".")
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case len(parts) == 6 && parts[2] == "scene":
		key := parts[3] + "." + parts[4]
		switch fleet.EventType(parts[5]) {
		case fleet.EventQueued:
			if _, ok := r.queued[key]; !ok {
				r.queued[key] = at
			}
		case fleet.EventCompleted:
			r.done[key] = append(r.done[key], at)
		}
	case len(parts) == 5 && parts[2] == "job" && fleet.EventType(parts[4]).Terminal():
		job := parts[3]
		if _, ok := r.jobs[job]; !ok {
			r.jobs[job] = at
			if w := r.waiters[job]; w != nil {
				close(w)
			}
		}
	}
}

// awaitJobs waits until every job has its terminal event, at most within.
func (r *eventRecorder) awaitJobs(ctx context.Context, ids []string, within time.Duration) error {
	deadline := time.NewTimer(within)
	defer deadline.Stop()
	for _, id := range ids {
		r.mu.Lock()
		_, ended := r.jobs[id]
		w := r.waiters[id]
		if w == nil {
			w = make(chan struct{})
			r.waiters[id] = w
		}
		r.mu.Unlock()
		if ended {
			continue
		}
		select {
		case <-w:
		case <-deadline.C:
			return fmt.Errorf("bench: job %s has no completion event after %s", id, within)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return nil
}

func (r *eventRecorder) result(start time.Time, accepted time.Duration, ids []string, scenes int, posts []time.Duration) loadResult {
	r.mu.Lock()
	defer r.mu.Unlock()
	res := loadResult{acceptedIn: accepted, posts: posts}
	var lastQueued, lastDone time.Time
	for _, at := range r.queued {
		if at.After(lastQueued) {
			lastQueued = at
		}
	}
	for _, id := range ids {
		var lastScene time.Time
		for i := range scenes {
			done := r.done[fmt.Sprintf("%s.%d", id, i)]
			switch {
			case len(done) == 0:
				res.lost++
				continue
			case len(done) > 1:
				res.twice++
			}
			if done[0].After(lastScene) {
				lastScene = done[0]
			}
			if queued, ok := r.queued[fmt.Sprintf("%s.%d", id, i)]; ok {
				res.slowest = max(res.slowest, done[0].Sub(queued))
			}
		}
		if lastScene.After(lastDone) {
			lastDone = lastScene
		}
		if end, ok := r.jobs[id]; ok {
			res.endedIn = max(res.endedIn, end.Sub(start))
			if !lastScene.IsZero() {
				res.jobLags = append(res.jobLags, end.Sub(lastScene))
			}
		}
	}
	res.queuedIn, res.completedIn = lastQueued.Sub(start), lastDone.Sub(start)
	return res
}

func (r *eventRecorder) close() {
	_ = r.sub.Unsubscribe()
	r.nc.Close()
}

// fetchProfile saves a pprof profile of p.
func fetchProfile(p *benchProc, path, file string) {
	resp, err := http.Get("http://" + p.pprof + "/debug/pprof/" + path)
	if err != nil {
		return
	}
	defer resp.Body.Close()
	out, err := os.Create(file)
	if err != nil {
		return
	}
	defer out.Close()
	_, _ = io.Copy(out, resp.Body)
}

// profileSelf writes a CPU profile of this process, its simulated nodes and
// clients, for d.
func profileSelf(ctx context.Context, d time.Duration, file string) {
	out, err := os.Create(file)
	if err != nil {
		return
	}
	defer out.Close()
	if pprof.StartCPUProfile(out) != nil {
		return
	}
	fleet.Pause(ctx, d)
	pprof.StopCPUProfile()
}

// pct is the p-th percentile of ds.
func pct(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000) }
