package intake

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"time"

	"github.com/cenkalti/backoff/v4"
	"github.com/danielgtaylor/huma/v2"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/inventory"
	"github.com/comfyfleet/comfyfleet/pkg/outputs"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
	"github.com/comfyfleet/comfyfleet/pkg/workflow"
)

func (in *intake) addRoutes(a huma.API) {
	in.addDeadLetterRoutes(a)
	huma.Register(a, secured(tenancy.RoleSubmit, huma.Operation{
		OperationID: "create-job",
		Method:      http.MethodPost,
		Path:        "/v1/jobs",
		Summary:     "Submit a job of scenes",
		Description: "Accepts the job and returns at once (202); its scenes run in parallel on the fleet. The job is POSTed to callback_url when every scene is done. " +
			"With Prefer: wait=N (N up to 60), it answers 200 with the finished job if the job ends within N seconds, else 202 as without it. " +
			"A scene that no registered node of its pool can run, by the nodes' last known inventories (node classes, model files), is a 422 naming the field, e.g. body.scenes[0].params.checkpoint.",
		Tags:          []string{"jobs"},
		DefaultStatus: http.StatusAccepted,
		MaxBodyBytes:  maxJobBytes,
		Responses: map[string]*huma.Response{
			"200": {
				Description: "The job ended within the wait of Prefer: wait=N.",
				Headers: map[string]*huma.Param{
					"Location":           {Description: "URL of the job.", Schema: &huma.Schema{Type: huma.TypeString}},
					"Preference-Applied": {Description: "wait=N: the wait the request asked for, as honoured.", Schema: &huma.Schema{Type: huma.TypeString}},
				},
				Content: map[string]*huma.MediaType{"application/json": {Schema: &huma.Schema{Ref: "#/components/schemas/Job"}}},
			},
		},
	}), in.createJob)
	huma.Register(a, secured(tenancy.RoleRead, huma.Operation{
		OperationID: "get-job",
		Method:      http.MethodGet,
		Path:        "/v1/jobs/{id}",
		Summary:     "Get a job and its scenes",
		Tags:        []string{"jobs"},
	}), in.getJob)
	huma.Register(a, secured(tenancy.RoleRead, huma.Operation{
		OperationID: "get-output",
		Method:      http.MethodGet,
		Path:        "/v1/jobs/{id}/scenes/{index}/outputs/{name}",
		Summary:     "Download an output file of a scene",
		Tags:        []string{"jobs"},
		Responses: map[string]*huma.Response{
			"200": {Description: "The file, with its content type.", Content: map[string]*huma.MediaType{"application/octet-stream": {}}},
			"307": {Description: "The file is in an S3-compatible store: Location is a presigned URL that downloads it for a limited time.",
				Headers: map[string]*huma.Param{"Location": {Description: "Presigned URL of the file.", Schema: &huma.Schema{Type: huma.TypeString}}}},
		},
	}), in.getOutput)
	huma.Register(a, secured(tenancy.RoleRead, huma.Operation{
		OperationID: "list-workflows",
		Method:      http.MethodGet,
		Path:        "/v1/workflows",
		Summary:     "List the workflow templates and their parameters",
		Tags:        []string{"workflows"},
	}), in.listWorkflows)
	huma.Register(a, huma.Operation{
		OperationID: "healthz",
		Method:      http.MethodGet,
		Path:        "/healthz",
		Summary:     "Liveness: the process serves requests",
		Tags:        []string{"health"},
	}, func(context.Context, *struct{}) (*healthOutput, error) {
		return &healthOutput{Body: health{Status: "ok"}}, nil
	})
	huma.Register(a, huma.Operation{
		OperationID: "readyz",
		Method:      http.MethodGet,
		Path:        "/readyz",
		Summary:     "Readiness: NATS and JetStream answer",
		Tags:        []string{"health"},
	}, in.ready)
	in.addControlRoutes(a)
	in.addJobListRoutes(a)
	in.addNodeRoutes(a)
	in.addWorkflowRoutes(a)
	in.addCompatRoutes(a)
}

// maxJobBytes bounds a job request, input images in base64 included.
const maxJobBytes = 64 << 20

// SceneInput is one scene of a job request.
type SceneInput struct {
	Workflow string                `json:"workflow,omitempty" doc:"Name of a workflow template (GET /v1/workflows). Give this or graph."`
	Params   map[string]any        `json:"params,omitempty" doc:"Values of the template's named parameters."`
	Graph    map[string]any        `json:"graph,omitempty" doc:"A ComfyUI API-format graph: node id to {class_type, inputs}. Give this or workflow."`
	Pool     string                `json:"pool,omitempty" pattern:"^[A-Za-z0-9_-]+$" maxLength:"64" doc:"Pool of nodes to run on. Defaults to the template's pool, or image."`
	Inputs   map[string]ImageInput `json:"inputs,omitempty" doc:"Input images for the template's image parameters, by parameter name. Each is uploaded to the node that runs the scene."`
	TimeoutS int                   `json:"timeout_s,omitempty" minimum:"1" maximum:"86400" doc:"Most seconds one attempt may run; then it is interrupted and retried, elsewhere if possible. Defaults to 3600 in the video pool, 600 elsewhere."`

	Region       string `json:"region,omitempty" pattern:"^[A-Za-z0-9_-]+$" maxLength:"64" doc:"The only region whose nodes may run the scene, e.g. shenzhen; a registered node of its pool must be in it. Defaults to the job's region."`
	PreferRegion string `json:"prefer_region,omitempty" pattern:"^[A-Za-z0-9_-]+$" maxLength:"64" doc:"A region whose nodes the scene goes to unless a node elsewhere finishes it markedly sooner (the dispatcher's --region-penalty, 10 s by default). Defaults to the job's prefer_region."`
	// stored are input images of a raw graph already in the inputs store, bound to
	// the graph's inputs: the uploads that the ComfyUI door's prompts name.
	stored []fleet.Input
}

// JobInput is the body of a job request.
type JobInput struct {
	Priority    int          `json:"priority,omitempty" minimum:"1" maximum:"10" default:"5" doc:"1 (lowest) to 10."`
	CallbackURL string       `json:"callback_url,omitempty" maxLength:"2048" doc:"http(s) URL that receives the finished job as a POST."`
	Scenes      []SceneInput `json:"scenes" minItems:"1" doc:"The scenes, run in parallel."`
	TTLS        int          `json:"ttl_s,omitempty" doc:"Seconds after its submission that the job, its input images and its outputs are deleted; then it answers 404. At least 60, at most the fleet's retention (--retention, 7 days by default), which is also the default."`

	Region       string `json:"region,omitempty" pattern:"^[A-Za-z0-9_-]+$" maxLength:"64" doc:"The only region whose nodes may run the job's scenes, unless a scene names its own; a registered node of their pool must be in it."`
	PreferRegion string `json:"prefer_region,omitempty" pattern:"^[A-Za-z0-9_-]+$" maxLength:"64" doc:"A region whose nodes the job's scenes go to unless a node elsewhere finishes them markedly sooner, unless a scene names its own."`
}

type createJobInput struct {
	IdempotencyKey string `header:"Idempotency-Key" maxLength:"255" doc:"Makes retries safe: the same key with the same body returns the same job; with another body, 409."`
	Prefer         string `header:"Prefer" maxLength:"255" doc:"wait=N (RFC 7240, as Replicate has it): wait up to N seconds (at most 60) for the job to end, and answer 200 with the finished job if it does."`
	Body           JobInput
}

type createJobOutput struct {
	Status            int
	Location          string `header:"Location" doc:"URL of the job."`
	Replayed          string `header:"Idempotent-Replayed" doc:"true when an Idempotency-Key returned a job created before."`
	PreferenceApplied string `header:"Preference-Applied" doc:"wait=N when the request's Prefer: wait=N was honoured: the job was awaited N seconds at most."`
	Body              api.Job
}

type jobOutput struct {
	Location string `header:"Location" doc:"URL of the job."`
	Replayed string `header:"Idempotent-Replayed" doc:"true when an Idempotency-Key returned a job created before."`
	Body     api.Job
}

type resolved struct {
	spec   fleet.SceneSpec
	pool   string
	graph  fleet.Graph
	inputs []sceneInput
	// needs are the node classes and model files the graph names.
	needs *inventory.Requirements
	// region and preferRegion are the scene's, else the job's.
	region, preferRegion string
}

// resolve checks every scene and renders its graph; errors name the offending field.
func (in *intake) resolve(ctx context.Context, body *JobInput) ([]resolved, []error) {
	var errs []error
	detail := func(loc, msg string, v any) {
		errs = append(errs, &huma.ErrorDetail{Location: loc, Message: msg, Value: v})
	}
	if len(body.Scenes) > in.cfg.MaxScenes {
		detail("body.scenes", fmt.Sprintf("has %d scenes; at most %d per job", len(body.Scenes), in.cfg.MaxScenes), len(body.Scenes))
	}
	if body.CallbackURL != "" {
		if err := in.cfg.CallbackGuard.CheckURL(ctx, body.CallbackURL); err != nil {
			detail("body.callback_url", err.Error(), body.CallbackURL)
		}
	}
	if minTTL, maxTTL := int(in.cfg.MinJobTTL/time.Second), int(in.cfg.Settings.Retention/time.Second); body.TTLS != 0 && (body.TTLS < minTTL || body.TTLS > maxTTL) {
		detail("body.ttl_s", fmt.Sprintf("must be from %d to %d seconds (the fleet's retention)", minTTL, maxTTL), body.TTLS)
	}
	out := make([]resolved, len(body.Scenes))
	for i, s := range body.Scenes {
		at := fmt.Sprintf("body.scenes[%d]", i)
		r := resolved{spec: fleet.SceneSpec{Workflow: s.Workflow, Params: s.Params, Pool: s.Pool}, pool: s.Pool,
			region: cmp.Or(s.Region, body.Region), preferRegion: cmp.Or(s.PreferRegion, body.PreferRegion)}
		var tpl *workflow.Template
		switch {
		case s.Workflow != "" && s.Graph != nil:
			detail(at, "give either workflow or graph, not both", nil)
		case s.Workflow != "":
			var ok bool
			if tpl, ok = in.catalog.Get(s.Workflow); !ok {
				detail(at+".workflow", fmt.Sprintf("unknown workflow; known: %v", in.catalog.Names()), s.Workflow)
				continue
			}
			var inputErrs []error
			r.inputs, inputErrs = in.checkInputs(ctx, at, tpl, s)
			errs = append(errs, inputErrs...)
			g, err := tpl.Render(s.Params)
			var pe *workflow.ParamError
			if errors.As(err, &pe) {
				detail(at+".params."+pe.Param, pe.Message, pe.Value)
				continue
			}
			r.graph = g
			if r.pool == "" {
				r.pool = tpl.Pool
			}
		case s.Graph != nil:
			if len(s.Params) > 0 {
				detail(at+".params", "params apply to a workflow template, not to a raw graph", nil)
			}
			if len(s.Inputs) > 0 {
				detail(at+".inputs", "inputs apply to a workflow template's image parameters, not to a raw graph", nil)
			}
			if err := workflow.CheckGraph(s.Graph, in.graphClasses(cmp.Or(s.Pool, workflow.DefaultPool))); err != nil {
				loc := at + ".graph"
				var ge *workflow.GraphError
				if errors.As(err, &ge) && ge.Node != "" {
					loc += "." + ge.Node
				}
				detail(loc, "is not a ComfyUI API-format graph: "+err.Error(), nil)
				continue
			}
			r.graph, r.spec.Graph = s.Graph, s.Graph
			for _, f := range s.stored {
				r.inputs = append(r.inputs, sceneInput{param: f.Param, object: f.Object, bind: f.Bind})
			}
		default:
			detail(at, "give a workflow (with params) or a graph", nil)
		}
		if r.pool == "" {
			r.pool = workflow.DefaultPool
		}
		if r.graph != nil {
			r.needs = inventory.Require(r.graph)
			errs = append(errs, in.judge(at, r.pool, r.needs, tpl)...)
		}
		r.spec.TimeoutS = cmp.Or(s.TimeoutS, defaultTimeout(r.pool))
		out[i] = r
	}
	return out, errs
}

func (in *intake) createJob(ctx context.Context, input *createJobInput) (*createJobOutput, error) {
	job, replayed, err := in.submit(ctx, &input.Body, input.IdempotencyKey)
	if err != nil {
		return nil, err
	}
	out := &createJobOutput{Status: http.StatusAccepted, Location: in.cfg.PublicURL + api.JobPath(job.ID)}
	if replayed {
		out.Replayed = "true"
	}
	if wait := preferredWait(input.Prefer); wait > 0 {
		out.PreferenceApplied = fmt.Sprintf("wait=%d", int(wait/time.Second))
		done, err := in.awaitJob(ctx, job, wait)
		if err != nil {
			in.log.Warn("wait for the job to end; answering 202", "job", job.ID, "err", err)
		}
		if done != nil {
			job, out.Status = done, http.StatusOK
		}
	}
	out.Body = in.jobView(ctx, job)
	return out, nil
}

// submit validates a job request, stores its input images and the payloads of its
// scenes, commits it, records it and queues its scenes. With an Idempotency-Key, a
// request seen before returns the job it created (replayed) and a key reused for
// another request is a conflict. Its errors are huma errors.
//
// The commit is one message on the submit stream, published together with the
// payloads and awaited with them: a schedule that fires it for the dispatcher's
// router unless this intake queued the job first (queue), so that an intake that
// dies after the commit leaves no job half-queued.
func (in *intake) submit(ctx context.Context, body *JobInput, idempotencyKey string) (job *fleet.Job, replayed bool, err error) {
	scenes, errs := in.resolve(ctx, body)
	if errs = append(errs, in.checkRegions(body, scenes)...); len(errs) > 0 {
		return nil, false, huma.Error422UnprocessableEntity("validation failed", errs...)
	}
	tenant := caller(ctx).Tenant
	id, err := newJobID(tenant, idempotencyKey)
	if err != nil {
		return nil, false, err
	}
	var hash string
	if idempotencyKey != "" {
		// Only a replayed key is compared with the request that made the job.
		if hash, err = requestHash(*body); err != nil {
			return nil, false, err
		}
	}
	ctx, span := tracer.Start(ctx, "create job", trace.WithAttributes(
		attribute.String("comfyfleet.job", id), attribute.Int("comfyfleet.scenes", len(scenes))))
	defer span.End()
	now := time.Now().UTC()
	job = &fleet.Job{
		ID:          id,
		Tenant:      tenant,
		RequestHash: hash,
		Status:      fleet.StatusQueued,
		Priority:    body.Priority,
		CallbackURL: body.CallbackURL,
		Scenes:      make([]fleet.Scene, len(scenes)),
		CreatedAt:   now,
		UpdatedAt:   now,
	}
	expires := now.Add(in.cfg.Settings.Retention)
	if body.TTLS > 0 {
		// Whole seconds: the schedule that deletes the job fires at one.
		expires = now.Add(time.Duration(body.TTLS)*time.Second + time.Second - 1).Truncate(time.Second)
	}
	job.ExpiresAt = &expires
	refs := inputRefs(id, scenes)
	for i, s := range scenes {
		spec := s.spec
		spec.Inputs, spec.Graph = refs[i], nil
		job.Scenes[i] = fleet.Scene{Index: i, Spec: spec, Pool: s.pool, Model: fleet.Checkpoint(s.graph),
			Region: s.region, PreferRegion: s.preferRegion, Status: fleet.StatusQueued, QueuedAt: now}
		if s.needs != nil {
			if job.Needs == nil {
				job.Needs = map[string]*inventory.Requirements{}
			}
			job.Needs[s.needs.Key] = s.needs
			job.Scenes[i].NeedsKey = s.needs.Key
		}
	}
	if idempotencyKey != "" {
		existing, err := in.jobs.Record(ctx, id)
		switch {
		case err == nil:
			if job, replayed, err = in.replay(existing, hash); err != nil {
				return nil, false, err
			}
			if time.Since(job.CreatedAt) <= in.cfg.Settings.DuplicateWindow {
				// The first request may have stopped before its commit; the
				// message ids make this a no-op otherwise.
				c, err := in.commit(ctx, job, scenes, refs)
				if err != nil {
					return nil, false, err
				}
				if c.first {
					in.queue(ctx, job, c)
				} else {
					in.queuer.release(c.held)
				}
			}
			if job, err = in.jobs.Get(ctx, id); err != nil {
				return nil, false, huma.Error503ServiceUnavailable("cannot read the job now; retry", err)
			}
			return job, true, nil
		case !errors.Is(err, fleet.ErrJobNotFound):
			return nil, false, huma.Error503ServiceUnavailable("cannot read the job now; retry", err)
		}
	}
	if _, err := in.storeInputs(ctx, job.ID, scenes); err != nil {
		return nil, false, huma.Error503ServiceUnavailable("cannot store the input images now; retry", err)
	}
	c, err := in.commit(ctx, job, scenes, refs)
	if err != nil {
		in.removeInputs(context.WithoutCancel(ctx), job.ID, refs)
		return nil, false, err
	}
	if !c.first {
		// A concurrent request with the same Idempotency-Key committed the job; the
		// images under its id are that request's.
		in.queuer.release(c.held)
		return in.replayCommitted(ctx, id, hash)
	}
	if in.cfg.AfterCommit != nil {
		if err := in.cfg.AfterCommit(job.ID); err != nil {
			in.queuer.release(c.held)
			return nil, false, huma.Error503ServiceUnavailable("stopped after committing the job", err)
		}
	}
	in.queue(ctx, job, c)
	for _, s := range scenes {
		in.accepted.Add(ctx, 1, metric.WithAttributes(attribute.String("pool", s.pool)))
	}
	in.log.Debug("job accepted", "job", job.ID, "scenes", len(scenes), "priority", job.Priority)
	return job, false, nil
}

// committed is what the server answered to a job's commit.
type committed struct {
	// first is whether this was the job's first commit: of concurrent requests with
	// one Idempotency-Key, the server stores one commit and drops the others as
	// duplicates.
	first bool
	// encoded is the job as the commit carries it, for its record.
	encoded []byte
	// seq is the commit's sequence in the submit stream.
	seq uint64
	// held is the room reserved in the queuer for the job's scenes, for queue; it is
	// to be released if the job is not queued.
	held int64
}

// commit stores the payloads of the job's scenes and the job's commit, together,
// once the queuer has room to queue them, so that the commit's grace begins only
// then.
func (in *intake) commit(ctx context.Context, job *fleet.Job, scenes []resolved, refs [][]fleet.Input) (committed, error) {
	encoded, err := json.Marshal(job)
	if err != nil {
		return committed{}, fmt.Errorf("encode job %s: %w", job.ID, err)
	}
	msgs := make([]fleet.Outgoing, 0, len(scenes)+2)
	for i, s := range scenes {
		p := fleet.ScenePayload{JobID: job.ID, Index: i, Graph: s.graph, Timeout: s.spec.Timeout(), Inputs: refs[i]}
		data, err := p.Encode()
		if err != nil {
			return committed{}, err
		}
		msgs = append(msgs, fleet.Outgoing{Subject: fleet.ScenePayloadSubject(job.ID, i), MsgID: p.MsgID(), Data: data})
	}
	if job.ExpiresAt != nil && job.ExpiresAt.Before(job.CreatedAt.Add(in.cfg.Settings.Retention)) {
		// Sooner than JetStream's age limits remove the job: the janitor deletes it.
		msgs = append(msgs, fleet.ExpirySchedule(job))
	}
	msgs = append(msgs, fleet.JobCommit(job, encoded))
	held, err := in.queuer.reserve(ctx, len(scenes))
	if err != nil {
		return committed{}, huma.Error503ServiceUnavailable("cannot queue the job now; retry", err)
	}
	acks, err := in.pub.BatchAcks(ctx, msgs)
	if err != nil {
		in.queuer.release(held)
		return committed{}, huma.Error503ServiceUnavailable("cannot queue the job now; retry", err)
	}
	last := acks[len(acks)-1]
	return committed{first: !last.Duplicate, encoded: encoded, seq: last.Sequence, held: held}, nil
}

// replayCommitted answers a request whose Idempotency-Key another request committed
// a moment ago: with that job once it is recorded, or 409 if it was another request.
func (in *intake) replayCommitted(ctx context.Context, id, hash string) (*fleet.Job, bool, error) {
	var rec *fleet.Job
	err := backoff.Retry(func() error {
		var err error
		rec, err = in.jobs.Record(ctx, id)
		if err != nil && !errors.Is(err, fleet.ErrJobNotFound) {
			return backoff.Permanent(err)
		}
		return err
	}, backoff.WithContext(backoff.WithMaxRetries(backoff.NewConstantBackOff(20*time.Millisecond), 250), ctx))
	if err != nil {
		return nil, false, huma.Error503ServiceUnavailable("cannot read the job now; retry", err)
	}
	if _, _, err := in.replay(rec, hash); err != nil {
		return nil, false, err
	}
	job, err := in.jobs.Get(ctx, id)
	if err != nil {
		return nil, false, huma.Error503ServiceUnavailable("cannot read the job now; retry", err)
	}
	return job, true, nil
}

type jobIDInput struct {
	ID string `path:"id" doc:"Job id."`
}

func (in *intake) getJob(ctx context.Context, input *jobIDInput) (*jobOutput, error) {
	job, err := in.tenantJob(ctx, input.ID)
	if err != nil {
		return nil, err
	}
	out := &jobOutput{Location: in.cfg.PublicURL + api.JobPath(job.ID), Body: in.jobView(ctx, job)}
	in.explainWaits(ctx, job, &out.Body)
	return out, nil
}

type outputInput struct {
	ID    string `path:"id" doc:"Job id."`
	Index int    `path:"index" minimum:"0" doc:"Scene index."`
	Name  string `path:"name" doc:"Output file name."`
}

func (in *intake) getOutput(ctx context.Context, input *outputInput) (*huma.StreamResponse, error) {
	job, err := in.tenantJob(ctx, input.ID)
	if err != nil {
		return nil, err
	}
	if input.Index >= len(job.Scenes) {
		return nil, huma.Error404NotFound(fmt.Sprintf("job %s has no scene %d", input.ID, input.Index))
	}
	i := slices.IndexFunc(job.Scenes[input.Index].Outputs, func(o fleet.Output) bool { return o.Name == input.Name })
	if i < 0 {
		return nil, huma.Error404NotFound(fmt.Sprintf("scene %d of job %s has no output %q", input.Index, input.ID, input.Name))
	}
	meta := job.Scenes[input.Index].Outputs[i]
	key := fleet.OutputKey(job.ID, input.Index, meta.Name)
	link, err := in.outputs.URL(ctx, key, in.cfg.OutputURLTTL)
	if err != nil {
		return nil, huma.Error503ServiceUnavailable("cannot link the output now; retry", err)
	}
	if link != "" {
		return &huma.StreamResponse{Body: func(hc huma.Context) {
			hc.SetHeader("Location", link)
			hc.SetHeader("Cache-Control", "no-store")
			hc.SetStatus(http.StatusTemporaryRedirect)
		}}, nil
	}
	obj, _, err := in.outputs.Open(ctx, key)
	if errors.Is(err, outputs.ErrNotFound) {
		return nil, huma.Error404NotFound("output is gone from the store")
	}
	if err != nil {
		return nil, huma.Error503ServiceUnavailable("cannot read the output now; retry", err)
	}
	return &huma.StreamResponse{Body: func(hc huma.Context) {
		defer obj.Close()
		hc.SetHeader("Content-Type", meta.ContentType)
		hc.SetHeader("Content-Length", fmt.Sprint(meta.Size))
		hc.SetHeader("Content-Disposition", fmt.Sprintf("inline; filename=%q", meta.Name))
		if _, err := io.Copy(hc.BodyWriter(), obj); err != nil {
			in.log.Warn("stream output", "job", job.ID, "name", meta.Name, "err", err)
		}
	}}, nil
}

func readAll[T any](ctx context.Context, kv jetstream.KeyValue) (map[string]T, error) {
	lister, err := kv.ListKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("list keys: %w", err)
	}
	defer lister.Stop()
	out := map[string]T{}
	for key := range lister.Keys() {
		v, err := getJSON[T](ctx, kv, key)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out[key] = v
	}
	return out, nil
}

// getJSON reads and decodes the value of key.
func getJSON[T any](ctx context.Context, kv jetstream.KeyValue, key string) (T, error) {
	var v T
	e, err := kv.Get(ctx, key)
	if err != nil {
		return v, fmt.Errorf("get %s: %w", key, err)
	}
	if err := json.Unmarshal(e.Value(), &v); err != nil {
		return v, fmt.Errorf("decode %s: %w", key, err)
	}
	return v, nil
}

// WorkflowInfo describes a template and its parameters.
type WorkflowInfo struct {
	Name        string                    `json:"name"`
	Description string                    `json:"description,omitempty"`
	Pool        string                    `json:"pool"`
	Params      map[string]workflow.Param `json:"params"`
}

type workflowsOutput struct {
	Body struct {
		Workflows []WorkflowInfo `json:"workflows"`
	}
}

func (in *intake) listWorkflows(context.Context, *struct{}) (*workflowsOutput, error) {
	out := &workflowsOutput{}
	out.Body.Workflows = []WorkflowInfo{}
	for _, t := range in.catalog.List() {
		out.Body.Workflows = append(out.Body.Workflows, WorkflowInfo{Name: t.Name, Description: t.Description, Pool: t.Pool, Params: t.Params})
	}
	return out, nil
}

type health struct {
	Status string `json:"status"`
}

type healthOutput struct {
	Body health
}

func (in *intake) ready(ctx context.Context, _ *struct{}) (*healthOutput, error) {
	if !in.nc.IsConnected() {
		return nil, huma.Error503ServiceUnavailable("not connected to NATS")
	}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := in.js.AccountInfo(ctx); err != nil {
		return nil, huma.Error503ServiceUnavailable("JetStream does not answer", err)
	}
	return &healthOutput{Body: health{Status: "ready"}}, nil
}
