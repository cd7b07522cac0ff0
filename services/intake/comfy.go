package intake

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"sync"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/outputs"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
	"github.com/comfyfleet/comfyfleet/services/intake/comfydoor"
)

// ComfyPrefix is where the ComfyUI-compatible API is served (also under
// ComfyPrefix + "/api").
const ComfyPrefix = "/comfy"

// addComfyDoor serves the ComfyUI-compatible API on mux under ComfyPrefix, and
// follows what the nodes can run, in a goroutine that stops with ctx; wg waits for it.
func (in *intake) addComfyDoor(ctx context.Context, mux *http.ServeMux, wg *sync.WaitGroup) error {
	door, err := comfydoor.New(ctx, comfydoor.Config{
		JS:         in.js,
		Jobs:       in.jobs,
		Inputs:     in.inputs,
		Nodes:      in.nodes,
		OpenOutput: in.openOutput,
		Authorize:  in.authorizeComfy,
		Submit:     in.submitComfy,
		Cancel:     in.cancelScenes,
		Done:       in.done,
		Logger:     in.log,
	})
	if err != nil {
		return fmt.Errorf("intake: %w", err)
	}
	mux.Handle(ComfyPrefix+"/", http.StripPrefix(ComfyPrefix, door))
	wg.Go(func() { door.Run(ctx) })
	return nil
}

// openOutput opens a stored output; a missing one is fs.ErrNotExist.
func (in *intake) openOutput(ctx context.Context, key string) (io.ReadCloser, error) {
	obj, _, err := in.outputs.Open(ctx, key)
	if errors.Is(err, outputs.ErrNotFound) {
		return nil, fmt.Errorf("output %s: %w", key, fs.ErrNotExist)
	}
	if err != nil {
		return nil, fmt.Errorf("output %s: %w", key, err)
	}
	return obj, nil
}

// authorizeComfy is the API's authentication for ComfyUI's clients: the API key as
// Authorization: Bearer, or, since such clients cannot always set headers, as the
// token query parameter; then the role and the key's budget, as for every call.
func (in *intake) authorizeComfy(r *http.Request, need tenancy.Role) (comfydoor.Caller, error) {
	auth := r.Header.Get("Authorization")
	if token := r.URL.Query().Get("token"); auth == "" && token != "" {
		auth = "Bearer " + token
	}
	p, err := in.identify(r.Context(), auth)
	if errors.Is(err, tenancy.ErrUnknownKey) || errors.Is(err, errNoKey) {
		return comfydoor.Caller{}, &comfydoor.AuthError{Status: http.StatusUnauthorized,
			Message: "an API key is required: send Authorization: Bearer <key>, or ?token=<key>"}
	}
	if err != nil {
		return comfydoor.Caller{}, &comfydoor.AuthError{Status: http.StatusServiceUnavailable, Message: "cannot check the API key now; retry"}
	}
	if !p.Role.Allows(need) {
		return comfydoor.Caller{}, &comfydoor.AuthError{Status: http.StatusForbidden,
			Message: fmt.Sprintf("this needs role %s; the key has %s", need, p.Role)}
	}
	b := in.limits.of(r.Method)
	if ok, wait := b.take(p.limiterKey); !ok {
		msg, retryAfter := b.refusal(wait)
		return comfydoor.Caller{}, &comfydoor.AuthError{Status: http.StatusTooManyRequests, Message: msg, RetryAfter: retryAfter}
	}
	return comfydoor.Caller{Tenant: p.Tenant, Role: p.Role}, nil
}

// submitComfy submits a prompt of the ComfyUI-compatible API as a one-scene job,
// through the same checks and commit as POST /v1/jobs.
func (in *intake) submitComfy(ctx context.Context, c comfydoor.Caller, s comfydoor.Submission) (*fleet.Job, error) {
	ctx = context.WithValue(ctx, principalKey{}, principal{Tenant: c.Tenant, Role: c.Role})
	body := &JobInput{Priority: s.Priority, Scenes: []SceneInput{{Graph: s.Graph, Pool: s.Pool, stored: s.Inputs}}}
	job, _, err := in.submit(ctx, body, s.Key)
	return job, err
}
