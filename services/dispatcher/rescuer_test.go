package dispatcher

import (
	"context"
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

// rescueRig places two scenes on node gpu, the first of them taken by its executor
// (delivered, not acknowledged), and returns the rescuer and the state holding them.
func rescueRig(t *testing.T) (*rescuer, *fleetState, jetstream.JetStream) {
	t.Helper()
	settings := fleet.Settings{AckWait: 2 * time.Second}
	_, _, js := fleettest.Fleet(t, settings)
	ctx := context.Background()
	cons, err := fleet.EnsureWorkConsumer(ctx, js, "gpu", settings)
	if err != nil {
		t.Fatal(err)
	}
	st := newFleetState(settings)
	for i := range 2 {
		tk := fleet.Ticket{JobID: "job", Index: i, Pool: "image", Priority: 5, Moves: 1}
		data, _ := json.Marshal(tk)
		ack, err := js.Publish(ctx, fleet.WorkSubject("gpu"), data, jetstream.WithMsgID(tk.PlacementID()))
		if err != nil {
			t.Fatal(err)
		}
		st.hold("gpu", tk, ack.Sequence, time.Now())
	}
	batch, err := cons.Fetch(1, jetstream.FetchMaxWait(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	for range batch.Messages() {
	}
	return &rescuer{log: slog.New(slog.DiscardHandler), js: js, pub: fleet.NewPublisher(js, source)}, st, js
}

// queued returns the tickets in the queue stream, by scene index.
func queued(t *testing.T, js jetstream.JetStream) map[int]fleet.Ticket {
	t.Helper()
	msgs, err := fleet.ReadStream(context.Background(), js, fleet.StreamQueue, fleet.QueuePoolFilter("image"), 1)
	if err != nil {
		t.Fatal(err)
	}
	out := map[int]fleet.Ticket{}
	for _, m := range msgs {
		var tk fleet.Ticket
		if err := json.Unmarshal(m.Data, &tk); err != nil {
			t.Fatal(err)
		}
		out[tk.Index] = tk
	}
	return out
}

func workLeft(t *testing.T, js jetstream.JetStream) uint64 {
	t.Helper()
	s, err := js.Stream(context.Background(), fleet.StreamWork)
	if err != nil {
		t.Fatal(err)
	}
	info, err := s.Info(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	return info.State.Msgs
}

func TestRescueMovesEverySceneOfALostNodeBack(t *testing.T) {
	t.Parallel()
	r, st, js := rescueRig(t)
	r.rescue(context.Background(), st, lostNode{id: "gpu"})

	back := queued(t, js)
	if len(back) != 2 {
		t.Fatalf("%d scenes back in the queue, want 2: %+v", len(back), back)
	}
	taken, waiting := back[0], back[1]
	if taken.Moves != 2 || taken.Requeued != 1 || taken.Lost != 1 || taken.Avoid != "gpu" || len(taken.Failures) != 1 || !strings.Contains(taken.Failures[0].Error, "lost") {
		t.Errorf("the scene its executor had taken came back as %+v; want one more move, an attempt counted as lost with its failure, gpu avoided", taken)
	}
	if waiting.Moves != 2 || waiting.Requeued != 0 || waiting.Lost != 0 || len(waiting.Failures) != 0 {
		t.Errorf("the scene not taken yet came back as %+v; want one more move and no attempt counted", waiting)
	}
	if n := workLeft(t, js); n != 0 {
		t.Errorf("%d scenes left on the lost node's work subject", n)
	}
	if held := len(st.node("gpu").held); held != 0 {
		t.Errorf("the state still counts %d scenes on the lost node", held)
	}
}

func TestRescueOfADrainedNodeMovesOnlyWhatItHasNotTaken(t *testing.T) {
	t.Parallel()
	r, st, js := rescueRig(t)
	r.rescue(context.Background(), st, lostNode{id: "gpu", undeliveredOnly: true})

	back := queued(t, js)
	if _, ok := back[1]; len(back) != 1 || !ok {
		t.Fatalf("queue after rescuing a drained node: %+v; want only scene 1, which its executor had not taken", back)
	}
	if n := workLeft(t, js); n != 1 {
		t.Errorf("%d scenes left on the drained node's work subject, want the one it runs", n)
	}
	if len(st.node("gpu").held) != 1 {
		t.Errorf("the state should still count the scene the drained node runs: %v", st.node("gpu").held)
	}
}
