package intake

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"time"

	"github.com/danielgtaylor/huma/v2"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
	"github.com/comfyfleet/comfyfleet/pkg/workflow"
)

func (in *intake) addDeadLetterRoutes(a huma.API) {
	huma.Register(a, secured(tenancy.RoleRead, huma.Operation{
		OperationID: "list-dead-letters",
		Method:      http.MethodGet,
		Path:        "/v1/deadletters",
		Summary:     "List the scenes that failed for good",
		Description: "Each failed scene with every attempt's node and error, newest first. A retried scene leaves the list.",
		Tags:        []string{"jobs"},
	}), in.listDeadLetters)
	huma.Register(a, secured(tenancy.RoleSubmit, huma.Operation{
		OperationID:   "retry-scene",
		Method:        http.MethodPost,
		Path:          "/v1/jobs/{id}/scenes/{index}/retry",
		Summary:       "Run a failed scene again",
		Description:   "Queues the scene again with fresh attempts; the job runs again and calls back when it ends anew.",
		Tags:          []string{"jobs"},
		DefaultStatus: http.StatusAccepted,
	}), in.retryScene)
}

type deadLettersOutput struct {
	Body struct {
		DeadLetters []fleet.DeadLetter `json:"dead_letters"`
	}
}

func (in *intake) listDeadLetters(ctx context.Context, _ *struct{}) (*deadLettersOutput, error) {
	dead, err := readAll[fleet.DeadLetter](ctx, in.dead)
	if err != nil {
		return nil, huma.Error503ServiceUnavailable("cannot read dead letters now; retry", err)
	}
	out := &deadLettersOutput{}
	out.Body.DeadLetters = make([]fleet.DeadLetter, 0, len(dead))
	tenant := caller(ctx).Tenant
	for _, dl := range dead {
		if dl.Tenant == tenant {
			out.Body.DeadLetters = append(out.Body.DeadLetters, dl)
		}
	}
	slices.SortFunc(out.Body.DeadLetters, func(a, b fleet.DeadLetter) int { return b.FailedAt.Compare(a.FailedAt) })
	return out, nil
}

type scenePath struct {
	ID    string `path:"id" doc:"Job id."`
	Index int    `path:"index" minimum:"0" doc:"Scene index."`
}

func (in *intake) retryScene(ctx context.Context, input *scenePath) (*jobOutput, error) {
	var item fleet.WorkItem
	job, err := in.jobs.Update(ctx, input.ID, func(j *fleet.Job) error {
		if j.Tenant != caller(ctx).Tenant {
			return fleet.ErrJobNotFound
		}
		if input.Index >= len(j.Scenes) {
			return huma.Error404NotFound(fmt.Sprintf("job %s has no scene %d", j.ID, input.Index))
		}
		attempts := j.Scenes[input.Index].Attempts
		retry, err := j.Reopen(input.Index, time.Now().UTC())
		if err != nil {
			return err
		}
		s := j.Scenes[input.Index]
		graph, err := in.render(s.Spec)
		if err != nil {
			return err
		}
		item = fleet.WorkItem{
			JobID: j.ID, Index: s.Index, Tenant: j.Tenant, Priority: j.Priority, Pool: s.Pool, Workflow: s.Spec.Workflow,
			Graph: graph, SubmittedAt: s.QueuedAt, Retry: retry, AttemptBase: attempts, Timeout: s.Spec.Timeout(),
			Inputs: s.Spec.Inputs,
		}
		return nil
	})
	var status huma.StatusError
	switch {
	case errors.Is(err, fleet.ErrJobNotFound):
		return nil, huma.Error404NotFound("no job " + input.ID)
	case errors.Is(err, fleet.ErrNotRetryable):
		return nil, huma.Error409Conflict(err.Error())
	case errors.As(err, &status):
		return nil, err
	case err != nil:
		return nil, huma.Error503ServiceUnavailable("cannot update the job now; retry", err)
	}
	if err := in.pub.JSON(ctx, fleet.SubmitSubject(job.ID, input.Index), item.MsgID(), item); err != nil {
		return nil, huma.Error503ServiceUnavailable("cannot queue the scene now; retry the call", err)
	}
	if err := in.dead.Delete(ctx, fleet.DeadLetterKey(job.ID, input.Index)); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		in.log.Warn("remove dead letter", "job", job.ID, "scene", input.Index, "err", err)
	}
	in.log.Info("scene retried", "job", job.ID, "scene", input.Index, "retry", item.Retry)
	return &jobOutput{Location: in.cfg.PublicURL + api.JobPath(job.ID), Body: api.FromJob(job, in.cfg.PublicURL)}, nil
}

// render returns the graph of a recorded scene: its raw graph, or its template
// rendered with its parameters again.
func (in *intake) render(spec fleet.SceneSpec) (fleet.Graph, error) {
	if spec.Graph != nil {
		return spec.Graph, nil
	}
	tpl, ok := in.catalog.Get(spec.Workflow)
	if !ok {
		return nil, huma.Error409Conflict(fmt.Sprintf("workflow %q is no longer offered", spec.Workflow))
	}
	g, err := tpl.Render(spec.Params)
	var pe *workflow.ParamError
	if errors.As(err, &pe) {
		return nil, huma.Error409Conflict("the scene's parameters no longer fit its workflow: " + pe.Error())
	}
	return g, err
}
