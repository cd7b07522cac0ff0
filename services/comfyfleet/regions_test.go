package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

// The regions of the multi-region test, as in the story of issue 11: the hub and two
// GPUs in Shanghai, a region of GPUs in Shenzhen and one in Beijing, each joined to
// the hub by its leaf node over a link with latency.
const hubRegion = "shanghai"

// regionLinks are the regions joined by a leaf node and the latency the test adds on
// each one's link to the hub, each way.
var regionLinks = map[string]time.Duration{"shenzhen": 50 * time.Millisecond, "beijing": 100 * time.Millisecond}

// regionNodes are the simulated nodes of each region, all of one speed.
var regionNodes = map[string][]string{hubRegion: {"sh-1", "sh-2"}, "shenzhen": {"sz-1", "sz-2"}, "beijing": {"bj-1"}}

// regionStep is a simulated sampler step: a scene of n steps takes n×regionStep.
const regionStep = 25 * time.Millisecond

// regionFleet is a fleet across regions: a three-server hub and a leaf node per
// region, each a `comfyfleet nats --config deploy/nats/…` process, the regions'
// links to the hub through toxiproxy, the intake, dispatcher and notifier on the hub,
// and an executor per region with its simulated nodes, connected to its region's
// NATS server only.
type regionFleet struct {
	api, key string
	js       jetstream.JetStream
	links    map[string]*toxiproxy.Proxy
	// leafURLs are the client URLs of the regions' leaf nodes, hubURL the hub's.
	leafURLs  map[string]string
	hubURL    string
	passwords map[string]string
	sims      map[string]*comfysim.Server
	regionOf  map[string]string
	events    sceneEventLog
	hooks     *fleettest.Webhooks
}

// TestRegionsJoinedByLeafNodes runs a fleet across three regions joined as
// deploy/nats configures them, with latency on the inter-region links, then cuts
// one region's link in the middle of its scenes and restores it. It shows that
// scenes requiring a region run only there; that with equal speeds a scene goes to
// the hub's region (no link latency in the nodes' setup time) unless it prefers
// another; that a cut region's running scenes finish elsewhere while one that
// requires the region waits for it; and that nothing is lost or completed twice once
// the link returns. It logs the latency added and measured, and how long the cut
// region's scenes took to move (BENCHMARKS.md).
func TestRegionsJoinedByLeafNodes(t *testing.T) {
	t.Parallel()
	f := startRegionFleet(t, buildBinary(t))
	for _, region := range slices.Sorted(maps.Keys(regionLinks)) {
		leaf, hub := f.roundTrip(t, f.leafURLs[region]), f.roundTrip(t, f.hubURL)
		t.Logf("link %s–%s: %v added each way; a JetStream request from %s takes %v, from %s %v",
			region, hubRegion, regionLinks[region], region, leaf.Round(time.Millisecond), hubRegion, hub.Round(time.Millisecond))
	}

	// Scenes that require a region run there, and nowhere else.
	job := f.submit(t, map[string]any{"scenes": []any{
		regionScene(0, 4, "region", hubRegion), regionScene(1, 4, "region", hubRegion), regionScene(2, 4, "region", "shenzhen"),
		regionScene(3, 4, "region", "shenzhen"), regionScene(4, 4, "region", "beijing"),
	}})
	for _, s := range f.awaitJob(t, job, 60*time.Second).Scenes {
		if f.regionOf[s.Node] != s.Region {
			t.Errorf("scene %d requires %s and ran on %s, in %q", s.Index, s.Region, s.Node, f.regionOf[s.Node])
		}
	}
	var setup, took map[string]float64
	fleettest.Eventually(t, 10*time.Second, func() bool {
		setup, took = f.nodeFigures(t)
		for _, s := range took {
			if s == 0 {
				return false
			}
		}
		return len(took) == len(f.regionOf)
	}, "not every node reported the duration of its scene: %v", took)
	t.Logf("setup time measured per node (s): %v; duration of a scene of 0.1 s of sampling (s): %v", setup, took)
	for _, id := range append(regionNodes["shenzhen"], regionNodes["beijing"]...) {
		for _, near := range regionNodes[hubRegion] {
			if setup[id] <= setup[near] {
				t.Errorf("node %s across a link has a setup time of %gs, no more than %s's %gs in the hub's region", id, setup[id], near, setup[near])
			}
		}
	}

	// Equal speeds: the hub's region wins, as its nodes pay no link latency; a
	// preferred region wins over it.
	for _, tc := range []struct {
		prefer, want string
	}{{"", hubRegion}, {"shenzhen", "shenzhen"}, {"beijing", "beijing"}} {
		body := map[string]any{"scenes": []any{regionScene(10, 4), regionScene(11, 4)}}
		if tc.prefer != "" {
			body["prefer_region"] = tc.prefer
		}
		for _, s := range f.awaitJob(t, f.submit(t, body), 60*time.Second).Scenes {
			if f.regionOf[s.Node] != tc.want {
				t.Errorf("a scene preferring %q ran on %s in %s, want a node in %s", tc.prefer, s.Node, f.regionOf[s.Node], tc.want)
			}
		}
	}

	// The link of shenzhen is cut while its nodes run scenes that prefer it, and one
	// that requires it.
	const steps = 60 // 1.5 s a scene
	body := map[string]any{"prefer_region": "shenzhen", "scenes": []any{
		regionScene(20, steps, "region", "shenzhen"), regionScene(21, steps), regionScene(22, steps), regionScene(23, steps), regionScene(24, steps),
	}}
	job = f.submit(t, body)
	fleettest.Eventually(t, 30*time.Second, func() bool { return len(f.events.runningIn(job, regionNodes["shenzhen"])) == 2 },
		"the scenes did not start on both nodes of shenzhen")
	running := f.events.runningIn(job, regionNodes["shenzhen"])
	f.links["shenzhen"].Stop()
	cut := time.Now()
	t.Logf("link of shenzhen cut with scenes %v running there", running)

	fleettest.Eventually(t, 60*time.Second, func() bool {
		j := f.job(t, job)
		for i := 1; i < len(j.Scenes); i++ {
			if j.Scenes[i].Status != string(fleet.StatusSucceeded) {
				return false
			}
		}
		return len(j.Scenes) > 0
	}, "the scenes that only prefer shenzhen did not finish elsewhere while its link was cut")
	var requeued, restarted, finished time.Duration
	for i := 1; i < 5; i++ {
		requeued = max(requeued, f.events.after(job, i, fleet.EventRetrying, cut).Sub(cut))
		restarted = max(restarted, f.events.after(job, i, fleet.EventStarted, cut).Sub(cut))
		finished = max(finished, f.events.after(job, i, fleet.EventCompleted, cut).Sub(cut))
	}
	t.Logf("after the cut, the scenes that only prefer shenzhen (1 to 4) were all back in the queue within %v, "+
		"all running elsewhere within %v, all done within %v", requeued.Round(10*time.Millisecond),
		restarted.Round(10*time.Millisecond), finished.Round(10*time.Millisecond))
	j := f.job(t, job)
	for i, s := range j.Scenes[1:] {
		if f.regionOf[s.Node] == "shenzhen" {
			t.Errorf("scene %d finished on %s, behind the cut link", i+1, s.Node)
		}
	}
	if s := j.Scenes[0]; s.Status == string(fleet.StatusSucceeded) || f.events.startedOutside(job, 0, regionNodes["shenzhen"]) {
		t.Fatalf("the scene that requires shenzhen ran elsewhere or finished while its link was cut: %+v", s)
	}

	// The link returns once the region's nodes are done with what they held: the
	// scene that requires shenzhen runs there, and nothing ran twice to completion.
	fleettest.Eventually(t, 30*time.Second, func() bool {
		for _, id := range regionNodes["shenzhen"] {
			st := f.sims[id].Stats()
			if st.Prompts != st.Completed+st.Failed+st.Interrupted {
				return false
			}
		}
		return true
	}, "the nodes of shenzhen still run prompts")
	if err := f.links["shenzhen"].Start(); err != nil {
		t.Fatalf("restore the link of shenzhen: %v", err)
	}
	restored := time.Now()
	j = f.awaitJob(t, job, 60*time.Second)
	t.Logf("link of shenzhen restored after %v; the scene that requires shenzhen finished there %v later",
		restored.Sub(cut).Round(10*time.Millisecond), f.events.after(job, 0, fleet.EventCompleted, restored).Sub(restored).Round(10*time.Millisecond))
	if s := j.Scenes[0]; f.regionOf[s.Node] != "shenzhen" {
		t.Errorf("the scene that requires shenzhen finished on %s", s.Node)
	}
	f.checkOnce(t)
}

// regionScene is a txt2img scene of steps sampler steps with its own seed, and the fields
// given as key, value pairs.
func regionScene(seed, steps int, kv ...string) map[string]any {
	s := map[string]any{"workflow": "txt2img", "params": map[string]any{"seed": seed, "steps": steps, "width": 64, "height": 64}}
	for i := 0; i+1 < len(kv); i += 2 {
		s[kv[i]] = kv[i+1]
	}
	return s
}

func startRegionFleet(t *testing.T, bin string) *regionFleet {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	f := &regionFleet{links: map[string]*toxiproxy.Proxy{}, leafURLs: map[string]string{}, passwords: map[string]string{},
		sims: map[string]*comfysim.Server{}, regionOf: map[string]string{}, hooks: fleettest.StartWebhooks(t)}
	env := os.Environ()
	for _, user := range natsUsers {
		f.passwords[user] = "pw-" + user
		env = append(env, "COMFYFLEET_"+strings.ToUpper(user)+"_PASSWORD="+f.passwords[user])
	}
	conf := func(name string) string {
		p, err := filepath.Abs(filepath.Join(natsDeployDir, name))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	listening := regexp.MustCompile(`listening on (nats://\S+)`)

	// The hub: three servers of hub.conf. Their routes name their cluster ports, so
	// those are chosen first.
	ports := freePorts(t, 6)
	var routes []string
	for _, port := range ports[:3] {
		routes = append(routes, fmt.Sprintf("nats-route://route:%s@127.0.0.1:%d", f.passwords["route"], port))
	}
	var hubURLs []string
	for i := range 3 {
		p := startProcEnv(t, bin, fmt.Sprintf("nats-%d", i),
			append(slices.Clip(env), fmt.Sprintf("COMFYFLEET_NATS_SERVER_NAME=nats-%d", i), "COMFYFLEET_NATS_ROUTES=["+strings.Join(routes, ", ")+"]"),
			"nats", "--config", conf("hub.conf"), "--host", "127.0.0.1", "--port", "-1", "--http-port", "-1", "--store", t.TempDir(),
			"--cluster", fmt.Sprintf("127.0.0.1:%d", ports[i]), "--leaf-port", fmt.Sprint(ports[3+i]))
		hubURLs = append(hubURLs, p.await(t, listening))
	}
	f.hubURL = hubURLs[0]
	admin := f.connect(t, hubURLs[0], "admin")
	var err error
	if f.js, err = jetstream.New(admin); err != nil {
		t.Fatal(err)
	}
	fleettest.Eventually(t, 30*time.Second, func() bool {
		callCtx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		_, err := f.js.AccountInfo(callCtx)
		return err == nil
	}, "the hub formed no JetStream cluster")

	// A leaf node per region, whose link to the hub runs through toxiproxy.
	tox := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	for _, region := range slices.Sorted(maps.Keys(regionLinks)) {
		link := toxiproxy.NewProxy(tox, region, "127.0.0.1:0", fmt.Sprintf("127.0.0.1:%d", ports[3]))
		if err := link.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(link.Stop)
		for _, stream := range []string{"upstream", "downstream"} {
			toxic := fmt.Sprintf(`{"name": "latency_%s", "type": "latency", "stream": %q, "attributes": {"latency": %d}}`,
				stream, stream, regionLinks[region].Milliseconds())
			if _, err := link.Toxics.AddToxicJson(strings.NewReader(toxic)); err != nil {
				t.Fatal(err)
			}
		}
		f.links[region] = link
		p := startProcEnv(t, bin, "leaf-"+region,
			append(slices.Clip(env), fmt.Sprintf("COMFYFLEET_HUB_URL=nats-leaf://leaf:%s@%s", f.passwords["leaf"], link.Listen)),
			"nats", "--config", conf("leaf-"+region+".conf"), "--host", "127.0.0.1", "--port", "-1", "--http-port", "-1")
		f.leafURLs[region] = p.await(t, listening)
		probe, err := jetstream.New(f.connect(t, f.leafURLs[region], "executor"))
		if err != nil {
			t.Fatal(err)
		}
		fleettest.Eventually(t, 30*time.Second, func() bool {
			callCtx, cancel := context.WithTimeout(ctx, time.Second)
			defer cancel()
			_, err := probe.AccountInfo(callCtx)
			return err == nil
		}, "the leaf node of %s reaches no JetStream in the hub", region)
	}

	// Every scene event, as the hub sees it, with the time it arrived.
	f.events = sceneEventLog{fleettest.Follow(t, admin, fleet.SceneEventsFilter, func(b []byte) (loggedEvent, error) {
		ev, err := fleet.DecodeSceneEvent(b)
		return loggedEvent{time.Now(), ev}, err
	})}

	// The services: intake, dispatcher and notifier on the hub's servers, an executor
	// in each region on its own NATS server.
	var out bytes.Buffer
	if err := run(ctx, []string{"apikey", "create", "--nats", f.userURL(hubURLs[0], "admin"), "--replicas", "3", "--tenant", "studio", "--role", "submit"},
		&out, io.Discard); err != nil {
		t.Fatalf("apikey create: %v", err)
	}
	m := regexp.MustCompile(`(?m)^\s+(cf_\S+)$`).FindStringSubmatch(out.String())
	if m == nil {
		t.Fatalf("apikey create printed no key: %s", out.String())
	}
	f.key = m[1]
	apiAddr := fmt.Sprintf("127.0.0.1:%d", freePorts(t, 1)[0])
	f.api = "http://" + apiAddr
	common := []string{"--replicas", "3", "--ack-wait", "2s", "--retry-backoff", "100ms", "--node-ttl", "3s", "--log-level", "warn"}
	services := map[string][]string{
		"intake": {"intake", "--nats", f.userURL(hubURLs[0], "intake"), "--http", apiAddr, "--allow-callback", "127.0.0.1",
			"--rate-submit", "0", "--rate-read", "0"},
		"dispatcher": {"dispatcher", "--nats", f.userURL(hubURLs[1], "dispatcher"), "--name", "dispatcher-" + hubRegion},
		"notifier":   {"notifier", "--nats", f.userURL(hubURLs[2], "notifier"), "--public-url", f.api, "--allow-callback", "127.0.0.1"},
	}
	for region, nodes := range regionNodes {
		natsURL := f.userURL(hubURLs[0], "executor")
		if region != hubRegion {
			natsURL = f.userURL(f.leafURLs[region], "executor")
		}
		args := []string{"executor", "--nats", natsURL, "--name", "executor-" + region, "--region", region}
		for _, id := range nodes {
			sim := fleettest.Sim(t, comfysim.Config{Name: id, StepDuration: regionStep})
			f.sims[id], f.regionOf[id] = sim, region
			args = append(args, "--comfy", sim.URL()+",id="+id+",pool=image")
		}
		services["executor-"+region] = args
	}
	svcCtx, stop := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	for name, args := range services {
		logs := &fleettest.Buffer{}
		wg.Go(func() {
			if err := run(svcCtx, append(args, common...), io.Discard, logs); err != nil && !errors.Is(err, context.Canceled) {
				t.Errorf("%s: %v", name, err)
			}
		})
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("--- log of %s:\n%s", name, logs.String())
			}
		})
	}
	t.Cleanup(func() { stop(); wg.Wait() })

	fleettest.Eventually(t, 60*time.Second, func() bool {
		var list struct {
			Nodes []struct {
				ID     string `json:"id"`
				Region string `json:"region"`
				Health struct {
					Status string `json:"status"`
				} `json:"health"`
			} `json:"nodes"`
		}
		if f.call(t, http.MethodGet, "/v1/nodes", nil, &list) != http.StatusOK || len(list.Nodes) != len(f.regionOf) {
			return false
		}
		for _, n := range list.Nodes {
			if n.Health.Status != "online" || n.Region != f.regionOf[n.ID] {
				return false
			}
		}
		return true
	}, "the nodes of every region are not online in their regions")
	return f
}

// connect opens a connection to url as user, with the user's inbox prefix.
func (f *regionFleet) connect(t *testing.T, natsURL, user string) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(natsURL, nats.UserInfo(user, f.passwords[user]), nats.CustomInboxPrefix("_INBOX_"+user))
	if err != nil {
		t.Fatalf("connect to %s as %s: %v", natsURL, user, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// userURL is natsURL with user's credentials.
func (f *regionFleet) userURL(natsURL, user string) string {
	u, err := url.Parse(natsURL)
	if err != nil {
		panic(err)
	}
	u.User = url.UserPassword(user, f.passwords[user])
	return u.String()
}

// roundTrip is the median time of a JetStream request (a direct get of a scene
// payload, as an executor makes for each scene) from an executor connected to
// natsURL.
func (f *regionFleet) roundTrip(t *testing.T, natsURL string) time.Duration {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	js, err := jetstream.New(f.connect(t, natsURL, "executor"))
	if err != nil {
		t.Fatal(err)
	}
	payloads, err := js.Stream(ctx, fleet.StreamScenes)
	if err != nil {
		t.Fatal(err)
	}
	var took []time.Duration
	for range 7 {
		start := time.Now()
		if _, err := payloads.GetLastMsgForSubject(ctx, fleet.ScenePayloadSubject("probe", 0)); err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
			t.Fatalf("a direct get through %s: %v", natsURL, err)
		}
		took = append(took, time.Since(start))
	}
	slices.Sort(took)
	return took[len(took)/2]
}

// call sends body to the API with the fleet's key and decodes a successful answer
// into out (see fleettest.Call); it returns the status, 0 if the call failed (the
// intake not listening yet).
func (f *regionFleet) call(t *testing.T, method, path string, body, out any) int {
	t.Helper()
	a, err := fleettest.Send(context.Background(), method, f.api+path, body, fleettest.Key(f.key))
	if err != nil {
		return 0
	}
	if out != nil && a.Status < 300 {
		_ = json.Unmarshal(a.Body, out)
	}
	return a.Status
}

// submit posts a job with a callback to the fleet's hook counter and returns its id.
func (f *regionFleet) submit(t *testing.T, body map[string]any) string {
	t.Helper()
	body["callback_url"] = f.hooks.URL
	return fleettest.SubmitJob(t, f.api, body, fleettest.Key(f.key)).ID
}

// job reads job id; a job that its intake has not recorded yet (404 for a moment
// after its submission) has no scenes.
func (f *regionFleet) job(t *testing.T, id string) api.Job {
	t.Helper()
	var job api.Job
	if status := f.call(t, http.MethodGet, "/v1/jobs/"+id, nil, &job); status != http.StatusOK && status != http.StatusNotFound {
		t.Fatalf("GET /v1/jobs/%s: %d", id, status)
	}
	return job
}

// awaitJob waits until job has succeeded and returns it.
func (f *regionFleet) awaitJob(t *testing.T, id string, within time.Duration) api.Job {
	t.Helper()
	var job api.Job
	fleettest.Eventually(t, within, func() bool {
		job = f.job(t, id)
		return job.Status == string(fleet.StatusSucceeded) || job.Status == string(fleet.StatusFailed)
	}, "job %s did not end", id)
	if job.Status != string(fleet.StatusSucceeded) {
		t.Fatalf("job %s %s: %+v", id, job.Status, job.Scenes)
	}
	return job
}

// nodeFigures returns every node's setup time and its measured scene duration, in
// seconds to the millisecond, as GET /v1/nodes shows them.
func (f *regionFleet) nodeFigures(t *testing.T) (setup, took map[string]float64) {
	t.Helper()
	var list struct {
		Nodes []struct {
			ID     string `json:"id"`
			Health struct {
				SetupSeconds    float64 `json:"setup_seconds"`
				SecondsPerScene float64 `json:"seconds_per_scene"`
			} `json:"health"`
		} `json:"nodes"`
	}
	if status := f.call(t, http.MethodGet, "/v1/nodes", nil, &list); status != http.StatusOK {
		t.Fatalf("GET /v1/nodes: %d", status)
	}
	ms := func(s float64) float64 { return math.Round(s*1000) / 1000 }
	setup, took = map[string]float64{}, map[string]float64{}
	for _, n := range list.Nodes {
		setup[n.ID], took[n.ID] = ms(n.Health.SetupSeconds), ms(n.Health.SecondsPerScene)
	}
	return setup, took
}

// checkOnce checks that every job's scenes completed once each and that every job
// ended, and was called back, once.
func (f *regionFleet) checkOnce(t *testing.T) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	events, err := f.js.Stream(ctx, fleet.StreamEvents)
	if err != nil {
		t.Fatal(err)
	}
	jobs := f.events.jobs()
	fleettest.Eventually(t, 20*time.Second, func() bool { return len(f.hooks.All()) >= len(jobs) }, "not every job was called back")
	info, err := events.Info(ctx, jetstream.WithSubjectFilter("fleet.evt.>"))
	if err != nil {
		t.Fatal(err)
	}
	for _, job := range jobs {
		j := f.job(t, job)
		for _, s := range j.Scenes {
			if n := info.State.Subjects[fmt.Sprintf("fleet.evt.scene.%s.%d.%s", job, s.Index, fleet.EventCompleted)]; n != 1 || s.Status != string(fleet.StatusSucceeded) {
				t.Errorf("scene %d of job %s: %s, %d completed events", s.Index, job, s.Status, n)
			}
		}
		if n := info.State.Subjects[fmt.Sprintf("fleet.evt.job.%s.completed", job)]; n != 1 {
			t.Errorf("job %s: %d completed events", job, n)
		}
	}
	for _, job := range jobs {
		if n := f.hooks.Count(job); n != 1 {
			t.Errorf("job %s was called back %d times", job, n)
		}
	}
}

// sceneEventLog keeps every scene event with the time it arrived.
type sceneEventLog struct {
	*fleettest.Events[loggedEvent]
}

type loggedEvent struct {
	at time.Time
	ev fleet.SceneEvent
}

// runningIn returns the scenes of job whose last start or end was a start on one of
// nodes.
func (l *sceneEventLog) runningIn(job string, nodes []string) []int {
	last := map[int]fleet.SceneEvent{}
	for _, e := range l.All(nil) {
		if e.ev.JobID == job && (e.ev.Type == fleet.EventStarted || e.ev.Type.Terminal() || e.ev.Type == fleet.EventRetrying) {
			last[e.ev.Index] = e.ev
		}
	}
	var out []int
	for i, ev := range last {
		if ev.Type == fleet.EventStarted && slices.Contains(nodes, ev.Node) {
			out = append(out, i)
		}
	}
	slices.Sort(out)
	return out
}

// after is when the first event of type typ of scene index of job arrived after
// since; since itself if none did.
func (l *sceneEventLog) after(job string, index int, typ fleet.EventType, since time.Time) time.Time {
	for _, e := range l.All(nil) {
		if e.ev.JobID == job && e.ev.Index == index && e.ev.Type == typ && e.at.After(since) {
			return e.at
		}
	}
	return since
}

// startedOutside reports whether scene index of job started on a node not in nodes.
func (l *sceneEventLog) startedOutside(job string, index int, nodes []string) bool {
	for _, e := range l.All(nil) {
		if e.ev.JobID == job && e.ev.Index == index && e.ev.Type == fleet.EventStarted && !slices.Contains(nodes, e.ev.Node) {
			return true
		}
	}
	return false
}

// jobs are the jobs seen in events.
func (l *sceneEventLog) jobs() []string {
	var out []string
	for _, e := range l.All(nil) {
		if !slices.Contains(out, e.ev.JobID) {
			out = append(out, e.ev.JobID)
		}
	}
	return out
}
