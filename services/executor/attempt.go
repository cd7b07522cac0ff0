package executor

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/comfy"
)

// errNodeLost ends an attempt whose node stopped answering its probes.
var errNodeLost = errors.New("node stopped answering during the scene")

// timeoutError ends an attempt that ran longer than its scene's timeout.
type timeoutError struct{ after time.Duration }

func (e *timeoutError) Error() string { return fmt.Sprintf("timed out after %gs", e.after.Seconds()) }

// watch ends the attempt of item on n early, through cancel, when the node is found
// dead, when the scene's timeout passes, or when the scene is cancelled; the cause
// tells which. Call the returned function once the attempt is over.
func (e *executor) watch(ctx context.Context, cancel context.CancelCauseFunc, n *node, item scene) (stop func()) {
	var timer *time.Timer
	if item.Timeout > 0 {
		timer = time.AfterFunc(item.Timeout, func() { cancel(&timeoutError{after: item.Timeout}) })
	}
	lost := n.lost()
	var wg sync.WaitGroup
	wg.Go(func() {
		select {
		case <-lost:
			cancel(errNodeLost)
		case <-ctx.Done():
		}
	})
	return func() {
		if timer != nil {
			timer.Stop()
		}
		cancel(nil)
		wg.Wait()
	}
}

// attemptError is the error of an attempt that failed with err: the node's loss or
// the timeout when one of them ended it, else err itself.
func attemptError(runCtx context.Context, n *node, err error) error {
	cause := context.Cause(runCtx)
	if errors.Is(cause, errNodeLost) {
		return fmt.Errorf("node %s: %w", n.cfg.ID, errNodeLost)
	}
	if te, ok := errors.AsType[*timeoutError](cause); ok {
		return te
	}
	return err
}

// freeAfterOOM frees the memory of a node whose attempt ran out of it, so that the
// scenes after it do not.
func (e *executor) freeAfterOOM(ctx context.Context, n *node, err error) {
	ee, ok := errors.AsType[*comfy.ExecutionError](err)
	if !ok || !ee.OutOfMemory() {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, e.cfg.HeartbeatInterval)
	defer cancel()
	if err := n.client.Free(ctx); err != nil {
		e.log.Warn("free memory after running out of it", "node", n.cfg.ID, "err", err)
	}
}
