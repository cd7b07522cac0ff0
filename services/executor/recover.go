package executor

import (
	"context"
	"log/slog"
	"strconv"

	"github.com/comfyfleet/comfyfleet/pkg/comfy"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// promptID is the ComfyUI prompt id of an attempt of a scene: the same on every
// executor, so that a later attempt can find an earlier one's prompt.
func promptID(t fleet.Ticket, attempt int) string {
	return comfy.PromptID(t.JobID, strconv.Itoa(t.Index), strconv.Itoa(attempt))
}

// execute runs attempt of the scene on n. A redelivered scene is first looked for on
// n, since the executor that had it may have been lost after ComfyUI took its prompt:
// an earlier attempt's prompt that finished there gives its outputs without
// rendering again, and one still queued or running is followed instead of submitting
// the graph anew.
func (e *executor) execute(ctx context.Context, n *node, item scene, attempt int, log *slog.Logger,
	onProgress func(comfy.Progress)) (comfy.Result, error) {
	switch id, done := earlier(ctx, n, item, attempt, log); {
	case done != nil:
		log.Info("an earlier attempt's prompt finished on this node; taking its outputs", "prompt_id", id)
		return comfy.Result{PromptID: id, Outputs: done.Outputs, Cached: done.AllCached()}, nil
	case id != "":
		log.Info("an earlier attempt's prompt is still on this node; following it", "prompt_id", id)
		// Its messages go to the earlier executor's socket: it counts as started now.
		onProgress(comfy.Progress{PromptID: id})
		return n.client.Await(ctx, id, onProgress)
	}
	return e.runOnNode(ctx, n, item, promptID(item.Ticket, attempt), onProgress)
}

// earlier finds on n the latest earlier attempt's prompt of the scene's run that is
// still queued or running (its id and a nil entry), else the latest that succeeded
// (its id and history entry). A node that cannot be asked shows nothing: submitting
// anew then meets the same trouble and reports it.
func earlier(ctx context.Context, n *node, item scene, attempt int, log *slog.Logger) (string, *comfy.HistoryEntry) {
	first := item.AttemptBase + 1
	if attempt <= first {
		return "", nil
	}
	q, err := n.client.Queue(ctx)
	if err != nil {
		log.Debug("cannot look for earlier attempts on the node", "err", err)
		return "", nil
	}
	for k := attempt - 1; k >= first; k-- {
		if id := promptID(item.Ticket, k); q.Contains(id) {
			return id, nil
		}
	}
	// A prompt leaves the queue in the same step that records it in history, so
	// one that left since the queue was read is found here.
	for k := attempt - 1; k >= first; k-- {
		id := promptID(item.Ticket, k)
		h, err := n.client.History(ctx, id)
		if err != nil {
			log.Debug("cannot look for earlier attempts on the node", "err", err)
			return "", nil
		}
		if h != nil && h.Err() == nil {
			return id, h
		}
	}
	return "", nil
}
