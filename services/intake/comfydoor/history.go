package comfydoor

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strconv"

	"github.com/comfyfleet/comfyfleet/pkg/comfyfacade"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// getHistoryOf answers GET /history/{prompt_id}: the prompt's entry once it ended,
// else {}.
func (d *Door) getHistoryOf(w http.ResponseWriter, r *http.Request, c Caller) {
	ctx := r.Context()
	id := r.PathValue("prompt_id")
	rec, err := d.prompts.get(ctx, c.Tenant, id)
	if err != nil {
		d.unavailable(w, "read the history", err)
		return
	}
	out := object{}
	if rec != nil {
		entry, err := d.entry(ctx, rec)
		if err != nil {
			d.unavailable(w, "read the history", err)
			return
		}
		if entry != nil {
			out = append(out, field{rec.PromptID, entry})
		}
	}
	writeJSON(w, http.StatusOK, out)
}

// getHistory answers GET /history: the entries of the tenant's prompts that ended,
// oldest first; with max_items=N, the last N.
func (d *Door) getHistory(w http.ResponseWriter, r *http.Request, c Caller) {
	ctx := r.Context()
	limit := -1
	if s := r.URL.Query().Get("max_items"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil {
			writeServerError(w)
			return
		}
		limit = n
	}
	recs, err := d.prompts.records(ctx, c.Tenant)
	if err != nil {
		d.unavailable(w, "read the history", err)
		return
	}
	slices.SortFunc(recs, func(a, b *record) int { return cmp.Compare(a.rev, b.rev) })
	var entries []field
	for i := len(recs) - 1; i >= 0 && (limit < 0 || len(entries) < limit); i-- {
		entry, err := d.entry(ctx, recs[i])
		if err != nil {
			d.unavailable(w, "read the history", err)
			return
		}
		if entry != nil {
			entries = append(entries, field{recs[i].PromptID, entry})
		}
	}
	slices.Reverse(entries)
	writeJSON(w, http.StatusOK, object(entries))
}

// historyMessages are the messages ComfyUI keeps in a history entry's status.
var historyMessages = []string{"execution_start", "execution_cached", "execution_success", "execution_error", "execution_interrupted"}

// entry is a prompt's history entry, nil while it has not ended, and for a prompt
// cancelled before it started, which ComfyUI deletes from its queue without a trace.
func (d *Door) entry(ctx context.Context, rec *record) (object, error) {
	job, err := d.cfg.Jobs.Get(ctx, rec.Job)
	if errors.Is(err, fleet.ErrJobNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read job %s: %w", rec.Job, err)
	}
	if len(job.Scenes) == 0 || !job.Scenes[0].Status.Terminal() {
		return nil, nil
	}
	scene := job.Scenes[0]
	msgs, err := fleet.ReadStream(ctx, d.cfg.JS, fleet.StreamEvents, fleet.SceneEventSubject(job.ID, 0, "*"), 0)
	if err != nil {
		return nil, fmt.Errorf("read the events of job %s: %w", job.ID, err)
	}
	p := &comfyfacade.Prompt{ID: rec.PromptID, Classes: rec.Classes, Subfolder: job.ID}
	messages := []any{}
	started := false
	for _, m := range msgs {
		ev, err := fleet.DecodeSceneEvent(m.Data)
		if err != nil || ev.Retry != scene.Retries {
			continue
		}
		for _, msg := range p.Apply(ev, 0) {
			if slices.Contains(historyMessages, msg.Type) {
				started = started || msg.Type == "execution_start"
				messages = append(messages, []any{msg.Type, msg.Data})
			}
		}
	}
	if !started && scene.Status == fleet.StatusCancelled {
		return nil, nil
	}
	graph, err := d.graphOf(ctx, job.ID)
	if err != nil {
		return nil, err
	}
	outputs, meta := object{}, object{}
	nodes, byNode := comfyfacade.Outputs(scene.Outputs, job.ID)
	for _, node := range nodes {
		files := object{}
		for _, k := range slices.Sorted(maps.Keys(byNode[node])) {
			files = append(files, field{k, byNode[node][k]})
		}
		outputs = append(outputs, field{node, files})
		meta = append(meta, field{node, object{{"node_id", node}, {"display_node", node}, {"parent_node", nil}, {"real_node_id", node}}})
	}
	ok := scene.Status == fleet.StatusSucceeded
	status := "error"
	if ok {
		status = "success"
	}
	return object{
		{"prompt", []any{rec.number(), rec.PromptID, graph, rec.Extra, rec.Outputs}},
		{"outputs", outputs},
		{"status", object{{"status_str", status}, {"completed", ok}, {"messages", messages}}},
		{"meta", meta},
	}, nil
}
