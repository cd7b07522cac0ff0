package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/inventory"
)

// Headers of the queue stream's tombstones: the node a scene was placed on (empty
// when the scene ended while it waited), the sequence of the ticket the tombstone
// replaced, and the sequence of the work message that placed it.
const (
	headerPlacedOn  = "Comfyfleet-Placed-On"
	headerTicketSeq = "Comfyfleet-Ticket-Seq"
	headerWorkSeq   = "Comfyfleet-Work-Seq"
	// HeaderPlacedBy names, on a work message, the dispatcher that placed it.
	HeaderPlacedBy   = "Comfyfleet-Placed-By"
	traceparentField = "traceparent"
)

// burstWait is the longest the scheduler waits for the rest of a burst of tickets
// (a job's scenes, published together) before it plans what has arrived.
const burstWait = 20 * time.Millisecond

// catchUpBacklog is how far behind the queue stream the scheduler may be and still
// plan: further behind (a dispatcher starting on a deep queue), it reads on first.
const catchUpBacklog = 1000

// scheduler keeps a fleetState current from NATS, in every dispatcher, and while this
// dispatcher leads it places waiting scenes and has the rescuer move the scenes of
// lost nodes. One goroutine (the loop in run) owns the state; everything else posts
// changes to it.
type scheduler struct {
	name     string
	log      *slog.Logger
	nc       *nats.Conn
	js       jetstream.JetStream
	settings fleet.Settings
	planner  planner
	rescuer  *rescuer
	metrics  *metrics
	// onPlaced, if set, is called by the loop after each placement (tests).
	onPlaced func(node string, t fleet.Ticket)

	// leading is set while this dispatcher holds the lease.
	leading atomic.Bool

	mu    sync.Mutex
	inbox []func(*loop)
	wake  chan struct{}
}

// setLeading follows the lease.
func (s *scheduler) setLeading(lead bool) {
	s.leading.Store(lead)
	s.post(func(l *loop) { l.lead(lead, s.log) })
}

func (l *loop) lead(lead bool, log *slog.Logger) {
	if lead != l.leading {
		l.leading, l.dirty, l.scan = lead, true, lead
		log.Info("dispatcher leadership changed", "leading", lead)
	}
}

// loop is what the scheduler's loop owns while it runs.
type loop struct {
	state *fleetState
	// leading is set while this dispatcher holds the lease.
	leading bool
	// dirty is set when something happened that may allow a placement.
	dirty bool
	// removals are queue entries of scenes that ended while they waited; the leader
	// replaces them with tombstones.
	removals []*waiting
	// bursts are the jobs whose tickets are still arriving, with the time the
	// scheduler stops waiting for them.
	bursts map[string]time.Time
	// behind is how many queue messages the server held for the scheduler when it
	// read the last one.
	behind uint64
	// scan asks for a scan of the work stream.
	scan bool
}

func newScheduler(name string, log *slog.Logger, nc *nats.Conn, js jetstream.JetStream, settings fleet.Settings, p planner, m *metrics) *scheduler {
	return &scheduler{
		name: name, log: log, nc: nc, js: js, settings: settings, planner: p, metrics: m,
		rescuer: &rescuer{log: log, js: js, pub: fleet.NewPublisher(js, source)},
		wake:    make(chan struct{}, 1),
	}
}

// post hands f to the loop, which runs it and plans again.
func (s *scheduler) post(f func(*loop)) {
	s.mu.Lock()
	s.inbox = append(s.inbox, f)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// run follows the queue stream, scene events, heartbeats, the registry, the lease
// and the clock until ctx is done, placing scenes while this dispatcher leads.
func (s *scheduler) run(ctx context.Context) error {
	l := &loop{state: newFleetState(s.settings), bursts: map[string]time.Time{}}
	s.mu.Lock()
	s.inbox = nil
	s.mu.Unlock()
	l.lead(s.leading.Load(), s.log)
	queueStream, err := s.js.Stream(ctx, fleet.StreamQueue)
	if err != nil {
		return fmt.Errorf("open queue stream: %w", err)
	}
	// Scene events straight from their subjects: a slot frees the moment its scene
	// ends. One missed is corrected by the next scan. Only the types that change a
	// node's load: the queued and progress events, most of them, never reach us.
	onEvent := func(m *nats.Msg) {
		if ev, err := fleet.DecodeSceneEvent(m.Data); err == nil {
			s.post(func(l *loop) { l.sceneEvent(ev) })
			switch ev.Type {
			case fleet.EventCompleted:
				s.metrics.count(time.Now(), 0, 1, 0)
			case fleet.EventFailed:
				s.metrics.count(time.Now(), 0, 0, 1)
			}
		}
	}
	for _, typ := range loadEvents {
		events, err := s.nc.Subscribe(fleet.SceneEventFilter(typ), onEvent)
		if err != nil {
			return fmt.Errorf("follow scene events: %w", err)
		}
		defer events.Unsubscribe()
	}
	// The ends of runs as stored: only a stored end makes a ticket stale. A run's end
	// seen as published but lost with a stream's leader would otherwise drop the
	// ticket that runs the scene again.
	ends, err := s.js.OrderedConsumer(ctx, fleet.StreamEvents, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{fleet.SceneEventFilter(fleet.EventCompleted), fleet.SceneEventFilter(fleet.EventFailed), fleet.SceneEventFilter(fleet.EventCancelled)},
		DeliverPolicy:  jetstream.DeliverNewPolicy,
	})
	if err != nil {
		return fmt.Errorf("follow the ends of scenes: %w", err)
	}
	endsCC, err := ends.Consume(func(msg jetstream.Msg) {
		if ev, err := fleet.DecodeSceneEvent(msg.Data()); err == nil {
			s.post(func(l *loop) { l.sceneEnded(ev) })
		}
	}, fleet.PullExpiry, fleet.PullHeartbeat)
	if err != nil {
		return fmt.Errorf("follow the ends of scenes: %w", err)
	}
	defer endsCC.Stop()
	// Heartbeats straight from their subject too: they keep coming while a watch of
	// the nodes bucket, which gives the state at start, stalls after a NATS server
	// dies.
	hb, err := s.nc.Subscribe(fleet.HeartbeatFilter, func(m *nats.Msg) {
		var st fleet.NodeStatus
		if err := json.Unmarshal(m.Data, &st); err == nil && fleet.ValidToken(st.ID) {
			s.post(func(l *loop) { l.heartbeat(st) })
		}
	})
	if err != nil {
		return fmt.Errorf("follow heartbeats: %w", err)
	}
	defer hb.Unsubscribe()
	registry, err := s.js.KeyValue(ctx, fleet.BucketRegistry)
	if err != nil {
		return fmt.Errorf("open registry: %w", err)
	}
	nodes, err := s.js.KeyValue(ctx, fleet.BucketNodes)
	if err != nil {
		return fmt.Errorf("open nodes bucket: %w", err)
	}
	beats, err := nodes.WatchAll(ctx)
	if err != nil {
		return fmt.Errorf("follow heartbeats: %w", err)
	}
	defer beats.Stop()
	cons, err := queueStream.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		return fmt.Errorf("follow queue: %w", err)
	}
	cc, err := cons.Consume(func(msg jetstream.Msg) { s.queueMessage(msg) }, fleet.PullExpiry, fleet.PullHeartbeat)
	if err != nil {
		return fmt.Errorf("follow queue: %w", err)
	}
	defer cc.Stop()
	watch, err := registry.WatchAll(ctx)
	if err != nil {
		return fmt.Errorf("watch registry: %w", err)
	}
	defer watch.Stop()
	inventories, err := s.js.KeyValue(ctx, fleet.BucketInventory)
	if err != nil {
		return fmt.Errorf("open inventory bucket: %w", err)
	}
	invs, err := inventories.WatchAll(ctx)
	if err != nil {
		return fmt.Errorf("watch inventories: %w", err)
	}
	defer invs.Stop()
	acks := newPlacer(s, ctx)
	defer acks.stop()
	pings := &pinger{s: s, asking: map[string]bool{}}
	defer pings.wait()

	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	timer := time.NewTimer(time.Hour)
	defer timer.Stop()
	lastScan := time.Time{}
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-watch.Updates():
			if !ok {
				return errors.New("registry watch ended")
			}
			l.registryEntry(e, s.log)
		case e, ok := <-beats.Updates():
			if !ok {
				return errors.New("heartbeat watch ended")
			}
			l.heartbeatEntry(e)
		case e, ok := <-invs.Updates():
			if !ok {
				return errors.New("inventory watch ended")
			}
			l.inventoryEntry(e, s.log)
		case <-s.wake:
		case <-timer.C:
			l.dirty = true
		case <-tick.C:
			now := time.Now()
			l.state.forget(now)
			l.dirty = true
			s.metrics.observe(l.state, l.leading, now)
			if l.leading && now.Sub(lastScan) >= 2*time.Second {
				l.scan = true
			}
			if l.leading {
				pings.ask(ctx, l.state.executors())
				for _, lost := range l.state.lost(now) {
					s.rescuer.rescue(ctx, l.state, lost)
				}
			}
		}
		s.drain(l)
		if !l.leading {
			continue
		}
		if l.scan {
			l.scan = false
			lastScan = time.Now()
			if err := s.scanWork(ctx, l.state); err != nil {
				s.log.Warn("scan placed scenes", "err", err)
			}
		}
		for _, w := range l.removals {
			acks.remove(w)
		}
		l.removals = l.removals[:0]
		now := time.Now()
		next := l.state.queue.due(now)
		if wait := l.waitForBursts(now); wait > 0 {
			timer.Reset(wait)
			continue
		}
		if !next.IsZero() {
			timer.Reset(time.Until(next))
		}
		if !l.dirty || l.behind > catchUpBacklog {
			continue
		}
		l.dirty = false
		s.place(l, acks, now)
	}
}

// drain runs what was posted.
func (s *scheduler) drain(l *loop) {
	s.mu.Lock()
	inbox := s.inbox
	s.inbox = nil
	s.mu.Unlock()
	for _, f := range inbox {
		f(l)
	}
}

// waitForBursts returns how long to wait for bursts still arriving, zero to plan now.
func (l *loop) waitForBursts(now time.Time) time.Duration {
	var wait time.Duration
	for job, until := range l.bursts {
		if !until.After(now) {
			delete(l.bursts, job)
			continue
		}
		wait = max(wait, until.Sub(now))
	}
	return wait
}

// queueMessage takes a message of the queue stream: a ticket, or the tombstone of a
// scene placed or ended.
func (s *scheduler) queueMessage(msg jetstream.Msg) {
	md, err := msg.Metadata()
	if err != nil {
		return
	}
	key, ok := queueKey(msg.Subject())
	if !ok {
		s.log.Warn("ignore a queue message on an unknown subject", "subject", msg.Subject())
		return
	}
	seq, pending := md.Sequence.Stream, md.NumPending
	h := msg.Headers()
	if _, tomb := h[headerTicketSeq]; tomb || len(msg.Data()) == 0 {
		ticketSeq, _ := strconv.ParseUint(h.Get(headerTicketSeq), 10, 64)
		workSeq, _ := strconv.ParseUint(h.Get(headerWorkSeq), 10, 64)
		node := h.Get(headerPlacedOn)
		s.post(func(l *loop) {
			l.behind = pending
			l.state.placedElsewhere(key, ticketSeq, node, workSeq, time.Now())
		})
		return
	}
	var t fleet.Ticket
	if err := json.Unmarshal(msg.Data(), &t); err != nil {
		s.log.Error("drop an undecodable ticket", "subject", msg.Subject(), "err", err)
		w := &waiting{seq: seq, t: fleet.Ticket{JobID: key.job, Index: key.index}}
		s.post(func(l *loop) { l.removals = append(l.removals, w) })
		return
	}
	w := &waiting{t: t, seq: seq, trace: h.Get(traceparentField)}
	left, _ := strconv.Atoi(h.Get(fleet.HeaderBurstLeft))
	s.post(func(l *loop) {
		l.behind = pending
		if !l.state.enqueue(w, time.Now()) {
			l.removals = append(l.removals, w)
			return
		}
		l.dirty = true
		if t.Moves == 0 && t.Retry == 0 {
			s.metrics.count(time.Now(), 1, 0, 0)
		}
		if left > 0 {
			l.bursts[t.JobID] = time.Now().Add(burstWait)
		} else {
			delete(l.bursts, t.JobID)
		}
	})
}

// queueKey reads the scene of a queue subject: fleet.queue.<pool>.<job>.<index>.
func queueKey(subject string) (sceneKey, bool) {
	i := strings.LastIndexByte(subject, '.')
	if i < 0 {
		return sceneKey{}, false
	}
	index, err := strconv.Atoi(subject[i+1:])
	if err != nil {
		return sceneKey{}, false
	}
	rest := subject[:i]
	j := strings.LastIndexByte(rest, '.')
	if j < 0 {
		return sceneKey{}, false
	}
	return sceneKey{job: rest[j+1:], index: index}, true
}

// loadEvents are the scene events that change what a node holds or how fast it is.
var loadEvents = []fleet.EventType{fleet.EventStarted, fleet.EventRetrying, fleet.EventCompleted, fleet.EventFailed, fleet.EventCancelled}

// sceneEvent follows a scene event of loadEvents as published.
func (l *loop) sceneEvent(ev fleet.SceneEvent) {
	l.state.sceneEvent(ev)
	l.dirty = l.dirty || ev.Type != fleet.EventStarted
}

// sceneEnded follows a terminal scene event stored in the events stream.
func (l *loop) sceneEnded(ev fleet.SceneEvent) {
	if w := l.state.ended(ev, time.Now()); w != nil {
		l.removals = append(l.removals, w)
	}
	l.dirty = true
}

func (l *loop) registryEntry(e jetstream.KeyValueEntry, log *slog.Logger) {
	l.dirty = true
	if e == nil {
		l.state.registryReady = true
		return
	}
	if e.Operation() != jetstream.KeyValuePut {
		l.state.registryChanged(e.Key(), nil)
		return
	}
	var cfg fleet.NodeConfig
	if err := json.Unmarshal(e.Value(), &cfg); err != nil {
		log.Warn("undecodable registry entry", "node", e.Key(), "err", err)
		return
	}
	l.state.registryChanged(e.Key(), &cfg)
}

func (l *loop) inventoryEntry(e jetstream.KeyValueEntry, log *slog.Logger) {
	if e == nil {
		return
	}
	l.dirty = true
	if e.Operation() != jetstream.KeyValuePut {
		l.state.inventoryChanged(e.Key(), nil)
		return
	}
	var inv inventory.Inventory
	if err := json.Unmarshal(e.Value(), &inv); err != nil {
		log.Warn("undecodable inventory", "node", e.Key(), "err", err)
		return
	}
	l.state.inventoryChanged(e.Key(), &inv)
}

func (l *loop) heartbeatEntry(e jetstream.KeyValueEntry) {
	if e == nil || e.Operation() != jetstream.KeyValuePut {
		return
	}
	var st fleet.NodeStatus
	if err := json.Unmarshal(e.Value(), &st); err != nil || !fleet.ValidToken(st.ID) {
		return
	}
	l.heartbeat(st)
}

// heartbeat takes a node's reported state, from its subject or the nodes bucket.
func (l *loop) heartbeat(st fleet.NodeStatus) {
	if n := l.state.nodes[st.ID]; n != nil && n.status != nil && !st.Heartbeat.After(n.status.Heartbeat) {
		return // the same report, by the other way
	}
	now := time.Now()
	n := l.state.nodes[st.ID]
	wasUsable := n != nil && l.state.usable(n, now)
	l.state.heartbeat(st, now)
	if !wasUsable || l.state.usable(l.state.nodes[st.ID], now) != wasUsable {
		l.dirty = true
	}
}

// place plans and makes the placements.
func (s *scheduler) place(l *loop, p *placer, now time.Time) {
	if l.state.queue.len() == 0 {
		return
	}
	nodes, tenants := l.state.views(now)
	// The plan stays on one thread, so that the thread's CPU clock is the plan's.
	runtime.LockOSThread()
	began := time.Now()
	cpuBegan, cpuKnown := threadCPU()
	placements := s.planner.plan(now, l.state.queue, nodes, tenants)
	cpuEnded, _ := threadCPU()
	s.metrics.decided(time.Since(began), cpuEnded-cpuBegan, cpuKnown, len(placements))
	runtime.UnlockOSThread()
	for _, pl := range placements {
		p.place(l.state, pl.w, pl.node.id, now)
		if s.onPlaced != nil {
			s.onPlaced(pl.node.id, pl.w.t)
		}
	}
}

// scanWork rebuilds what every node holds from the work stream.
func (s *scheduler) scanWork(ctx context.Context, st *fleetState) error {
	found, err := s.placed(ctx, fleet.WorkFilter, 0)
	if err != nil {
		return err
	}
	st.scanned(found, time.Now())
	return nil
}

// placed reads the scenes in the work stream on subject from sequence after on.
func (s *scheduler) placed(ctx context.Context, subject string, after uint64) ([]placedMsg, error) {
	return readPlaced(ctx, s.js, subject, after)
}

func readPlaced(ctx context.Context, js jetstream.JetStream, subject string, after uint64) ([]placedMsg, error) {
	msgs, err := fleet.ReadStream(ctx, js, fleet.StreamWork, subject, after+1)
	if err != nil {
		return nil, fmt.Errorf("read placed scenes: %w", err)
	}
	out := make([]placedMsg, 0, len(msgs))
	for _, m := range msgs {
		var t fleet.Ticket
		if err := json.Unmarshal(m.Data, &t); err == nil {
			out = append(out, placedMsg{node: fleet.NodeFromWorkSubject(m.Header.Get(jetstream.SubjectHeader)), seq: fleet.MsgSequence(m), t: t})
		}
	}
	return out, nil
}

// pinger asks executors whether they live, a request at a time per executor, and
// posts each outcome to the loop.
type pinger struct {
	s      *scheduler
	mu     sync.Mutex
	asking map[string]bool
	wg     sync.WaitGroup
}

// pingTimeout bounds a liveness request; an executor answering later is slow, not gone.
const pingTimeout = 500 * time.Millisecond

// ask sends a liveness request to each executor not being asked already.
func (p *pinger) ask(ctx context.Context, executors []string) {
	for _, ex := range executors {
		p.mu.Lock()
		busy := p.asking[ex]
		p.asking[ex] = true
		p.mu.Unlock()
		if busy {
			continue
		}
		p.wg.Go(func() {
			rctx, cancel := context.WithTimeout(ctx, pingTimeout)
			_, err := p.s.nc.RequestWithContext(rctx, fleet.ExecutorAliveSubject(ex), nil)
			cancel()
			p.mu.Lock()
			delete(p.asking, ex)
			p.mu.Unlock()
			if ctx.Err() != nil {
				return
			}
			gone := errors.Is(err, nats.ErrNoResponders)
			p.s.post(func(l *loop) {
				l.state.answered(ex, gone, time.Now())
				l.dirty = l.dirty || !gone
			})
		})
	}
}

// wait waits for the requests in flight.
func (p *pinger) wait() { p.wg.Wait() }
