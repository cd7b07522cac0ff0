package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// maxDeliveriesAdvisory is the part of the server's max-deliveries advisory we use.
type maxDeliveriesAdvisory struct {
	Stream     string `json:"stream"`
	Consumer   string `json:"consumer"`
	StreamSeq  uint64 `json:"stream_seq"`
	Deliveries int    `json:"deliveries"`
}

// deadLetters fails the scenes whose work message was delivered MaxAttempts times
// without an acknowledgement: every executor that took them died or hung. The
// scene's failed event is what records it as a dead letter.
type deadLetters struct {
	log     *slog.Logger
	js      jetstream.JetStream
	pub     *fleet.Publisher
	metrics *metrics
}

func (d *deadLetters) handle(ctx context.Context, msg jetstream.Msg) error {
	var adv maxDeliveriesAdvisory
	if err := json.Unmarshal(msg.Data(), &adv); err != nil || adv.Stream != fleet.StreamWork {
		return fleet.Permanent(errors.New("not a work advisory"))
	}
	raw, err := d.js.Stream(ctx, fleet.StreamWork)
	if err != nil {
		return err
	}
	m, err := fleet.MsgAt(ctx, d.js, raw, adv.StreamSeq)
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("read dead work message %d: %w", adv.StreamSeq, err)
	}
	var t fleet.Ticket
	if err := json.Unmarshal(m.Data, &t); err != nil {
		_ = raw.DeleteMsg(ctx, adv.StreamSeq)
		return fleet.Permanent(errors.New("undecodable work message"))
	}
	attempt := t.Attempt(adv.Deliveries)
	err = d.pub.SceneEvent(ctx, fleet.SceneEvent{
		JobID:    t.JobID,
		Index:    t.Index,
		Retry:    t.Retry,
		Type:     fleet.EventFailed,
		Attempt:  attempt,
		Error:    fmt.Sprintf("given up after %d deliveries that were never acknowledged: every node that took the scene was lost", adv.Deliveries),
		Failures: t.Failures,
	})
	if err != nil {
		return fmt.Errorf("dead letter %s: %w", t.RunKey(), err)
	}
	if err := raw.DeleteMsg(ctx, adv.StreamSeq); err != nil && !fleet.NoMessage(err) {
		return fmt.Errorf("dead letter %s: %w", t.RunKey(), err)
	}
	d.log.Warn("scene dead-lettered", "scene", t.RunKey(), "deliveries", adv.Deliveries)
	d.metrics.dead.Add(ctx, 1)
	return nil
}
