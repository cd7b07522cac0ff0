package intake

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/danielgtaylor/huma/v2"

	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
)

func (in *intake) addAPIKeyRoutes(a huma.API) {
	huma.Register(a, secured(tenancy.RoleAdmin, huma.Operation{
		OperationID: "list-apikeys",
		Method:      http.MethodGet,
		Path:        "/v1/apikeys",
		Summary:     "List the API keys (admin)",
		Description: "Admin operation. Every API key of every tenant, ordered by tenant and creation: its id, tenant, role, name and creation time. " +
			"A key itself is never shown (only its SHA-256 is stored); its id is the first 12 hex digits of that hash. Keys are created with comfyfleet apikey create.",
		Tags: []string{"apikeys", AdminTag},
	}), in.listAPIKeys)
	huma.Register(a, secured(tenancy.RoleAdmin, huma.Operation{
		OperationID:   "revoke-apikey",
		Method:        http.MethodDelete,
		Path:          "/v1/apikeys/{id}",
		Summary:       "Revoke an API key (admin)",
		Description:   "Admin operation. Deletes the key: every intake refuses it from its next call on (401). 404 for an id no key has.",
		Tags:          []string{"apikeys", AdminTag},
		DefaultStatus: http.StatusNoContent,
		Errors:        []int{http.StatusNotFound, http.StatusConflict},
	}), in.revokeAPIKey)
}

// APIKey is an API key as it is listed; the key itself is never shown.
type APIKey struct {
	ID      string       `json:"id" doc:"The key's id: the first 12 hex digits of its SHA-256. It lists and revokes the key and reveals nothing of it."`
	Tenant  string       `json:"tenant" doc:"The tenant the key acts for."`
	Role    tenancy.Role `json:"role" enum:"read,submit,admin" doc:"read, submit or admin."`
	Name    string       `json:"name,omitempty" doc:"The label given when the key was created."`
	Created time.Time    `json:"created"`
}

type apiKeysOutput struct {
	Body struct {
		Keys []APIKey `json:"keys"`
	}
}

func (in *intake) listAPIKeys(ctx context.Context, _ *struct{}) (*apiKeysOutput, error) {
	keys, err := in.keys.Keys(ctx)
	if err != nil {
		return nil, huma.Error503ServiceUnavailable("cannot read the API keys now; retry", err)
	}
	out := &apiKeysOutput{}
	out.Body.Keys = make([]APIKey, len(keys))
	for i, k := range keys {
		out.Body.Keys[i] = APIKey{ID: k.ID, Tenant: k.Tenant, Role: k.Role, Name: k.Name, Created: k.Created}
	}
	return out, nil
}

type apiKeyIDInput struct {
	ID string `path:"id" pattern:"^[0-9a-fA-F]{12,64}$" doc:"The key's id, as GET /v1/apikeys shows it (or more of its hash)."`
}

func (in *intake) revokeAPIKey(ctx context.Context, input *apiKeyIDInput) (*struct{}, error) {
	k, err := in.keys.Revoke(ctx, input.ID)
	switch {
	case errors.Is(err, tenancy.ErrUnknownKey):
		return nil, huma.Error404NotFound("no API key has the id " + input.ID)
	case errors.Is(err, tenancy.ErrAmbiguousKeyID):
		return nil, huma.Error409Conflict(err.Error())
	case err != nil:
		return nil, huma.Error503ServiceUnavailable("cannot revoke the API key now; retry", err)
	}
	in.log.Info("API key revoked", "id", k.ID, "tenant", k.Tenant, "role", k.Role, "by", caller(ctx).Tenant)
	return nil, nil
}
