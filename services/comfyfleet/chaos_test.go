package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"maps"
	"math/rand/v2"
	"net/http"
	"net/http/httptest"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/comfy"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

var (
	chaosScenes   = flag.Int("chaos.scenes", 300, "scenes the chaos test pushes through (3000 for the long run)")
	chaosEvery    = flag.Duration("chaos.every", time.Second, "time between two kills")
	chaosRate     = flag.Float64("chaos.rate", 2, "jobs of ten scenes submitted a second, so that kills land while work runs")
	chaosDeadline = flag.Duration("chaos.deadline", 5*time.Minute, "time the chaos test may take")
)

const chaosScenesPerJob = 10

// chaosFleet is a fleet of OS processes that can be SIGKILLed and restarted.
type chaosFleet struct {
	t       *testing.T
	bin     string
	mu      sync.Mutex
	procs   map[string]*chaosProc
	kinds   map[string][]string // kind → process names
	retired []*proc             // killed processes, kept for their output
}

type chaosProc struct {
	kind string
	args []string
	p    *proc
}

func (f *chaosFleet) start(kind, name string, ready *regexp.Regexp, args ...string) {
	f.t.Helper()
	p := startProc(f.t, f.bin, name, args...)
	if ready != nil {
		p.await(f.t, ready)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if _, ok := f.procs[name]; !ok {
		f.kinds[kind] = append(f.kinds[kind], name)
	}
	f.procs[name] = &chaosProc{kind: kind, args: args, p: p}
}

// kill SIGKILLs the named process and returns a function that starts it again with
// the same arguments (same ports, same store).
func (f *chaosFleet) kill(name string) func() {
	f.mu.Lock()
	cp := f.procs[name]
	f.retired = append(f.retired, cp.p)
	f.mu.Unlock()
	_ = cp.p.cmd.Process.Kill()
	<-cp.p.exited
	return func() {
		p := startProc(f.t, f.bin, name, cp.args...)
		f.mu.Lock()
		cp.p = p
		f.mu.Unlock()
	}
}

// output returns every line every process ever printed whose name starts with prefix.
func (f *chaosFleet) output(prefix string) string {
	f.mu.Lock()
	defer f.mu.Unlock()
	var b strings.Builder
	all := append([]*proc(nil), f.retired...)
	for _, cp := range f.procs {
		all = append(all, cp.p)
	}
	for _, p := range all {
		if strings.HasPrefix(p.name, prefix) {
			b.WriteString(p.output())
		}
	}
	return b.String()
}

func testPort(t *testing.T) int {
	t.Helper()
	port, err := freePort()
	if err != nil {
		t.Fatal(err)
	}
	return port
}

// hookLog records every webhook delivery.
type hookLog struct {
	mu       sync.Mutex
	ids      map[string]map[string]bool // job → webhook-ids
	count    map[string]int
	final    map[string]string // job → status of its last delivery
	finished chan struct{}
	want     int
}

func (h *hookLog) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	var body api.Webhook
	if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	id := body.Job.ID
	if h.ids[id] == nil {
		h.ids[id] = map[string]bool{}
	}
	h.ids[id][r.Header.Get("webhook-id")] = true
	h.count[id]++
	h.final[id] = body.Job.Status
	done := 0
	for _, st := range h.final {
		if st == "succeeded" {
			done++
		}
	}
	if done == h.want {
		select {
		case <-h.finished:
		default:
			close(h.finished)
		}
	}
}

// TestChaos pushes scenes through a fleet of separate processes — a three-server NATS
// cluster with every stream in three copies, two intakes, two dispatchers, two
// notifiers, two executors driving two simulated nodes each — while SIGKILLing one
// of them at random every second (each comes back after a moment), and checks that
// nothing was lost or reported twice. The long run: see CONTRIBUTING.md.
func TestChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos takes a minute")
	}
	runChaos(t, chaosOptions{scenes: *chaosScenes, every: *chaosEvery,
		kinds: []string{"executor", "simulated node", "dispatcher", "notifier", "intake", "nats"}})
}

// TestNATSClusterLosesNothingWhenItsServersDie SIGKILLs the servers of the NATS
// cluster under load, one at a time, each back before the next goes: the services
// reconnect on their own, nothing is lost, nothing completes twice.
func TestNATSClusterLosesNothingWhenItsServersDie(t *testing.T) {
	if testing.Short() {
		t.Skip("takes half a minute")
	}
	runChaos(t, chaosOptions{scenes: 200, every: 4 * time.Second, kinds: []string{"nats"}, maxKills: 3})
}

// chaosOptions shape a chaos run.
type chaosOptions struct {
	scenes int
	every  time.Duration
	// kinds are the kinds of processes killed, in turn.
	kinds []string
	// maxKills stops the killing after that many; 0 kills until the work is done.
	maxKills int
}

func runChaos(t *testing.T, o chaosOptions) {
	bin := buildBinary(t)
	started := time.Now()
	f := &chaosFleet{t: t, bin: bin, procs: map[string]*chaosProc{}, kinds: map[string][]string{}}
	const servers = 3
	var natsURLs, routes []string
	clientPorts := make([]int, servers)
	for i := range servers {
		clientPorts[i] = testPort(t)
		routes = append(routes, fmt.Sprintf("nats://127.0.0.1:%d", testPort(t)))
		natsURLs = append(natsURLs, fmt.Sprintf("nats://127.0.0.1:%d", clientPorts[i]))
	}
	natsURL := strings.Join(natsURLs, ",")
	common := []string{"--nats", natsURL, "--replicas", strconv.Itoa(servers), "--ack-wait", "2s", "--retry-backoff", "200ms",
		"--max-attempts", "10", "--node-ttl", "3s", "--log-level", "warn"}
	for i := range servers {
		var others []string
		for j, r := range routes {
			if j != i {
				others = append(others, "--routes", r)
			}
		}
		cluster := strings.TrimPrefix(routes[i], "nats://")
		f.start("nats", fmt.Sprintf("nats-%d", i+1), regexp.MustCompile(`(listening)`), append([]string{"nats", "--name", fmt.Sprintf("n%d", i+1),
			"--port", strconv.Itoa(clientPorts[i]), "--cluster", cluster, "--store", t.TempDir(), "--sync", "always"}, others...)...)
	}
	keyRe := regexp.MustCompile(`^\s+(cf_\S+)$`)
	keyProc := startProc(t, bin, "apikey", append([]string{"apikey", "create", "--tenant", "chaos", "--role", "submit"}, common...)...)
	key := keyProc.await(t, keyRe)

	var comfyArgs [2][]string
	for i := range 4 {
		port := testPort(t)
		name := fmt.Sprintf("sim-%d", i)
		f.start("simulated node", name, regexp.MustCompile(`(listening)`), "sim", "--addr", fmt.Sprintf("127.0.0.1:%d", port),
			"--step", "5ms", "--name", name, "--log-renders")
		comfyArgs[i%2] = append(comfyArgs[i%2], "--comfy", fmt.Sprintf("http://127.0.0.1:%d,id=%s,pool=image", port, name))
	}
	hooks := &hookLog{ids: map[string]map[string]bool{}, count: map[string]int{}, final: map[string]string{},
		finished: make(chan struct{}), want: o.scenes / chaosScenesPerJob}
	receiver := httptest.NewServer(hooks)
	defer receiver.Close()

	var apiURLs []string
	for i := range 2 {
		port := testPort(t)
		apiURLs = append(apiURLs, fmt.Sprintf("http://127.0.0.1:%d", port))
		f.start("intake", fmt.Sprintf("intake-%d", i), nil, append([]string{"intake", "--http", fmt.Sprintf("127.0.0.1:%d", port),
			"--allow-callback", "127.0.0.1", "--rate-submit", "0", "--rate-read", "0"}, common...)...)
	}
	for i := range 2 {
		f.start("dispatcher", fmt.Sprintf("dispatcher-%d", i), nil, append([]string{"dispatcher", "--name", fmt.Sprintf("dispatcher-%d", i)}, common...)...)
		f.start("notifier", fmt.Sprintf("notifier-%d", i), nil, append([]string{"notifier", "--public-url", apiURLs[i], "--allow-callback", "127.0.0.1"}, common...)...)
	}
	for i := range 2 {
		f.start("executor", fmt.Sprintf("executor-%d", i), nil, append(append([]string{"executor", "--name", fmt.Sprintf("ex%d", i)}, common...), comfyArgs[i]...)...)
	}

	completions := newCompletionWatch(t, natsURL, servers)
	ctx, cancel := context.WithTimeout(context.Background(), *chaosDeadline)
	defer cancel()
	var jobs []string
	submitted := make(chan struct{})
	go func() { defer close(submitted); jobs = submitAll(ctx, t, apiURLs, key, receiver.URL, hooks.want) }()

	// Kill something every o.every until every job has called back.
	kinds := o.kinds
	kills := map[string]int{}
	var longest time.Duration
	rng := rand.New(rand.NewPCG(1, uint64(time.Now().UnixNano())))
	order := rng.Perm(len(kinds))
	tick := time.NewTicker(o.every)
	defer tick.Stop()
	for n := 0; ; n++ {
		select {
		case <-hooks.finished:
		case <-ctx.Done():
			<-submitted
			for _, id := range jobs {
				if id == "" {
					t.Logf("a job was never accepted")
					continue
				}
				called := hooks.last(id)
				if job := getJobWithKey(t, apiURLs, key, id); job.Status != "succeeded" || called != "succeeded" {
					b, _ := json.MarshalIndent(job, "", " ")
					t.Logf("job %s, its last webhook %q: %s", job.Status, called, b)
				}
			}
			t.Fatalf("after %s: %d of %d jobs called back succeeded; kills %v", *chaosDeadline, hooks.succeeded(), hooks.want, kills)
		case <-tick.C:
			if o.maxKills > 0 && n >= o.maxKills {
				continue
			}
			kind := kinds[order[n%len(kinds)]]
			if n%len(kinds) == len(kinds)-1 {
				order = rng.Perm(len(kinds))
			}
			names := f.kinds[kind]
			victim := names[rng.IntN(len(names))]
			if o.maxKills > 0 {
				// Each in turn, so that every one dies once.
				victim = names[n%len(names)]
			}
			restart := f.kill(victim)
			kills[kind]++
			killedAt := time.Now()
			// Downtime: the victim stays dead for a moment, as a crashed process would.
			time.Sleep(time.Duration(200+rng.IntN(600)) * time.Millisecond)
			restart()
			waitCtx, stopWaiting := context.WithTimeout(ctx, time.Minute)
			d, ok := completions.nextAfter(waitCtx, killedAt, hooks.finished)
			stopWaiting()
			if ok {
				longest = max(longest, d)
			}
			continue
		}
		break
	}
	<-submitted
	totalKills := 0
	for _, k := range kinds {
		totalKills += kills[k]
	}
	if totalKills < len(kinds) {
		t.Logf("only %d kills before the work was done: raise -chaos.scenes for more", totalKills)
	}

	// Everything completed, once.
	hooks.mu.Lock()
	webhookIDs, webhookCount := maps.Clone(hooks.ids), maps.Clone(hooks.count)
	hooks.mu.Unlock()
	// Renders against deliveries: a prompt id names one delivery (attempt) of one
	// scene. A scene's deliveries are at least its recorded attempts and its highest
	// attempt that rendered (an attempt whose events were lost while NATS was down
	// still counts). A NATS crash may lose the record of one delivery, which is then
	// made again under the same number: each such crash explains one more render.
	type attemptOf struct {
		scene   string
		attempt int
	}
	var redeliveries, renders, extraRenders int
	byPrompt := map[string]attemptOf{}
	recorded := map[string]int{}
	for _, id := range jobs {
		job := getJobWithKey(t, apiURLs, key, id)
		if job.Status != "succeeded" {
			t.Errorf("job %s: %s", id, job.Status)
		}
		for _, s := range job.Scenes {
			scene := fmt.Sprintf("%s/%d", id, s.Index)
			recorded[scene] = s.Attempts
			redeliveries += s.Attempts - 1
			for a := 1; a <= 10; a++ {
				byPrompt[comfy.PromptID(id, strconv.Itoa(s.Index), strconv.Itoa(a))] = attemptOf{scene, a}
			}
		}
		if n := len(webhookIDs[id]); n != 1 {
			t.Errorf("job %s: webhooks under %d different ids", id, n)
		}
	}
	rendersOf, deliveries := map[string]int{}, maps.Clone(recorded)
	for _, m := range regexp.MustCompile(`rendered (\S+)`).FindAllStringSubmatch(f.output("sim-"), -1) {
		a, ok := byPrompt[m[1]]
		if !ok {
			t.Errorf("prompt %s was rendered but is no attempt of any scene", m[1])
			continue
		}
		renders++
		rendersOf[a.scene]++
		deliveries[a.scene] = max(deliveries[a.scene], a.attempt)
	}
	for scene, r := range rendersOf {
		extra := r - deliveries[scene]
		if extra > 0 {
			extraRenders += extra
		}
		if extra > kills["nats"] {
			t.Errorf("scene %s rendered %d times in %d deliveries, with %d NATS crashes to explain more", scene, r, deliveries[scene], kills["nats"])
		}
	}
	completions.drain(t)
	stored := completions.stored(t)
	if stored != o.scenes {
		t.Errorf("%d completion events stored, want exactly %d", stored, o.scenes)
	}
	unique, dupes := completions.counts()
	if unique != o.scenes {
		t.Errorf("the subscriber saw %d distinct completions, want %d", unique, o.scenes)
	}
	webhookDupes := 0
	for _, n := range webhookCount {
		webhookDupes += n - 1
	}
	t.Logf("chaos: %d scenes in %d jobs, %s; kills %v (%d); %d redeliveries recorded, %d renders (%d beyond deliveries, after NATS crashes); duplicates suppressed: %d completion redeliveries to the subscriber, %d repeated webhooks; longest recovery %.1fs",
		o.scenes, len(jobs), time.Since(started).Round(time.Second), kills, totalKills, redeliveries, renders, extraRenders, dupes, webhookDupes, longest.Seconds())
}

// last is the status of job's last webhook, "" before any.
func (h *hookLog) last(job string) string {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.final[job]
}

func (h *hookLog) succeeded() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	n := 0
	for _, st := range h.final {
		if st == "succeeded" {
			n++
		}
	}
	return n
}

// submitAll submits n jobs with Idempotency-Keys to the intakes at apiURLs, trying
// the next intake and again until each is accepted, as a careful client does while
// an intake or NATS is down.
func submitAll(ctx context.Context, t *testing.T, apiURLs []string, key, hook string, n int) []string {
	t.Helper()
	ids := make([]string, n)
	var wg sync.WaitGroup
	pace := time.Duration(float64(time.Second) / *chaosRate)
	for j := range n {
		wg.Go(func() {
			select {
			case <-ctx.Done():
				return
			case <-time.After(time.Duration(j) * pace):
			}
			scenes := make([]any, chaosScenesPerJob)
			for i := range scenes {
				scenes[i] = map[string]any{"workflow": "txt2img", "params": map[string]any{"steps": 10, "width": 64, "height": 64, "seed": j*chaosScenesPerJob + i}}
			}
			body := map[string]any{"callback_url": hook, "scenes": scenes}
			for try := j; ctx.Err() == nil; try++ {
				apiURL := apiURLs[try%len(apiURLs)]
				a, err := fleettest.Send(ctx, http.MethodPost, apiURL+"/v1/jobs", body,
					fleettest.Key(key), fleettest.Header("Idempotency-Key", fmt.Sprintf("chaos-job-%d", j)))
				var job struct{ ID string }
				if err == nil && a.Status == http.StatusAccepted && json.Unmarshal(a.Body, &job) == nil {
					ids[j] = job.ID
					return
				}
				select {
				case <-ctx.Done():
				case <-time.After(100 * time.Millisecond):
				}
			}
		})
	}
	return waitIDs(ctx, t, &wg, ids)
}

func waitIDs(ctx context.Context, t *testing.T, wg *sync.WaitGroup, ids []string) []string {
	t.Helper()
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		t.Fatal("could not submit every job before the deadline")
	}
	return ids
}

// getJobWithKey reads a job from whichever of the intakes at apiURLs answers.
func getJobWithKey(t *testing.T, apiURLs []string, key, id string) api.Job {
	t.Helper()
	var job api.Job
	// An intake may be restarting.
	try := 0
	fleettest.Eventually(t, 10*time.Second, func() bool {
		try++
		a, err := fleettest.Send(context.Background(), http.MethodGet, apiURLs[try%len(apiURLs)]+"/v1/jobs/"+id, nil, fleettest.Key(key))
		return err == nil && a.Status == http.StatusOK && json.Unmarshal(a.Body, &job) == nil
	}, "GET job %s kept failing", id)
	return job
}

// completionWatch is a durable subscriber of scene completion events that acks
// each one after recording it, so it drops nothing across NATS restarts.
type completionWatch struct {
	nc   *nats.Conn
	js   jetstream.JetStream
	mu   sync.Mutex
	seen map[string]int
	at   []time.Time
	cc   jetstream.ConsumeContext
}

func newCompletionWatch(t *testing.T, natsURL string, replicas int) *completionWatch {
	t.Helper()
	nc, err := nats.Connect(natsURL, nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, _ := jetstream.New(nc)
	w := &completionWatch{nc: nc, js: js, seen: map[string]int{}}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := fleet.Ensure(ctx, js, fleet.Settings{AckWait: 2 * time.Second, RetryBackoff: 200 * time.Millisecond, MaxAttempts: 10, NodeTTL: 3 * time.Second, Replicas: replicas}); err != nil {
		t.Fatal(err)
	}
	cons, err := js.CreateOrUpdateConsumer(ctx, fleet.StreamEvents, jetstream.ConsumerConfig{
		Durable: "chaos-watch", FilterSubject: "fleet.evt.scene.*.*.completed", AckPolicy: jetstream.AckExplicitPolicy, AckWait: 5 * time.Second,
		Replicas: replicas,
	})
	if err != nil {
		t.Fatal(err)
	}
	w.cc, err = cons.Consume(func(m jetstream.Msg) {
		var ev fleet.Event
		if json.Unmarshal(m.Data(), &ev) == nil {
			w.mu.Lock()
			w.seen[ev.ID]++
			w.mu.Unlock()
		}
		_ = m.Ack()
	}, fleet.PullExpiry, fleet.PullHeartbeat)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.cc.Stop)
	// Recoveries are timed by the completions as they are published, whatever the
	// durable consumer's own pace through a server's death.
	live, err := nc.Subscribe("fleet.evt.scene.*.*.completed", func(*nats.Msg) {
		w.mu.Lock()
		w.at = append(w.at, time.Now())
		w.mu.Unlock()
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = live.Unsubscribe() })
	return w
}

// nextAfter waits for the first completion after t and returns how long after t it
// came; it gives up when ctx ends or all the work is done.
func (w *completionWatch) nextAfter(ctx context.Context, t time.Time, done <-chan struct{}) (time.Duration, bool) {
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		w.mu.Lock()
		i, _ := slices.BinarySearchFunc(w.at, t, func(a, b time.Time) int { return a.Compare(b) })
		var at time.Time
		if i < len(w.at) {
			at = w.at[i]
		}
		w.mu.Unlock()
		if !at.IsZero() {
			return at.Sub(t), true
		}
		select {
		case <-ctx.Done():
			return 0, false
		case <-done:
			return 0, false
		case <-tick.C:
		}
	}
}

// drain reads what the durable consumer still holds: a live consumption stopped by a
// server's death hides nothing from the count.
func (w *completionWatch) drain(t *testing.T) {
	t.Helper()
	w.cc.Stop()
	var cons jetstream.Consumer
	untilAnswered(t, 2*time.Minute, "look up the watch's consumer", func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		var err error
		cons, err = w.js.Consumer(ctx, fleet.StreamEvents, "chaos-watch")
		return err
	})
	for {
		batch, err := cons.Fetch(256, jetstream.FetchMaxWait(time.Second))
		if err != nil {
			t.Fatal(err)
		}
		got := 0
		for m := range batch.Messages() {
			got++
			var ev fleet.Event
			if json.Unmarshal(m.Data(), &ev) == nil {
				w.mu.Lock()
				w.seen[ev.ID]++
				w.mu.Unlock()
			}
			_ = m.Ack()
		}
		if got == 0 {
			return
		}
	}
}

func (w *completionWatch) counts() (unique, duplicates int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, n := range w.seen {
		unique++
		duplicates += n - 1
	}
	return unique, duplicates
}

// stored counts the completion events kept in the stream.
func (w *completionWatch) stored(t *testing.T) int {
	t.Helper()
	var n int
	untilAnswered(t, time.Minute, "count the completion events", func() error {
		var err error
		n, err = fleettest.TryCount(w.js, fleet.StreamEvents, "fleet.evt.scene.*.*.completed")
		return err
	})
	return n
}

// untilAnswered calls try until it succeeds, for up to within: after the last NATS
// crash the cluster may still be electing leaders, slowly on a loaded machine. Each
// new error is logged.
func untilAnswered(t *testing.T, within time.Duration, what string, try func() error) {
	t.Helper()
	var last string
	fleettest.Eventually(t, within, func() bool {
		err := try()
		if err != nil && err.Error() != last {
			t.Logf("%s: %v", what, err)
			last = err.Error()
		}
		return err == nil
	}, "%s: no answer", what)
}
