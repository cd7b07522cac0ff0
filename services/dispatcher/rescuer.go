package dispatcher

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// rescuer moves the scenes placed on lost nodes back to the queue: the leading
// dispatcher's maintenance, apart from planning. Which nodes are lost is the
// state's judgement (fleetState.lost); the rescuer reads what the work stream holds
// for them and moves it.
type rescuer struct {
	log *slog.Logger
	js  jetstream.JetStream
	pub *fleet.Publisher
}

// rescue moves back to the queue what lost holds: every scene, counting an attempt
// for each one its executor had taken, or only the scenes its executor has not taken
// yet.
func (r *rescuer) rescue(ctx context.Context, st *fleetState, lost lostNode) {
	delivered, err := r.delivered(ctx, lost.id)
	switch {
	case err != nil && lost.undeliveredOnly:
		return
	case err != nil:
		// Unknown: count every scene as taken, so none is tried more than allowed.
		delivered = math.MaxUint64
	}
	after := uint64(0)
	if lost.undeliveredOnly {
		after = delivered
	}
	found, err := readPlaced(ctx, r.js, fleet.WorkSubject(lost.id), after)
	if err != nil {
		r.log.Warn("read scenes of a lost node", "node", lost.id, "err", err)
		return
	}
	work, err := r.js.Stream(ctx, fleet.StreamWork)
	if err != nil {
		r.log.Warn("open the work stream", "err", err)
		return
	}
	n := st.node(lost.id)
	for _, f := range found {
		t := f.t
		if f.seq <= delivered {
			attempt := t.Attempt(1)
			failure := fleet.Attempt{Attempt: attempt, Node: lost.id, Error: fmt.Sprintf("node %s was lost: its executor stopped answering", lost.id), At: time.Now().UTC()}
			t = t.Requeue(1, lost.id, 0, &failure).AfterLoss()
			ev := fleet.SceneEvent{JobID: t.JobID, Index: t.Index, Retry: t.Retry, Type: fleet.EventRetrying, Attempt: attempt,
				Node: lost.id, Error: failure.Error, Failures: t.Failures}
			if err := r.pub.SceneEvent(ctx, ev); err != nil {
				r.log.Warn("report a scene of a lost node", "scene", t.RunKey(), "err", err)
			}
		} else {
			t = t.Requeue(0, lost.id, 0, nil)
		}
		if err := r.pub.Requeue(ctx, t); err != nil {
			r.log.Warn("give back a scene of a lost node", "node", lost.id, "scene", t.RunKey(), "err", err)
			return
		}
		if err := work.DeleteMsg(ctx, f.seq); err != nil && !fleet.NoMessage(err) {
			r.log.Warn("remove a given-back scene", "node", lost.id, "scene", t.RunKey(), "err", err)
		}
		st.release(n, f.t.RunKey())
		r.log.Info("scene given back to the queue", "node", lost.id, "scene", t.RunKey())
	}
	if lost.undeliveredOnly {
		return
	}
	st.replaceHeld(n, nil)
	if lost.removed {
		// A removed node's executor has stopped serving it; its consumer goes too.
		if err := r.js.DeleteConsumer(ctx, fleet.StreamWork, fleet.WorkConsumerName(lost.id)); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
			r.log.Debug("remove the consumer of a removed node", "node", lost.id, "err", err)
		}
	}
}

// delivered is the last work sequence the node's consumer delivered to its executor.
func (r *rescuer) delivered(ctx context.Context, node string) (uint64, error) {
	cons, err := r.js.Consumer(ctx, fleet.StreamWork, fleet.WorkConsumerName(node))
	if err != nil {
		return 0, err
	}
	info, err := cons.Info(ctx)
	if err != nil {
		return 0, err
	}
	return info.Delivered.Stream, nil
}
