package tenancy_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
)

func TestKeysAreStoredHashedAndLookedUp(t *testing.T) {
	t.Parallel()
	_, _, js := fleettest.Fleet(t, fleet.Settings{})
	ctx := context.Background()
	s, err := tenancy.Open(ctx, js)
	if err != nil {
		t.Fatal(err)
	}
	plain, k, err := s.CreateKey(ctx, "acme", tenancy.RoleSubmit, "ci")
	if err != nil {
		t.Fatal(err)
	}
	got, err := s.Lookup(ctx, plain)
	if err != nil || got.Tenant != "acme" || got.Role != tenancy.RoleSubmit || got.Name != k.Name {
		t.Fatalf("Lookup = %+v, %v", got, err)
	}
	if _, err := s.Lookup(ctx, plain+"x"); !errors.Is(err, tenancy.ErrUnknownKey) {
		t.Errorf("a wrong key: %v, want ErrUnknownKey", err)
	}
	kv, _ := js.KeyValue(ctx, fleet.BucketAPIKeys)
	if _, err := kv.Get(ctx, plain); err == nil {
		t.Error("the plain key is a bucket key")
	}
	t1, _ := s.Tenant(ctx, "acme")
	t2, _ := s.Tenant(ctx, "acme")
	if t1.WebhookSecret == "" || t1.WebhookSecret != t2.WebhookSecret {
		t.Errorf("tenant secret unstable: %q then %q", t1.WebhookSecret, t2.WebhookSecret)
	}
	if _, _, err := s.CreateKey(ctx, "acme", "owner", ""); err == nil {
		t.Error("an unknown role was accepted")
	}
}

// TestSignMatchesStandardWebhooksExample checks Sign against the example of the
// Standard Webhooks specification.
func TestSignMatchesStandardWebhooksExample(t *testing.T) {
	t.Parallel()
	got, err := tenancy.Sign("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "msg_p5jXN8AQM9LWM0D4loKWxJek",
		time.Unix(1614265330, 0), []byte(`{"test": 2432232314}`))
	if err != nil {
		t.Fatal(err)
	}
	if want := "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="; got != want {
		t.Errorf("Sign = %s, want %s", got, want)
	}
}

func TestRoles(t *testing.T) {
	t.Parallel()
	if !tenancy.RoleAdmin.Allows(tenancy.RoleSubmit) || tenancy.RoleRead.Allows(tenancy.RoleSubmit) || !tenancy.RoleSubmit.Allows(tenancy.RoleRead) {
		t.Error("role order is not read < submit < admin")
	}
}
