package intake

import (
	"fmt"
	"math"
	"net/http"
	"strconv"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// RateLimit is a budget of calls per API key: a token bucket.
type RateLimit struct {
	// PerSecond is the sustained rate. Zero takes the default; Unlimited (any
	// negative value) turns the limit off.
	PerSecond float64
	// Burst is how many calls may come at once. Defaults to twice PerSecond, and at
	// least 1.
	Burst int
}

// Unlimited, as a RateLimit's PerSecond, turns the limit off.
const Unlimited = -1.0

// Default budgets per API key.
var (
	DefaultSubmitRate = RateLimit{PerSecond: 20, Burst: 40}
	DefaultReadRate   = RateLimit{PerSecond: 200, Burst: 400}
)

func (r RateLimit) orDefault(d RateLimit) RateLimit {
	if r.PerSecond == 0 {
		return d
	}
	if r.Burst == 0 {
		r.Burst = max(1, int(math.Ceil(2*r.PerSecond)))
	}
	return r
}

func (r RateLimit) off() bool { return r.PerSecond < 0 }

// budget is one kind of calls' token bucket per API key.
type budget struct {
	// calls names what it counts in the 429 answer: "submissions", "reads".
	calls string
	limit RateLimit
	mu    sync.Mutex
	byKey map[string]*rate.Limiter
}

func newBudget(calls string, limit RateLimit) *budget {
	return &budget{calls: calls, limit: limit, byKey: map[string]*rate.Limiter{}}
}

// take spends a call of key; when the budget has none left it spends nothing and
// returns how long until it has.
func (b *budget) take(key string) (ok bool, wait time.Duration) {
	if b.limit.off() {
		return true, 0
	}
	b.mu.Lock()
	lim, found := b.byKey[key]
	if !found {
		lim = rate.NewLimiter(rate.Limit(b.limit.PerSecond), b.limit.Burst)
		b.byKey[key] = lim
	}
	b.mu.Unlock()
	now := time.Now()
	r := lim.ReserveN(now, 1)
	wait = r.DelayFrom(now)
	if wait == 0 {
		return true, 0
	}
	r.CancelAt(now)
	return false, wait
}

// refusal is the 429 message and Retry-After value (whole seconds) for a call that
// must wait.
func (b *budget) refusal(wait time.Duration) (message, retryAfter string) {
	return fmt.Sprintf("more than %g %s a second (bursts of %d) for this key", b.limit.PerSecond, b.calls, b.limit.Burst),
		strconv.Itoa(max(1, int(math.Ceil(wait.Seconds()))))
}

// rateLimits are the two budgets of every API key: reads (GET, HEAD), and
// submissions with every other change.
type rateLimits struct {
	submit, read *budget
}

func newRateLimits(submit, read RateLimit) *rateLimits {
	return &rateLimits{submit: newBudget("submissions and changes", submit), read: newBudget("reads", read)}
}

// of returns the budget that a call with method spends.
func (l *rateLimits) of(method string) *budget {
	if method == http.MethodGet || method == http.MethodHead {
		return l.read
	}
	return l.submit
}
