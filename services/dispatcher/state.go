package dispatcher

import (
	"cmp"
	"maps"
	"slices"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/inventory"
)

// fleetState is the dispatcher's picture of the fleet: the queue, the nodes and
// what each holds, and their measured speeds. Every dispatcher keeps it current
// from the streams and buckets, the standbys too, so that one taking over plans at
// once. It does no I/O; one goroutine (the scheduler's loop) owns it.
type fleetState struct {
	settings fleet.Settings
	queue    *queue
	nodes    map[string]*nodeState
	speeds   fleetSpeeds
	// registryReady is set once the registry's entries have all been read: until
	// then a node missing from it may only not be read yet.
	registryReady bool
	// finished remembers scene runs that ended recently, so that their tickets or
	// placements read late (the queue stream behind the events, a scan racing an
	// acknowledgement) do not count again.
	finished map[string]time.Time
	// gone holds, for each executor whose liveness requests meet no responders, since
	// when: its connection is gone.
	gone map[string]time.Time
	// holders lists, for each run held on a node, the nodes holding it: one, or two
	// for a moment while a scene moves. It keeps the end of a run from visiting
	// every node.
	holders map[string][]*nodeState
	// byID lists the nodes sorted by id, and viewList their views, for views; nil
	// once a node is added. tenants is views' count of scenes held by tenant.
	byID     []*nodeState
	viewList []*nodeView
	tenants  map[string]int
}

// livenessGrace is how long an executor's liveness requests must meet no responders,
// and its heartbeats be missing, before its nodes count as lost: longer than a
// reconnection to another NATS server takes.
const livenessGrace = time.Second

// nodeState is what the dispatcher knows of a node.
type nodeState struct {
	id         string
	cfg        *fleet.NodeConfig // nil: not registered
	status     *fleet.NodeStatus // nil: no heartbeat yet
	heartbeat  time.Time
	offlineFor int // heartbeats in a row reporting the node offline
	// model is the checkpoint the node ran last, from its heartbeats and completions.
	model string
	// held are the scenes placed on the node and not finished, by run key.
	held  map[string]*held
	speed *speedModel
	// inv is what the node can run; nil until its executor has read it.
	inv *inventory.Inventory
	// view is the planner's picture of the node, refreshed by views.
	view nodeView
}

func newFleetState(settings fleet.Settings) *fleetState {
	return &fleetState{
		settings: settings,
		queue:    newQueue(),
		nodes:    map[string]*nodeState{},
		speeds:   fleetSpeeds{reference: map[string]float64{}},
		finished: map[string]time.Time{},
		gone:     map[string]time.Time{},
		holders:  map[string][]*nodeState{},
		tenants:  map[string]int{},
	}
}

// keep records that n holds run key as h, unless it holds it already.
func (s *fleetState) keep(n *nodeState, key string, h *held) {
	if _, ok := n.held[key]; ok {
		return
	}
	n.held[key] = h
	s.holders[key] = append(s.holders[key], n)
}

// release records that n no longer holds run key.
func (s *fleetState) release(n *nodeState, key string) {
	if _, ok := n.held[key]; !ok {
		return
	}
	delete(n.held, key)
	rest := slices.DeleteFunc(s.holders[key], func(o *nodeState) bool { return o == n })
	if len(rest) == 0 {
		delete(s.holders, key)
	} else {
		s.holders[key] = rest
	}
}

// releaseEverywhere records that no node holds run key.
func (s *fleetState) releaseEverywhere(key string) {
	for _, n := range s.holders[key] {
		delete(n.held, key)
	}
	delete(s.holders, key)
}

// replaceHeld makes held (nil: nothing) what n holds.
func (s *fleetState) replaceHeld(n *nodeState, held map[string]*held) {
	for key := range n.held {
		s.release(n, key)
	}
	for key, h := range held {
		s.keep(n, key, h)
	}
}

// answered records the outcome of a liveness request to executor: whether it met no
// responders (the executor's connection is gone).
func (s *fleetState) answered(executor string, noResponders bool, now time.Time) {
	switch {
	case !noResponders:
		delete(s.gone, executor)
	case s.gone[executor].IsZero():
		s.gone[executor] = now
	}
}

// executors returns the executors of the nodes that hold scenes, which the leader
// asks whether they live.
func (s *fleetState) executors() []string {
	seen := map[string]bool{}
	var out []string
	for _, n := range s.nodes {
		if len(n.held) > 0 && n.status != nil && n.status.Executor != "" && !seen[n.status.Executor] {
			seen[n.status.Executor] = true
			out = append(out, n.status.Executor)
		}
	}
	slices.Sort(out)
	return out
}

// executorGone reports whether n's executor has been unreachable for livenessGrace.
func (s *fleetState) executorGone(n *nodeState, now time.Time) bool {
	if n.status == nil {
		return false
	}
	since, ok := s.gone[n.status.Executor]
	return ok && now.Sub(since) >= livenessGrace && now.Sub(n.heartbeat) >= livenessGrace
}

func (s *fleetState) node(id string) *nodeState {
	n := s.nodes[id]
	if n == nil {
		n = &nodeState{id: id, held: map[string]*held{}, speed: newSpeedModel(&s.speeds, 1)}
		s.nodes[id] = n
		s.byID, s.viewList = nil, nil
	}
	return n
}

// enqueue takes a ticket read from the queue stream at seq. It reports false for
// the ticket of a run that has ended: its entry is stale and must go.
func (s *fleetState) enqueue(w *waiting, now time.Time) bool {
	key := w.t.RunKey()
	if _, ended := s.finished[key]; ended {
		return false
	}
	// A scene back in the queue is no longer held anywhere.
	s.releaseEverywhere(key)
	s.queue.add(w, now)
	return true
}

// placedElsewhere follows a tombstone read from the queue stream: the scene's
// entry before seq was placed on node (empty when unknown), at work sequence
// workSeq.
func (s *fleetState) placedElsewhere(k sceneKey, seq uint64, node string, workSeq uint64, now time.Time) {
	w := s.queue.get(k)
	if w == nil || w.seq > seq {
		return
	}
	s.queue.remove(k)
	if node != "" {
		s.hold(node, w.t, workSeq, now)
	}
}

// hold records that the scene of t was placed on node at work sequence seq.
func (s *fleetState) hold(node string, t fleet.Ticket, seq uint64, now time.Time) {
	key := t.RunKey()
	if _, ended := s.finished[key]; ended {
		return
	}
	s.keep(s.node(node), key, &held{t: t, seq: seq, placedAt: now})
}

// registryChanged follows a node's desired configuration; cfg is nil for a node
// removed from the registry.
func (s *fleetState) registryChanged(id string, cfg *fleet.NodeConfig) {
	n := s.node(id)
	if cfg != nil && n.cfg == nil && len(n.speed.byWorkflow) == 0 && cfg.Weight > 0 {
		n.speed.slowness = 1 / cfg.Weight
	}
	n.cfg = cfg
}

// inventoryChanged follows what a node can run; inv is nil for a node whose
// inventory is gone.
func (s *fleetState) inventoryChanged(id string, inv *inventory.Inventory) {
	s.node(id).inv = inv
}

// heartbeat takes a node's reported state.
func (s *fleetState) heartbeat(st fleet.NodeStatus, now time.Time) {
	n := s.node(st.ID)
	n.status, n.heartbeat = &st, now
	// A heartbeat is the executor's own word that it lives.
	delete(s.gone, st.Executor)
	if st.Model != "" {
		n.model = st.Model
	}
	if st.State == fleet.NodeOffline {
		n.offlineFor++
	} else {
		n.offlineFor = 0
	}
	n.speed.seed(st.Workflows)
}

// sceneEvent follows a scene's life on its node, as published: the moment a scene
// ends its slot frees. An event seen as published may yet not be stored (its stream
// electing a leader), so nothing here decides that a run has ended: ended does, from
// the events stream.
func (s *fleetState) sceneEvent(ev fleet.SceneEvent) {
	key := fleet.Ticket{JobID: ev.JobID, Index: ev.Index, Retry: ev.Retry}.RunKey()
	switch ev.Type {
	case fleet.EventStarted:
		if n := s.nodes[ev.Node]; n != nil {
			if h := n.held[key]; h != nil && h.startedAt.IsZero() {
				h.startedAt = ev.Time
			}
		}
	case fleet.EventRetrying:
		if n := s.nodes[ev.Node]; n != nil {
			s.release(n, key)
		}
	case fleet.EventCompleted, fleet.EventFailed, fleet.EventCancelled:
		if n := s.nodes[ev.Node]; n != nil && ev.Type == fleet.EventCompleted && ev.Duration > 0 {
			n.speed.observe(workflowKey(ev.Workflow), ev.Duration, ev.ModelLoaded)
		}
		s.releaseEverywhere(key)
		if n := s.nodes[ev.Node]; n != nil && ev.Model != "" {
			n.model = ev.Model
		}
	}
}

// ended follows a terminal scene event read from the events stream, where it is
// stored: the run has ended, and a ticket of it is stale. It returns the queue entry
// of a scene that ended while it waited, which the leader removes from the stream.
func (s *fleetState) ended(ev fleet.SceneEvent, now time.Time) *waiting {
	key := fleet.Ticket{JobID: ev.JobID, Index: ev.Index, Retry: ev.Retry}.RunKey()
	s.releaseEverywhere(key)
	s.finished[key] = now
	k := sceneKey{ev.JobID, ev.Index}
	if w := s.queue.get(k); w != nil && w.t.Retry <= ev.Retry {
		return s.queue.remove(k)
	}
	return nil
}

// forget drops the memory of runs that ended long enough ago that nothing about
// them can still be on its way.
func (s *fleetState) forget(now time.Time) {
	for key, at := range s.finished {
		if now.Sub(at) > time.Minute {
			delete(s.finished, key)
		}
	}
}

// placedMsg is a scene found in the work stream.
type placedMsg struct {
	node string
	seq  uint64
	t    fleet.Ticket
}

// scanned replaces what every node holds with what the work stream holds, the
// truth: a placed scene stays there until its executor acknowledges it.
func (s *fleetState) scanned(found []placedMsg, now time.Time) {
	byNode := map[string]map[string]*held{}
	for _, f := range found {
		key := f.t.RunKey()
		if _, gone := s.finished[key]; gone {
			continue
		}
		if byNode[f.node] == nil {
			byNode[f.node] = map[string]*held{}
		}
		h := &held{t: f.t, seq: f.seq, placedAt: now}
		if old := s.nodes[f.node]; old != nil && old.held[key] != nil {
			h = old.held[key]
			h.seq = f.seq
		}
		byNode[f.node][key] = h
	}
	for id, n := range s.nodes {
		s.replaceHeld(n, byNode[id])
		delete(byNode, id)
	}
	for id, held := range byNode {
		s.replaceHeld(s.node(id), held)
	}
}

// usable reports whether n may get a new scene.
func (s *fleetState) usable(n *nodeState, now time.Time) bool {
	if n.cfg == nil || n.cfg.Drained || n.status == nil || n.offlineFor > 0 || s.silent(n, now) {
		return false
	}
	if len(s.gone) == 0 {
		return true
	}
	_, unreachable := s.gone[n.status.Executor]
	return !unreachable
}

// silent reports whether n's executor has not been heard from for AckWait: the
// time after which a running scene would move on if its executor died.
func (s *fleetState) silent(n *nodeState, now time.Time) bool {
	return now.Sub(n.heartbeat) > s.settings.AckWait
}

// views returns the planner's picture of the nodes, sorted by id, and how many
// scenes each tenant holds. Both are the fleet state's own, refreshed in place, and
// valid until the next call.
func (s *fleetState) views(now time.Time) ([]*nodeView, map[string]int) {
	if s.byID == nil {
		s.byID = slices.SortedFunc(maps.Values(s.nodes), func(a, b *nodeState) int { return cmp.Compare(a.id, b.id) })
		s.viewList = make([]*nodeView, len(s.byID))
		for i, n := range s.byID {
			s.viewList[i] = &n.view
		}
	}
	clear(s.tenants)
	// Held scenes are counted by runs of one tenant, most often all of them: one
	// map update a run, not one a scene.
	tenant, run := "", 0
	for _, n := range s.byID {
		v := &n.view
		v.id, v.speed, v.usable, v.model, v.inv = n.id, n.speed, s.usable(n, now), n.model, n.inv
		v.invBehind = n.status != nil && n.status.Inventory != "" && (n.inv == nil || n.inv.Version != n.status.Inventory)
		v.pools, v.weight, v.region, v.setup = nil, 1, "", 0
		if n.cfg != nil {
			v.pools, v.region = n.cfg.Pools, n.cfg.Region
			if n.cfg.Weight > 0 {
				v.weight = n.cfg.Weight
			}
		}
		if n.status != nil {
			v.setup = time.Duration(n.status.SetupSeconds * float64(time.Second))
		}
		v.held = v.held[:0]
		for _, h := range n.held {
			v.held = append(v.held, h)
			if h.t.Tenant != tenant {
				if run > 0 {
					s.tenants[tenant] += run
				}
				tenant, run = h.t.Tenant, 0
			}
			run++
		}
		slices.SortFunc(v.held, func(a, b *held) int {
			// Running first, then waiting, each in placement order.
			return cmp.Or(cmp.Compare(boolInt(a.startedAt.IsZero()), boolInt(b.startedAt.IsZero())), cmp.Compare(a.seq, b.seq))
		})
	}
	if run > 0 {
		s.tenants[tenant] += run
	}
	return s.viewList, s.tenants
}

// lostNode is a node whose placed scenes must go back to the queue: all of them
// (its executor is gone), or only those its executor has not taken yet (it was
// drained or removed, and finishes what it runs).
type lostNode struct {
	id              string
	undeliveredOnly bool
	// removed is set for a node gone from the registry: its consumer goes too.
	removed bool
}

// lost returns the nodes whose scenes must move: every scene of a node whose
// executor is gone (its connection, for livenessGrace), silent for longer than
// AckWait (alive but hung), reports the node offline twice in a row, or never
// reported since the node got scenes (NodeTTL); the scenes not taken yet of a node
// drained or removed from the registry.
func (s *fleetState) lost(now time.Time) []lostNode {
	if !s.registryReady {
		return nil
	}
	var out []lostNode
	for id, n := range s.nodes {
		if len(n.held) == 0 {
			continue
		}
		dead := n.status == nil && now.Sub(firstPlaced(n)) > s.settings.NodeTTL ||
			n.status != nil && (s.silent(n, now) || n.offlineFor >= 2 || s.executorGone(n, now))
		switch {
		case dead:
			out = append(out, lostNode{id: id, removed: n.cfg == nil})
		case n.cfg == nil || n.cfg.Drained:
			out = append(out, lostNode{id: id, undeliveredOnly: true})
		}
	}
	slices.SortFunc(out, func(a, b lostNode) int { return cmp.Compare(a.id, b.id) })
	return out
}

// firstPlaced is when the dispatcher first counted a scene on n.
func firstPlaced(n *nodeState) time.Time {
	var first time.Time
	for _, h := range n.held {
		if first.IsZero() || h.placedAt.Before(first) {
			first = h.placedAt
		}
	}
	return first
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}
