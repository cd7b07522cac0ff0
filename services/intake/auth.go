package intake

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/danielgtaylor/huma/v2"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
)

// principal is who a request acts for.
type principal struct {
	Tenant string
	Role   tenancy.Role
	// limiterKey names the caller's rate limit: the key's hash, never the key.
	limiterKey string
}

type principalKey struct{}

// caller returns the request's principal; routes that need none never ask.
func caller(ctx context.Context) principal {
	p, _ := ctx.Value(principalKey{}).(principal)
	return p
}

const roleMetadata = "comfyfleet-role"

// secured marks op as needing role, in the OpenAPI document too.
func secured(role tenancy.Role, op huma.Operation) huma.Operation {
	if op.Metadata == nil {
		op.Metadata = map[string]any{}
	}
	op.Metadata[roleMetadata] = role
	op.Security = []map[string][]string{{"bearer": {}}}
	op.Description = strings.TrimSpace(op.Description + " Needs an API key with role " + string(role) + " or above.")
	return op
}

// authenticate resolves the caller of every operation that declares a role, checks
// the role and the caller's budget for the call, and refuses with problem JSON otherwise.
func (in *intake) authenticate(api huma.API) func(huma.Context, func(huma.Context)) {
	return func(ctx huma.Context, next func(huma.Context)) {
		need, _ := ctx.Operation().Metadata[roleMetadata].(tenancy.Role)
		if need == "" {
			next(ctx)
			return
		}
		p, err := in.identify(ctx.Context(), ctx.Header("Authorization"))
		if errors.Is(err, tenancy.ErrUnknownKey) || errors.Is(err, errNoKey) {
			ctx.SetHeader("WWW-Authenticate", `Bearer realm="comfyfleet"`)
			_ = huma.WriteErr(api, ctx, http.StatusUnauthorized, err.Error())
			return
		}
		if err != nil {
			_ = huma.WriteErr(api, ctx, http.StatusServiceUnavailable, "cannot check the API key now; retry", err)
			return
		}
		if !p.Role.Allows(need) {
			_ = huma.WriteErr(api, ctx, http.StatusForbidden, fmt.Sprintf("this needs role %s; the key has %s", need, p.Role))
			return
		}
		b := in.limits.of(ctx.Method())
		if ok, wait := b.take(p.limiterKey); !ok {
			msg, retryAfter := b.refusal(wait)
			ctx.SetHeader("Retry-After", retryAfter)
			_ = huma.WriteErr(api, ctx, http.StatusTooManyRequests, msg)
			return
		}
		next(huma.WithValue(ctx, principalKey{}, p))
	}
}

var errNoKey = errors.New("an API key is required: send Authorization: Bearer <key>")

func (in *intake) identify(ctx context.Context, authorization string) (principal, error) {
	if in.cfg.Open {
		return principal{Tenant: tenancy.DefaultTenant, Role: tenancy.RoleAdmin, limiterKey: "open"}, nil
	}
	key, ok := strings.CutPrefix(authorization, "Bearer ")
	if !ok || strings.TrimSpace(key) == "" {
		return principal{}, errNoKey
	}
	k, err := in.keys.Lookup(ctx, strings.TrimSpace(key))
	if err != nil {
		return principal{}, err
	}
	return principal{Tenant: k.Tenant, Role: k.Role, limiterKey: tenancy.KeyID(key)}, nil
}

// tenantJob returns the caller's job id; another tenant's job does not exist for it,
// nor does an expired one, whose pieces may wait for their removal.
func (in *intake) tenantJob(ctx context.Context, id string) (*fleet.Job, error) {
	job, err := in.jobs.Get(ctx, id)
	if errors.Is(err, fleet.ErrJobNotFound) || err == nil && (job.Tenant != caller(ctx).Tenant ||
		!time.Now().Before(fleet.Expiry(job.CreatedAt, job.ExpiresAt, in.cfg.Settings.Retention))) {
		return nil, huma.Error404NotFound("no job " + id)
	}
	if err != nil {
		return nil, huma.Error503ServiceUnavailable("cannot read the job now; retry", err)
	}
	return job, nil
}
