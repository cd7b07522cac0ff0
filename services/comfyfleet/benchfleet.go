package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// benchFleet is a fleet run as it is deployed, for the benchmarks: a NATS server and
// every service in an OS process of its own (this binary), and simulated ComfyUI
// nodes, which stand for the GPUs, in the benchmark's process.
type benchFleet struct {
	bin, dir string
	natsURL  string
	// natsMonitor is the (first) NATS server's monitoring URL (/varz).
	natsMonitor string
	apiURL      string
	key         string
	common      []string
	procs       []*benchProc
	sims        []*comfysim.Server
	nodes       []fleet.NodeConfig
	keep        bool
	// executorOf names the executor process driving each node.
	executorOf map[string]string
	opts       benchFleetOptions
}

// fastSims configures n simulated nodes, gpu-001 on, whose scenes of a few nodes and
// no sampler steps take about sceneTime.
func fastSims(n int, sceneTime time.Duration) []comfysim.Config {
	sims := make([]comfysim.Config, n)
	for i := range sims {
		sims[i] = comfysim.Config{Name: fmt.Sprintf("gpu-%03d", i+1), NodeDuration: sceneTime / 4, StepDuration: -1,
			MaxHistory: fastSimHistory}
	}
	return sims
}

// fastSimHistory is how many finished prompts each fast simulated node keeps in its
// history, for an executor to read one it did not hear end or to recover after a
// restart: ComfyUI's 10,000 on each of 500 nodes, every entry holding its graph, made
// the bench process's live heap grow by about 6 KB a scene, and its garbage
// collections, seconds long by the end of a 50,000-scene backlog, stalled every
// simulated node at once until the executors took them for lost.
const fastSimHistory = 16

// benchFleetOptions shape a benchFleet.
type benchFleetOptions struct {
	// Nodes are the simulated nodes, and Executors how many executor processes
	// drive them (the nodes are shared out in turn).
	Nodes     []comfysim.Config
	Executors int
	// Dispatchers and Notifiers are how many of each run.
	Dispatchers, Notifiers int
	// Settings are passed to every service as flags.
	Settings fleet.Settings
	// Profile serves pprof profiles from every service, on ports it reports.
	Profile bool
	// Metrics serves Prometheus metrics from the dispatchers, executors and
	// notifiers, on ports it reports.
	Metrics bool
	// DispatcherMemoryLimit, if set, is the GOMEMLIMIT of the dispatchers (e.g.
	// "900MiB").
	DispatcherMemoryLimit string
	// NATSServers is how many NATS servers run (0: one), routed into one cluster
	// when more than one, every stream then keeping a copy on each.
	NATSServers int
	// NATSMemoryLimit, if set, is the GOMEMLIMIT of each NATS server (e.g. "3GiB").
	NATSMemoryLimit string
	// Keep leaves the fleet's directory (its NATS store and every process's log)
	// when it stops.
	Keep bool
}

// benchProc is a process of the fleet.
type benchProc struct {
	name  string
	args  []string
	env   []string
	cmd   *exec.Cmd
	pprof string
	// metrics is where the process serves its Prometheus metrics, if it does.
	metrics string
	// exited is closed once the process has exited.
	exited chan struct{}
}

func startBenchFleet(ctx context.Context, o benchFleetOptions) (_ *benchFleet, err error) {
	bin, err := os.Executable()
	if err != nil {
		return nil, fmt.Errorf("bench: find own binary: %w", err)
	}
	dir, err := os.MkdirTemp("", "comfyfleet-bench-")
	if err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	f := &benchFleet{bin: bin, dir: dir, keep: o.Keep, executorOf: map[string]string{}, opts: o}
	defer func() {
		if err != nil {
			f.stop()
		}
	}()
	if err := f.startNATS(max(o.NATSServers, 1)); err != nil {
		return nil, err
	}
	f.common = []string{"--nats", f.natsURL, "--log-format", "json", "--log-level", "warn",
		"--ack-wait", o.Settings.AckWait.String(), "--max-attempts", strconv.Itoa(o.Settings.MaxAttempts),
		"--retry-backoff", o.Settings.RetryBackoff.String(), "--replicas", strconv.Itoa(max(o.NATSServers, 1))}
	if f.key, err = f.apiKey(ctx); err != nil {
		return nil, err
	}
	httpPort, err := freePort()
	if err != nil {
		return nil, err
	}
	f.apiURL = fmt.Sprintf("http://127.0.0.1:%d", httpPort)
	intake := append([]string{"intake", "--http", fmt.Sprintf("127.0.0.1:%d", httpPort), "--rate-submit", "0", "--rate-read", "0", "--allow-callback", "127.0.0.1"}, f.common...)
	if _, err := f.startService("intake", o.Profile, intake...); err != nil {
		return nil, err
	}
	for i := range max(o.Dispatchers, 1) {
		if _, err := f.startService(fmt.Sprintf("dispatcher-%d", i+1), o.Profile, append([]string{"dispatcher", "--name", fmt.Sprintf("dispatcher-%d", i+1)}, f.common...)...); err != nil {
			return nil, err
		}
	}
	for i := range max(o.Notifiers, 1) {
		if _, err := f.startService(fmt.Sprintf("notifier-%d", i+1), o.Profile, append([]string{"notifier", "--public-url", f.apiURL, "--allow-callback", "127.0.0.1"}, f.common...)...); err != nil {
			return nil, err
		}
	}
	if err := f.startNodes(o.Nodes, o.Executors); err != nil {
		return nil, err
	}
	if err := f.awaitReady(ctx); err != nil {
		return nil, err
	}
	return f, nil
}

// startNATS starts the fleet's NATS server, named nats, or a cluster of n routed
// servers, named nats-1 on.
func (f *benchFleet) startNATS(n int) error {
	ports := make([]int, 3*n)
	for i := range ports {
		port, err := freePort()
		if err != nil {
			return err
		}
		ports[i] = port
	}
	var urls, routes []string
	for i := range n {
		urls = append(urls, fmt.Sprintf("nats://127.0.0.1:%d", ports[3*i]))
		routes = append(routes, fmt.Sprintf("nats://127.0.0.1:%d", ports[3*i+2]))
	}
	f.natsURL = strings.Join(urls, ",")
	f.natsMonitor = fmt.Sprintf("http://127.0.0.1:%d", ports[1])
	for i := range n {
		name := "nats"
		if n > 1 {
			name = fmt.Sprintf("nats-%d", i+1)
		}
		args := []string{"nats", "--port", strconv.Itoa(ports[3*i]), "--http-port", strconv.Itoa(ports[3*i+1]),
			"--store", filepath.Join(f.dir, name)}
		if n > 1 {
			args = append(args, "--name", name, "--cluster", fmt.Sprintf("127.0.0.1:%d", ports[3*i+2]),
				"--routes", strings.Join(slices.Delete(slices.Clone(routes), i, i+1), ","))
		}
		if _, err := f.startService(name, f.opts.Profile, args...); err != nil {
			return err
		}
	}
	return nil
}

// startNodes starts simulated nodes in this process and executor processes to drive
// them, the nodes shared out among them in turn.
func (f *benchFleet) startNodes(nodes []comfysim.Config, executors int) error {
	if len(nodes) == 0 {
		return nil
	}
	quiet := slog.New(slog.DiscardHandler)
	args := make([][]string, max(executors, 1))
	first := len(f.procNames("executor"))
	for i, sc := range nodes {
		sc.Logger = quiet
		sim, err := comfysim.Start(sc)
		if err != nil {
			return fmt.Errorf("bench: simulated node %s: %w", sc.Name, err)
		}
		f.sims = append(f.sims, sim)
		n := fleet.NodeConfig{ID: sc.Name, URL: sim.URL(), Pools: []string{"image", "video"}, Weight: max(sc.Speed, 1)}
		f.nodes = append(f.nodes, n)
		e := i % len(args)
		args[e] = append(args[e], "--comfy", fmt.Sprintf("%s,id=%s,pool=image+video,weight=%g", n.URL, n.ID, n.Weight))
		f.executorOf[n.ID] = fmt.Sprintf("executor-%d", first+e+1)
	}
	for i, nodeArgs := range args {
		name := fmt.Sprintf("executor-%d", first+i+1)
		a := append(append([]string{"executor", "--name", name}, f.common...), nodeArgs...)
		if _, err := f.startService(name, f.opts.Profile, a...); err != nil {
			return err
		}
	}
	return nil
}

// procNames are the names of the processes of kind ("nats", "executor") started so
// far: the kind alone, or followed by "-" and a number.
func (f *benchFleet) procNames(kind string) []string {
	var out []string
	for _, p := range f.procs {
		if p.name == kind || strings.HasPrefix(p.name, kind+"-") {
			out = append(out, p.name)
		}
	}
	return out
}

// start starts a process of this binary with args, its output in a file of the
// fleet's directory.
func (f *benchFleet) start(name string, args ...string) (*benchProc, error) {
	return f.startWith(name, nil, args...)
}

// startWith is start with env added to the process's environment.
func (f *benchFleet) startWith(name string, env []string, args ...string) (*benchProc, error) {
	out, err := os.OpenFile(filepath.Join(f.dir, name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, fmt.Errorf("bench: %w", err)
	}
	cmd := exec.Command(f.bin, args...)
	cmd.Stdout, cmd.Stderr = out, out
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	if err := cmd.Start(); err != nil {
		out.Close()
		return nil, fmt.Errorf("bench: start %s: %w", name, err)
	}
	p := &benchProc{name: name, args: args, env: env, cmd: cmd, exited: make(chan struct{})}
	f.procs = append(f.procs, p)
	go func() {
		defer close(p.exited)
		_ = cmd.Wait()
		out.Close()
	}()
	return p, nil
}

func (f *benchFleet) startService(name string, profile bool, args ...string) (*benchProc, error) {
	var pprofAddr, metricsAddr string
	if profile {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		pprofAddr = fmt.Sprintf("127.0.0.1:%d", port)
		args = append(args, "--pprof", pprofAddr)
	}
	if f.opts.Metrics && args[0] != "intake" && args[0] != "nats" {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		metricsAddr = fmt.Sprintf("127.0.0.1:%d", port)
		args = append(args, "--metrics", metricsAddr)
	}
	var env []string
	if limit := map[string]string{"dispatcher": f.opts.DispatcherMemoryLimit, "nats": f.opts.NATSMemoryLimit}[args[0]]; limit != "" {
		env = []string{"GOMEMLIMIT=" + limit}
	}
	p, err := f.startWith(name, env, args...)
	if p != nil {
		p.pprof, p.metrics = pprofAddr, metricsAddr
	}
	return p, err
}

// apiKey creates an admin key of the default tenant.
func (f *benchFleet) apiKey(ctx context.Context) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, f.bin, "apikey", "create", "--nats", f.natsURL, "--tenant", "default", "--role", "admin").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("bench: create an API key: %v: %s", err, out)
	}
	m := regexp.MustCompile(`(?m)^\s+(cf_\S+)$`).FindSubmatch(out)
	if m == nil {
		return "", fmt.Errorf("bench: no API key in %q", out)
	}
	return string(m[1]), nil
}

// awaitReady waits until the API answers and every node is online.
func (f *benchFleet) awaitReady(ctx context.Context) error {
	deadline := time.Now().Add(time.Minute)
	for time.Now().Before(deadline) {
		var nodes struct {
			Nodes []struct {
				Health struct {
					Status string `json:"status"`
				} `json:"health"`
			} `json:"nodes"`
		}
		if err := f.get(ctx, "/v1/nodes", &nodes); err == nil {
			online := 0
			for _, n := range nodes.Nodes {
				if n.Health.Status == "online" {
					online++
				}
			}
			if online == len(f.nodes) {
				return nil
			}
		}
		fleet.Pause(ctx, 100*time.Millisecond)
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	return fmt.Errorf("bench: the fleet was not ready within a minute; logs in %s", f.dir)
}

func (f *benchFleet) get(ctx context.Context, path string, v any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, f.apiURL+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+f.key)
	resp, err := benchClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", path, resp.Status)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// post submits a job and returns its id.
func (f *benchFleet) post(ctx context.Context, body []byte) (string, error) {
	req, err := newJSONRequest(ctx, f.apiURL+"/v1/jobs", string(body))
	if err != nil {
		return "", err
	}
	req.Header.Set("Authorization", "Bearer "+f.key)
	resp, err := benchClient.Do(req)
	if err != nil {
		return "", fmt.Errorf("submit: %w", err)
	}
	defer resp.Body.Close()
	var job struct {
		ID string `json:"id"`
	}
	if resp.StatusCode != http.StatusAccepted {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 1024))
		return "", fmt.Errorf("submit: %s: %s", resp.Status, b)
	}
	if err := json.NewDecoder(resp.Body).Decode(&job); err != nil {
		return "", fmt.Errorf("submit: %w", err)
	}
	return job.ID, nil
}

// procUsage is what a process used: CPU time and peak resident memory.
type procUsage struct {
	cpu    time.Duration
	rssMax int64
}

// benchSelf names this process in usage: the simulated nodes, the clients and
// the event recorder.
const benchSelf = "bench (simulated nodes, clients)"

// usage reads each running process's CPU time and peak RSS from /proc, this one's
// included.
func (f *benchFleet) usage() map[string]procUsage {
	out := map[string]procUsage{}
	if u, err := readUsage(os.Getpid()); err == nil {
		out[benchSelf] = u
	}
	for _, p := range f.procs {
		if p.cmd.Process == nil {
			continue
		}
		u, err := readUsage(p.cmd.Process.Pid)
		if err == nil {
			out[p.name] = u
		}
	}
	return out
}

func readUsage(pid int) (procUsage, error) {
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return procUsage{}, err
	}
	// Fields after the command name, which is in parentheses and may hold spaces.
	fields := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+2:]))
	if len(fields) < 13 {
		return procUsage{}, errors.New("short /proc stat")
	}
	utime, _ := strconv.ParseInt(fields[11], 10, 64)
	stime, _ := strconv.ParseInt(fields[12], 10, 64)
	const ticks = 100 // USER_HZ on Linux
	u := procUsage{cpu: time.Duration(utime+stime) * time.Second / ticks}
	status, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return u, err
	}
	defer status.Close()
	sc := bufio.NewScanner(status)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			u.rssMax = kb << 10
		}
	}
	return u, nil
}

// natsTraffic is how many messages the NATS server took in and sent out.
type natsTraffic struct {
	In  int64 `json:"in_msgs"`
	Out int64 `json:"out_msgs"`
}

// traffic reads the NATS server's message counts from its /varz; they are zero if
// the server does not answer, and then left out of the results.
func (f *benchFleet) traffic(ctx context.Context) natsTraffic {
	var t natsTraffic
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, f.natsMonitor+"/varz", nil)
	if err != nil {
		return t
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return t
	}
	defer resp.Body.Close()
	if json.NewDecoder(resp.Body).Decode(&t) != nil {
		return natsTraffic{}
	}
	return t
}

// proc returns the first process whose name starts with prefix.
func (f *benchFleet) proc(prefix string) *benchProc {
	for _, p := range f.procs {
		if strings.HasPrefix(p.name, prefix) {
			return p
		}
	}
	return nil
}

// stop stops the services with SIGTERM, NATS last, then the simulated nodes, and
// removes the fleet's directory unless it is kept.
func (f *benchFleet) stop() {
	for i := len(f.procs) - 1; i >= 0; i-- {
		f.procs[i].terminate(15 * time.Second)
	}
	for _, s := range f.sims {
		_ = s.Close()
	}
	if f.keep {
		fmt.Fprintf(os.Stderr, "the fleet's store and logs are in %s\n", f.dir)
		return
	}
	_ = os.RemoveAll(f.dir)
}

// terminate stops p with SIGTERM and waits until it exits, killing it after d.
func (p *benchProc) terminate(d time.Duration) {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(d):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// kill stops p with SIGKILL and waits until it exits.
func (p *benchProc) kill() {
	_ = p.cmd.Process.Kill()
	<-p.exited
}

// restart starts p again with the same arguments, in its place in the fleet.
func (f *benchFleet) restart(p *benchProc) (*benchProc, error) {
	next, err := f.startWith(p.name, p.env, p.args...)
	if err != nil {
		return nil, err
	}
	next.pprof = p.pprof
	for i, q := range f.procs {
		if q == p {
			f.procs[i] = next
		}
	}
	f.procs = f.procs[:len(f.procs)-1]
	return next, nil
}

// freePort returns a loopback TCP port that is free and that the system does not
// hand out to outgoing connections: below its ephemeral range (Linux's
// ip_local_port_range), so that a server of the fleet, restarted on its port as a
// deployment's would be, finds it free, and that the port given to a server whose
// start waits for others' (a cluster's routes) is not taken meanwhile by a
// connection. No port is given twice by one process.
func freePort() (int, error) {
	givenPorts.mu.Lock()
	defer givenPorts.mu.Unlock()
	if low := ephemeralLow(); low > lowestFreePort+1000 {
		for range 1000 {
			port := lowestFreePort + rand.IntN(low-lowestFreePort)
			if givenPorts.set[port] {
				continue
			}
			ln, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
			if err != nil {
				continue
			}
			ln.Close()
			givenPorts.set[port] = true
			return port, nil
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("bench: find a free port: %w", err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// lowestFreePort is the lowest port freePort gives: above the well-known services'.
const lowestFreePort = 10000

// givenPorts are the ports freePort gave.
var givenPorts = struct {
	mu  sync.Mutex
	set map[int]bool
}{set: map[int]bool{}}

// ephemeralLow is the first port of the system's range for outgoing connections, 0
// where it cannot be read.
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 0
	}
	fields := strings.Fields(string(b))
	if len(fields) == 0 {
		return 0
	}
	low, _ := strconv.Atoi(fields[0])
	return low
}
