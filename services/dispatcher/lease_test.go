package dispatcher

import (
	"context"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

// A renewal that the server stored but whose answer never came (a server slow under
// load) moves the entry's revision on; the leader must not take its own renewal for
// another dispatcher's lease and stand down.
func TestLeaseSurvivesARenewalWhoseAnswerWasLost(t *testing.T) {
	t.Parallel()
	settings := fleet.Settings{LeaseTTL: time.Second}
	_, _, js := fleettest.Fleet(t, settings)
	ctx, cancel := context.WithCancel(context.Background())
	l, err := openLease(ctx, js, "dispatcher-a", settings.LeaseTTL, slog.New(slog.DiscardHandler))
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu      sync.Mutex
		reports []bool
	)
	leading := func() []bool {
		mu.Lock()
		defer mu.Unlock()
		return append([]bool(nil), reports...)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		l.run(ctx, func(lead bool) {
			mu.Lock()
			reports = append(reports, lead)
			mu.Unlock()
		})
	})
	t.Cleanup(func() { cancel(); wg.Wait() })
	fleettest.Eventually(t, 5*time.Second, func() bool { return len(leading()) > 0 }, "the only dispatcher never took the lease")

	// The renewal the dispatcher will not hear of.
	lost, err := l.kv.Put(ctx, leaseKey, []byte("dispatcher-a"))
	if err != nil {
		t.Fatal(err)
	}
	fleettest.Eventually(t, 5*time.Second, func() bool {
		e, err := l.kv.Get(ctx, leaseKey)
		return err == nil && e.Revision() > lost
	}, "the lease was not renewed after revision %d", lost)
	if got := leading(); len(got) != 1 || !got[0] {
		t.Fatalf("leadership reported %v, want [true]: the dispatcher stood down for its own renewal", got)
	}
}
