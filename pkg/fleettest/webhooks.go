package fleettest

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/api"
)

// Delivery is one webhook delivery attempt as a receiver got it.
type Delivery struct {
	// ID, Timestamp and Signature are the Standard Webhooks headers.
	ID, Timestamp, Signature string
	// Raw is the body as sent; Body, as read.
	Raw  []byte
	Body api.Webhook
	// Refused is true for a delivery the receiver answered 409 (see Refuse).
	Refused bool
}

// Webhooks is a webhook endpoint on a real loopback socket that keeps every
// delivery.
type Webhooks struct {
	// URL is where callbacks go.
	URL string

	got *Events[Delivery]

	mu     sync.Mutex
	refuse int
	// waited is each job's position after the last delivery Wait returned.
	waited map[string]int
}

// StartWebhooks runs a webhook endpoint until the test ends.
func StartWebhooks(t testing.TB) *Webhooks {
	t.Helper()
	h := &Webhooks{waited: map[string]int{}, got: NewEvents("webhook deliveries", func(d Delivery) string {
		return fmt.Sprintf("%s %s (%s, refused %v)", d.Body.Type, d.Body.Job.ID, d.Body.Job.Status, d.Refused)
	})}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		raw, err := io.ReadAll(r.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		d := Delivery{ID: r.Header.Get("webhook-id"), Timestamp: r.Header.Get("webhook-timestamp"),
			Signature: r.Header.Get("webhook-signature"), Raw: raw}
		if err := json.Unmarshal(raw, &d.Body); err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		h.mu.Lock()
		d.Refused = h.refuse > 0
		if d.Refused {
			h.refuse--
		}
		h.mu.Unlock()
		h.got.Add(d)
		if d.Refused {
			http.Error(w, `{"code":409,"message":"The execution is running already"}`, http.StatusConflict)
		}
	}))
	t.Cleanup(srv.Close)
	h.URL = srv.URL + "/hook"
	return h
}

// Refuse answers the next n deliveries with 409 "running already", as n8n does
// before it has parked the execution.
func (h *Webhooks) Refuse(n int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.refuse = n
}

// Wait returns the next accepted delivery of job, after the one Wait returned last
// for it; it fails the test if none comes within the time given.
func (h *Webhooks) Wait(t testing.TB, job string, within time.Duration) Delivery {
	t.Helper()
	h.mu.Lock()
	from := h.waited[job]
	h.mu.Unlock()
	d, next := h.got.Next(t, from, within, "webhook for job "+job, func(d Delivery) bool {
		return d.Body.Job.ID == job && !d.Refused
	})
	h.mu.Lock()
	h.waited[job] = next
	h.mu.Unlock()
	return d
}

// Deliveries returns every delivery attempt of job, refused ones included.
func (h *Webhooks) Deliveries(job string) []Delivery {
	return h.got.All(func(d Delivery) bool { return d.Body.Job.ID == job })
}

// Count is how many delivery attempts job got, refused ones included.
func (h *Webhooks) Count(job string) int {
	return len(h.Deliveries(job))
}

// All returns every delivery attempt.
func (h *Webhooks) All() []Delivery {
	return h.got.All(nil)
}
