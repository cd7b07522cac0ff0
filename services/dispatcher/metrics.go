package dispatcher

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"strconv"
	"sync"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/telemetry"
)

// metrics are the dispatcher's instruments, and the queue summary it answers with.
// The scheduler's loop updates them; the exporters and summary requests read them.
type metrics struct {
	wait     metric.Float64Histogram
	decision metric.Float64Histogram
	// decisionCPU is the CPU time of the same plans: where decision is far above
	// it, the plan waited for a core.
	decisionCPU metric.Float64Histogram
	dead        metric.Int64Counter

	mu      sync.Mutex
	summary fleet.QueueSummary
	// depths are the queue depths reported, by pool and priority; one seen once is
	// reported at 0 when empty, so that an emptied queue reads 0 rather than nothing.
	depths map[[2]string]int
	// seconds counts, per second of the last minute, the scenes accepted,
	// completed and failed.
	seconds [60]rateSecond
}

type rateSecond struct {
	at                          int64
	accepted, completed, failed int
}

func newMetrics(name string) (*metrics, error) {
	meter := otel.Meter("comfyfleet/dispatcher")
	m := &metrics{summary: fleet.QueueSummary{Dispatcher: name, Nodes: map[string]int{}}}
	var err error
	if m.wait, err = meter.Float64Histogram("comfyfleet.queue.wait", metric.WithUnit("s"),
		metric.WithDescription("Time from a scene's submission to its placement on a node, first placements only."),
		metric.WithExplicitBucketBoundaries(telemetry.SecondsBuckets...)); err != nil {
		return nil, fmt.Errorf("dispatcher metrics: %w", err)
	}
	if m.decision, err = meter.Float64Histogram("comfyfleet.placement.decision", metric.WithUnit("s"),
		metric.WithDescription("Time one plan took that placed at least one scene."),
		metric.WithExplicitBucketBoundaries(decisionBuckets...)); err != nil {
		return nil, fmt.Errorf("dispatcher metrics: %w", err)
	}
	if m.decisionCPU, err = meter.Float64Histogram("comfyfleet.placement.decision.cpu", metric.WithUnit("s"),
		metric.WithDescription("CPU time of the thread running one plan that placed at least one scene; far below comfyfleet.placement.decision when the dispatcher waits for a core."),
		metric.WithExplicitBucketBoundaries(decisionBuckets...)); err != nil {
		return nil, fmt.Errorf("dispatcher metrics: %w", err)
	}
	if m.dead, err = meter.Int64Counter("comfyfleet.scene.dead_letters",
		metric.WithDescription("Scenes failed because every delivery went unacknowledged.")); err != nil {
		return nil, fmt.Errorf("dispatcher metrics: %w", err)
	}
	depth, err := meter.Int64ObservableGauge("comfyfleet.queue.depth",
		metric.WithDescription("Scenes waiting to be placed, by pool and priority."))
	if err != nil {
		return nil, fmt.Errorf("dispatcher metrics: %w", err)
	}
	nodes, err := meter.Int64ObservableGauge("comfyfleet.nodes",
		metric.WithDescription("Known ComfyUI nodes by status: online, busy, draining, offline."))
	if err != nil {
		return nil, fmt.Errorf("dispatcher metrics: %w", err)
	}
	if _, err := meter.RegisterCallback(func(_ context.Context, o metric.Observer) error {
		m.mu.Lock()
		defer m.mu.Unlock()
		if !m.summary.Leading {
			// Only the leader reports the fleet's figures, so that they are not
			// counted once per dispatcher.
			return nil
		}
		for k, n := range m.depths {
			o.ObserveInt64(depth, int64(n), metric.WithAttributes(attribute.String("pool", k[0]), attribute.String("priority", k[1])))
		}
		for status, n := range m.summary.Nodes {
			o.ObserveInt64(nodes, int64(n), metric.WithAttributes(attribute.String("status", status)))
		}
		return nil
	}, depth, nodes); err != nil {
		return nil, fmt.Errorf("dispatcher metrics: %w", err)
	}
	return m, nil
}

// decisionBuckets bound the decision histograms, in seconds: 5 µs to 50 ms.
var decisionBuckets = []float64{0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05}

// decided records a plan's duration and, if known, its CPU time, if it placed
// anything.
func (m *metrics) decided(d, cpu time.Duration, cpuKnown bool, placed int) {
	if placed == 0 {
		return
	}
	m.decision.Record(context.Background(), d.Seconds())
	if cpuKnown {
		m.decisionCPU.Record(context.Background(), cpu.Seconds())
	}
}

// placed records the placement of w.
func (m *metrics) placed(w *waiting, now time.Time) {
	if w.t.Moves == 0 && w.t.Retry == 0 {
		m.wait.Record(context.Background(), now.Sub(w.t.SubmittedAt).Seconds(), metric.WithAttributes(attribute.String("pool", w.t.Pool)))
	}
}

// count adds to this second's rates.
func (m *metrics) count(now time.Time, accepted, completed, failed int) {
	m.mu.Lock()
	defer m.mu.Unlock()
	sec := now.Unix()
	r := &m.seconds[sec%int64(len(m.seconds))]
	if r.at != sec {
		*r = rateSecond{at: sec}
	}
	r.accepted += accepted
	r.completed += completed
	r.failed += failed
}

// observe takes a new summary of the state.
func (m *metrics) observe(st *fleetState, leading bool, now time.Time) {
	pools := map[string]*fleet.PoolQueue{}
	pool := func(name string) *fleet.PoolQueue {
		p := pools[name]
		if p == nil {
			p = &fleet.PoolQueue{Pool: name, ByPriority: map[string]int{}, ByTenant: map[string]int{}}
			pools[name] = p
		}
		return p
	}
	oldest := map[string]time.Time{}
	count := func(w *waiting, n int) {
		p := pool(w.t.Pool)
		p.Depth += n
		p.ByPriority[strconv.Itoa(w.t.Priority)] += n
		p.ByTenant[w.t.Tenant] += n
		if o, ok := oldest[w.t.Pool]; !ok || w.t.SubmittedAt.Before(o) {
			oldest[w.t.Pool] = w.t.SubmittedAt
		}
	}
	for _, pq := range st.queue.pools {
		for _, level := range pq.levels {
			for _, b := range level {
				if first, ok := b.items.Min(); ok {
					count(first, b.items.Len())
				}
			}
		}
	}
	for _, w := range st.queue.delayed {
		count(w, 1)
		pool(w.t.Pool).Delayed++
	}
	// The pools of the known nodes show too, empty, so that a reader (KEDA) finds a
	// depth of 0 for them rather than nothing.
	for _, n := range st.nodes {
		if n.cfg != nil {
			for _, name := range n.cfg.Pools {
				pool(name)
			}
		}
	}
	summary := fleet.QueueSummary{Nodes: map[string]int{}, Leading: leading, At: now.UTC(), Pools: []fleet.PoolQueue{}}
	for _, name := range slices.Sorted(maps.Keys(pools)) {
		p := pools[name]
		if o, ok := oldest[name]; ok {
			p.OldestAgeS = now.Sub(o).Seconds()
		}
		summary.Pools = append(summary.Pools, *p)
	}
	for _, n := range st.nodes {
		if n.cfg == nil {
			continue
		}
		status := fleet.NodeOffline
		if n.status != nil && !st.silent(n, now) {
			status = n.status.State
		}
		summary.Nodes[string(status)]++
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	var rates [3]int
	for _, r := range m.seconds {
		if now.Unix()-r.at < int64(len(m.seconds)) {
			rates[0] += r.accepted
			rates[1] += r.completed
			rates[2] += r.failed
		}
	}
	window := float64(len(m.seconds))
	summary.Rates = fleet.QueueRates{AcceptedPerS: float64(rates[0]) / window, CompletedPerS: float64(rates[1]) / window, FailedPerS: float64(rates[2]) / window}
	summary.Dispatcher = m.summary.Dispatcher
	m.summary = summary
	if m.depths == nil {
		m.depths = map[[2]string]int{}
	}
	for k := range m.depths {
		m.depths[k] = 0
	}
	for _, p := range summary.Pools {
		for prio, n := range p.ByPriority {
			m.depths[[2]string{p.Pool, prio}] = n
		}
	}
}

// snapshot returns the last summary.
func (m *metrics) snapshot() fleet.QueueSummary {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.summary
}
