package comfydoor

import (
	"bytes"
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

// TestCatalogReadsANodesAnswerWithoutTheClientsDefaultTimeout reads a node's
// /object_info through a JetStream client whose default timeout has passed before
// any answer can come, as a request without a deadline would on a loaded host after
// 5 s: the read must go by the answer's size, not by that default.
func TestCatalogReadsANodesAnswerWithoutTheClientsDefaultTimeout(t *testing.T) {
	t.Parallel()
	_, nc, js := fleettest.Fleet(t, fleet.Settings{})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	answer := []byte(`{"SaveImage": {"input": {"required": {"images": ["IMAGE", {}]}}, "output": [], "output_node": true}}`)
	store, err := js.ObjectStore(ctx, ObjectInfoStore)
	if err != nil {
		t.Fatal(err)
	}
	info, err := store.PutBytes(ctx, "sim-a", answer)
	if err != nil {
		t.Fatal(err)
	}
	hasty, err := jetstream.New(nc, jetstream.WithDefaultTimeout(time.Nanosecond))
	if err != nil {
		t.Fatal(err)
	}
	hastyStore, err := hasty.ObjectStore(ctx, ObjectInfoStore)
	if err != nil {
		t.Fatal(err)
	}
	c := newCatalog(func(context.Context) (jetstream.ObjectStore, error) { return hastyStore, nil }, slog.New(slog.DiscardHandler))
	c.digests["sim-a"] = info.Digest + "/" + info.NUID
	fi, err := c.get(context.Background())
	if err != nil {
		t.Fatalf("get: %v", err)
	}
	if saved := fi.classes["SaveImage"]; !bytes.Contains(saved, []byte(`"output_node": true`)) {
		t.Errorf("SaveImage = %s, want the node's definition", saved)
	}
}
