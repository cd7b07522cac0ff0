package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/http"
	"net/http/pprof"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/callback"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/outputs"
	"github.com/comfyfleet/comfyfleet/pkg/telemetry"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

// settingsFlags are the delivery settings every service must agree on.
type settingsFlags struct {
	ackWait      time.Duration
	maxAttempts  int
	retryBackoff time.Duration
	nodeTTL      time.Duration
	retention    time.Duration
	storage      string
	replicas     int
}

func (s *settingsFlags) register(fs *flag.FlagSet) {
	d := fleet.DefaultSettings()
	fs.DurationVar(&s.ackWait, "ack-wait", d.AckWait, "time without a heartbeat after which a running scene moves to another executor")
	fs.IntVar(&s.maxAttempts, "max-attempts", d.MaxAttempts, "attempts per scene before it becomes a dead letter")
	fs.DurationVar(&s.retryBackoff, "retry-backoff", d.RetryBackoff, "first delay before a failed scene is retried (doubles per attempt)")
	fs.DurationVar(&s.nodeTTL, "node-ttl", d.NodeTTL, "time after its last heartbeat that a node is shown offline")
	fs.DurationVar(&s.retention, "retention", d.Retention, "time after its submission that a job, its inputs and its outputs are deleted (a job's ttl_s may ask for less); the same on every service")
	fs.StringVar(&s.storage, "storage", "file", "JetStream storage of streams and buckets: file or memory")
	fs.IntVar(&s.replicas, "replicas", d.Replicas, "copies of each stream in a NATS cluster")
}

func (s *settingsFlags) settings() (fleet.Settings, error) {
	out := fleet.Settings{
		AckWait: s.ackWait, MaxAttempts: s.maxAttempts, RetryBackoff: s.retryBackoff,
		NodeTTL: s.nodeTTL, Retention: s.retention, Replicas: s.replicas,
	}
	switch s.storage {
	case "file":
		out.Storage = jetstream.FileStorage
	case "memory":
		out.Storage = jetstream.MemoryStorage
	default:
		return out, fmt.Errorf("--storage %q: use file or memory", s.storage)
	}
	return out.Normalize()
}

// parseNode reads a --comfy value: a ComfyUI URL, then optional comma-separated
// id=NAME, pool=POOL[+POOL…], weight=W and region=R, e.g.
// "http://10.0.0.5:8188,id=a100,pool=video,weight=4,region=shanghai".
func parseNode(v string) (fleet.NodeConfig, error) {
	parts := strings.Split(v, ",")
	u, err := url.Parse(strings.TrimSpace(parts[0]))
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fleet.NodeConfig{}, fmt.Errorf("--comfy %q: start with the node's http(s) URL", v)
	}
	n := fleet.NodeConfig{
		ID:     strings.NewReplacer(".", "-", ":", "-", "[", "", "]", "").Replace(u.Host),
		URL:    strings.TrimSuffix(u.String(), "/"),
		Pools:  []string{"image", "video"},
		Weight: 1,
	}
	for _, kv := range parts[1:] {
		key, val, ok := strings.Cut(strings.TrimSpace(kv), "=")
		if !ok {
			return n, fmt.Errorf("--comfy %q: %q is not key=value", v, kv)
		}
		switch key {
		case "id", "name":
			n.ID = val
		case "pool", "pools":
			n.Pools = strings.FieldsFunc(val, func(r rune) bool { return r == '+' || r == '|' })
		case "weight":
			if n.Weight, err = strconv.ParseFloat(val, 64); err != nil || n.Weight <= 0 {
				return n, fmt.Errorf("--comfy %q: weight %q is not a positive number", v, val)
			}
		case "region":
			if !fleet.ValidToken(val) {
				return n, fmt.Errorf("--comfy %q: region %q: use letters, digits, '-' and '_'", v, val)
			}
			n.Region = val
		default:
			return n, fmt.Errorf("--comfy %q: unknown key %q; use id, pool, weight or region", v, key)
		}
	}
	if !fleet.ValidToken(n.ID) {
		return n, fmt.Errorf("--comfy %q: id %q: use letters, digits, '-' and '_'", v, n.ID)
	}
	return n, nil
}

// serviceFlags are the flags of a service that runs against an external NATS.
type serviceFlags struct {
	natsURL  string
	health   string
	pprof    string
	settings settingsFlags
	log      logFlags
}

func (s *serviceFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&s.natsURL, "nats", nats.DefaultURL, "NATS server URL(s), comma-separated")
	fs.StringVar(&s.health, "health", "", "listen address for container probes: /healthz (alive) and /readyz (connected to NATS); none if empty")
	fs.StringVar(&s.pprof, "pprof", "", "serve Go's pprof profiles (/debug/pprof/) on this address, e.g. 127.0.0.1:6060 (default off)")
	s.settings.register(fs)
	s.log.register(fs)
}

// service holds what a single-service command needs at run time.
type service struct {
	conn     *nats.Conn
	settings fleet.Settings
	log      *slog.Logger
	close    func()
}

// drainTimeout bounds the drain of a service's NATS connection when it stops.
const drainTimeout = 10 * time.Second

// start connects to NATS and sets up logging and telemetry for the named service.
func (s *serviceFlags) start(ctx context.Context, name string, stderr io.Writer) (*service, error) {
	log, err := s.log.logger(stderr)
	if err != nil {
		return nil, err
	}
	settings, err := s.settings.settings()
	if err != nil {
		return nil, err
	}
	shutdown, err := telemetry.Setup(ctx, "comfyfleet-"+name)
	if err != nil {
		return nil, err
	}
	nc, closed, err := s.dial(name, "", log)
	if err != nil {
		_ = shutdown(ctx)
		return nil, err
	}
	stopProfiles, err := serveProfiles(s.pprof, log)
	if err != nil {
		nc.Close()
		_ = shutdown(ctx)
		return nil, err
	}
	stopHealth := func() {}
	if s.health != "" {
		h, err := startHealth(s.health, nc)
		if err != nil {
			stopProfiles()
			nc.Close()
			_ = shutdown(ctx)
			return nil, err
		}
		stopHealth = h.stop
	}
	return &service{conn: nc, settings: settings, log: log, close: func() {
		stopHealth()
		stopProfiles()
		closeConn(nc, closed, log)
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = shutdown(ctx)
	}}, nil
}

// dial connects to NATS as the named service; role, if not empty, names a second
// connection of the service in the server's monitoring. closed is closed once the
// connection has closed.
func (s *serviceFlags) dial(name, role string, log *slog.Logger) (nc *nats.Conn, closed <-chan struct{}, err error) {
	connName := "comfyfleet-" + name
	if role != "" {
		connName += "-" + role
	}
	// Each service has an inbox prefix of its own, so that the NATS permissions of
	// deploy/nats/comfyfleet.conf can keep one service from reading another's replies.
	// The connection's handlers run on a goroutine of its own, until it has closed:
	// closeConn waits for that, so that none logs after the service returned.
	done := make(chan struct{})
	nc, err = nats.Connect(s.natsURL, nats.Name(connName), nats.CustomInboxPrefix("_INBOX_"+name),
		nats.MaxReconnects(-1), nats.RetryOnFailedConnect(true), nats.ReconnectWait(250*time.Millisecond),
		nats.DrainTimeout(drainTimeout), nats.ClosedHandler(func(*nats.Conn) { close(done) }),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				log.Warn("NATS disconnected", "connection", connName, "err", err)
			}
		}),
		nats.ReconnectHandler(func(c *nats.Conn) {
			log.Info("NATS reconnected", "connection", connName, "url", c.ConnectedUrlRedacted())
		}),
		// Permission violations and slow consumers arrive here, not as returned errors.
		nats.ErrorHandler(func(_ *nats.Conn, sub *nats.Subscription, err error) {
			subject := ""
			if sub != nil {
				subject = sub.Subject
			}
			log.Error("NATS error", "connection", connName, "subscription", subject, "err", err)
		}))
	if err != nil {
		return nil, nil, fmt.Errorf("connect to NATS at %s: %w", redactURLs(s.natsURL), err)
	}
	return nc, done, nil
}

// closeConn drains nc and waits until it has closed, at most drainTimeout and a
// second.
func closeConn(nc *nats.Conn, closed <-chan struct{}, log *slog.Logger) {
	if err := nc.Drain(); err != nil {
		nc.Close()
	}
	select {
	case <-closed:
	case <-time.After(drainTimeout + time.Second):
		log.Warn("NATS connection not closed after its drain timeout", "connection", nc.Opts.Name)
	}
}

// serveProfiles serves net/http/pprof's profiles on addr until the returned function
// is called; an empty addr serves nothing.
func serveProfiles(addr string, log *slog.Logger) (stop func(), err error) {
	if addr == "" {
		return func() {}, nil
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--pprof %s: %w", addr, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("serve profiles", "err", err)
		}
	}()
	log.Info("serving pprof profiles", "addr", ln.Addr().String())
	return func() { _ = srv.Close(); <-done }, nil
}

// allowFlag is --allow-callback: internal addresses that callbacks may reach.
type allowFlag struct {
	values listFlag
}

func (a *allowFlag) register(fs *flag.FlagSet) {
	fs.Var(&a.values, "allow-callback", "internal address or CIDR prefix that callbacks and input-image URLs may reach, e.g. an n8n host (repeatable)")
}

// guard returns the callback guard that refuses internal addresses but the allowed.
func (a *allowFlag) guard() (*callback.Guard, error) {
	allowed, err := callback.ParsePrefixes(a.values)
	if err != nil {
		return nil, fmt.Errorf("--allow-callback: %w", err)
	}
	return callback.NewGuard(allowed...), nil
}

// redactURLs returns the comma-separated NATS URLs urls with their passwords replaced
// by "xxxxx", fit for logs and error messages.
func redactURLs(urls string) string {
	parts := strings.Split(urls, ",")
	for i, raw := range parts {
		u, err := url.Parse(strings.TrimSpace(raw))
		if err != nil {
			// An unparsable URL may still hold a secret: say nothing of it.
			parts[i] = "(invalid URL)"
			continue
		}
		if u.User != nil {
			if _, has := u.User.Password(); !has {
				// nats://token@host: the user part is the secret.
				u.User = url.User("xxxxx")
			}
		}
		parts[i] = u.Redacted()
	}
	return strings.Join(parts, ",")
}

// rateFlags are the API's two budgets per API key: --rate-submit and --rate-read,
// with their bursts.
type rateFlags struct {
	submit, read           rateFlag
	submitBurst, readBurst int
}

// register adds the flags; offWhenOpen says, in their help, that an open API
// (up on loopback) limits nothing unless they are given.
func (r *rateFlags) register(fs *flag.FlagSet, offWhenOpen bool) {
	r.submit.v, r.read.v = intake.DefaultSubmitRate.PerSecond, intake.DefaultReadRate.PerSecond
	note := "; 0 turns the limit off"
	if offWhenOpen {
		note += "; unless given, an open API (no keys, loopback) limits nothing"
	}
	fs.Var(&r.submit, "rate-submit", "at most `n` job submissions and other changes (POST, PUT, DELETE) a second per API key"+note)
	fs.IntVar(&r.submitBurst, "rate-submit-burst", 0, "at most `n` submissions and changes at once per API key (default twice --rate-submit)")
	fs.Var(&r.read, "rate-read", "at most `n` reads (GET: jobs, events, outputs, nodes, …) a second per API key"+note)
	fs.IntVar(&r.readBurst, "rate-read-burst", 0, "at most `n` reads at once per API key (default twice --rate-read)")
}

// limits returns the intake's budgets; on an open API, a rate not given is off.
func (r *rateFlags) limits(open bool) (submit, read intake.RateLimit) {
	return r.submit.limit(r.submitBurst, open), r.read.limit(r.readBurst, open)
}

// rateFlag is a rate a second that knows whether it was given.
type rateFlag struct {
	v   float64
	set bool
}

func (f *rateFlag) String() string { return strconv.FormatFloat(f.v, 'g', -1, 64) }

func (f *rateFlag) Set(s string) error {
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || v < 0 || math.IsInf(v, 0) || math.IsNaN(v) {
		return fmt.Errorf("%q is not a rate a second (a number, 0 for no limit)", s)
	}
	f.v, f.set = v, true
	return nil
}

func (f rateFlag) limit(burst int, open bool) intake.RateLimit {
	if f.v == 0 || open && !f.set {
		return intake.RateLimit{PerSecond: intake.Unlimited}
	}
	return intake.RateLimit{PerSecond: f.v, Burst: burst}
}

// outputsFlags are --outputs, where scene outputs are stored, and --output-url-ttl,
// how long their presigned URLs stay valid.
type outputsFlags struct {
	spec string
	ttl  time.Duration
}

// register adds --outputs, and --output-url-ttl when links says the command gives
// output URLs.
func (o *outputsFlags) register(fs *flag.FlagSet, links bool) {
	fs.StringVar(&o.spec, "outputs", "", "where scene outputs are stored: s3://BUCKET/PREFIX[?part_size=16MiB] for an S3-compatible bucket "+
		"(AWS_ENDPOINT_URL_S3, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), or the fleet's JetStream object store if empty")
	if links {
		fs.DurationVar(&o.ttl, "output-url-ttl", time.Hour, "how long the presigned URLs of outputs in an S3-compatible store stay valid")
	}
}

// open returns the store --outputs names, nil for the JetStream object store (each
// service opens that on its own connection).
func (o *outputsFlags) open(ctx context.Context) (outputs.Store, error) {
	if o.spec == "" || o.spec == "nats" {
		return nil, nil
	}
	s, err := outputs.Open(ctx, o.spec, nil)
	if err != nil {
		return nil, fmt.Errorf("--outputs: %w", err)
	}
	return s, nil
}
