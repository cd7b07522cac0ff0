package executor

import (
	"context"
	"encoding/json"
	"errors"
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
	// heldUntil is when the node may take work again after a failed attempt.
	heldUntil time.Time
}

// missedProbes is how many probes in a row may time out before a node is taken
// out; a refused connection takes it out at once.
const missedProbes = 3

func newNode(cfg fleet.NodeConfig, client *comfy.Client, executor string) *node {
	return &node{
		cfg:    cfg,
		client: client,
		up:     make(chan struct{}),
		down:   closedChan(),
		status: fleet.NodeStatus{ID: cfg.ID, URL: cfg.URL, Pools: cfg.Pools, Executor: executor, State: fleet.NodeOffline},
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
	if n.status.Scene == "" {
		n.status.State = fleet.NodeOnline
	}
	if stats != nil && len(stats.Devices) > 0 {
		d := stats.Devices[0]
		n.status.Device, n.status.VRAMTotal, n.status.VRAMFree = d.Name, d.VRAMTotal, d.VRAMFree
	}
	if !n.healthy {
		n.healthy = true
		n.down = make(chan struct{})
		close(n.up)
	}
}

func closedChan() chan struct{} {
	c := make(chan struct{})
	close(c)
	return c
}

// errStopped is the health of the nodes of an executor that has stopped.
var errStopped = errors.New("executor stopped")

func (n *node) setScene(scene string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.status.Scene = scene
	switch {
	case scene != "":
		n.status.State = fleet.NodeBusy
	case n.healthy:
		n.status.State = fleet.NodeOnline
	}
}

// finished records a successful scene's duration in the node's moving average.
func (n *node) finished(d time.Duration) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.status.ScenesDone++
	const weight = 0.3
	if n.status.SecondsPerScene == 0 {
		n.status.SecondsPerScene = d.Seconds()
	} else {
		n.status.SecondsPerScene = weight*d.Seconds() + (1-weight)*n.status.SecondsPerScene
	}
}

func (n *node) snapshot() fleet.NodeStatus {
	n.mu.Lock()
	defer n.mu.Unlock()
	st := n.status
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
			e.report(n)
			return
		}
		if q, err := n.client.QueueRemaining(ctx); err == nil {
			n.mu.Lock()
			n.status.QueueRemaining = q
			n.mu.Unlock()
		}
		e.report(n)
		select {
		case <-ctx.Done():
		case <-t.C:
		}
	}
}

func (e *executor) report(n *node) {
	st := n.snapshot()
	b, err := json.Marshal(st)
	if err != nil {
		e.log.Error("encode heartbeat", "node", n.cfg.ID, "err", err)
		return
	}
	if err := e.nc.Publish(fleet.HeartbeatSubject(n.cfg.ID), b); err != nil && e.nc.IsConnected() {
		e.log.Warn("publish heartbeat", "node", n.cfg.ID, "err", err)
	}
}
