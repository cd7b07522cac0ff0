package workflow_test

import (
	"context"
	"encoding/json"
	"os"
	"slices"
	"sync"
	"testing"
	"testing/fstest"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/workflow"
)

func openStore(t *testing.T) (*workflow.Store, jetstream.KeyValue) {
	t.Helper()
	_, _, js := fleettest.Fleet(t, fleet.Settings{})
	ctx := context.Background()
	s, err := workflow.OpenStore(ctx, js)
	if err != nil {
		t.Fatal(err)
	}
	kv, err := js.KeyValue(ctx, fleet.BucketWorkflows)
	if err != nil {
		t.Fatal(err)
	}
	return s, kv
}

func TestSeedKeepsStoredVersions(t *testing.T) {
	t.Parallel()
	s, kv := openStore(t)
	ctx := context.Background()
	mine := `{"name": "demo", "description": "the admin's", "graph": {"1": {"class_type": "SaveImage", "inputs": {}}}}`
	if _, err := kv.Put(ctx, "demo", []byte(mine)); err != nil {
		t.Fatal(err)
	}
	seeded, err := s.Seed(ctx, os.DirFS("../../workflows"))
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{"img2img", "img2video", "txt2img", "txt2video"}; !slices.Equal(seeded, want) {
		t.Errorf("seeded %v, want %v", seeded, want)
	}
	e, err := kv.Get(ctx, "demo")
	if err != nil {
		t.Fatal(err)
	}
	if string(e.Value()) != mine {
		t.Errorf("seeding replaced the stored demo with %s", e.Value())
	}
	if again, err := s.Seed(ctx, os.DirFS("../../workflows")); err != nil || len(again) != 0 {
		t.Errorf("second Seed = %v, %v; want nothing seeded", again, err)
	}
}

// follow runs Store.Follow into a new catalog until the test ends, returning once
// the catalog holds the bucket's snapshot.
func follow(t *testing.T, s *workflow.Store) *workflow.Catalog {
	t.Helper()
	c := workflow.NewCatalog()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		if err := s.Follow(ctx, c, fleettest.Logger(t), func() { close(ready) }); err != nil {
			t.Errorf("Follow: %v", err)
		}
	})
	t.Cleanup(func() { cancel(); wg.Wait() })
	select {
	case <-ready:
	case <-time.After(10 * time.Second):
		t.Fatal("Follow never reported its snapshot")
	}
	return c
}

func TestFollowMirrorsTheBucket(t *testing.T) {
	t.Parallel()
	s, kv := openStore(t)
	ctx := context.Background()
	if _, err := s.Seed(ctx, fstest.MapFS{
		"a.json": {Data: []byte(`{"name": "a", "graph": {"1": {"class_type": "SaveImage", "inputs": {}}}}`)},
		"b.json": {Data: []byte(`{"name": "b", "graph": {"1": {"class_type": "SaveImage", "inputs": {}}}}`)},
	}); err != nil {
		t.Fatal(err)
	}
	if err := kv.Delete(ctx, "b"); err != nil {
		t.Fatal(err)
	}
	c := follow(t, s)
	if got := c.Names(); !slices.Equal(got, []string{"a"}) {
		t.Fatalf("after the snapshot the catalog holds %v, want [a]", got)
	}

	tpl, err := workflow.Parse([]byte(`{"name": "c", "pool": "video", "graph": {"1": {"class_type": "SaveImage", "inputs": {}}}}`))
	if err != nil {
		t.Fatal(err)
	}
	if _, created, err := s.Put(ctx, tpl); err != nil || !created {
		t.Fatalf("Put(c) created=%v, %v", created, err)
	}
	if _, err := kv.Put(ctx, "a", []byte(`{"name": "a", "description": "v2", "graph": {"1": {"class_type": "SaveImage", "inputs": {}}}}`)); err != nil {
		t.Fatal(err)
	}
	if _, err := kv.Put(ctx, "a", []byte(`{"name": "a", "graph": {}}`)); err != nil {
		t.Fatal(err)
	}
	if err := kv.Delete(ctx, "c"); err != nil {
		t.Fatal(err)
	}
	bad, _ := json.Marshal(map[string]any{"name": "d", "graph": map[string]any{}})
	if _, err := kv.Put(ctx, "d", bad); err != nil {
		t.Fatal(err)
	}
	marker := `{"name": "z", "graph": {"1": {"class_type": "SaveImage", "inputs": {}}}}`
	if _, err := kv.Put(ctx, "z", []byte(marker)); err != nil {
		t.Fatal(err)
	}
	fleettest.Eventually(t, 10*time.Second, func() bool { _, ok := c.Get("z"); return ok }, "the catalog never saw z")
	if got := c.Names(); !slices.Equal(got, []string{"a", "z"}) {
		t.Errorf("catalog holds %v, want [a z]: c deleted, d invalid", got)
	}
	if a, _ := c.Get("a"); a.Description != "v2" {
		t.Errorf("a is %+v, want v2 kept over the invalid revision after it", a)
	}
}

func TestSetKeepsTheLaterRevision(t *testing.T) {
	t.Parallel()
	c := workflow.NewCatalog()
	v := func(desc string) *workflow.Template { return &workflow.Template{Name: "a", Description: desc} }
	c.Set(v("rev 5"), 5)
	c.Set(v("rev 4"), 4)
	if a, _ := c.Get("a"); a.Description != "rev 5" {
		t.Errorf("catalog holds %q after an older revision came late, want rev 5", a.Description)
	}
	c.Set(v("rev 6"), 6)
	if a, _ := c.Get("a"); a.Description != "rev 6" {
		t.Errorf("catalog holds %q, want rev 6", a.Description)
	}
}
