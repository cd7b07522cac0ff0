// Package comfydoor is the fleet's ComfyUI-compatible front door: ComfyUI's own HTTP
// and websocket API, served by the intake under /comfy/ (and /comfy/api/), so that a
// client written for one ComfyUI server runs its prompts on the whole fleet once its
// URL changes.
//
// Every prompt becomes a one-scene job of its raw graph, submitted through the
// intake's own path (its checks, its idempotency); the prompt's record in
// fleet.BucketComfyPrompts maps its prompt_id to the job. The websocket turns the
// scene events of a client's jobs into ComfyUI's messages (pkg/comfyfacade); /view
// serves outputs from the fleet's output store under the job's id as subfolder;
// /object_info is the union of what the nodes published in ObjectInfoStore, and
// prompts are refused, with ComfyUI's 400, as a server that has it would refuse them.
package comfydoor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strings"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
)

// Caller is who a request acts for.
type Caller struct {
	Tenant string
	Role   tenancy.Role
}

// AuthError refuses a request before it is served: Status is 401, 403, 429 or 503;
// RetryAfter, if set, is the Retry-After header of a 429.
type AuthError struct {
	Status     int
	Message    string
	RetryAfter string
}

func (e *AuthError) Error() string { return e.Message }

// Submission is a prompt to run on the fleet as a one-scene job of its raw graph.
type Submission struct {
	Graph fleet.Graph
	// Pool is the pool that runs it: "image" unless the graph makes video.
	Pool string
	// Priority is 1 to 10: 10 for a prompt sent to the front, else 5.
	Priority int
	// Inputs are files already in the inputs store (uploads) that the graph's
	// LoadImage nodes name, to upload to the node that runs the scene.
	Inputs []fleet.Input
	// Key makes the submission idempotent, as an Idempotency-Key does: the same key
	// and graph give the same job.
	Key string
}

// Config configures the door.
type Config struct {
	// JS is the fleet's JetStream. Required.
	JS jetstream.JetStream
	// Jobs reads jobs. Required.
	Jobs *fleet.Jobs
	// Inputs is the store of input images (fleet.ObjectInputs), which uploads go to.
	// Required.
	Inputs jetstream.ObjectStore
	// Nodes is the bucket of the nodes' heartbeats (fleet.BucketNodes). Required.
	Nodes jetstream.KeyValue
	// OpenOutput opens a stored output by its fleet.OutputKey; an error that wraps
	// fs.ErrNotExist says it is gone. Required.
	OpenOutput func(ctx context.Context, key string) (io.ReadCloser, error)
	// Authorize tells who sends r and refuses, with an *AuthError, a caller without
	// role need or over its budget. Required.
	Authorize func(r *http.Request, need tenancy.Role) (Caller, error)
	// Submit submits a prompt's job for the caller. A refusal is a huma error (the
	// intake's): its 422 details become ComfyUI's node_errors. Required.
	Submit func(ctx context.Context, c Caller, s Submission) (*fleet.Job, error)
	// Cancel cancels every scene of job that has not ended. Required.
	Cancel func(ctx context.Context, job *fleet.Job) error
	// Done is closed when the intake stops; websockets close then. Defaults to never.
	Done <-chan struct{}
	// Logger defaults to slog.Default.
	Logger *slog.Logger
}

// Door serves ComfyUI's API. Its ServeHTTP expects paths without the /comfy prefix.
type Door struct {
	cfg     Config
	log     *slog.Logger
	prompts *prompts
	catalog *catalog
	mux     *http.ServeMux
}

// New returns the door; Run must run beside it for /object_info and validation to
// follow the nodes.
func New(ctx context.Context, cfg Config) (*Door, error) {
	if cfg.JS == nil || cfg.Jobs == nil || cfg.Inputs == nil || cfg.Nodes == nil || cfg.OpenOutput == nil ||
		cfg.Authorize == nil || cfg.Submit == nil || cfg.Cancel == nil {
		return nil, errors.New("comfydoor: JS, Jobs, Inputs, Nodes, OpenOutput, Authorize, Submit and Cancel are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	d := &Door{cfg: cfg, log: cfg.Logger.With("api", "comfy")}
	var err error
	if d.prompts, err = openPrompts(ctx, cfg.JS); err != nil {
		return nil, err
	}
	d.catalog = newCatalog(func(ctx context.Context) (jetstream.ObjectStore, error) {
		return cfg.JS.ObjectStore(ctx, ObjectInfoStore)
	}, d.log)
	d.mux = http.NewServeMux()
	for _, prefix := range []string{"", "/api"} {
		d.route(prefix, "POST /prompt", tenancy.RoleSubmit, d.postPrompt)
		d.route(prefix, "GET /prompt", tenancy.RoleRead, d.getPrompt)
		d.route(prefix, "GET /queue", tenancy.RoleRead, d.getQueue)
		d.route(prefix, "POST /queue", tenancy.RoleSubmit, d.postQueue)
		d.route(prefix, "POST /interrupt", tenancy.RoleSubmit, d.postInterrupt)
		d.route(prefix, "GET /history", tenancy.RoleRead, d.getHistory)
		d.route(prefix, "GET /history/{prompt_id}", tenancy.RoleRead, d.getHistoryOf)
		d.route(prefix, "GET /view", tenancy.RoleRead, d.getView)
		d.route(prefix, "POST /upload/image", tenancy.RoleSubmit, d.postUpload)
		d.route(prefix, "GET /object_info", tenancy.RoleRead, d.getObjectInfo)
		d.route(prefix, "GET /object_info/{class}", tenancy.RoleRead, d.getObjectInfo)
		d.route(prefix, "GET /system_stats", tenancy.RoleRead, d.getSystemStats)
		d.route(prefix, "GET /features", tenancy.RoleRead, d.getFeatures)
		d.route(prefix, "GET /ws", tenancy.RoleRead, d.serveWS)
	}
	return d, nil
}

// Run follows the nodes' /object_info answers until ctx ends.
func (d *Door) Run(ctx context.Context) { d.catalog.follow(ctx) }

// ServeHTTP serves one request; its path lacks the /comfy prefix.
func (d *Door) ServeHTTP(w http.ResponseWriter, r *http.Request) { d.mux.ServeHTTP(w, r) }

// handler serves a request of caller.
type handler func(w http.ResponseWriter, r *http.Request, c Caller)

// route registers h at pattern under prefix, for callers with role need.
func (d *Door) route(prefix, pattern string, need tenancy.Role, h handler) {
	method, path, _ := strings.Cut(pattern, " ")
	d.mux.HandleFunc(method+" "+prefix+path, func(w http.ResponseWriter, r *http.Request) {
		c, err := d.cfg.Authorize(r, need)
		if err != nil {
			var ae *AuthError
			if !errors.As(err, &ae) {
				ae = &AuthError{Status: http.StatusServiceUnavailable, Message: "cannot check the API key now; retry"}
			}
			if ae.Status == http.StatusUnauthorized {
				w.Header().Set("WWW-Authenticate", `Bearer realm="comfyfleet"`)
			}
			if ae.RetryAfter != "" {
				w.Header().Set("Retry-After", ae.RetryAfter)
			}
			writeText(w, ae.Status, ae.Message)
			return
		}
		h(w, r, c)
	})
}

// unavailable answers a failure to reach the fleet's state.
func (d *Door) unavailable(w http.ResponseWriter, what string, err error) {
	d.log.Warn(what, "err", err)
	writeText(w, http.StatusServiceUnavailable, fmt.Sprintf("503: cannot %s now; retry", what))
}
