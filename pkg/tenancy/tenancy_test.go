package tenancy_test

import (
	"context"
	"errors"
	"strings"
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

func TestKeysAreListedAndRevokedByTheirID(t *testing.T) {
	t.Parallel()
	_, _, js := fleettest.Fleet(t, fleet.Settings{})
	ctx := context.Background()
	s, err := tenancy.Open(ctx, js)
	if err != nil {
		t.Fatal(err)
	}
	ci, _, err := s.CreateKey(ctx, "acme", tenancy.RoleSubmit, "ci")
	if err != nil {
		t.Fatal(err)
	}
	ops, _, err := s.CreateKey(ctx, "acme", tenancy.RoleAdmin, "ops")
	if err != nil {
		t.Fatal(err)
	}
	keys, err := s.Keys(ctx)
	if err != nil || len(keys) != 2 {
		t.Fatalf("Keys = %+v, %v; want two", keys, err)
	}
	if keys[0].ID != tenancy.ShortID(ci) || keys[0].Name != "ci" || keys[1].ID != tenancy.ShortID(ops) || keys[1].Role != tenancy.RoleAdmin {
		t.Errorf("Keys = %+v; want ci then ops, by creation, with their short IDs", keys)
	}
	if len(keys[0].ID) != tenancy.ShortIDLength || strings.Contains(ci, keys[0].ID) {
		t.Errorf("ID %q: want %d hex digits of the hash, nothing of the key", keys[0].ID, tenancy.ShortIDLength)
	}

	got, err := s.Revoke(ctx, strings.ToUpper(tenancy.ShortID(ci)))
	if err != nil || got.Name != "ci" {
		t.Fatalf("Revoke = %+v, %v", got, err)
	}
	if _, err := s.Lookup(ctx, ci); !errors.Is(err, tenancy.ErrUnknownKey) {
		t.Errorf("the revoked key: %v, want ErrUnknownKey", err)
	}
	if _, err := s.Lookup(ctx, ops); err != nil {
		t.Errorf("the other key: %v", err)
	}
	if _, err := s.Revoke(ctx, tenancy.ShortID(ci)); !errors.Is(err, tenancy.ErrUnknownKey) {
		t.Errorf("revoked twice: %v, want ErrUnknownKey", err)
	}
	for _, bad := range []string{"", "abc", "zzzzzzzzzzzz"} {
		if _, err := s.Revoke(ctx, bad); err == nil || errors.Is(err, tenancy.ErrUnknownKey) {
			t.Errorf("Revoke(%q) = %v, want an error that says what an ID is", bad, err)
		}
	}
	if keys, _ := s.Keys(ctx); len(keys) != 1 {
		t.Errorf("after the revocation, Keys = %+v", keys)
	}
}
