package intake

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"

	"github.com/danielgtaylor/huma/v2"
	"github.com/google/uuid"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// idempotencyNamespace derives job ids from Idempotency-Key values.
var idempotencyNamespace = uuid.MustParse("4f0d1f3e-5b8a-4c2e-9a51-7c1f6a0b2d93")

// newJobID returns a fresh time-ordered id, or, for a request with an
// Idempotency-Key, the id that the tenant's key always maps to: recording the job is
// then itself the atomic check that the key is new.
func newJobID(tenant, key string) (string, error) {
	if key != "" {
		return uuid.NewSHA1(idempotencyNamespace, []byte("key/"+tenant+"/"+key)).String(), nil
	}
	id, err := uuid.NewV7()
	if err != nil {
		return "", fmt.Errorf("job id: %w", err)
	}
	return id.String(), nil
}

// replay returns the job an earlier request with the same Idempotency-Key created,
// or a conflict if that request was another one.
func (in *intake) replay(existing *fleet.Job, hash string) (*fleet.Job, bool, error) {
	if existing.RequestHash != hash {
		return nil, false, huma.Error409Conflict("Idempotency-Key was already used with another request")
	}
	return existing, true, nil
}

// requestHash fingerprints a job request, so a replayed key can be told from a key
// reused for another request. The body is hashed as decoded (defaults applied, object
// keys sorted), so formatting differences do not count.
func requestHash(body JobInput) (string, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return "", fmt.Errorf("hash request: %w", err)
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:]), nil
}
