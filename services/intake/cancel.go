package intake

import (
	"context"
	"net/http"
	"time"

	"github.com/danielgtaylor/huma/v2"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
)

// addControlRoutes registers the routes that steer and follow a running job.
func (in *intake) addControlRoutes(a huma.API) {
	huma.Register(a, secured(tenancy.RoleSubmit, huma.Operation{
		OperationID: "cancel-job",
		Method:      http.MethodPost,
		Path:        "/v1/jobs/{id}/cancel",
		Summary:     "Cancel a job",
		Description: "Every scene that has not ended is cancelled: queued scenes never start, running ones are interrupted on their ComfyUI node within a second. " +
			"The job then becomes cancelled and is POSTed to its callback_url as job.cancelled. " +
			"The answer shows the job with the cancellation applied; a finished job cannot be cancelled (409).",
		Tags:          []string{"jobs"},
		DefaultStatus: http.StatusAccepted,
		Errors:        []int{http.StatusNotFound, http.StatusConflict},
	}), in.cancelJob)
	in.addEventRoutes(a)
}

// cancelJob publishes a cancelled event for each scene of the job that has not ended.
// Those events are the cancellation: the notifier's tracker folds them into the job's
// state, the dispatcher drops the scenes still queued, and
// executors stop the attempts they run and drop the scenes they are handed later.
func (in *intake) cancelJob(ctx context.Context, input *jobIDInput) (*cancelOutput, error) {
	job, err := in.tenantJob(ctx, input.ID)
	if err != nil {
		return nil, err
	}
	if job.Status.Terminal() {
		return nil, huma.Error409Conflict("job " + job.ID + " has already ended: " + string(job.Status))
	}
	if err := in.cancelScenes(ctx, job); err != nil {
		return nil, huma.Error503ServiceUnavailable("cannot cancel the job's scenes now; retry", err)
	}
	return &cancelOutput{Location: in.cfg.PublicURL + api.JobPath(job.ID), Body: in.jobView(ctx, job)}, nil
}

// cancelScenes cancels every scene of job that has not ended and applies the
// cancellations to job.
func (in *intake) cancelScenes(ctx context.Context, job *fleet.Job) error {
	ctx, span := tracer.Start(ctx, "cancel job", trace.WithAttributes(attribute.String("comfyfleet.job", job.ID)))
	defer span.End()
	events := fleet.CancelEvents(job, time.Now().UTC())
	if err := in.pub.SceneEvents(ctx, events); err != nil {
		return err
	}
	for _, ev := range events {
		job.Apply(ev)
	}
	in.log.Info("job cancelled", "job", job.ID, "scenes", len(events))
	return nil
}

type cancelOutput struct {
	Location string `header:"Location" doc:"URL of the job."`
	Body     api.Job
}
