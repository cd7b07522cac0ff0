package executor

import (
	"context"
	"errors"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// setupGrain is the unit of the setup times reported: nodes in one place, whose
// setup times differ by noise, report the same (none), so that placement does not
// tell them apart by it; a region a round trip of 20 ms or more away shows.
const setupGrain = 20 * time.Millisecond

// setupTook folds the setup time of a scene into n's moving average: from the
// scene's delivery to its prompt going to ComfyUI, that is reading its payload and
// input images from JetStream and uploading the images. Reported as
// NodeStatus.SetupSeconds, in whole setupGrains, it is what a node in another region
// than the NATS hub pays for the distance; the dispatcher adds it to the node's
// estimates.
func (n *node) setupTook(d time.Duration) {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.setup = time.Duration(average(float64(n.setup), float64(d)))
	n.status.SetupSeconds = n.setup.Truncate(setupGrain).Seconds()
}

// seedSetup measures, before n runs its first scene, a read of a scene payload (of a
// scene that does not exist: one round trip to the stream every scene is read from),
// the quickest of three so that a moment of load does not count, as n's setup time,
// so that placement sees the distance to a node far from the hub before that node has
// run anything.
func (e *executor) seedSetup(ctx context.Context, n *node) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	quickest := time.Duration(-1)
	for range 3 {
		start := time.Now()
		_, err := e.payloads.GetLastMsgForSubject(ctx, fleet.ScenePayloadSubject("setup-probe", 0))
		if err != nil && !errors.Is(err, jetstream.ErrMsgNotFound) {
			e.log.Debug("measure the setup time of a node", "node", n.cfg.ID, "err", err)
			return
		}
		if took := time.Since(start); quickest < 0 || took < quickest {
			quickest = took
		}
	}
	n.setupTook(quickest)
}
