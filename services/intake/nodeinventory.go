package intake

import (
	"context"
	"encoding/json"
	"errors"
	"maps"
	"slices"
	"time"

	"github.com/danielgtaylor/huma/v2"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/inventory"
)

// refreshTimeout bounds a refresh: longer than the executor's own bound on reading
// a node's /object_info.
const refreshTimeout = 45 * time.Second

// inventoryOf returns node id's inventory in short, as its executor last published
// it, nil if it has not. Its errors are huma errors.
func (in *intake) inventoryOf(ctx context.Context, id string) (*NodeInventory, error) {
	e, err := in.inventories.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, huma.Error503ServiceUnavailable("cannot read the node's inventory now; retry", err)
	}
	var inv inventory.Inventory
	if err := json.Unmarshal(e.Value(), &inv); err != nil {
		in.log.Warn("undecodable inventory", "node", id, "err", err)
		return nil, nil
	}
	out := &NodeInventory{Version: inv.Version, Classes: len(inv.Classes), Models: make([]ModelFiles, 0, len(inv.Models)), ChangedAt: e.Created().UTC()}
	for _, m := range inv.Models {
		classes := slices.Sorted(maps.Keys(m.Inputs))
		class := ""
		if len(classes) > 0 {
			class = classes[0]
		}
		out.Models = append(out.Models, ModelFiles{Input: m.Kind, Kind: inventory.ModelKind(class, m.Kind), Files: m.Files})
	}
	return out, nil
}

// refreshNode asks the executor driving a node to read the node's inventory again,
// and answers the node with it.
func (in *intake) refreshNode(ctx context.Context, input *nodeIDInput) (*nodeOutput, error) {
	cfg, _, err := in.registered(ctx, input.ID)
	if err != nil {
		return nil, err
	}
	ask, cancel := context.WithTimeout(ctx, refreshTimeout)
	defer cancel()
	reply, err := fleet.RefreshNode(ask, in.nc, cfg.ID)
	switch {
	case errors.Is(err, fleet.ErrNoExecutor):
		return nil, huma.Error503ServiceUnavailable("no executor drives node " + cfg.ID + " now; its inventory is read when one does")
	case err != nil:
		return nil, huma.Error503ServiceUnavailable("the executor driving node "+cfg.ID+" did not answer; retry", err)
	case reply.Error != "":
		return nil, huma.Error502BadGateway("cannot read the inventory of node " + cfg.ID + ": " + reply.Error)
	}
	in.log.Info("node inventory refreshed", "node", cfg.ID, "version", reply.Version, "changed", reply.Changed)
	// The executor published before it answered; a replica of the bucket may lag a
	// moment behind.
	var n Node
	for range 20 {
		if n, err = in.viewOf(ctx, *cfg); err != nil {
			return nil, err
		}
		if n.Inventory != nil && n.Inventory.Version == reply.Version {
			break
		}
		fleet.Pause(ctx, 50*time.Millisecond)
	}
	return &nodeOutput{Body: n}, nil
}
