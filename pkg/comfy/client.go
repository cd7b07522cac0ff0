// Package comfy is the ComfyUI client used by comfyfleet's executor: the REST
// calls (submit, history, queue, view, upload, interrupt, ...), the websocket
// event stream, and Run, which submits a prompt and follows it to its end
// through websocket drops, returning classified errors (see IsPermanent).
package comfy

import (
	"log/slog"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/uuid"
)

// Client talks to one ComfyUI server. It is safe for concurrent use; the Runs
// of a Client share one websocket, since the server keeps a single socket per
// client id and sends execution events only to the submitting client's socket.
// The websocket stays open while Runs follow prompts and for a minute after
// the last one; Close closes it at once.
type Client struct {
	base     string
	http     *http.Client
	clientID string
	log      *slog.Logger

	// pollInterval paces /queue and /history polling while the websocket is down.
	pollInterval time.Duration
	// watchdogInterval paces the same check while the websocket is up, as a
	// safety net against lost messages.
	watchdogInterval time.Duration
	// endGrace is how long Run waits after execution_success for the
	// executing-null end marker before reading history anyway.
	endGrace time.Duration
	// reconnectMin and reconnectMax bound the websocket reconnect back-off.
	reconnectMin, reconnectMax time.Duration
	// maxOutage is how long Run keeps polling an unreachable server.
	maxOutage time.Duration
	// cleanupTimeout bounds the interrupt/delete calls made when Run is cancelled.
	cleanupTimeout time.Duration
	// submitTimeout bounds a POST /prompt, which a cancellation does not cut short.
	submitTimeout time.Duration
	// connectTimeout bounds the websocket handshake and the wait for the
	// server's greeting.
	connectTimeout time.Duration
	// idleTimeout is how long the websocket stays open after the last Run.
	idleTimeout time.Duration
	// silenceTimeout is how long after a submission the websocket may hear
	// nothing before Run takes it for unregistered by the server.
	silenceTimeout time.Duration

	// heard is when the server last answered (Unix nanoseconds).
	heard atomic.Int64

	streamMu   sync.Mutex
	stream     *stream
	lastStream <-chan struct{} // done of the stream that retired last
	closed     bool
}

// Option configures a Client.
type Option func(*Client)

// WithHTTPClient sets the HTTP client used for REST calls and the websocket
// handshake. Prefer contexts to http.Client.Timeout, which also bounds the
// download of View bodies.
func WithHTTPClient(h *http.Client) Option {
	return func(c *Client) {
		if h != nil {
			c.http = h
		}
	}
}

// WithClientID sets the client id sent with prompts and on the websocket.
// Use one id per Client: the server replaces a client's socket when another
// connects with the same id.
func WithClientID(id string) Option {
	return func(c *Client) {
		if id != "" {
			c.clientID = id
		}
	}
}

// WithLogger sets the logger (default slog.Default()).
func WithLogger(l *slog.Logger) Option {
	return func(c *Client) {
		if l != nil {
			c.log = l
		}
	}
}

// WithPollInterval sets how often Run reads /queue and /history while its
// websocket is down (default 1s).
func WithPollInterval(d time.Duration) Option {
	return func(c *Client) {
		if d > 0 {
			c.pollInterval = d
		}
	}
}

// WithReconnectBackoff bounds the delay between websocket reconnection
// attempts (default 250ms doubling up to 5s).
func WithReconnectBackoff(lo, hi time.Duration) Option {
	return func(c *Client) {
		if lo > 0 && hi >= lo {
			c.reconnectMin, c.reconnectMax = lo, hi
		}
	}
}

// New returns a client for the server at baseURL, e.g. "http://127.0.0.1:8188"
// (an "/api" suffix works too).
func New(baseURL string, opts ...Option) *Client {
	c := &Client{
		base:             strings.TrimRight(baseURL, "/"),
		http:             &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()},
		clientID:         "comfyfleet-" + uuid.NewString(),
		log:              slog.Default(),
		pollInterval:     time.Second,
		watchdogInterval: 30 * time.Second,
		endGrace:         2 * time.Second,
		reconnectMin:     250 * time.Millisecond,
		reconnectMax:     5 * time.Second,
		maxOutage:        5 * time.Minute,
		cleanupTimeout:   10 * time.Second,
		submitTimeout:    time.Minute,
		connectTimeout:   10 * time.Second,
		idleTimeout:      time.Minute,
		silenceTimeout:   2 * time.Second,
	}
	for _, o := range opts {
		o(c)
	}
	c.log = c.log.With("comfy", c.base)
	return c
}

// Close closes the websocket that the Client's Runs share and waits for the
// goroutine that reads it. Runs still in progress follow their prompts by
// polling; later Runs and Awaits fail with ErrClientClosed, while the other
// calls keep working. It always returns nil.
func (c *Client) Close() error {
	c.streamMu.Lock()
	c.closed = true
	s := c.stream
	c.stream = nil
	c.streamMu.Unlock()
	if s != nil {
		s.cancel()
		<-s.done
	}
	return nil
}

// LastHeard is when the server last answered anything: an HTTP response or a
// websocket frame. A server slow to answer one request while it speaks on others is
// busy, not gone.
func (c *Client) LastHeard() time.Time { return time.Unix(0, c.heard.Load()) }

func (c *Client) hear() { c.heard.Store(time.Now().UnixNano()) }

// ClientID returns the client id sent with prompts and on the websocket.
func (c *Client) ClientID() string { return c.clientID }

// BaseURL returns the server's base URL without a trailing slash.
func (c *Client) BaseURL() string { return c.base }

var promptNamespace = uuid.NewSHA1(uuid.NameSpaceURL, []byte("https://github.com/comfyfleet/comfyfleet/prompt"))

// PromptID returns a deterministic prompt id for parts (joined by "/"), so
// that, e.g., a scene's attempt always maps to the same prompt_id.
func PromptID(parts ...string) string {
	return uuid.NewSHA1(promptNamespace, []byte(strings.Join(parts, "/"))).String()
}
