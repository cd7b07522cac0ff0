package executor_test

import (
	"context"
	"encoding/json"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/executor"
)

// TestNodesHaveTheExecutorsRegion runs an executor of the region shenzhen with a node
// that names no region and one that names beijing: the first is registered in
// shenzhen, the second keeps its own, both report their region, and a scene runs.
// (The multi-region test in services/comfyfleet shows the setup times of far nodes.)
func TestNodesHaveTheExecutorsRegion(t *testing.T) {
	t.Parallel()
	r := newRig(t)
	_, local := r.sim(comfysim.Config{Name: "sz-1"})
	_, far := r.sim(comfysim.Config{Name: "bj-1"})
	far.Region = "beijing"
	cfg := executor.Config{Conn: r.nc, Settings: r.settings, Nodes: []fleet.NodeConfig{local, far}, Name: "ex-sz", Region: "shenzhen",
		HeartbeatInterval: 100 * time.Millisecond, Logger: fleettest.Logger(t)}
	r.wg.Go(func() {
		if err := executor.Run(r.ctx, cfg); err != nil {
			t.Errorf("executor: %v", err)
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	registry, err := fleet.OpenRegistry(ctx, r.js)
	if err != nil {
		t.Fatal(err)
	}
	nodes, err := r.js.KeyValue(ctx, fleet.BucketNodes)
	if err != nil {
		t.Fatal(err)
	}
	status := func(id string) fleet.NodeStatus {
		var st fleet.NodeStatus
		if e, err := nodes.Get(ctx, id); err == nil {
			_ = json.Unmarshal(e.Value(), &st)
		}
		return st
	}
	want := map[string]string{"sz-1": "shenzhen", "bj-1": "beijing"}
	fleettest.Eventually(t, 10*time.Second, func() bool {
		for id, region := range want {
			cfg, _, err := registry.Get(ctx, id)
			if st := status(id); err != nil || cfg.Region != region || st.Region != region {
				return false
			}
		}
		return true
	}, "the nodes are not registered and reported in their regions")

	r.awaitOnline("sz-1", "bj-1")
	r.submit("job-setup", 5, 0)
	r.await(fleet.EventCompleted, 20*time.Second)
	if invalid := (executor.Config{Conn: r.nc, Nodes: []fleet.NodeConfig{local}, Region: "south china"}); executor.Run(ctx, invalid) == nil {
		t.Error("an executor of the region \"south china\" started")
	}
}
