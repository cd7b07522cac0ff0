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
	job, err := in.tenantJob(ctx, input.ID)
	if err != nil {
		return nil, err
	}
	if input.Index >= len(job.Scenes) {
		return nil, huma.Error404NotFound(fmt.Sprintf("job %s has no scene %d", job.ID, input.Index))
	}
	attempts := job.Scenes[input.Index].Attempts
	now := time.Now().UTC()
	retry, err := job.Reopen(input.Index, now)
	if errors.Is(err, fleet.ErrNotRetryable) {
		return nil, huma.Error409Conflict(err.Error())
	}
	if err != nil {
		return nil, huma.Error404NotFound(err.Error())
	}
	cmd := fleet.SceneRetry{JobID: job.ID, Index: input.Index, Retry: retry, AttemptBase: attempts, At: now}
	if err := in.pub.JSON(ctx, fleet.SubmitRetrySubject(job.ID, input.Index), cmd.MsgID(), cmd); err != nil {
		return nil, huma.Error503ServiceUnavailable("cannot queue the scene now; retry the call", err)
	}
	if err := in.dead.Delete(ctx, fleet.DeadLetterKey(job.ID, input.Index)); err != nil && !errors.Is(err, jetstream.ErrKeyNotFound) {
		in.log.Warn("remove dead letter", "job", job.ID, "scene", input.Index, "err", err)
	}
	in.log.Info("scene retried", "job", job.ID, "scene", input.Index, "retry", retry)
	return &jobOutput{Location: in.cfg.PublicURL + api.JobPath(job.ID), Body: in.jobView(ctx, job)}, nil
}
