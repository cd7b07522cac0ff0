package executor_test

import (
	"context"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

// stallingTransport holds requests until their context ends, as a server too busy
// (or hung) to answer would: /system_stats only, or every request.
type stallingTransport struct {
	base              http.RoundTripper
	stats, everything atomic.Bool
}

func (s *stallingTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	if s.everything.Load() || (s.stats.Load() && strings.HasSuffix(req.URL.Path, "/system_stats")) {
		<-req.Context().Done()
		return nil, req.Context().Err()
	}
	return s.base.RoundTrip(req)
}

// A node slow to answer its probes while its websocket reports the scene it runs is
// busy, not gone: the scene finishes there, at its first attempt.
func TestNodeThatSpeaksIsNotTakenOutForSlowProbes(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	_, node := r.sim(comfysim.Config{Name: "gpu-a"})
	gate := &stallingTransport{base: http.DefaultTransport}
	r.executor("exec-a", gate, node)
	r.awaitOnline(node.ID)
	gate.stats.Store(true)
	// 150 steps of 10 ms: longer than the three missed probes (200 ms each) that
	// take out a silent node.
	r.submit("busy", 150, 0)
	done := r.await(fleet.EventCompleted, 30*time.Second)
	for _, ev := range r.seen() {
		if ev.Type == fleet.EventRetrying {
			t.Fatalf("the scene was retried (%s) though its node spoke all along", ev.Error)
		}
	}
	if done.Attempt != 1 || done.Node != node.ID {
		t.Errorf("completed at attempt %d on %s, want attempt 1 on %s", done.Attempt, done.Node, node.ID)
	}
}

// A node that answers nothing at all is taken out after its missed probes.
func TestSilentNodeIsTakenOut(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	_, node := r.sim(comfysim.Config{Name: "gpu-a"})
	gate := &stallingTransport{base: http.DefaultTransport}
	r.executor("exec-a", gate, node)
	r.awaitOnline(node.ID)
	gate.everything.Store(true)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	nodes, err := r.js.KeyValue(ctx, fleet.BucketNodes)
	if err != nil {
		t.Fatal(err)
	}
	fleettest.Eventually(t, 10*time.Second, func() bool {
		e, err := nodes.Get(ctx, node.ID)
		return err == nil && strings.Contains(string(e.Value()), `"state":"offline"`)
	}, "node %s still not offline after it stopped answering", node.ID)
}

// A work consumer lost with its NATS server (its state is kept in memory) is created
// again, and the node's scenes run.
func TestLostWorkConsumerIsCreatedAgain(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	_, node := r.sim(comfysim.Config{Name: "gpu-a"})
	r.executor("exec-a", nil, node)
	r.awaitOnline(node.ID)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.js.DeleteConsumer(ctx, fleet.StreamWork, fleet.WorkConsumerName(node.ID)); err != nil {
		t.Fatal(err)
	}
	r.submit("after-loss", 5, 0)
	if done := r.await(fleet.EventCompleted, 30*time.Second); done.Node != node.ID {
		t.Errorf("completed on %s, want %s", done.Node, node.ID)
	}
}
