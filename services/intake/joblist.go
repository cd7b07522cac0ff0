package intake

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/danielgtaylor/huma/v2"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
)

// addJobListRoutes registers the job list, job deletion and the queue summary.
func (in *intake) addJobListRoutes(a huma.API) {
	huma.Register(a, secured(tenancy.RoleRead, huma.Operation{
		OperationID: "list-jobs",
		Method:      http.MethodGet,
		Path:        "/v1/jobs",
		Summary:     "List jobs",
		Description: "The jobs of the key's tenant (an admin key may name another), newest first, a page at a time: " +
			"pass next_cursor as cursor for the next page. Filters: status, and since/until on the creation time.",
		Tags: []string{"jobs"},
	}), in.listJobs)
	huma.Register(a, secured(tenancy.RoleSubmit, huma.Operation{
		OperationID: "delete-job",
		Method:      http.MethodDelete,
		Path:        "/v1/jobs/{id}",
		Summary:     "Delete a job, its inputs and its outputs",
		Description: "Removes the job and everything of it: its input images, its outputs, its events and dead letters; it answers 404 afterwards. " +
			"A job that has not ended answers 409, unless cancel=true: it is then cancelled first, as POST /v1/jobs/{id}/cancel does, and deleted.",
		Tags:          []string{"jobs"},
		DefaultStatus: http.StatusNoContent,
		Errors:        []int{http.StatusNotFound, http.StatusConflict},
	}), in.deleteJob)
	huma.Register(a, secured(tenancy.RoleRead, huma.Operation{
		OperationID: "get-queues",
		Method:      http.MethodGet,
		Path:        "/v1/queues",
		Summary:     "Queue depths and throughput",
		Description: "The scenes waiting per pool (by priority and tenant, the oldest one's wait), the nodes by status and the rates of the last minute, " +
			"as a dispatcher sees them. 503 when no dispatcher answers within a second.",
		Tags:   []string{"queues"},
		Errors: []int{http.StatusServiceUnavailable},
	}), in.getQueues)
}

// jobStatuses are the values of the status filter.
var jobStatuses = []string{string(fleet.StatusQueued), string(fleet.StatusRunning), string(fleet.StatusSucceeded), string(fleet.StatusFailed), string(fleet.StatusCancelled)}

type listJobsInput struct {
	Status []string  `query:"status,explode" doc:"Only jobs in these states: queued, running, succeeded, failed, cancelled. Repeat the parameter, or separate states with commas."`
	Since  time.Time `query:"since" doc:"Only jobs created at this time (RFC 3339) or later."`
	Until  time.Time `query:"until" doc:"Only jobs created before this time (RFC 3339)."`
	Tenant string    `query:"tenant" maxLength:"128" doc:"Another tenant's jobs: admin keys only. Defaults to the key's tenant."`
	Limit  int       `query:"limit" minimum:"1" maximum:"1000" default:"50" doc:"Most jobs on the page."`
	Cursor string    `query:"cursor" maxLength:"512" doc:"next_cursor of the page before."`
}

type listJobsOutput struct {
	Body api.JobPage
}

func (in *intake) listJobs(ctx context.Context, input *listJobsInput) (*listJobsOutput, error) {
	p := caller(ctx)
	q := listQuery{tenant: p.Tenant, since: input.Since, until: input.Until, limit: input.Limit}
	if input.Tenant != "" && input.Tenant != p.Tenant {
		if p.Role != tenancy.RoleAdmin {
			return nil, huma.Error403Forbidden("only an admin key lists another tenant's jobs")
		}
		q.tenant = input.Tenant
	}
	var errs []error
	for _, v := range input.Status {
		for s := range strings.SplitSeq(v, ",") {
			s = strings.TrimSpace(s)
			if !slices.Contains(jobStatuses, s) {
				errs = append(errs, &huma.ErrorDetail{Location: "query.status", Message: "unknown state; use " + strings.Join(jobStatuses, ", "), Value: s})
				continue
			}
			if q.statuses == nil {
				q.statuses = map[string]bool{}
			}
			q.statuses[s] = true
		}
	}
	if !q.since.IsZero() && !q.until.IsZero() && !q.since.Before(q.until) {
		errs = append(errs, &huma.ErrorDetail{Location: "query.until", Message: "must be after since", Value: input.Until})
	}
	if input.Cursor != "" {
		after, err := decodeCursor(input.Cursor)
		if err != nil {
			errs = append(errs, &huma.ErrorDetail{Location: "query.cursor", Message: "is not a cursor of this list: pass next_cursor as it came", Value: input.Cursor})
		}
		after.tenant = q.tenant
		q.after = &after
	}
	if len(errs) > 0 {
		return nil, huma.Error422UnprocessableEntity("invalid job list query", errs...)
	}
	jobs, next := in.index.page(q, time.Now())
	out := &listJobsOutput{Body: api.JobPage{Jobs: jobs}}
	if next != nil {
		out.Body.NextCursor = encodeCursor(*next)
	}
	return out, nil
}

// encodeCursor writes the position after which the next page starts: the creation
// time and id of the last job listed.
func encodeCursor(k indexKey) string {
	return base64.RawURLEncoding.EncodeToString([]byte(strconv.FormatInt(k.created, 10) + "." + k.id))
}

func decodeCursor(s string) (indexKey, error) {
	raw, err := base64.RawURLEncoding.DecodeString(s)
	if err != nil {
		return indexKey{}, err
	}
	created, id, ok := strings.Cut(string(raw), ".")
	if !ok || !fleet.ValidToken(id) {
		return indexKey{}, errors.New("malformed cursor")
	}
	k := indexKey{id: id}
	if k.created, err = strconv.ParseInt(created, 10, 64); err != nil {
		return indexKey{}, fmt.Errorf("malformed cursor: %w", err)
	}
	return k, nil
}

type deleteJobInput struct {
	ID     string `path:"id" doc:"Job id."`
	Cancel bool   `query:"cancel" doc:"Cancel the job first if it has not ended; without it, such a job answers 409."`
}

// deleteJob removes a job of the caller's tenant and everything of it.
func (in *intake) deleteJob(ctx context.Context, input *deleteJobInput) (*struct{}, error) {
	job, err := in.tenantJob(ctx, input.ID)
	if err != nil {
		return nil, err
	}
	if !job.Status.Terminal() && !input.Cancel {
		return nil, huma.Error409Conflict("job " + job.ID + " is " + string(job.Status) + ": cancel it first, or delete with cancel=true")
	}
	var cancel *fleet.Publisher
	if input.Cancel {
		cancel = in.pub
	}
	ctx, span := tracer.Start(ctx, "delete job", trace.WithAttributes(attribute.String("comfyfleet.job", job.ID)))
	defer span.End()
	switch err := in.jobs.Delete(ctx, job.ID, in.outputs, cancel); {
	case errors.Is(err, fleet.ErrJobRunning):
		return nil, huma.Error409Conflict("job " + job.ID + " runs again (a scene was retried): cancel it first, or delete with cancel=true")
	case errors.Is(err, fleet.ErrJobNotFound):
		return nil, huma.Error404NotFound("no job " + job.ID)
	case err != nil:
		return nil, huma.Error503ServiceUnavailable("cannot delete the job now; retry: what is left of it goes then", err)
	}
	in.index.remove(job.ID, 0)
	in.log.Info("job deleted", "job", job.ID, "cancelled", !job.Status.Terminal())
	return nil, nil
}

// queuesTimeout is how long the intake waits for a dispatcher's queue summary.
const queuesTimeout = time.Second

type queuesOutput struct {
	Body fleet.QueueSummary
}

// getQueues asks a dispatcher for its queue summary.
func (in *intake) getQueues(ctx context.Context, _ *struct{}) (*queuesOutput, error) {
	ctx, cancel := context.WithTimeout(ctx, queuesTimeout)
	defer cancel()
	msg, err := in.nc.RequestWithContext(ctx, fleet.QueuesSubject, nil)
	if err != nil {
		return nil, huma.Error503ServiceUnavailable(fmt.Sprintf("no dispatcher answered within %s; retry", queuesTimeout), err)
	}
	out := &queuesOutput{}
	if err := json.Unmarshal(msg.Data, &out.Body); err != nil {
		return nil, huma.Error503ServiceUnavailable("a dispatcher answered with an undecodable queue summary", err)
	}
	return out, nil
}
