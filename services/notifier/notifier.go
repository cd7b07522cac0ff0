// Package notifier follows jobs to their end: its tracker folds the starts and ends
// of scenes into each job's state, a compare-and-set of about one byte per scene,
// records failed scenes as dead letters, and announces a job whose scenes have all
// ended; for each such job it publishes the public job event and POSTs the job to its
// callback URL, retrying with back-off until the receiver accepts it. Any number of
// notifiers run at once; each message goes to one of them.
package notifier

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/callback"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/outputs"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
)

const source = "comfyfleet/notifier"

var tracer = otel.Tracer("comfyfleet/notifier")

// Config configures the notifier.
type Config struct {
	// Conn is the NATS connection. Required.
	Conn *nats.Conn
	// Settings must match the other services'. Defaults to fleet.DefaultSettings.
	Settings fleet.Settings
	// PublicURL is the API's base URL, used for output links in webhooks.
	// Defaults to "http://127.0.0.1:8080".
	PublicURL string
	// CallbackGuard decides which addresses webhooks may reach, checked at connect
	// time for every connection and redirect. Defaults to a guard that refuses
	// loopback, private, link-local and metadata addresses.
	CallbackGuard *callback.Guard
	// HTTPClient sends webhooks. Defaults to CallbackGuard's client with a 10s
	// timeout.
	HTTPClient *http.Client
	// WebhookBackoff is the first delay between webhook attempts; it doubles up to
	// WebhookMaxBackoff. Defaults to 1s.
	WebhookBackoff time.Duration
	// WebhookMaxBackoff caps the delay between webhook attempts. Defaults to 5m.
	WebhookMaxBackoff time.Duration
	// WebhookAttempts is how many times a webhook is tried before it is given up.
	// Defaults to 20 (about 75 minutes with the default back-off).
	WebhookAttempts int
	// Outputs is where the executors store scene outputs: when it gives presigned
	// URLs (an S3-compatible store), webhooks link outputs by them, and the janitor
	// deletes expired jobs' outputs there. Defaults to none: outputs are linked
	// through the API (PublicURL) and deleted from the JetStream object store.
	Outputs outputs.Store
	// OutputURLTTL is how long the presigned URLs in webhooks stay valid. Defaults
	// to 1h.
	OutputURLTTL time.Duration
	// TrackerWorkers is how many scene events the tracker handles at once; the
	// ends of one job's scenes handled together are folded into its state in one
	// write. Defaults to 32.
	TrackerWorkers int
	// Logger defaults to slog.Default.
	Logger *slog.Logger
}

func (c *Config) fill() error {
	if c.Conn == nil {
		return errors.New("notifier: a NATS connection is required")
	}
	s, err := c.Settings.Normalize()
	if err != nil {
		return fmt.Errorf("notifier: %w", err)
	}
	c.Settings = s
	if c.PublicURL == "" {
		c.PublicURL = "http://127.0.0.1:8080"
	}
	if c.CallbackGuard == nil {
		c.CallbackGuard = callback.NewGuard()
	}
	if c.HTTPClient == nil {
		c.HTTPClient = c.CallbackGuard.Client(10*time.Second, func(rt http.RoundTripper) http.RoundTripper {
			return otelhttp.NewTransport(rt)
		})
	}
	if c.WebhookBackoff == 0 {
		c.WebhookBackoff = time.Second
	}
	if c.WebhookMaxBackoff == 0 {
		c.WebhookMaxBackoff = 5 * time.Minute
	}
	if c.WebhookAttempts == 0 {
		c.WebhookAttempts = 20
	}
	if c.OutputURLTTL == 0 {
		c.OutputURLTTL = time.Hour
	}
	if c.TrackerWorkers == 0 {
		c.TrackerWorkers = 32
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

type notifier struct {
	cfg      Config
	log      *slog.Logger
	jobs     *fleet.Jobs
	dead     jetstream.KeyValue
	tenants  *tenancy.Store
	pub      *fleet.Publisher
	webhooks metric.Int64Counter
	running  runningJobs
	states   stateCache
	ends     endGroups
}

// Run runs the notifier until ctx is done.
func Run(ctx context.Context, cfg Config) error {
	return fleet.IgnoreStop(ctx, run(ctx, cfg))
}

func run(ctx context.Context, cfg Config) error {
	if err := cfg.fill(); err != nil {
		return err
	}
	js, err := jetstream.New(cfg.Conn, fleet.PublishAckTimeout)
	if err != nil {
		return fmt.Errorf("notifier: jetstream: %w", err)
	}
	n := &notifier{cfg: cfg, log: cfg.Logger.With("service", "notifier"), pub: fleet.NewPublisher(js, source)}
	if err := fleet.Retry(ctx, n.log, "notifier start", func(ctx context.Context) error {
		var err error
		if err = fleet.Ensure(ctx, js, cfg.Settings); err != nil {
			return err
		}
		if n.jobs, err = fleet.OpenJobs(ctx, js); err != nil {
			return err
		}
		if n.dead, err = js.KeyValue(ctx, fleet.BucketDeadLetters); err != nil {
			return fmt.Errorf("open dead letters bucket: %w", err)
		}
		n.tenants, err = tenancy.Open(ctx, js)
		return err
	}); err != nil {
		return fmt.Errorf("notifier: %w", err)
	}
	if n.webhooks, err = otel.Meter("comfyfleet/notifier").Int64Counter("comfyfleet.webhook.attempts",
		metric.WithDescription("Webhook delivery attempts by outcome: delivered, retrying or given_up.")); err != nil {
		return fmt.Errorf("notifier metrics: %w", err)
	}
	n.log.Info("notifier running")
	defer n.log.Info("notifier stopped")
	var wg sync.WaitGroup
	errs := make(chan error, 3)
	wg.Go(func() {
		errs <- fleet.Consume(ctx, js, fleet.StreamEvents, fleet.TrackerConsumer(), n.log, n.track, fleet.Service("notifier"), fleet.Workers(cfg.TrackerWorkers))
	})
	wg.Go(func() {
		errs <- fleet.Consume(ctx, js, fleet.StreamDone, fleet.DoneConsumer(cfg.WebhookAttempts), n.log, n.complete, fleet.Service("notifier"), fleet.Workers(8))
	})
	wg.Go(func() {
		errs <- fleet.Consume(ctx, js, fleet.StreamExpiry, fleet.JanitorConsumer(), n.log, n.expire, fleet.Service("notifier"), fleet.Workers(4))
	})
	wg.Wait()
	close(errs)
	var all []error
	for err := range errs {
		all = append(all, err)
	}
	return errors.Join(all...)
}

// track folds a scene's start or end into its job's state, and announces the job
// once every scene has ended.
func (n *notifier) track(ctx context.Context, msg jetstream.Msg) error {
	ev, err := fleet.DecodeSceneEvent(msg.Data())
	if err != nil {
		return fleet.Permanent(err)
	}
	trace.SpanFromContext(ctx).SetAttributes(attribute.String("comfyfleet.job", ev.JobID), attribute.Int("comfyfleet.scene", ev.Index))
	if ev.Type == fleet.EventStarted {
		if n.running.has(ev.JobID) {
			return nil
		}
		if _, err := n.jobs.UpdateState(ctx, ev.JobID, func(st *fleet.JobState) error {
			if !st.Start(ev.Time) {
				return fleet.ErrNoChange
			}
			return nil
		}); errors.Is(err, fleet.ErrJobNotFound) {
			return fleet.UnknownJob(msg, ev.JobID)
		} else if err != nil {
			return err
		}
		n.running.add(ev.JobID)
		return nil
	}
	st, wrote, err := n.ends.fold(ctx, ev, n.writeEnds)
	if errors.Is(err, fleet.ErrJobNotFound) {
		return fleet.UnknownJob(msg, ev.JobID)
	}
	if err != nil {
		return err
	}
	if ev.Type == fleet.EventFailed && ev.Retry >= st.Retries[ev.Index] {
		if err := n.recordDeadLetter(ctx, st, ev); err != nil {
			return err
		}
	}
	if !st.Ended() || !wrote {
		return nil
	}
	n.running.remove(ev.JobID)
	n.states.drop(ev.JobID)
	done := fleet.DoneMsg{JobID: st.ID, Round: st.Round, Scenes: st.Scenes()}
	return n.pub.JSON(ctx, fleet.DoneSubject(st.ID), done.MsgID(), done)
}

// writeEnds folds the ends evs of scenes of one job into its state.
func (n *notifier) writeEnds(ctx context.Context, evs []fleet.SceneEvent) (*fleet.JobState, error) {
	job := evs[0].JobID
	known, rev := n.states.get(job)
	st, rev, err := n.jobs.UpdateStateFrom(ctx, job, known, rev, func(st *fleet.JobState) error {
		changed := false
		for _, ev := range evs {
			changed = st.End(ev.Index, ev.Retry, ev.Type, ev.Time) || changed
		}
		if !changed {
			return fleet.ErrNoChange
		}
		return nil
	})
	if err == nil {
		n.states.put(job, st, rev)
	}
	return st, err
}

// endGroups folds the ends of a job's scenes into its state in groups: while the
// state of a job is being written, the ends of its other scenes that come gather, and
// the next write folds them all, one compare-and-set. Under load the state of a job
// is written a few times for many scenes, not once for each.
type endGroups struct {
	mu   sync.Mutex
	cond *sync.Cond
	// open are the groups still taking ends, by job; writing the jobs whose
	// state is being written.
	open    map[string]*endGroup
	writing map[string]bool
}

// endGroup is ends of scenes of one job folded in one write, and what it wrote.
type endGroup struct {
	evs  []fleet.SceneEvent
	done chan struct{}
	st   *fleet.JobState
	err  error
}

// fold adds the end ev to its job's open group, and returns the state once the
// group is written. The first end of a group writes it, by write with its ctx, once
// the job's previous group is written; wrote reports whether this end did (so that
// what follows from the state, as announcing the job's end, is done once).
func (g *endGroups) fold(ctx context.Context, ev fleet.SceneEvent, write func(context.Context, []fleet.SceneEvent) (*fleet.JobState, error)) (st *fleet.JobState, wrote bool, err error) {
	g.mu.Lock()
	if g.cond == nil {
		g.cond = sync.NewCond(&g.mu)
		g.open, g.writing = map[string]*endGroup{}, map[string]bool{}
	}
	grp := g.open[ev.JobID]
	lead := grp == nil
	if lead {
		grp = &endGroup{done: make(chan struct{})}
		g.open[ev.JobID] = grp
	}
	grp.evs = append(grp.evs, ev)
	if !lead {
		g.mu.Unlock()
		<-grp.done
		return grp.st, false, grp.err
	}
	for g.writing[ev.JobID] {
		g.cond.Wait()
	}
	g.writing[ev.JobID] = true
	delete(g.open, ev.JobID)
	g.mu.Unlock()

	// Even if write panics, the group's other ends learn it failed, and the job's
	// next group is written.
	defer func() {
		if r := recover(); r != nil {
			grp.st, grp.err = nil, fmt.Errorf("fold the ends of job %s: %v", ev.JobID, r)
			defer panic(r)
		}
		close(grp.done)
		g.mu.Lock()
		delete(g.writing, ev.JobID)
		g.cond.Broadcast()
		g.mu.Unlock()
	}()
	grp.st, grp.err = write(ctx, grp.evs)
	return grp.st, true, grp.err
}

// staleReadFor is how long the notifier reads again, within one delivery of a job's
// end, a job that it read as it was before that end, before it gives the delivery
// back (with the webhook's back-off) and its worker to other jobs' ends.
const staleReadFor = 15 * time.Second

// expire deletes a job whose ttl has passed, cancelling it first if it has not
// ended: the janitor's handler of the messages its expiry schedule fires.
func (n *notifier) expire(ctx context.Context, msg jetstream.Msg) error {
	var e fleet.JobExpiry
	if err := json.Unmarshal(msg.Data(), &e); err != nil || !fleet.ValidToken(e.JobID) {
		return fleet.Permanent(fmt.Errorf("undecodable job expiry: %v", err))
	}
	trace.SpanFromContext(ctx).SetAttributes(attribute.String("comfyfleet.job", e.JobID))
	if wait := time.Until(e.ExpiresAt); wait > 0 {
		// The server's clock runs ahead of ours.
		return fleet.RetryAfter(wait, fmt.Errorf("job %s expires in %s", e.JobID, wait))
	}
	switch err := n.jobs.Delete(ctx, e.JobID, n.cfg.Outputs, n.pub); {
	case errors.Is(err, fleet.ErrJobNotFound):
		return nil
	case err != nil:
		return err
	}
	n.log.Info("expired job deleted", "job", e.JobID, "expired_at", e.ExpiresAt)
	return nil
}

// recordDeadLetter keeps a failed scene where GET /v1/deadletters finds it. It runs
// again for a redelivered event, so the record survives a crash after the update.
func (n *notifier) recordDeadLetter(ctx context.Context, st *fleet.JobState, ev fleet.SceneEvent) error {
	rec, err := n.jobs.Record(ctx, ev.JobID)
	if err != nil {
		return err
	}
	if ev.Index >= len(rec.Scenes) {
		return nil
	}
	s := rec.Scenes[ev.Index]
	failures := ev.Failures
	if !slices.ContainsFunc(failures, func(a fleet.Attempt) bool { return a.Attempt == ev.Attempt }) {
		failures = append(slices.Clip(failures), fleet.Attempt{Attempt: ev.Attempt, Node: ev.Node, Error: ev.Error, At: ev.Time})
	}
	dl := fleet.DeadLetter{
		JobID: ev.JobID, Index: ev.Index, Tenant: st.Tenant, Workflow: s.Spec.Workflow, Pool: s.Pool,
		Error: ev.Error, Attempts: ev.Attempt, Failures: failures, FailedAt: ev.Time,
	}
	b, err := json.Marshal(dl)
	if err != nil {
		return fmt.Errorf("encode dead letter: %w", err)
	}
	if _, err := n.dead.Put(ctx, fleet.DeadLetterKey(ev.JobID, ev.Index), b); err != nil {
		return fmt.Errorf("record dead letter: %w", err)
	}
	return nil
}

// stateCache keeps the last state the tracker wrote of each job it is following, with
// its revision: the next end of one of the job's scenes is then written without a read
// first, unless another notifier wrote in between.
type stateCache struct {
	mu     sync.Mutex
	states map[string]cachedState
}

type cachedState struct {
	st  *fleet.JobState
	rev uint64
}

// stateCacheKept bounds the states kept; past it, the cache starts afresh.
const stateCacheKept = 1 << 14

func (c *stateCache) get(job string) (*fleet.JobState, uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.states[job]
	return s.st, s.rev
}

func (c *stateCache) put(job string, st *fleet.JobState, rev uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.states == nil || len(c.states) >= stateCacheKept {
		c.states = map[string]cachedState{}
	}
	c.states[job] = cachedState{st, rev}
}

func (c *stateCache) drop(job string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.states, job)
}

// runningJobs remembers jobs known to have started, so that the starts of their
// other scenes cost nothing.
type runningJobs struct {
	mu   sync.Mutex
	jobs map[string]struct{}
}

// runningJobsKept bounds the memory of started jobs; past it, it starts afresh.
const runningJobsKept = 1 << 16

func (r *runningJobs) has(job string) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	_, ok := r.jobs[job]
	return ok
}

func (r *runningJobs) add(job string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.jobs == nil || len(r.jobs) >= runningJobsKept {
		r.jobs = map[string]struct{}{}
	}
	r.jobs[job] = struct{}{}
}

func (r *runningJobs) remove(job string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.jobs, job)
}

// complete publishes the job's terminal event and delivers its webhook.
func (n *notifier) complete(ctx context.Context, msg jetstream.Msg) error {
	var done fleet.DoneMsg
	if err := json.Unmarshal(msg.Data(), &done); err != nil {
		return fleet.Permanent(fmt.Errorf("undecodable done message: %w", err))
	}
	md, err := msg.Metadata()
	if err != nil {
		return err
	}
	attempt := int(md.NumDelivered)
	trace.SpanFromContext(ctx).SetAttributes(attribute.String("comfyfleet.job", done.JobID), attribute.Int("comfyfleet.attempt", attempt))
	retry := func(err error) error {
		if attempt >= n.cfg.WebhookAttempts {
			// The server delivers the end no more.
			n.log.Error("webhook given up", "job", done.JobID, "attempts", attempt, "err", err)
			return fleet.Permanent(fmt.Errorf("webhook given up: %w", err))
		}
		return fleet.RetryAfter(fleet.ExponentialDelay(n.cfg.WebhookBackoff, n.cfg.WebhookMaxBackoff, attempt), err)
	}
	job, err := n.readEnded(ctx, msg, done)
	if errors.Is(err, fleet.ErrJobNotFound) {
		return fleet.UnknownJob(msg, done.JobID)
	}
	if err != nil {
		return retry(err)
	}
	if job.Round > done.Round {
		n.log.Info("job reopened by a retry since it ended; its next end will be announced", "job", job.ID)
		return nil
	}
	typ := jobEventType(job.Status)
	if err := n.pub.JobEvent(ctx, fleet.JobEvent{Type: typ, Job: *job}); err != nil {
		return retry(err)
	}
	if job.CallbackURL == "" {
		return nil
	}
	err = n.deliver(ctx, job, typ)
	outcome := "retrying"
	defer func() { n.webhooks.Add(ctx, 1, metric.WithAttributes(attribute.String("outcome", outcome))) }()
	switch {
	case err == nil:
		outcome = "delivered"
		n.log.Info("webhook delivered", "job", job.ID, "attempt", attempt)
		return nil
	case attempt >= n.cfg.WebhookAttempts || errors.Is(err, errGone):
		outcome = "given_up"
		n.log.Error("webhook given up", "job", job.ID, "attempts", attempt, "err", err)
		return fleet.Permanent(fmt.Errorf("webhook given up: %w", err))
	}
	return retry(err)
}

// readEnded reads the job whose end done announces. A read that shows the job as it
// was before that end came from a server of the cluster that has not caught up yet
// (one restarted, say): the job is read again, within this delivery for up to
// staleReadFor, so that a replica behind for seconds does not use up the webhook's
// attempts, each a delivery of done.
func (n *notifier) readEnded(ctx context.Context, msg jetstream.Msg, done fleet.DoneMsg) (*fleet.Job, error) {
	job, caughtUp, err := fleet.ReadCaughtUp(ctx, staleReadFor, func() (*fleet.Job, bool, error) {
		job, err := n.jobs.GetEnded(ctx, done.JobID, done.Scenes)
		if err != nil {
			return nil, false, err
		}
		if job.Round > done.Round || job.Round == done.Round && job.Status.Terminal() {
			return job, true, nil
		}
		if err := msg.InProgress(); err != nil {
			return nil, false, fmt.Errorf("extend the delivery of job %s's end: %w", done.JobID, err)
		}
		return job, false, nil
	})
	if err != nil || caughtUp {
		return job, err
	}
	stale := fmt.Errorf("job %s read %s in round %d, before the end of round %d", job.ID, job.Status, job.Round, done.Round)
	n.log.Warn("job still read before its end; it is read again at the next delivery", "job", done.JobID, "for", staleReadFor, "err", stale)
	return nil, stale
}

// errGone marks a receiver that answered 410 Gone: it wants no more attempts.
var errGone = errors.New("receiver answered 410 Gone")

// deliver POSTs the job to its callback URL, signed per Standard Webhooks with the
// tenant's secret. The webhook-id header is the same on every attempt, so a
// receiver can drop repeats.
func (n *notifier) deliver(ctx context.Context, job *fleet.Job, typ fleet.EventType) error {
	ctx, span := tracer.Start(ctx, "deliver webhook", trace.WithSpanKind(trace.SpanKindClient))
	defer span.End()
	view := api.FromJob(job, n.cfg.PublicURL)
	if n.cfg.Outputs != nil {
		if err := api.Presign(ctx, &view, n.cfg.Outputs, n.cfg.OutputURLTTL); err != nil {
			n.log.Warn("presign output URLs; the webhook links them through the API", "job", job.ID, "err", err)
			view = api.FromJob(job, n.cfg.PublicURL)
		}
	}
	body, err := json.Marshal(api.Webhook{Type: "job." + string(typ), Job: view})
	if err != nil {
		return fmt.Errorf("encode webhook of job %s: %w", job.ID, err)
	}
	tenant := job.Tenant
	if tenant == "" {
		tenant = tenancy.DefaultTenant
	}
	t, err := n.tenants.Tenant(ctx, tenant)
	if err != nil {
		return fmt.Errorf("webhook secret of tenant %s: %w", tenant, err)
	}
	id, now := fleet.JobEventID(job.ID, typ, job.Round), time.Now()
	signature, err := tenancy.Sign(t.WebhookSecret, id, now, body)
	if err != nil {
		return fmt.Errorf("sign webhook of job %s: %w", job.ID, err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, job.CallbackURL, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("webhook request of job %s: %w", job.ID, err)
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("User-Agent", "comfyfleet-notifier")
	req.Header.Set("webhook-id", id)
	req.Header.Set("webhook-timestamp", strconv.FormatInt(now.Unix(), 10))
	req.Header.Set("webhook-signature", signature)
	resp, err := n.cfg.HTTPClient.Do(req)
	if err != nil {
		return fmt.Errorf("post webhook of job %s: %w", job.ID, err)
	}
	defer resp.Body.Close()
	snippet, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
	span.SetAttributes(attribute.Int("http.response.status_code", resp.StatusCode))
	switch {
	case resp.StatusCode >= 200 && resp.StatusCode < 300:
		return nil
	case resp.StatusCode == http.StatusGone:
		return errGone
	}
	return fmt.Errorf("webhook of job %s: receiver answered %s: %s", job.ID, resp.Status, bytes.TrimSpace(snippet))
}

func jobEventType(s fleet.Status) fleet.EventType {
	switch s {
	case fleet.StatusSucceeded:
		return fleet.EventCompleted
	case fleet.StatusCancelled:
		return fleet.EventCancelled
	}
	return fleet.EventFailed
}
