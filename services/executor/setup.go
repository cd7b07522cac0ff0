package executor

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// setupTook folds the setup time of a scene into n's moving average: from the
// scene's delivery to its prompt going to ComfyUI, that is reading its payload and
// input images from JetStream and uploading the images. Reported as
// NodeStatus.SetupSeconds, it is what a node in another region than the NATS hub
// pays for the distance; the dispatcher adds it to the node's estimates.
func (n *node) setupTook(d time.Duration) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.status.SetupSeconds = average(n.status.SetupSeconds, d.Seconds())
}

// seedSetup measures, before n runs its first scene, one read of a scene payload
// (of a scene that does not exist: one round trip to the stream every scene is read
// from) as n's setup time, so that placement sees the distance to a node far from
// the hub before that node has run anything.
func (e *executor) seedSetup(ctx context.Context, n *node) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	start := time.Now()
	_, err := e.payloads.GetLastMsgForSubject(ctx, fleet.ScenePayloadSubject("setup-probe", 0))
	if err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
		e.log.Debug("measure the setup time of a node", "node", n.cfg.ID, "err", err)
		return
	}
	n.setupTook(time.Since(start))
}
