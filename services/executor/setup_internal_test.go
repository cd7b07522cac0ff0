package executor

import (
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// TestSetupTimeIsAMovingAverageInGrains: a node's setup times are averaged, and
// reported in whole grains of 20 ms, so that nodes in one place report none.
func TestSetupTimeIsAMovingAverageInGrains(t *testing.T) {
	t.Parallel()
	near := newNode(fleet.NodeConfig{ID: "near"}, nil, "ex")
	for _, d := range []time.Duration{3 * time.Millisecond, 12 * time.Millisecond, time.Millisecond} {
		near.setupTook(d)
	}
	if got := near.snapshot().SetupSeconds; got != 0 {
		t.Errorf("a node whose setups take a few milliseconds reports %gs, want 0", got)
	}
	far := newNode(fleet.NodeConfig{ID: "far", Region: "beijing"}, nil, "ex")
	far.setupTook(105 * time.Millisecond)
	if st := far.snapshot(); st.SetupSeconds != 0.1 || st.Region != "beijing" {
		t.Errorf("a node 105 ms away reports %gs in %q, want 0.1 s in beijing", st.SetupSeconds, st.Region)
	}
	far.setupTook(205 * time.Millisecond)
	// 0.3×205 + 0.7×105 = 135 ms
	if got := far.snapshot().SetupSeconds; got != 0.12 {
		t.Errorf("after 105 and 205 ms the node reports %gs, want 0.12 (a moving average in 20 ms grains)", got)
	}
}
