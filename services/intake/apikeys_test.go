package intake_test

import (
	"context"
	"net/http"
	"strings"
	"testing"

	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

func TestAdminsListAndRevokeAPIKeys(t *testing.T) {
	t.Parallel()
	natsURL, js := fleetFor(t)
	base := serveIntake(t, natsURL, intake.Config{})
	keys, err := tenancy.Open(context.Background(), js)
	if err != nil {
		t.Fatal(err)
	}
	create := func(tenant string, role tenancy.Role) string {
		plain, _, err := keys.CreateKey(context.Background(), tenant, role, "k-"+string(role))
		if err != nil {
			t.Fatal(err)
		}
		return plain
	}
	admin, reader, other := create("studio", tenancy.RoleAdmin), create("studio", tenancy.RoleRead), create("agency", tenancy.RoleSubmit)

	var list struct {
		Keys []intake.APIKey `json:"keys"`
	}
	if code := fleettest.Call(t, http.MethodGet, base+"/v1/apikeys", nil, &list, fleettest.Key(admin)); code != http.StatusOK || len(list.Keys) != 3 {
		t.Fatalf("GET /v1/apikeys as admin: %d, %+v; want 200 and three keys", code, list.Keys)
	}
	ids := map[string]intake.APIKey{}
	for _, k := range list.Keys {
		ids[k.ID] = k
		for _, plain := range []string{admin, reader, other} {
			if strings.Contains(plain, k.ID) || len(k.ID) != tenancy.ShortIDLength {
				t.Errorf("listed id %q is not a %d-digit hash prefix", k.ID, tenancy.ShortIDLength)
			}
		}
	}
	if k := ids[tenancy.ShortID(other)]; k.Tenant != "agency" || k.Role != tenancy.RoleSubmit || k.Created.IsZero() {
		t.Errorf("the agency key is listed as %+v", k)
	}
	if code := fleettest.Call(t, http.MethodGet, base+"/v1/apikeys", nil, nil, fleettest.Key(reader)); code != http.StatusForbidden {
		t.Errorf("GET /v1/apikeys with a read key: %d, want 403", code)
	}
	if code := fleettest.Call(t, http.MethodDelete, base+"/v1/apikeys/"+tenancy.ShortID(other), nil, nil, fleettest.Key(reader)); code != http.StatusForbidden {
		t.Errorf("DELETE with a read key: %d, want 403", code)
	}

	if code := fleettest.Call(t, http.MethodDelete, base+"/v1/apikeys/"+tenancy.ShortID(other), nil, nil, fleettest.Key(admin)); code != http.StatusNoContent {
		t.Fatalf("DELETE /v1/apikeys/{id}: %d, want 204", code)
	}
	if code := fleettest.Call(t, http.MethodGet, base+"/v1/nodes", nil, nil, fleettest.Key(other)); code != http.StatusUnauthorized {
		t.Errorf("the revoked key: %d, want 401", code)
	}
	var p fleettest.Problem
	if code := fleettest.Call(t, http.MethodDelete, base+"/v1/apikeys/"+tenancy.ShortID(other), nil, &p, fleettest.Key(admin)); code != http.StatusNotFound {
		t.Errorf("revoking it again: %d, want 404", code)
	}
	if code := fleettest.Call(t, http.MethodDelete, base+"/v1/apikeys/not-an-id", nil, &p, fleettest.Key(admin)); code != http.StatusUnprocessableEntity || !p.At("path.id") {
		t.Errorf("DELETE with a malformed id: %d %+v, want 422 naming path.id", code, p)
	}
	if code := fleettest.Call(t, http.MethodGet, base+"/v1/apikeys", nil, &list, fleettest.Key(admin)); code != http.StatusOK || len(list.Keys) != 2 {
		t.Errorf("after the revocation: %d, %d keys; want 2", code, len(list.Keys))
	}
}
