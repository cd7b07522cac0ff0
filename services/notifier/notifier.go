// Package notifier completes jobs: for each job that reached a terminal state it
// publishes the public job event and POSTs the job to its callback URL, retrying
// with back-off until the receiver accepts it.
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
	"strconv"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/contrib/instrumentation/net/http/otelhttp"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/metric"
	"go.opentelemetry.io/otel/trace"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/callback"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
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
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	return nil
}

type notifier struct {
	cfg      Config
	log      *slog.Logger
	jobs     *fleet.Jobs
	tenants  *tenancy.Store
	pub      *fleet.Publisher
	webhooks metric.Int64Counter
}

// Run runs the notifier until ctx is done.
func Run(ctx context.Context, cfg Config) error {
	return fleet.IgnoreStop(ctx, run(ctx, cfg))
}

func run(ctx context.Context, cfg Config) error {
	if err := cfg.fill(); err != nil {
		return err
	}
	js, err := jetstream.New(cfg.Conn)
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
	return fleet.Consume(ctx, js, fleet.StreamDone, fleet.DoneConsumer(cfg.WebhookAttempts), n.log, n.complete)
}

// complete publishes the job's terminal event and delivers its webhook.
func (n *notifier) complete(ctx context.Context, msg jetstream.Msg) {
	var done fleet.DoneMsg
	if err := json.Unmarshal(msg.Data(), &done); err != nil {
		_ = msg.TermWithReason("undecodable")
		return
	}
	md, err := msg.Metadata()
	if err != nil {
		_ = msg.NakWithDelay(time.Second)
		return
	}
	attempt := int(md.NumDelivered)
	ctx, span := tracer.Start(ctx, "complete job", trace.WithAttributes(
		attribute.String("comfyfleet.job", done.JobID), attribute.Int("comfyfleet.attempt", attempt)))
	defer span.End()

	job, _, err := n.jobs.Get(ctx, done.JobID)
	if errors.Is(err, fleet.ErrJobNotFound) {
		fleet.DropUnknownJob(n.log, msg, done.JobID)
		return
	}
	if err != nil {
		n.retry(span, msg, attempt, err)
		return
	}
	if !job.Status.Terminal() || job.Round > done.Round {
		n.log.Info("job reopened by a retry since it ended; its next end will be announced", "job", job.ID)
		fleet.Ack(ctx, n.log, msg)
		return
	}
	typ := jobEventType(job.Status)
	if err := n.pub.JobEvent(ctx, fleet.JobEvent{Type: typ, Job: *job}); err != nil {
		n.retry(span, msg, attempt, err)
		return
	}
	if job.CallbackURL == "" {
		fleet.Ack(ctx, n.log, msg)
		return
	}
	err = n.deliver(ctx, job, typ)
	outcome := "retrying"
	switch {
	case err == nil:
		outcome = "delivered"
		n.log.Info("webhook delivered", "job", job.ID, "attempt", attempt)
		fleet.Ack(ctx, n.log, msg)
	case attempt >= n.cfg.WebhookAttempts || errors.Is(err, errGone):
		outcome = "given_up"
		span.RecordError(err)
		n.log.Error("webhook given up", "job", job.ID, "attempts", attempt, "err", err)
		_ = msg.TermWithReason("webhook given up")
	default:
		n.retry(span, msg, attempt, err)
	}
	n.webhooks.Add(ctx, 1, metric.WithAttributes(attribute.String("outcome", outcome)))
}

func (n *notifier) retry(span trace.Span, msg jetstream.Msg, attempt int, err error) {
	span.RecordError(err)
	span.SetStatus(codes.Error, err.Error())
	delay := fleet.ExponentialDelay(n.cfg.WebhookBackoff, n.cfg.WebhookMaxBackoff, attempt)
	n.log.Warn("job completion will be retried", "subject", msg.Subject(), "attempt", attempt, "in", delay, "err", err)
	_ = msg.NakWithDelay(delay)
}

// errGone marks a receiver that answered 410 Gone: it wants no more attempts.
var errGone = errors.New("receiver answered 410 Gone")

// deliver POSTs the job to its callback URL, signed per Standard Webhooks with the
// tenant's secret. The webhook-id header is the same on every attempt, so a
// receiver can drop repeats.
func (n *notifier) deliver(ctx context.Context, job *fleet.Job, typ fleet.EventType) error {
	ctx, span := tracer.Start(ctx, "deliver webhook", trace.WithSpanKind(trace.SpanKindClient))
	defer span.End()
	body, err := json.Marshal(api.Webhook{Type: "job." + string(typ), Job: api.FromJob(job, n.cfg.PublicURL)})
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
