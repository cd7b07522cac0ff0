package main

import (
	"bytes"
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
			p.mu.Lock()
			b.WriteString(p.out.String())
			p.mu.Unlock()
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

// TestChaos pushes scenes through a fleet of separate processes while SIGKILLing
// executors, simulated nodes, the dispatcher, the notifier, the intake and NATS
// itself at random, and checks that nothing was lost or reported twice. The long
// run: go test ./services/comfyfleet -run Chaos -v -chaos.scenes 3000 -chaos.deadline 20m
func TestChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos takes a minute")
	}
	bin := buildBinary(t)
	started := time.Now()
	f := &chaosFleet{t: t, bin: bin, procs: map[string]*chaosProc{}, kinds: map[string][]string{}}
	natsPort, httpPort := testPort(t), testPort(t)
	natsURL := fmt.Sprintf("nats://127.0.0.1:%d", natsPort)
	apiURL := fmt.Sprintf("http://127.0.0.1:%d", httpPort)
	common := []string{"--nats", natsURL, "--ack-wait", "2s", "--retry-backoff", "200ms", "--max-attempts", "10", "--node-ttl", "3s", "--log-level", "warn"}

	f.start("nats", "nats", regexp.MustCompile(`(listening)`), "nats", "--port", strconv.Itoa(natsPort), "--store", t.TempDir(), "--sync", "always")
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
		finished: make(chan struct{}), want: *chaosScenes / chaosScenesPerJob}
	receiver := httptest.NewServer(hooks)
	defer receiver.Close()

	f.start("intake", "intake", nil, append([]string{"intake", "--http", fmt.Sprintf("127.0.0.1:%d", httpPort), "--allow-callback", "127.0.0.1", "--rate-submit", "0", "--rate-read", "0"}, common...)...)
	f.start("dispatcher", "dispatcher", nil, append([]string{"dispatcher"}, common...)...)
	f.start("notifier", "notifier", nil, append([]string{"notifier", "--public-url", apiURL, "--allow-callback", "127.0.0.1"}, common...)...)
	for i := range 2 {
		f.start("executor", fmt.Sprintf("executor-%d", i), nil, append(append([]string{"executor", "--name", fmt.Sprintf("ex%d", i)}, common...), comfyArgs[i]...)...)
	}

	completions := newCompletionWatch(t, natsURL)
	ctx, cancel := context.WithTimeout(context.Background(), *chaosDeadline)
	defer cancel()
	var jobs []string
	submitted := make(chan struct{})
	go func() { defer close(submitted); jobs = submitAll(ctx, t, apiURL, key, receiver.URL, hooks.want) }()

	// Kill something every chaos.every until every job has called back.
	kinds := []string{"executor", "simulated node", "dispatcher", "notifier", "intake", "nats"}
	kills := map[string]int{}
	var longest time.Duration
	rng := rand.New(rand.NewPCG(1, uint64(time.Now().UnixNano())))
	order := rng.Perm(len(kinds))
	tick := time.NewTicker(*chaosEvery)
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
				if job := getJobWithKey(t, apiURL, key, id); job.Status != "succeeded" {
					b, _ := json.MarshalIndent(job, "", " ")
					t.Logf("unfinished job: %s", b)
				}
			}
			t.Fatalf("after %s: %d of %d jobs called back succeeded; kills %v", *chaosDeadline, hooks.succeeded(), hooks.want, kills)
		case <-tick.C:
			kind := kinds[order[n%len(kinds)]]
			if n%len(kinds) == len(kinds)-1 {
				order = rng.Perm(len(kinds))
			}
			names := f.kinds[kind]
			victim := names[rng.IntN(len(names))]
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
		job := getJobWithKey(t, apiURL, key, id)
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
	stored := completions.stored(t)
	if stored != *chaosScenes {
		t.Errorf("%d completion events stored, want exactly %d", stored, *chaosScenes)
	}
	unique, dupes := completions.counts()
	if unique != *chaosScenes {
		t.Errorf("the subscriber saw %d distinct completions, want %d", unique, *chaosScenes)
	}
	webhookDupes := 0
	for _, n := range webhookCount {
		webhookDupes += n - 1
	}
	t.Logf("chaos: %d scenes in %d jobs, %s; kills %v (%d); %d redeliveries recorded, %d renders (%d beyond deliveries, after NATS crashes); duplicates suppressed: %d completion redeliveries to the subscriber, %d repeated webhooks; longest recovery %.1fs",
		*chaosScenes, len(jobs), time.Since(started).Round(time.Second), kills, totalKills, redeliveries, renders, extraRenders, dupes, webhookDupes, longest.Seconds())
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

// submitAll submits n jobs with Idempotency-Keys, retrying each until it is
// accepted, as a careful client does while the intake or NATS are down.
func submitAll(ctx context.Context, t *testing.T, apiURL, key, hook string, n int) []string {
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
			body, _ := json.Marshal(map[string]any{"callback_url": hook, "scenes": scenes})
			for ctx.Err() == nil {
				req, _ := http.NewRequestWithContext(ctx, http.MethodPost, apiURL+"/v1/jobs", bytes.NewReader(body))
				req.Header.Set("Content-Type", "application/json")
				req.Header.Set("Authorization", "Bearer "+key)
				req.Header.Set("Idempotency-Key", fmt.Sprintf("chaos-job-%d", j))
				resp, err := testClient.Do(req)
				if err == nil {
					var job struct{ ID string }
					_ = json.NewDecoder(resp.Body).Decode(&job)
					resp.Body.Close()
					if resp.StatusCode == http.StatusAccepted {
						ids[j] = job.ID
						return
					}
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

func getJobWithKey(t *testing.T, apiURL, key, id string) api.Job {
	t.Helper()
	var job api.Job
	// The intake may be restarting.
	fleettest.Eventually(t, 10*time.Second, func() bool {
		req, _ := http.NewRequest(http.MethodGet, apiURL+"/v1/jobs/"+id, nil)
		req.Header.Set("Authorization", "Bearer "+key)
		resp, err := testClient.Do(req)
		if err != nil {
			return false
		}
		defer resp.Body.Close()
		return resp.StatusCode == http.StatusOK && json.NewDecoder(resp.Body).Decode(&job) == nil
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

func newCompletionWatch(t *testing.T, natsURL string) *completionWatch {
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
	if err := fleet.Ensure(ctx, js, fleet.Settings{AckWait: 2 * time.Second, RetryBackoff: 200 * time.Millisecond, MaxAttempts: 10, NodeTTL: 3 * time.Second}); err != nil {
		t.Fatal(err)
	}
	cons, err := js.CreateOrUpdateConsumer(ctx, fleet.StreamEvents, jetstream.ConsumerConfig{
		Durable: "chaos-watch", FilterSubject: "fleet.evt.scene.*.*.completed", AckPolicy: jetstream.AckExplicitPolicy, AckWait: 5 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	w.cc, err = cons.Consume(func(m jetstream.Msg) {
		var ev fleet.Event
		if json.Unmarshal(m.Data(), &ev) == nil {
			w.mu.Lock()
			w.seen[ev.ID]++
			w.at = append(w.at, time.Now())
			w.mu.Unlock()
		}
		_ = m.Ack()
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.cc.Stop)
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
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := w.js.Stream(ctx, fleet.StreamEvents)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(ctx, jetstream.WithSubjectFilter("fleet.evt.scene.*.*.completed"))
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, c := range info.State.Subjects {
		n += int(c)
	}
	return n
}
