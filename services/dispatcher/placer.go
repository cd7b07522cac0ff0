package dispatcher

import (
	"context"
	"encoding/json"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/telemetry"
)

// placer makes the leader's placements without holding up the scheduler's loop: it
// records a placement at once, publishes it asynchronously, and when the server has
// stored it, replaces the scene's ticket in the queue stream with a tombstone naming
// the node. A placement the server refuses goes back to the queue; one it drops as a
// duplicate (a placement made before, by a dispatcher that stopped half-way) asks
// for a scan of the work stream, which tells where the scene is.
type placer struct {
	s       *scheduler
	pending chan pendingMsg
	tombs   chan pendingMsg
	// placing and burying wait for the goroutines settling placements and tombstones.
	placing, burying sync.WaitGroup
}

// pendingMsg is a publish waiting for the server's answer.
type pendingMsg struct {
	w      *waiting
	node   string
	future jetstream.PubAckFuture
	// span is the placement's span, ended with the answer; nil when the scene's
	// trace is not recorded.
	span trace.Span
}

// placeTracer makes the spans of placements.
var placeTracer = otel.Tracer("comfyfleet/dispatcher")

// traceWork starts the span of w's placement on node, a child of the trace context
// its ticket carried and the parent of the work message h is for, which it writes
// into h. It returns nil when the ticket carried none.
func traceWork(h nats.Header, w *waiting, node string, now time.Time) trace.Span {
	if w.trace == "" {
		return nil
	}
	h.Set(traceparentField, w.trace)
	attrs := append(telemetry.SceneAttrs(w.t.JobID, w.t.Index), attribute.String("comfyfleet.node", node), attribute.Int("comfyfleet.priority", w.t.Priority))
	if w.t.Moves == 0 && w.t.Retry == 0 {
		attrs = append(attrs, attribute.Float64("comfyfleet.queue_wait_s", now.Sub(w.t.SubmittedAt).Seconds()))
	}
	ctx, span := placeTracer.Start(telemetry.Extract(context.Background(), h), "place",
		trace.WithTimestamp(now), trace.WithAttributes(attrs...))
	telemetry.Inject(ctx, h)
	return span
}

// endSpan ends span, if any, with err as its error, if any.
func endSpan(span trace.Span, err error) {
	if span == nil {
		return
	}
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}

// placerWindow bounds the placements and tombstones in flight.
const placerWindow = 1 << 16

func newPlacer(s *scheduler, ctx context.Context) *placer {
	p := &placer{s: s, pending: make(chan pendingMsg, placerWindow), tombs: make(chan pendingMsg, placerWindow)}
	p.placing.Go(func() { p.settlePlacements(ctx) })
	p.burying.Go(func() { p.settleTombstones(ctx) })
	return p
}

// stop waits until every publish in flight has its answer, or the context ended.
// Call it from the goroutine that places, once it places no more.
func (p *placer) stop() {
	close(p.pending)
	p.placing.Wait()
	close(p.tombs)
	p.burying.Wait()
}

// place releases w to node: it leaves the queue and is held by the node from now.
func (p *placer) place(st *fleetState, w *waiting, node string, now time.Time) {
	st.queue.remove(w.key())
	t := w.t
	t.NotBefore, t.Avoid = time.Time{}, ""
	st.hold(node, t, 0, now)
	data, err := json.Marshal(t)
	if err == nil {
		msg := &nats.Msg{Subject: fleet.WorkSubject(node), Data: data, Header: nats.Header{}}
		span := traceWork(msg.Header, w, node, now)
		msg.Header.Set(HeaderPlacedBy, p.s.name)
		var f jetstream.PubAckFuture
		if f, err = p.s.js.PublishMsgAsync(msg, jetstream.WithMsgID(t.PlacementID())); err == nil {
			p.s.metrics.placed(w, now)
			p.pending <- pendingMsg{w: w, node: node, future: f, span: span}
			return
		}
		endSpan(span, err)
	}
	p.s.log.Warn("place scene", "scene", t.RunKey(), "node", node, "err", err)
	p.unplace(st, w, node)
}

// unplace takes back a placement the server did not store.
func (p *placer) unplace(st *fleetState, w *waiting, node string) {
	if n := st.nodes[node]; n != nil {
		st.release(n, w.t.RunKey())
	}
	st.enqueue(w, time.Now())
}

// remove replaces the queue entry of a scene that ended while it waited, or of a
// ticket that cannot be read, with a tombstone.
func (p *placer) remove(w *waiting) {
	p.tombstone(w, "", 0)
}

func (p *placer) tombstone(w *waiting, node string, workSeq uint64) {
	msg := &nats.Msg{Subject: fleet.QueueSubject(w.t.Pool, w.t.JobID, w.t.Index), Header: nats.Header{}}
	msg.Header.Set(headerTicketSeq, strconv.FormatUint(w.seq, 10))
	msg.Header.Set(headerPlacedOn, node)
	if workSeq > 0 {
		msg.Header.Set(headerWorkSeq, strconv.FormatUint(workSeq, 10))
	}
	f, err := p.s.js.PublishMsgAsync(msg, jetstream.WithExpectLastSequencePerSubject(w.seq), jetstream.WithMsgTTL(fleet.QueueTombstoneTTL))
	if err != nil {
		p.s.log.Warn("replace a queue entry with its tombstone", "scene", w.t.RunKey(), "err", err)
		return
	}
	p.tombs <- pendingMsg{w: w, node: node, future: f}
}

func (p *placer) settlePlacements(ctx context.Context) {
	for pm := range p.pending {
		select {
		case ack := <-pm.future.Ok():
			endSpan(pm.span, nil)
			if ack.Duplicate {
				p.s.post(func(l *loop) { l.scan = true })
			} else {
				key, node, seq := pm.w.t.RunKey(), pm.node, ack.Sequence
				p.s.post(func(l *loop) {
					if n := l.state.nodes[node]; n != nil {
						if h := n.held[key]; h != nil {
							h.seq = seq
						}
					}
				})
			}
			p.tombstone(pm.w, pm.node, ack.Sequence)
		case err := <-pm.future.Err():
			endSpan(pm.span, err)
			p.s.log.Warn("place scene: the server did not store it; it goes back to the queue", "scene", pm.w.t.RunKey(), "node", pm.node, "err", err)
			w, node := pm.w, pm.node
			p.s.post(func(l *loop) {
				p.unplace(l.state, w, node)
				l.dirty = true
			})
		case <-ctx.Done():
			endSpan(pm.span, ctx.Err())
			for pm := range p.pending {
				endSpan(pm.span, ctx.Err())
			}
			return
		}
	}
}

func (p *placer) settleTombstones(ctx context.Context) {
	for pm := range p.tombs {
		select {
		case <-pm.future.Ok():
		case err := <-pm.future.Err():
			// A ticket replaced since (the scene came back to the queue) is right to
			// keep; anything else leaves a stale entry that a later placement drops as
			// a duplicate.
			if !fleet.WrongLastSequence(err) {
				p.s.log.Warn("replace a queue entry with its tombstone", "scene", pm.w.t.RunKey(), "err", err)
			}
		case <-ctx.Done():
			for range p.tombs {
			}
			return
		}
	}
}
