package intake_test

import (
	"context"
	"net/http"
	"strconv"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

// slow gives back no token during a test: one call every 100 s.
const slow = 0.01

func submitKey(t *testing.T, js jetstream.JetStream) string {
	t.Helper()
	keys, err := tenancy.Open(context.Background(), js)
	if err != nil {
		t.Fatal(err)
	}
	plain, _, err := keys.CreateKey(context.Background(), "studio", tenancy.RoleSubmit, t.Name())
	if err != nil {
		t.Fatal(err)
	}
	return plain
}

// status sends a bodiless request with key and returns the status and Retry-After.
func status(t *testing.T, key, method, url string) (int, string) {
	t.Helper()
	a := fleettest.Do(t, method, url, nil, fleettest.Key(key))
	return a.Status, a.Header.Get("Retry-After")
}

func TestReadsAndSubmissionsHaveBudgetsOfTheirOwn(t *testing.T) {
	t.Parallel()
	natsURL, js := fleetFor(t)
	base := serveIntake(t, natsURL, intake.Config{
		SubmitRate: intake.RateLimit{PerSecond: slow, Burst: 2},
		ReadRate:   intake.RateLimit{PerSecond: slow, Burst: 5},
	})
	key, other := submitKey(t, js), submitKey(t, js)
	read := func(key string) (int, string) { return status(t, key, http.MethodGet, base+"/v1/nodes") }
	// A submission-budget call that does nothing: cancelling a job that is not there.
	change := func(key string) (int, string) { return status(t, key, http.MethodPost, base+"/v1/jobs/none/cancel") }

	burst := time.Now()
	for i := range 5 {
		if code, _ := read(key); code != http.StatusOK {
			t.Fatalf("read %d of a burst of 5: %d, want 200", i+1, code)
		}
	}
	// One read every 100 s: the next comes 100 s after the burst, less the time the
	// burst took, which a loaded machine stretches to seconds.
	code, retry := read(key)
	wait, err := strconv.Atoi(retry)
	if code != http.StatusTooManyRequests || err != nil || wait > 100 || float64(wait) < 100-time.Since(burst).Seconds() {
		t.Errorf("sixth read: %d, Retry-After %q; want 429 and 100 s less the %s the burst took", code, retry, time.Since(burst).Round(time.Millisecond))
	}
	for i := range 2 {
		if code, _ := change(key); code != http.StatusNotFound {
			t.Fatalf("submission %d after the reads ran out: %d, want 404 (the reads spent none of its budget)", i+1, code)
		}
	}
	if code, retry := change(key); code != http.StatusTooManyRequests || retry == "" {
		t.Errorf("third submission: %d, Retry-After %q; want 429 with Retry-After", code, retry)
	}
	if code, _ := read(other); code != http.StatusOK {
		t.Errorf("another key's read: %d, want 200", code)
	}
}

func TestUnlimitedTurnsABudgetOff(t *testing.T) {
	t.Parallel()
	natsURL, js := fleetFor(t)
	base := serveIntake(t, natsURL, intake.Config{
		SubmitRate: intake.RateLimit{PerSecond: slow, Burst: 1},
		ReadRate:   intake.RateLimit{PerSecond: intake.Unlimited},
	})
	key := submitKey(t, js)
	// More reads at once than any default burst (400) allows.
	for i := range 500 {
		if code, _ := status(t, key, http.MethodGet, base+"/v1/nodes"); code != http.StatusOK {
			t.Fatalf("read %d with the read limit off: %d, want 200", i+1, code)
		}
	}
	status(t, key, http.MethodPost, base+"/v1/jobs/none/cancel")
	if code, _ := status(t, key, http.MethodPost, base+"/v1/jobs/none/cancel"); code != http.StatusTooManyRequests {
		t.Errorf("second submission on a burst of 1: %d, want 429: turning reads off left submissions limited", code)
	}
}
