package comfydoor

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
)

// waiting is a prompt that has not ended, and where its job stands.
type waiting struct {
	rec     *record
	running bool
}

// waitingPrompts returns the tenant's prompts that have not ended, by number. It
// drops the markers of those it finds ended.
func (d *Door) waitingPrompts(ctx context.Context, tenant string) ([]waiting, error) {
	ms, err := d.prompts.markers(ctx, tenant)
	if err != nil {
		return nil, err
	}
	var out []waiting
	for _, m := range ms {
		rec, err := d.prompts.recordOf(ctx, m)
		if err != nil {
			return nil, err
		}
		if rec == nil {
			continue
		}
		st, _, err := d.cfg.Jobs.State(ctx, rec.Job)
		if errors.Is(err, fleet.ErrJobNotFound) {
			// Committed and not recorded yet: the router records it in a moment.
			out = append(out, waiting{rec: rec})
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("read the state of job %s: %w", rec.Job, err)
		}
		if st.Status.Terminal() {
			if err := d.prompts.unmark(ctx, tenant, rec.PromptID); err != nil {
				d.log.Debug("unmark an ended prompt", "prompt_id", rec.PromptID, "err", err)
			}
			continue
		}
		out = append(out, waiting{rec: rec, running: st.Status == fleet.StatusRunning})
	}
	slices.SortFunc(out, func(a, b waiting) int { return cmp.Compare(a.rec.order(), b.rec.order()) })
	return out, nil
}

// getPrompt answers GET /prompt: how many of the tenant's prompts wait or run.
func (d *Door) getPrompt(w http.ResponseWriter, r *http.Request, c Caller) {
	open, err := d.waitingPrompts(r.Context(), c.Tenant)
	if err != nil {
		d.unavailable(w, "read the queue", err)
		return
	}
	writeJSON(w, http.StatusOK, object{{"exec_info", object{{"queue_remaining", len(open)}}}})
}

// getQueue answers GET /queue: the tenant's running prompts and those waiting, each
// as [number, prompt_id, prompt, extra_data, outputs_to_execute].
func (d *Door) getQueue(w http.ResponseWriter, r *http.Request, c Caller) {
	ctx := r.Context()
	open, err := d.waitingPrompts(ctx, c.Tenant)
	if err != nil {
		d.unavailable(w, "read the queue", err)
		return
	}
	running, pending := []any{}, []any{}
	for _, p := range open {
		graph, err := d.graphOf(ctx, p.rec.Job)
		if err != nil {
			d.unavailable(w, "read the queue", err)
			return
		}
		item := []any{p.rec.number(), p.rec.PromptID, graph, p.rec.Extra, p.rec.Outputs}
		if p.running {
			running = append(running, item)
		} else {
			pending = append(pending, item)
		}
	}
	writeJSON(w, http.StatusOK, object{{"queue_running", running}, {"queue_pending", pending}})
}

// graphOf returns the graph of a door job's scene as stored with it.
func (d *Door) graphOf(ctx context.Context, job string) (json.RawMessage, error) {
	stream, err := d.cfg.JS.Stream(ctx, fleet.StreamScenes)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", fleet.StreamScenes, err)
	}
	msg, err := stream.GetLastMsgForSubject(ctx, fleet.ScenePayloadSubject(job, 0))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return json.RawMessage("{}"), nil
	}
	if err != nil {
		return nil, fmt.Errorf("read the graph of job %s: %w", job, err)
	}
	var p struct {
		Graph json.RawMessage `json:"graph"`
	}
	if err := json.Unmarshal(msg.Data, &p); err != nil || len(p.Graph) == 0 {
		return json.RawMessage("{}"), nil
	}
	return p.Graph, nil
}

// postQueue answers POST /queue: {"delete": [prompt_id, …]} cancels those of the
// tenant's prompts that have not started, {"clear": true} all that have not.
func (d *Door) postQueue(w http.ResponseWriter, r *http.Request, c Caller) {
	var body struct {
		Delete []string        `json:"delete"`
		Clear  json.RawMessage `json:"clear"`
	}
	if !readJSONBody(w, r, &body) {
		return
	}
	ctx := r.Context()
	var targets []*record
	if pyjson.Truthy(body.Clear) {
		open, err := d.waitingPrompts(ctx, c.Tenant)
		if err != nil {
			d.unavailable(w, "read the queue", err)
			return
		}
		for _, p := range open {
			if !p.running {
				targets = append(targets, p.rec)
			}
		}
	}
	for _, id := range body.Delete {
		rec, err := d.prompts.get(ctx, c.Tenant, id)
		if err != nil {
			d.unavailable(w, "read the queue", err)
			return
		}
		if rec != nil {
			targets = append(targets, rec)
		}
	}
	if err := d.cancel(ctx, targets, fleet.StatusQueued); err != nil {
		d.unavailable(w, "delete from the queue", err)
		return
	}
	writeBare(w, http.StatusOK)
}

// postInterrupt answers POST /interrupt: it cancels the running prompt named by
// prompt_id, or else the running prompts of client_id (an addition of the door), or
// else every running prompt of the tenant, as ComfyUI interrupts whatever runs.
func (d *Door) postInterrupt(w http.ResponseWriter, r *http.Request, c Caller) {
	var body struct {
		PromptID string `json:"prompt_id"`
		ClientID string `json:"client_id"`
	}
	if !readJSONBody(w, r, &body) {
		return
	}
	ctx := r.Context()
	var targets []*record
	if body.PromptID != "" {
		rec, err := d.prompts.get(ctx, c.Tenant, body.PromptID)
		if err != nil {
			d.unavailable(w, "read the prompt", err)
			return
		}
		if rec != nil {
			targets = append(targets, rec)
		}
	} else {
		open, err := d.waitingPrompts(ctx, c.Tenant)
		if err != nil {
			d.unavailable(w, "read the queue", err)
			return
		}
		for _, p := range open {
			if p.running && (body.ClientID == "" || p.rec.ClientID == body.ClientID) {
				targets = append(targets, p.rec)
			}
		}
	}
	if err := d.cancel(ctx, targets, fleet.StatusRunning); err != nil {
		d.unavailable(w, "interrupt", err)
		return
	}
	writeBare(w, http.StatusOK)
}

// cancel cancels the jobs of those prompts whose scene is in state only.
func (d *Door) cancel(ctx context.Context, prompts []*record, only fleet.Status) error {
	for _, rec := range prompts {
		job, err := d.cfg.Jobs.Get(ctx, rec.Job)
		if errors.Is(err, fleet.ErrJobNotFound) {
			continue
		}
		if err != nil {
			return fmt.Errorf("read job %s: %w", rec.Job, err)
		}
		if len(job.Scenes) == 0 || job.Scenes[0].Status != only {
			continue
		}
		if err := d.cfg.Cancel(ctx, job); err != nil {
			return fmt.Errorf("cancel job %s: %w", rec.Job, err)
		}
		d.log.Debug("prompt cancelled", "prompt_id", rec.PromptID, "job", rec.Job, "was", only)
	}
	return nil
}

// readJSONBody decodes an optional JSON body into v, as ComfyUI's handlers read
// theirs; a body that is not JSON is answered with a 500 and false.
func readJSONBody(w http.ResponseWriter, r *http.Request, v any) bool {
	body, err := readBody(w, r, 1<<20)
	if err != nil {
		return false
	}
	if len(body) == 0 {
		return true
	}
	if err := json.Unmarshal(body, v); err != nil {
		writeServerError(w)
		return false
	}
	return true
}
