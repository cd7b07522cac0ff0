package dispatcher

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// scheduler places the scenes waiting in the queue stream on nodes, as capacity
// frees. It keeps its state in memory, rebuilt at start from the queue and work
// streams; one goroutine (loop) owns it, and everything else posts changes to it.
type scheduler struct {
	log      *slog.Logger
	nc       *nats.Conn
	js       jetstream.JetStream
	pub      *fleet.Publisher
	queue    jetstream.Stream
	work     jetstream.Stream
	settings fleet.Settings
	planner  planner
	// onPlaced, if set, is called by the loop after each placement (tests).
	onPlaced func(node string, item fleet.WorkItem)

	mu      sync.Mutex
	inbox   []func()
	wake    chan struct{}
	waiting map[uint64]*waiting // by queue sequence
	nodes   map[string]*nodeState
	speeds  fleetSpeeds
	// ctx is run's context, for the loop's calls.
	ctx context.Context
	// registryReady is set once the registry's entries have all been read: until
	// then a node missing from it may only not be read yet.
	registryReady bool
	// arrived is set when scenes came into the queue since the last plan.
	arrived bool
	// finished remembers scene runs that ended recently, so that a scan of the work
	// stream racing their acknowledgement does not count them as held again.
	finished map[string]time.Time
}

// nodeState is what the scheduler knows of a node.
type nodeState struct {
	cfg        *fleet.NodeConfig // nil: not registered
	status     *fleet.NodeStatus // nil: no heartbeat yet
	heartbeat  time.Time
	offlineFor int // heartbeats in a row reporting the node offline
	// model is the checkpoint the node ran last, from its heartbeats and completions.
	model string
	held  map[string]*held
	speed *speedModel
}

func newScheduler(log *slog.Logger, nc *nats.Conn, js jetstream.JetStream, pub *fleet.Publisher, settings fleet.Settings, policy Policy, loadPenalty time.Duration) *scheduler {
	return &scheduler{
		log:      log,
		nc:       nc,
		js:       js,
		pub:      pub,
		settings: settings,
		planner:  planner{policy: policy, loadPenalty: loadPenalty},
		wake:     make(chan struct{}, 1),
		waiting:  map[uint64]*waiting{},
		nodes:    map[string]*nodeState{},
		speeds:   fleetSpeeds{reference: map[string]float64{}},
		finished: map[string]time.Time{},
	}
}

// burstQuiet is how long the queue must stay quiet before the scheduler plans
// scenes that just arrived, and burstWait the longest it waits for that.
const (
	burstQuiet = 10 * time.Millisecond
	burstWait  = 100 * time.Millisecond
)

// post hands f to the loop, which runs it and plans again.
func (s *scheduler) post(f func()) {
	s.mu.Lock()
	s.inbox = append(s.inbox, f)
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// run follows the queue stream, the registry and the clock, and places scenes
// until ctx is done.
func (s *scheduler) run(ctx context.Context) error {
	s.ctx = ctx
	// The queue consumer delivers every entry again; what nodes hold is scanned.
	s.waiting, s.registryReady = map[uint64]*waiting{}, false
	var err error
	if s.queue, err = s.js.Stream(ctx, fleet.StreamQueue); err != nil {
		return fmt.Errorf("open queue stream: %w", err)
	}
	if s.work, err = s.js.Stream(ctx, fleet.StreamWork); err != nil {
		return fmt.Errorf("open work stream: %w", err)
	}
	// Scene events straight from the subject, not through the state consumer that
	// folds them into jobs: a slot frees the moment its scene ends. One missed is
	// corrected by the next scan.
	events, err := s.nc.Subscribe(fleet.SceneEventsFilter, func(m *nats.Msg) {
		if ev, err := fleet.DecodeSceneEvent(m.Data); err == nil {
			s.sceneEvent(ev)
		}
	})
	if err != nil {
		return fmt.Errorf("follow scene events: %w", err)
	}
	defer events.Unsubscribe()
	registry, err := s.js.KeyValue(ctx, fleet.BucketRegistry)
	if err != nil {
		return fmt.Errorf("open registry: %w", err)
	}
	if err := s.scanWork(ctx); err != nil {
		return err
	}
	cons, err := s.queue.OrderedConsumer(ctx, jetstream.OrderedConsumerConfig{})
	if err != nil {
		return fmt.Errorf("follow queue: %w", err)
	}
	cc, err := cons.Consume(s.enqueue)
	if err != nil {
		return fmt.Errorf("follow queue: %w", err)
	}
	defer cc.Stop()
	watch, err := registry.WatchAll(ctx)
	if err != nil {
		return fmt.Errorf("watch registry: %w", err)
	}
	defer watch.Stop()

	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	backoff := time.NewTimer(time.Hour)
	defer backoff.Stop()
	// The scenes of a job arrive one by one, a few milliseconds apart; planning
	// waits until they stop arriving (at most burstWait), so that it sees the
	// whole batch.
	burst := time.NewTimer(time.Hour)
	defer burst.Stop()
	var burstStart time.Time
	lastScan := time.Now()
	for {
		select {
		case <-ctx.Done():
			return nil
		case e, ok := <-watch.Updates():
			if !ok {
				return errors.New("registry watch ended")
			}
			if e == nil {
				s.registryReady = true
			} else {
				s.registryChanged(e)
			}
		case <-s.wake:
		case <-burst.C:
			burstStart = time.Time{}
		case <-backoff.C:
		case <-tick.C:
			if time.Since(lastScan) >= 2*time.Second {
				if err := s.scanWork(ctx); err != nil {
					s.log.Warn("scan placed scenes", "err", err)
				}
				lastScan = time.Now()
			}
			s.rescueLost(ctx)
		}
		s.drain()
		if s.arrived {
			s.arrived = false
			if burstStart.IsZero() {
				burstStart = time.Now()
			}
			if wait := min(burstQuiet, time.Until(burstStart.Add(burstWait))); wait > 0 {
				burst.Reset(wait)
				continue
			}
		}
		if !burstStart.IsZero() && time.Since(burstStart) < burstWait {
			continue
		}
		burstStart = time.Time{}
		s.place(ctx)
		if next := s.nextNotBefore(); !next.IsZero() {
			backoff.Reset(time.Until(next))
		}
	}
}

// drain runs what was posted.
func (s *scheduler) drain() {
	s.mu.Lock()
	inbox := s.inbox
	s.inbox = nil
	s.mu.Unlock()
	for _, f := range inbox {
		f()
	}
}

func (s *scheduler) node(id string) *nodeState {
	n := s.nodes[id]
	if n == nil {
		n = &nodeState{held: map[string]*held{}, speed: newSpeedModel(&s.speeds, 1)}
		s.nodes[id] = n
	}
	return n
}

// enqueue takes a new queue entry (called by the queue consumer).
func (s *scheduler) enqueue(msg jetstream.Msg) {
	md, err := msg.Metadata()
	if err != nil {
		return
	}
	var item fleet.WorkItem
	if err := json.Unmarshal(msg.Data(), &item); err != nil {
		s.log.Error("drop undecodable queue entry", "subject", msg.Subject(), "err", err)
		s.post(func() { _ = s.queue.DeleteMsg(s.ctx, md.Sequence.Stream) })
		return
	}
	w := &waiting{item: item, seq: md.Sequence.Stream, model: fleet.Checkpoint(item.Graph), header: nats.Header{}}
	for k, v := range msg.Headers() {
		if k != jetstream.MsgIDHeader {
			w.header[k] = v
		}
	}
	s.post(func() {
		// A scene back in the queue is no longer held anywhere.
		for _, n := range s.nodes {
			delete(n.held, item.MsgID())
		}
		s.waiting[w.seq] = w
		s.arrived = true
	})
}

// registryChanged follows a node's desired configuration.
func (s *scheduler) registryChanged(e jetstream.KeyValueEntry) {
	n := s.node(e.Key())
	if e.Operation() != jetstream.KeyValuePut {
		n.cfg = nil
		return
	}
	var cfg fleet.NodeConfig
	if err := json.Unmarshal(e.Value(), &cfg); err != nil {
		s.log.Warn("undecodable registry entry", "node", e.Key(), "err", err)
		return
	}
	if n.cfg == nil && len(n.speed.byWorkflow) == 0 && cfg.Weight > 0 {
		n.speed.slowness = 1 / cfg.Weight
	}
	n.cfg = &cfg
}

// heartbeat takes a node's reported state (called by the heartbeat subscription).
func (s *scheduler) heartbeat(st fleet.NodeStatus) {
	s.post(func() {
		n := s.node(st.ID)
		n.status, n.heartbeat = &st, time.Now()
		if st.Model != "" {
			n.model = st.Model
		}
		if st.State == fleet.NodeOffline {
			n.offlineFor++
		} else {
			n.offlineFor = 0
		}
		n.speed.seed(st.Workflows)
	})
}

// sceneEvent follows a scene's life on its node.
func (s *scheduler) sceneEvent(ev fleet.SceneEvent) {
	key := fleet.WorkItem{JobID: ev.JobID, Index: ev.Index, Retry: ev.Retry}.MsgID()
	switch ev.Type {
	case fleet.EventStarted, fleet.EventCompleted, fleet.EventFailed, fleet.EventCancelled, fleet.EventRetrying:
	default:
		return
	}
	s.post(func() {
		switch ev.Type {
		case fleet.EventStarted:
			if n := s.nodes[ev.Node]; n != nil {
				if h := n.held[key]; h != nil {
					h.startedAt = ev.Time
				}
			}
		case fleet.EventCompleted:
			if n := s.nodes[ev.Node]; n != nil && ev.Duration > 0 {
				n.speed.observe(workflowKey(ev.Workflow), ev.Duration, ev.ModelLoaded)
			}
			s.ended(key, ev)
		case fleet.EventFailed, fleet.EventCancelled, fleet.EventRetrying:
			s.ended(key, ev)
		}
	})
}

// ended forgets a scene run that left its node, and drops it from the queue if it
// ended for good.
func (s *scheduler) ended(key string, ev fleet.SceneEvent) {
	if ev.Type == fleet.EventRetrying {
		if n := s.nodes[ev.Node]; n != nil {
			delete(n.held, key)
		}
		return
	}
	for _, n := range s.nodes {
		delete(n.held, key)
	}
	if n := s.nodes[ev.Node]; n != nil && ev.Model != "" {
		n.model = ev.Model
	}
	s.finished[key] = time.Now()
	for seq, w := range s.waiting {
		if w.item.MsgID() == key {
			delete(s.waiting, seq)
			if err := s.queue.DeleteMsg(s.ctx, seq); err != nil && !fleet.NoMessage(err) {
				s.log.Warn("remove an ended scene from the queue", "scene", key, "err", err)
			}
		}
	}
}

// views returns the planner's picture of the nodes, sorted by id, and how many
// scenes each tenant holds.
func (s *scheduler) views(now time.Time) ([]*nodeView, map[string]int) {
	var views []*nodeView
	tenants := map[string]int{}
	for id, n := range s.nodes {
		v := &nodeView{id: id, speed: n.speed, usable: s.usable(n, now)}
		if n.cfg != nil {
			v.pools, v.weight = n.cfg.Pools, n.cfg.Weight
		}
		if v.weight <= 0 {
			v.weight = 1
		}
		v.model = n.model
		for _, h := range n.held {
			v.held = append(v.held, h)
			tenants[h.item.Tenant]++
		}
		slices.SortFunc(v.held, func(a, b *held) int {
			// Running first, then waiting, each in placement order.
			return cmp.Or(cmp.Compare(boolInt(a.startedAt.IsZero()), boolInt(b.startedAt.IsZero())), cmp.Compare(a.seq, b.seq))
		})
		views = append(views, v)
	}
	slices.SortFunc(views, func(a, b *nodeView) int { return cmp.Compare(a.id, b.id) })
	return views, tenants
}

// usable reports whether n may get a new scene.
func (s *scheduler) usable(n *nodeState, now time.Time) bool {
	return n.cfg != nil && !n.cfg.Drained && n.status != nil && n.offlineFor == 0 && !s.silent(n, now)
}

// place plans and makes the placements.
func (s *scheduler) place(ctx context.Context) {
	if len(s.waiting) == 0 {
		return
	}
	now := time.Now()
	nodes, tenants := s.views(now)
	queue := make([]*waiting, 0, len(s.waiting))
	for _, w := range s.waiting {
		queue = append(queue, w)
	}
	for _, p := range s.planner.plan(now, order(queue, tenants), nodes) {
		if err := s.release(ctx, p.w, p.node.id); err != nil {
			s.log.Warn("place scene", "scene", p.w.item.MsgID(), "node", p.node.id, "err", err)
			return
		}
	}
}

// nextNotBefore is when the first backed-off scene may be placed, zero if none waits.
func (s *scheduler) nextNotBefore() time.Time {
	now := time.Now()
	var next time.Time
	for _, w := range s.waiting {
		if nb := w.item.NotBefore; nb.After(now) && (next.IsZero() || nb.Before(next)) {
			next = nb
		}
	}
	return next
}

// release publishes w to node's work subject, then removes it from the queue. A
// crash in between leaves the entry in the queue; placing it again is dropped as a
// duplicate by its message id.
func (s *scheduler) release(ctx context.Context, w *waiting, node string) error {
	item := w.item
	item.NotBefore, item.Avoid = time.Time{}, ""
	data, err := json.Marshal(item)
	if err != nil {
		return fmt.Errorf("encode scene %s: %w", item.MsgID(), err)
	}
	ack, err := s.js.PublishMsg(ctx, &nats.Msg{Subject: fleet.WorkSubject(node), Data: data, Header: w.header},
		jetstream.WithMsgID(item.PlacementID()))
	if err != nil {
		return fmt.Errorf("publish scene %s to node %s: %w", item.MsgID(), node, err)
	}
	if err := s.queue.DeleteMsg(ctx, w.seq); err != nil && !fleet.NoMessage(err) {
		return fmt.Errorf("remove scene %s from the queue: %w", item.MsgID(), err)
	}
	delete(s.waiting, w.seq)
	if !ack.Duplicate {
		s.node(node).held[item.MsgID()] = &held{item: item, seq: ack.Sequence, model: w.model, placedAt: time.Now()}
	}
	if s.onPlaced != nil {
		s.onPlaced(node, item)
	}
	return nil
}

// scanWork rebuilds what every node holds from the work stream, the truth: a
// placed scene stays there until its executor acknowledges it.
func (s *scheduler) scanWork(ctx context.Context) error {
	found, err := s.placed(ctx, fleet.WorkFilter, 0)
	if err != nil {
		return err
	}
	now := time.Now()
	for key, at := range s.finished {
		if now.Sub(at) > time.Minute {
			delete(s.finished, key)
		}
	}
	byNode := map[string]map[string]*held{}
	for _, f := range found {
		key := f.item.MsgID()
		if _, gone := s.finished[key]; gone {
			continue
		}
		if byNode[f.node] == nil {
			byNode[f.node] = map[string]*held{}
		}
		h := &held{item: f.item, seq: f.seq, model: fleet.Checkpoint(f.item.Graph), placedAt: now}
		if old := s.nodes[f.node]; old != nil && old.held[key] != nil {
			h = old.held[key]
		}
		byNode[f.node][key] = h
	}
	for id, n := range s.nodes {
		n.held = byNode[id]
		if n.held == nil {
			n.held = map[string]*held{}
		}
		delete(byNode, id)
	}
	for id, held := range byNode {
		s.node(id).held = held
	}
	return nil
}

// placedMsg is a scene found in the work stream.
type placedMsg struct {
	node string
	seq  uint64
	item fleet.WorkItem
}

// placed reads the work stream's messages on subject from sequence after on.
func (s *scheduler) placed(ctx context.Context, subject string, after uint64) ([]placedMsg, error) {
	var out []placedMsg
	for seq := after + 1; ; {
		raw, err := s.work.GetMsg(ctx, seq, jetstream.WithGetMsgSubject(subject))
		if errors.Is(err, jetstream.ErrMsgNotFound) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("read placed scenes: %w", err)
		}
		var item fleet.WorkItem
		if err := json.Unmarshal(raw.Data, &item); err == nil {
			out = append(out, placedMsg{node: fleet.NodeFromWorkSubject(raw.Subject), seq: raw.Sequence, item: item})
		}
		seq = raw.Sequence + 1
	}
}

// silent reports whether n's executor has not been heard from for AckWait: the
// time after which a running scene would move on if its executor died.
func (s *scheduler) silent(n *nodeState, now time.Time) bool {
	return now.Sub(n.heartbeat) > s.settings.AckWait
}

// rescueLost puts back in the queue the scenes placed on nodes that are gone: all
// of them when the node's executor is silent for longer than AckWait or reports
// the node offline twice in a row; those its executor has not taken yet when the
// node is drained or removed from the registry (the executor finishes the scenes it
// runs and gives back the others itself).
func (s *scheduler) rescueLost(ctx context.Context) {
	if !s.registryReady {
		return
	}
	now := time.Now()
	for id, n := range s.nodes {
		if len(n.held) == 0 {
			continue
		}
		dead := n.status == nil && now.Sub(s.started(n)) > s.settings.NodeTTL ||
			n.status != nil && (s.silent(n, now) || n.offlineFor >= 2)
		switch {
		case dead:
			s.rescue(ctx, id, n, 0)
		case n.cfg == nil || n.cfg.Drained:
			s.rescueUndelivered(ctx, id, n)
		}
	}
}

// started is when the scheduler first counted a scene on n.
func (s *scheduler) started(n *nodeState) time.Time {
	var first time.Time
	for _, h := range n.held {
		if first.IsZero() || h.placedAt.Before(first) {
			first = h.placedAt
		}
	}
	return first
}

// rescueUndelivered gives back the scenes placed on n that its executor has not
// taken yet.
func (s *scheduler) rescueUndelivered(ctx context.Context, id string, n *nodeState) {
	cons, err := s.work.Consumer(ctx, fleet.WorkConsumerName(id))
	if err != nil {
		return
	}
	info, err := cons.Info(ctx)
	if err != nil {
		return
	}
	s.rescue(ctx, id, n, info.Delivered.Stream)
}

// rescue moves the scenes placed on node id after sequence after back to the queue.
func (s *scheduler) rescue(ctx context.Context, id string, n *nodeState, after uint64) {
	found, err := s.placed(ctx, fleet.WorkSubject(id), after)
	if err != nil {
		s.log.Warn("read scenes of a lost node", "node", id, "err", err)
		return
	}
	for _, f := range found {
		attempted := 1
		if after > 0 {
			attempted = 0
		}
		item := f.item.Requeue(attempted)
		item.Avoid = id
		if err := s.pub.JSON(ctx, fleet.QueueSubject(item.Pool), item.PlacementID(), item); err != nil {
			s.log.Warn("give back a scene of a lost node", "node", id, "scene", item.MsgID(), "err", err)
			return
		}
		if err := s.work.DeleteMsg(ctx, f.seq); err != nil && !fleet.NoMessage(err) {
			s.log.Warn("remove a given-back scene", "node", id, "scene", item.MsgID(), "err", err)
		}
		delete(n.held, f.item.MsgID())
		s.log.Info("scene given back to the queue", "node", id, "scene", item.MsgID())
	}
	if after == 0 {
		n.held = map[string]*held{}
	}
	if n.cfg == nil && after == 0 {
		// A removed node's executor has stopped serving it; its consumer goes too.
		if err := s.js.DeleteConsumer(ctx, fleet.StreamWork, fleet.WorkConsumerName(id)); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
			s.log.Debug("remove the consumer of a removed node", "node", id, "err", err)
		}
	}
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
