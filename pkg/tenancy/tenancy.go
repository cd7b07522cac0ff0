// Package tenancy holds who may use a fleet: API keys, stored hashed, each with a
// tenant and a role, and each tenant's webhook signing secret.
package tenancy

import (
	"cmp"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// Role says what a key may do. Each role includes the ones before it.
type Role string

// Roles, from least to most.
const (
	// RoleRead reads its tenant's jobs, outputs and events, nodes and workflows.
	RoleRead Role = "read"
	// RoleSubmit also submits, cancels and retries its tenant's jobs.
	RoleSubmit Role = "submit"
	// RoleAdmin also manages workflows and nodes.
	RoleAdmin Role = "admin"
)

var rank = map[Role]int{RoleRead: 1, RoleSubmit: 2, RoleAdmin: 3}

// Valid reports whether r is a known role.
func (r Role) Valid() bool { return rank[r] > 0 }

// Allows reports whether a key of role r may do what needs role need.
func (r Role) Allows(need Role) bool { return rank[r] >= rank[need] }

// DefaultTenant is the tenant of an API that runs open, without keys.
const DefaultTenant = "default"

// Key is what an API key stands for. The key itself is never stored.
type Key struct {
	Name    string    `json:"name"`
	Tenant  string    `json:"tenant"`
	Role    Role      `json:"role"`
	Created time.Time `json:"created"`
}

// Tenant is a customer of the fleet.
type Tenant struct {
	Name string `json:"name"`
	// WebhookSecret signs the tenant's webhooks ("whsec_" + base64).
	WebhookSecret string    `json:"webhook_secret"`
	Created       time.Time `json:"created"`
}

// ErrUnknownKey is returned for a key that is not registered.
var ErrUnknownKey = errors.New("unknown API key")

// Store keeps keys and tenants in their buckets, which fleet.Ensure creates.
type Store struct {
	keys, tenants jetstream.KeyValue
}

// Open binds to the key and tenant buckets.
func Open(ctx context.Context, js jetstream.JetStream) (*Store, error) {
	keys, err := js.KeyValue(ctx, fleet.BucketAPIKeys)
	if err != nil {
		return nil, fmt.Errorf("open bucket %s: %w", fleet.BucketAPIKeys, err)
	}
	tenants, err := js.KeyValue(ctx, fleet.BucketTenants)
	if err != nil {
		return nil, fmt.Errorf("open bucket %s: %w", fleet.BucketTenants, err)
	}
	return &Store{keys: keys, tenants: tenants}, nil
}

// CreateKey registers a new key for tenant with role, creating the tenant if it is
// new, and returns the key. It is shown once: only its hash is kept.
func (s *Store) CreateKey(ctx context.Context, tenant string, role Role, name string) (string, Key, error) {
	if !fleet.ValidToken(tenant) {
		return "", Key{}, fmt.Errorf("tenant %q: use letters, digits, '-' and '_'", tenant)
	}
	if !role.Valid() {
		return "", Key{}, fmt.Errorf("role %q: use read, submit or admin", role)
	}
	if _, err := s.Tenant(ctx, tenant); err != nil {
		return "", Key{}, err
	}
	secret, err := randomText(32)
	if err != nil {
		return "", Key{}, err
	}
	plain := "cf_" + secret
	k := Key{Name: name, Tenant: tenant, Role: role, Created: time.Now().UTC()}
	b, err := json.Marshal(k)
	if err != nil {
		return "", Key{}, fmt.Errorf("encode key: %w", err)
	}
	if _, err := s.keys.Create(ctx, hashKey(plain), b); err != nil {
		return "", Key{}, fmt.Errorf("store key: %w", err)
	}
	return plain, k, nil
}

// Lookup returns what plain stands for.
func (s *Store) Lookup(ctx context.Context, plain string) (Key, error) {
	e, err := s.keys.Get(ctx, hashKey(plain))
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return Key{}, ErrUnknownKey
	}
	if err != nil {
		return Key{}, fmt.Errorf("look up key: %w", err)
	}
	var k Key
	if err := json.Unmarshal(e.Value(), &k); err != nil {
		return Key{}, fmt.Errorf("decode key: %w", err)
	}
	return k, nil
}

// Tenant returns the tenant called name, creating it with a fresh webhook secret
// if it does not exist yet.
func (s *Store) Tenant(ctx context.Context, name string) (Tenant, error) {
	for {
		e, err := s.tenants.Get(ctx, name)
		if err == nil {
			var t Tenant
			if err := json.Unmarshal(e.Value(), &t); err != nil {
				return Tenant{}, fmt.Errorf("decode tenant %s: %w", name, err)
			}
			return t, nil
		}
		if !errors.Is(err, jetstream.ErrKeyNotFound) {
			return Tenant{}, fmt.Errorf("get tenant %s: %w", name, err)
		}
		secret := make([]byte, 24)
		if _, err := rand.Read(secret); err != nil {
			return Tenant{}, fmt.Errorf("random: %w", err)
		}
		b, err := json.Marshal(Tenant{Name: name, WebhookSecret: "whsec_" + base64.StdEncoding.EncodeToString(secret), Created: time.Now().UTC()})
		if err != nil {
			return Tenant{}, fmt.Errorf("encode tenant: %w", err)
		}
		// Whoever creates it first wins; the others read theirs.
		if _, err := s.tenants.Create(ctx, name, b); err != nil && !errors.Is(err, jetstream.ErrKeyExists) {
			return Tenant{}, fmt.Errorf("create tenant %s: %w", name, err)
		}
	}
}

// KeyInfo is a stored key as it is listed: what it stands for and its ID.
type KeyInfo struct {
	// ID lists and revokes the key without revealing it (see ShortID).
	ID string `json:"id"`
	Key
}

// ShortIDLength is the length of a key's ID: hex digits of its SHA-256.
const ShortIDLength = 12

// ShortID is the ID by which the key plain is listed and revoked: the first
// ShortIDLength hex digits of its SHA-256, which reveal nothing of the key.
func ShortID(plain string) string { return hashKey(plain)[:ShortIDLength] }

// ErrAmbiguousKeyID is returned by Revoke for an ID that several keys start with.
var ErrAmbiguousKeyID = errors.New("several API keys have this ID; give more of its hash")

// Keys returns every key, ordered by tenant, then by creation.
func (s *Store) Keys(ctx context.Context) ([]KeyInfo, error) {
	lister, err := s.keys.ListKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("list keys: %w", err)
	}
	defer lister.Stop()
	var out []KeyInfo
	for hash := range lister.Keys() {
		e, err := s.keys.Get(ctx, hash)
		if errors.Is(err, jetstream.ErrKeyNotFound) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("get key %s: %w", hash[:ShortIDLength], err)
		}
		var k Key
		if err := json.Unmarshal(e.Value(), &k); err != nil {
			return nil, fmt.Errorf("decode key %s: %w", hash[:ShortIDLength], err)
		}
		out = append(out, KeyInfo{ID: hash[:ShortIDLength], Key: k})
	}
	slices.SortFunc(out, func(a, b KeyInfo) int {
		return cmp.Or(cmp.Compare(a.Tenant, b.Tenant), a.Created.Compare(b.Created), cmp.Compare(a.ID, b.ID))
	})
	return out, nil
}

// Revoke deletes the key whose SHA-256 starts with id (its ID, or more of the
// hash): from then on it is refused. It returns ErrUnknownKey when no key has that
// ID, and ErrAmbiguousKeyID when several have.
func (s *Store) Revoke(ctx context.Context, id string) (KeyInfo, error) {
	id = strings.ToLower(id)
	if len(id) < ShortIDLength || strings.Trim(id, "0123456789abcdef") != "" {
		return KeyInfo{}, fmt.Errorf("key ID %q: give at least %d hex digits, as apikey list shows them", id, ShortIDLength)
	}
	lister, err := s.keys.ListKeys(ctx, jetstream.MetaOnly())
	if err != nil {
		return KeyInfo{}, fmt.Errorf("list keys: %w", err)
	}
	var match []string
	for hash := range lister.Keys() {
		if strings.HasPrefix(hash, id) {
			match = append(match, hash)
		}
	}
	_ = lister.Stop()
	switch len(match) {
	case 0:
		return KeyInfo{}, ErrUnknownKey
	case 1:
	default:
		return KeyInfo{}, ErrAmbiguousKeyID
	}
	info := KeyInfo{ID: match[0][:ShortIDLength]}
	if e, err := s.keys.Get(ctx, match[0]); err == nil {
		_ = json.Unmarshal(e.Value(), &info.Key)
	}
	if err := s.keys.Purge(ctx, match[0]); err != nil {
		return KeyInfo{}, fmt.Errorf("revoke key %s: %w", info.ID, err)
	}
	return info, nil
}

// KeyID names an API key without revealing it: its SHA-256, which is also its
// bucket key. Keys carry 256 random bits, so a fast hash is enough to keep a stolen
// bucket from revealing them.
func KeyID(plain string) string { return hashKey(plain) }

func hashKey(plain string) string {
	sum := sha256.Sum256([]byte(plain))
	return hex.EncodeToString(sum[:])
}

// randomText returns n random bytes as unpadded URL-safe base64.
func randomText(n int) (string, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return "", fmt.Errorf("random: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(b), nil
}

// Sign returns the Standard Webhooks signature header value of a message: "v1,"
// and the base64 HMAC-SHA256, keyed by the secret's decoded bytes, of
// "<id>.<unix timestamp>.<body>".
func Sign(secret, id string, ts time.Time, body []byte) (string, error) {
	key, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(secret, "whsec_"))
	if err != nil {
		return "", fmt.Errorf("webhook secret is not base64: %w", err)
	}
	mac := hmac.New(sha256.New, key)
	mac.Write([]byte(id + "." + strconv.FormatInt(ts.Unix(), 10) + "."))
	mac.Write(body)
	return "v1," + base64.StdEncoding.EncodeToString(mac.Sum(nil)), nil
}
