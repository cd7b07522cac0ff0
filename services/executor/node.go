package executor

import (
	"context"
	"encoding/json"
	"errors"
	"maps"
	"sync"
	"syscall"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/comfy"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// node is one ComfyUI server as this executor sees it.
type node struct {
	cfg    fleet.NodeConfig
	client *comfy.Client

	mu       sync.Mutex
	status   fleet.NodeStatus
	healthy  bool
	failures int
	// up is closed while the node is healthy; down while it is not. Each is replaced
	// when the node changes state.
	up, down chan struct{}
	// drained is the registry's word: scenes not started yet go back to the queue.
	drained bool
	// retired is set once the node left the registry: it takes no more scenes.
	retired bool
	// runs are the scenes the node holds, by run name.
	runs map[string]*nodeRun
	// model is the checkpoint of the scene that started last.
	model string
	// setup is the moving average of the node's setup times (see setupTook).
	setup time.Duration
	// inventoryDue is set when the node comes up: its inventory is read again
	// before it is reported online.
	inventoryDue bool
	inv          nodeInventory
}

// nodeRun is a scene a node holds: running, or queued inside ComfyUI behind the
// running one.
type nodeRun struct {
	cancel  context.CancelCauseFunc
	job     string
	prompt  string
	started time.Time
}

// errHandBack ends an attempt whose scene goes back to the queue unstarted: its node
// was drained or removed.
var errHandBack = errors.New("node drained or removed: scene handed back")

// missedProbes is how many probes in a row may time out before a node is taken
// out; a refused connection takes it out at once.
const missedProbes = 3

func newNode(cfg fleet.NodeConfig, client *comfy.Client, executor string) *node {
	return &node{
		cfg:    cfg,
		client: client,
		up:     make(chan struct{}),
		down:   closedChan(),
		runs:   map[string]*nodeRun{},
		inv:    nodeInventory{first: make(chan struct{})},
		status: fleet.NodeStatus{ID: cfg.ID, URL: cfg.URL, Pools: cfg.Pools, Executor: executor, State: fleet.NodeOffline,
			Workflows: map[string]float64{}, Region: cfg.Region},
	}
}

// waitHealthy blocks until the node is healthy; it reports false when ctx ended first.
func (n *node) waitHealthy(ctx context.Context) bool {
	n.mu.Lock()
	up := n.up
	n.mu.Unlock()
	select {
	case <-up:
		return true
	case <-ctx.Done():
		return false
	}
}

// lost returns a channel that is closed when the node goes down.
func (n *node) lost() <-chan struct{} {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.down
}

// setHealth records a probe's outcome.
func (n *node) setHealth(err error, stats *comfy.SystemStats) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if err != nil {
		n.failures++
		n.status.Error = err.Error()
		if n.healthy && (n.failures >= missedProbes || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, errStopped)) {
			n.healthy = false
			n.status.State = fleet.NodeOffline
			n.up = make(chan struct{})
			close(n.down)
		}
		return
	}
	n.failures = 0
	n.status.Error = ""
	if stats != nil && len(stats.Devices) > 0 {
		d := stats.Devices[0]
		n.status.Device, n.status.VRAMTotal, n.status.VRAMFree = d.Name, d.VRAMTotal, d.VRAMFree
	}
	if !n.healthy {
		n.healthy = true
		n.inventoryDue = true
		n.down = make(chan struct{})
		close(n.up)
	}
}

// takeInventoryDue reports whether the node came up since its inventory was last
// read on that account, and clears that.
func (n *node) takeInventoryDue() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	due := n.inventoryDue && n.healthy
	n.inventoryDue = false
	return due
}

func (n *node) isHealthy() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.healthy
}

func closedChan() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}

// errStopped is the health of the nodes of an executor that has stopped.
var errStopped = errors.New("executor stopped")

// hold records that the node holds the scene run key of job, submitted as prompt,
// until the returned function is called; cancel ends its attempt.
func (n *node) hold(key, job, prompt string, cancel context.CancelCauseFunc) (release func()) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.runs[key] = &nodeRun{cancel: cancel, job: job, prompt: prompt}
	if n.drained {
		cancel(errHandBack)
	}
	return func() {
		n.mu.Lock()
		defer n.mu.Unlock()
		delete(n.runs, key)
	}
}

// start records that ComfyUI started the scene run key, needing model, and reports
// whether the node had last run another checkpoint (so loads it now).
func (n *node) start(key, model string) (loaded bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if r := n.runs[key]; r != nil && r.started.IsZero() {
		r.started = time.Now()
	}
	loaded = model != "" && model != n.model
	if model != "" {
		n.model = model
	}
	return loaded
}

// queuedPrompts returns the prompts of job that wait inside ComfyUI, not started.
func (n *node) queuedPrompts(job string) []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	var ids []string
	for _, r := range n.runs {
		if r.job == job && r.started.IsZero() {
			ids = append(ids, r.prompt)
		}
	}
	return ids
}

// setDrained follows the registry: a node drained at `at` hands back the scenes
// ComfyUI had not started by then.
func (n *node) setDrained(drained bool, at time.Time) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.drained = drained
	if drained {
		n.handBackLocked(at)
	}
}

// retire stops the node taking scenes from `at`, when it left the registry, and hands
// back those ComfyUI had not started by then; those running since before finish.
func (n *node) retire(at time.Time) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.retired, n.drained = true, true
	n.handBackLocked(at)
}

func (n *node) isRetired() bool {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.retired
}

// holding reports how many scenes the node holds.
func (n *node) holding() int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return len(n.runs)
}

// cancelJob ends the attempts of the scenes of job the node holds with
// errCancelled and reports how many.
func (n *node) cancelJob(job string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	ended := 0
	for _, r := range n.runs {
		if r.job == job {
			r.cancel(errCancelled)
			ended++
		}
	}
	return ended
}

// handBackLocked ends the attempts of the scenes the node holds that ComfyUI had not
// started by `at` (the moment the registry changed, which the executor learns a
// little later), so that they go back to the queue; one started since is interrupted.
func (n *node) handBackLocked(at time.Time) {
	for _, r := range n.runs {
		if r.started.IsZero() || r.started.After(at) {
			r.cancel(errHandBack)
		}
	}
}

// finished records a successful scene's duration (from its start in ComfyUI) in the
// node's moving averages; loaded tells that it included loading a checkpoint.
func (n *node) finished(workflow string, d time.Duration, steps int, loaded bool) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.status.ScenesDone++
	secs := d.Seconds()
	n.status.SecondsPerScene = average(n.status.SecondsPerScene, secs)
	if loaded {
		return
	}
	if workflow == "" {
		workflow = "graph"
	}
	n.status.Workflows[workflow] = average(n.status.Workflows[workflow], secs)
	if steps > 0 {
		n.status.SecondsPerStep = average(n.status.SecondsPerStep, secs/float64(steps))
	}
}

// average folds v into a moving average.
func average(old, v float64) float64 {
	const weight = 0.3
	if old == 0 {
		return v
	}
	return weight*v + (1-weight)*old
}

func (n *node) snapshot() fleet.NodeStatus {
	n.mu.Lock()
	defer n.mu.Unlock()
	st := n.status
	st.Workflows = maps.Clone(n.status.Workflows)
	st.Holding, st.Model, st.Scene = len(n.runs), n.model, ""
	for key, r := range n.runs {
		if !r.started.IsZero() {
			st.Scene = key
		}
	}
	switch {
	case !n.healthy:
		st.State = fleet.NodeOffline
	case n.drained:
		st.State = fleet.NodeDraining
	case st.Scene != "":
		st.State = fleet.NodeBusy
	default:
		st.State = fleet.NodeOnline
	}
	st.Heartbeat = time.Now().UTC()
	return st
}

// heartbeat probes n and reports its state until ctx is done, then reports it offline.
func (e *executor) heartbeat(ctx context.Context, n *node) {
	t := time.NewTicker(e.cfg.HeartbeatInterval)
	defer t.Stop()
	for {
		e.probe(ctx, n)
		if ctx.Err() != nil {
			n.setHealth(errStopped, nil)
			stopCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
			e.report(stopCtx, n)
			cancel()
			return
		}
		if n.takeInventoryDue() {
			// Before the node is reported online, so that no scene is placed on
			// it by what it had before it went down.
			if _, err := e.readInventory(ctx, n); err != nil && ctx.Err() == nil {
				e.log.Warn("read node inventory; it is read again in "+e.cfg.InventoryInterval.String(), "node", n.cfg.ID, "err", err)
			}
			n.inv.readOnce()
		}
		// Bounded as the probe is: a hung node must not stop its heartbeats.
		qctx, cancel := context.WithTimeout(ctx, e.cfg.HeartbeatInterval)
		if q, err := n.client.QueueRemaining(qctx); err == nil {
			n.mu.Lock()
			n.status.QueueRemaining = q
			n.mu.Unlock()
		}
		cancel()
		e.report(ctx, n)
		select {
		case <-ctx.Done():
		case <-t.C:
		}
	}
}

// report sends n's observed state to the dispatchers as a heartbeat, and records it
// in the nodes bucket, where the API reads it; the entry expires when reports stop.
func (e *executor) report(ctx context.Context, n *node) {
	st := n.snapshot()
	b, err := json.Marshal(st)
	if err != nil {
		e.log.Error("encode heartbeat", "node", n.cfg.ID, "err", err)
		return
	}
	if err := e.nc.Publish(fleet.HeartbeatSubject(n.cfg.ID), b); err != nil && e.nc.IsConnected() {
		e.log.Warn("publish heartbeat", "node", n.cfg.ID, "err", err)
	}
	if _, err := e.nodes.Put(ctx, n.cfg.ID, b); err != nil && ctx.Err() == nil && e.nc.IsConnected() {
		e.log.Warn("report node state", "node", n.cfg.ID, "err", err)
	}
}
