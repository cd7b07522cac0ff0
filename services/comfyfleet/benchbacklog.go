package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

func runBenchBacklog(ctx context.Context, args []string, stdout, _ io.Writer) error {
	fs := flag.NewFlagSet("bench backlog", flag.ContinueOnError)
	var (
		scenes    = fs.Int("scenes", 1_000_000, "scenes queued before any node arrives")
		perJob    = fs.Int("scenes-per-job", 1000, "scenes per job")
		clients   = fs.Int("clients", 8, "concurrent clients submitting")
		nodes     = fs.Int("nodes", 500, "simulated ComfyUI nodes that arrive once the backlog is queued (0: stop once it is queued)")
		executors = fs.Int("executors", 2, "executor processes driving the nodes")
		sceneTime = fs.Duration("scene-time", time.Millisecond, "time a simulated node takes for one scene")
		profile   = fs.String("profile", "", "directory to write a heap profile of every service with the backlog queued and a CPU profile of every service (10 s of the queueing, 30 s of the drain)")
		keep      = fs.Bool("keep", false, "keep the fleet's NATS store and the services' logs, and print where")
		nodesNice = fs.Int("nodes-nice", 0, "nice value this process takes once the nodes arrive (1-19; Linux): its simulated nodes and clients then yield the cores to the services, as GPUs on machines of their own would (0: unchanged)")
		memLimit  = fs.String("dispatcher-memory-limit", "900MiB", "the dispatcher's GOMEMLIMIT, as deploy/k8s/dispatcher.yaml sets it (empty: none)")
		natsLimit = fs.String("nats-memory-limit", "3GiB", "each NATS server's GOMEMLIMIT, as deploy/k8s/nats.yaml sets it (empty: none)")
		servers   = fs.Int("nats-servers", 1, "NATS servers; more than one form a cluster whose streams keep a copy on each, as deploy/k8s/nats.yaml's three do")
	)
	if err := parse(fs, args); err != nil {
		return err
	}
	if *nodesNice < 0 || *nodesNice > 19 {
		return fmt.Errorf("bench backlog: --nodes-nice %d: want 0 (unchanged) to 19", *nodesNice)
	}
	if *nodes < 0 {
		return fmt.Errorf("bench backlog: --nodes %d: want 0 (none) or more", *nodes)
	}
	if *servers < 1 {
		return fmt.Errorf("bench backlog: --nats-servers %d: want at least 1", *servers)
	}
	jobs := *scenes / *perJob
	f, err := startBenchFleet(ctx, benchFleetOptions{Dispatchers: 1, Notifiers: 1, Settings: fleet.DefaultSettings(), Metrics: true, Profile: *profile != "", Keep: *keep,
		DispatcherMemoryLimit: *memLimit, NATSServers: *servers, NATSMemoryLimit: *natsLimit})
	if err != nil {
		return err
	}
	defer f.stop()
	nc, err := nats.Connect(f.natsURL)
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	defer nc.Close()
	var (
		ended, unsuccessful atomic.Int64
		mu                  sync.Mutex
		failedJobs          []string
	)
	sub, err := nc.Subscribe("fleet.evt.job.*.*", func(m *nats.Msg) {
		typ := fleet.EventType(m.Subject[strings.LastIndexByte(m.Subject, '.')+1:])
		if typ.Terminal() {
			ended.Add(1)
		}
		if typ == fleet.EventFailed || typ == fleet.EventCancelled {
			unsuccessful.Add(1)
			mu.Lock()
			failedJobs = append(failedJobs, strings.Split(m.Subject, ".")[3])
			mu.Unlock()
		}
	})
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	defer sub.Unsubscribe()
	// Attempts retried, and of them those whose node or executor was taken for lost:
	// under this load, mostly nodes and executors too starved to answer in time.
	var retried, nodeLost, executorLost atomic.Int64
	retries, err := nc.Subscribe("fleet.evt.scene.*.*.retrying", func(m *nats.Msg) {
		retried.Add(1)
		ev, err := fleet.DecodeSceneEvent(m.Data)
		switch {
		case err != nil:
		case strings.Contains(ev.Error, "its executor stopped answering"):
			executorLost.Add(1)
		case strings.Contains(ev.Error, "node stopped answering"):
			nodeLost.Add(1)
		}
	})
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	defer retries.Unsubscribe()
	then := fmt.Sprintf("then %d simulated nodes of %s scenes arrive, driven by %d executors", *nodes, *sceneTime, *executors)
	if *nodes == 0 {
		then = "and no node arrives"
	}
	store := "one NATS server"
	if *servers > 1 {
		store = fmt.Sprintf("a cluster of %d NATS servers, each holding a copy of every stream", *servers)
	}
	fmt.Fprintf(stdout, "backlog: %d scenes in jobs of %d queued with no node, %s; every service its own process, on %s\n\n",
		jobs**perJob, *perJob, then, store)

	// Queue the backlog.
	if *profile != "" {
		if err := os.MkdirAll(*profile, 0o755); err != nil {
			return err
		}
	}
	var profiles sync.WaitGroup
	defer profiles.Wait()
	fetchProfiles := func(path, suffix string) {
		for _, p := range f.procs {
			if p.pprof != "" {
				profiles.Go(func() { fetchProfile(p, path, filepath.Join(*profile, p.name+suffix)) })
			}
		}
	}
	if *profile != "" {
		fetchProfiles("profile?seconds=10", ".accept.cpu.pprof")
	}
	beforeAccept := f.usage()
	start := time.Now()
	work := make(chan int, jobs)
	for j := range jobs {
		work <- j
	}
	close(work)
	var wg sync.WaitGroup
	var failed atomic.Value
	posts := make([][]time.Duration, *clients)
	for c := range *clients {
		wg.Go(func() {
			for j := range work {
				list := make([]map[string]any, *perJob)
				for i := range list {
					list[i] = map[string]any{"workflow": "demo", "params": map[string]any{"width": 8, "height": 8, "size": 8, "color": (j**perJob + i) % 0xffffff}}
				}
				body, _ := json.Marshal(map[string]any{"scenes": list})
				sent := time.Now()
				if _, err := f.post(ctx, body); err != nil {
					failed.Store(err)
					return
				}
				posts[c] = append(posts[c], time.Since(sent))
			}
		})
	}
	wg.Wait()
	if err, ok := failed.Load().(error); ok {
		return err
	}
	accepted := time.Since(start)
	total := jobs * *perJob
	var summary fleet.QueueSummary
	for {
		if err := queueSummary(nc, &summary); err == nil && depth(summary) >= total {
			break
		}
		if time.Since(start) > time.Hour {
			return fmt.Errorf("bench: the queue holds %d scenes of %d after an hour", depth(summary), total)
		}
		fleet.Pause(ctx, 100*time.Millisecond)
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	queuedIn := time.Since(start)
	queued := f.usage()
	if *profile != "" {
		for _, p := range f.procs {
			if p.pprof != "" {
				fetchProfile(p, "heap", filepath.Join(*profile, p.name+".queued.heap.pprof"))
			}
		}
	}
	services := append(f.procNames("nats"), "intake", "dispatcher-1", "notifier-1")
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "measure\tvalue\t")
	fmt.Fprintf(tw, "scenes accepted a second\t%.0f\t\n", float64(total)/accepted.Seconds())
	allPosts := slices.Concat(posts...)
	fmt.Fprintf(tw, "POST of a %d-scene job p50 / p99\t%s / %s\t\n", *perJob, ms(pct(allPosts, 50)), ms(pct(allPosts, 99)))
	fmt.Fprintf(tw, "every scene queued after\t%.1f s\t\n", queuedIn.Seconds())
	// Until every scene is queued, not only accepted: work a service defers past the
	// last answer (queueing the last jobs) counts too.
	for _, name := range append([]string{benchSelf}, services...) {
		cpu := queued[name].cpu - beforeAccept[name].cpu
		fmt.Fprintf(tw, "%s: CPU per scene queued\t%.3f ms\t\n", name, float64(cpu.Microseconds())/1000/float64(total))
	}
	held := queued["dispatcher-1"]
	fmt.Fprintf(tw, "dispatcher peak RSS with %d scenes queued\t%d MiB (%.0f bytes a scene)\t\n", total, held.rssMax>>20, float64(held.rssMax)/float64(total))
	if *nodes == 0 {
		for _, name := range services {
			fmt.Fprintf(tw, "%s: peak RSS once queued\t%d MiB\t\n", name, queued[name].rssMax>>20)
		}
		return tw.Flush()
	}

	// The nodes arrive.
	sims := fastSims(*nodes, *sceneTime)
	arrived := time.Now()
	if err := f.startNodes(sims, *executors); err != nil {
		return err
	}
	if *nodesNice != 0 {
		if err := lowerPriority(*nodesNice); err != nil {
			return fmt.Errorf("bench: --nodes-nice: %w", err)
		}
	}
	if *profile != "" {
		fetchProfiles("profile?seconds=30", ".drain.cpu.pprof")
	}
	for ended.Load() < int64(jobs) {
		if time.Since(arrived) > 3*time.Hour {
			return fmt.Errorf("bench: %d of %d jobs ended after 3 hours", ended.Load(), jobs)
		}
		fleet.Pause(ctx, time.Second)
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	drained := time.Since(arrived)
	after := f.usage()
	decisions, err := histogram(f.proc("dispatcher-1").metrics, "comfyfleet_placement_decision_seconds")
	if err != nil {
		return err
	}
	onCPU, err := histogram(f.proc("dispatcher-1").metrics, "comfyfleet_placement_decision_cpu_seconds")
	if err != nil {
		return err
	}
	fmt.Fprintf(tw, "placement decisions (plans placing a scene)\t%.0f\t\n", decisions.count)
	fmt.Fprintf(tw, "placement decision p50 / p99 (upper bucket bounds)\t%s / %s\t\n", decisions.quantile(0.5), decisions.quantile(0.99))
	fmt.Fprintf(tw, "placement decisions within 1 ms / 10 ms\t%.2f%% / %.2f%%\t\n", 100*decisions.within(0.001), 100*decisions.within(0.01))
	fmt.Fprintf(tw, "their CPU time p50 / p99; within 1 ms\t%s / %s; %.2f%%\t\n", onCPU.quantile(0.5), onCPU.quantile(0.99), 100*onCPU.within(0.001))
	fmt.Fprintf(tw, "time to drain once %d nodes arrived\t%.1f s (%.0f scenes a second)\t\n", *nodes, drained.Seconds(), float64(total)/drained.Seconds())
	fmt.Fprintf(tw, "jobs ended / of them not succeeded\t%d / %d\t\n", ended.Load(), unsuccessful.Load())
	fmt.Fprintf(tw, "attempts retried / of them after a lost node / executor\t%d / %d / %d\t\n", retried.Load(), nodeLost.Load(), executorLost.Load())
	for _, name := range services {
		fmt.Fprintf(tw, "%s: peak RSS once queued / at the end\t%d / %d MiB\t\n", name, queued[name].rssMax>>20, after[name].rssMax>>20)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	mu.Lock()
	notSucceeded := slices.Clone(failedJobs)
	mu.Unlock()
	f.explainFailures(ctx, stdout, notSucceeded)
	return nil
}

// explainFailures prints why the scenes of the first few of jobs that did not succeed
// ended as they did: each failed attempt's node and error, as the API gives them.
func (f *benchFleet) explainFailures(ctx context.Context, w io.Writer, jobs []string) {
	const most = 5
	for i, id := range jobs {
		if i == most {
			fmt.Fprintf(w, "… and %d more jobs that did not succeed\n", len(jobs)-most)
			return
		}
		var job api.Job
		if err := f.get(ctx, api.JobPath(id), &job); err != nil {
			fmt.Fprintf(w, "job %s did not succeed; reading it: %v\n", id, err)
			continue
		}
		fmt.Fprintf(w, "job %s: %s\n", id, job.Status)
		for _, sc := range job.Scenes {
			if sc.Status == "succeeded" {
				continue
			}
			fmt.Fprintf(w, "  scene %d: %s after %d attempts: %s\n", sc.Index, sc.Status, sc.Attempts, sc.Error)
			for _, a := range sc.Failures {
				fmt.Fprintf(w, "    attempt %d on %s at %s: %s\n", a.Attempt, a.Node, a.At.Format(time.RFC3339Nano), a.Error)
			}
		}
	}
}

// queueSummary asks a dispatcher what its queue holds.
func queueSummary(nc *nats.Conn, s *fleet.QueueSummary) error {
	m, err := nc.Request(fleet.QueuesSubject, nil, 5*time.Second)
	if err != nil {
		return err
	}
	return json.Unmarshal(m.Data, s)
}

func depth(s fleet.QueueSummary) int {
	n := 0
	for _, p := range s.Pools {
		n += p.Depth
	}
	return n
}

// buckets is a Prometheus histogram: cumulative counts by upper bound.
type buckets struct {
	bounds []float64
	counts []float64
	count  float64
}

// quantile is the upper bound of the bucket holding quantile q.
func (b buckets) quantile(q float64) string {
	for i, c := range b.counts {
		if c >= q*b.count {
			if math.IsInf(b.bounds[i], 1) {
				return "above the last bucket"
			}
			return fmt.Sprintf("≤ %s", time.Duration(b.bounds[i]*float64(time.Second)))
		}
	}
	return "n/a"
}

// within is the share of observations at most bound, a bucket's upper bound.
func (b buckets) within(bound float64) float64 {
	i := slices.Index(b.bounds, bound)
	if i < 0 || b.count == 0 {
		return math.NaN()
	}
	return b.counts[i] / b.count
}

// histogram reads histogram name from the Prometheus metrics at addr.
func histogram(addr, name string) (buckets, error) {
	var b buckets
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		return b, fmt.Errorf("bench: read metrics: %w", err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		switch {
		case strings.HasPrefix(line, name+"_bucket{"):
			i := strings.Index(line, `le="`)
			j := strings.Index(line[i+4:], `"`)
			le := line[i+4 : i+4+j]
			bound := math.Inf(1)
			if le != "+Inf" {
				bound, _ = strconv.ParseFloat(le, 64)
			}
			v, _ := strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
			b.bounds, b.counts = append(b.bounds, bound), append(b.counts, v)
		case strings.HasPrefix(line, name+"_count"):
			b.count, _ = strconv.ParseFloat(line[strings.LastIndexByte(line, ' ')+1:], 64)
		}
	}
	return b, sc.Err()
}
