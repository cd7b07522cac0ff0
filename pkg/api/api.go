// Package api holds the representations that comfyfleet's HTTP API and webhooks send:
// one definition, used by the intake for responses and the notifier for callbacks.
package api

import (
	"context"
	"fmt"
	"net/url"
	"strings"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// Job is a job as clients see it.
type Job struct {
	ID          string     `json:"id" doc:"Job id."`
	Status      string     `json:"status" enum:"queued,running,succeeded,failed,cancelled" doc:"queued until a scene starts, running until every scene is terminal, then failed if a scene failed, else cancelled if a scene was cancelled, else succeeded."`
	Priority    int        `json:"priority" doc:"Priority 1 (lowest) to 10."`
	CallbackURL string     `json:"callback_url,omitempty" doc:"Where the job is POSTed when it is done."`
	Scenes      []Scene    `json:"scenes"`
	CreatedAt   time.Time  `json:"created_at"`
	UpdatedAt   time.Time  `json:"updated_at"`
	FinishedAt  *time.Time `json:"finished_at,omitempty"`
	ExpiresAt   *time.Time `json:"expires_at,omitempty" doc:"When the job, its input images and its outputs are deleted: after the fleet's retention, or the job's ttl_s."`
}

// JobSummary is a job as GET /v1/jobs lists it: what its state holds, without its
// scenes.
type JobSummary struct {
	ID         string     `json:"id" doc:"Job id."`
	Tenant     string     `json:"tenant"`
	Status     string     `json:"status" enum:"queued,running,succeeded,failed,cancelled"`
	Priority   int        `json:"priority" doc:"Priority 1 (lowest) to 10."`
	Scenes     int        `json:"scenes" doc:"Number of scenes."`
	Succeeded  int        `json:"succeeded" doc:"Scenes that succeeded."`
	Failed     int        `json:"failed" doc:"Scenes that failed (for good)."`
	Cancelled  int        `json:"cancelled" doc:"Scenes cancelled."`
	CreatedAt  time.Time  `json:"created_at"`
	UpdatedAt  time.Time  `json:"updated_at"`
	FinishedAt *time.Time `json:"finished_at,omitempty"`
	ExpiresAt  *time.Time `json:"expires_at,omitempty" doc:"When the job is deleted."`
}

// JobPage is one page of GET /v1/jobs.
type JobPage struct {
	Jobs       []JobSummary `json:"jobs" doc:"Newest first."`
	NextCursor string       `json:"next_cursor,omitempty" doc:"Pass as cursor for the next page; absent on the last page."`
}

// FromJobState summarizes a job's state for lists.
func FromJobState(st *fleet.JobState) JobSummary {
	succeeded, failed, cancelled := st.Counts()
	return JobSummary{
		ID:         st.ID,
		Tenant:     st.Tenant,
		Status:     string(st.Status),
		Priority:   st.Priority,
		Scenes:     st.Scenes(),
		Succeeded:  succeeded,
		Failed:     failed,
		Cancelled:  cancelled,
		CreatedAt:  st.CreatedAt,
		UpdatedAt:  st.UpdatedAt,
		FinishedAt: st.FinishedAt,
		ExpiresAt:  st.ExpiresAt,
	}
}

// Scene is one scene of a job as clients see it.
type Scene struct {
	Index      int             `json:"index"`
	Workflow   string          `json:"workflow,omitempty" doc:"Template name, absent for a raw graph."`
	Pool       string          `json:"pool"`
	Status     string          `json:"status" enum:"queued,running,succeeded,failed,cancelled"`
	Node       string          `json:"node,omitempty" doc:"The node running or that ran the scene."`
	Attempts   int             `json:"attempts" doc:"Attempts started so far."`
	TimeoutS   int             `json:"timeout_s,omitempty" doc:"Most seconds one attempt may run."`
	Progress   *fleet.Progress `json:"progress,omitempty" doc:"Sampler progress of the running attempt."`
	Error      string          `json:"error,omitempty"`
	WaitingFor string          `json:"waiting_for,omitempty" doc:"Why a queued scene cannot start now when no node taking scenes (online, not drained) can run it: no node serves its pool, none is online, or those online lack what it needs, e.g. no online node in pool image has checkpoint x.safetensors (the nodes that have it are offline or drained). Absent when it only waits for a free node."`
	Failures   []fleet.Attempt `json:"failures,omitempty" doc:"Every failed attempt: node and error."`
	Outputs    []Output        `json:"outputs,omitempty"`
	QueuedAt   time.Time       `json:"queued_at"`
	StartedAt  *time.Time      `json:"started_at,omitempty"`
	FinishedAt *time.Time      `json:"finished_at,omitempty"`

	Region       string `json:"region,omitempty" doc:"The only region whose nodes may run the scene."`
	PreferRegion string `json:"prefer_region,omitempty" doc:"The region whose nodes the scene goes to unless others finish it markedly sooner."`
}

// Output is a downloadable file of a scene.
type Output struct {
	Name        string `json:"name" doc:"File name, unique within the job: s<index>_ and the name ComfyUI gave the file, e.g. s3_comfyfleet_00001_.png."`
	ContentType string `json:"content_type"`
	Size        int64  `json:"size"`
	Kind        string `json:"kind,omitempty" doc:"ComfyUI output kind: images, gifs, audio, …"`
	URL         string `json:"url" doc:"Download URL: the API's, or, when outputs go to an S3-compatible store, a presigned URL of the store valid for a limited time (an hour by default; read the job again for a fresh one)."`
}

// JobPath is the API path of a job.
func JobPath(id string) string { return "/v1/jobs/" + id }

// OutputPath is the API path of an output.
func OutputPath(job string, index int, name string) string {
	return fmt.Sprintf("/v1/jobs/%s/scenes/%d/outputs/%s", job, index, url.PathEscape(name))
}

// FromJob renders j for clients; baseURL (e.g. "http://127.0.0.1:8080") prefixes the
// download URLs.
func FromJob(j *fleet.Job, baseURL string) Job {
	baseURL = strings.TrimSuffix(baseURL, "/")
	out := Job{
		ID:          j.ID,
		Status:      string(j.Status),
		Priority:    j.Priority,
		CallbackURL: j.CallbackURL,
		Scenes:      make([]Scene, len(j.Scenes)),
		CreatedAt:   j.CreatedAt,
		UpdatedAt:   j.UpdatedAt,
		FinishedAt:  j.FinishedAt,
		ExpiresAt:   j.ExpiresAt,
	}
	for i, s := range j.Scenes {
		v := Scene{
			Index:      s.Index,
			Workflow:   s.Spec.Workflow,
			Pool:       s.Pool,
			Status:     string(s.Status),
			Node:       s.Node,
			Attempts:   s.Attempts,
			TimeoutS:   s.Spec.TimeoutS,
			Progress:   s.Progress,
			Error:      s.Error,
			Failures:   s.Failures,
			QueuedAt:   s.QueuedAt,
			StartedAt:  s.StartedAt,
			FinishedAt: s.FinishedAt,
		}
		v.Region, v.PreferRegion = s.Region, s.PreferRegion
		for _, o := range s.Outputs {
			v.Outputs = append(v.Outputs, Output{
				Name:        o.Name,
				ContentType: o.ContentType,
				Size:        o.Size,
				Kind:        o.Kind,
				URL:         baseURL + OutputPath(j.ID, s.Index, o.Name),
			})
		}
		out.Scenes[i] = v
	}
	return out
}

// Presigner gives a time-limited URL that downloads a stored output without the API,
// or "" when only the API serves it; outputs.Store is one.
type Presigner interface {
	URL(ctx context.Context, key string, ttl time.Duration) (string, error)
}

// Presign replaces the download URL of each output of j by the URL p gives for it,
// valid for ttl, where p gives one.
func Presign(ctx context.Context, j *Job, p Presigner, ttl time.Duration) error {
	for i := range j.Scenes {
		s := &j.Scenes[i]
		for k := range s.Outputs {
			o := &s.Outputs[k]
			u, err := p.URL(ctx, fleet.OutputKey(j.ID, s.Index, o.Name), ttl)
			if err != nil {
				return fmt.Errorf("link output %s of scene %d of job %s: %w", o.Name, s.Index, j.ID, err)
			}
			if u != "" {
				o.URL = u
			}
		}
	}
	return nil
}

// Webhook is the body POSTed to a job's callback URL.
type Webhook struct {
	Type string `json:"type" doc:"job.completed, job.failed or job.cancelled."`
	Job  Job    `json:"job"`
}
