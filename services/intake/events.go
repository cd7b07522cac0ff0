package intake

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/danielgtaylor/huma/v2"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
)

// keepAliveInterval is how often an idle event stream sends a comment, so that
// proxies keep it open and a client that is gone is noticed.
const keepAliveInterval = 15 * time.Second

// eventWriteTimeout bounds each write to an event stream's client.
const eventWriteTimeout = 10 * time.Second

type eventsInput struct {
	ID          string `path:"id" doc:"Job id."`
	LastEventID string `header:"Last-Event-ID" doc:"Resume after the event with this id, as a browser's EventSource does when it reconnects."`
}

func (in *intake) addEventRoutes(a huma.API) {
	huma.Register(a, secured(tenancy.RoleRead, huma.Operation{
		OperationID: "stream-job-events",
		Method:      http.MethodGet,
		Path:        "/v1/jobs/{id}/events",
		Summary:     "Follow a job's events live",
		Description: "Server-Sent Events: the job's CloudEvents from its first one (or after Last-Event-ID), then live as they happen. " +
			"Each message has the CloudEvent's id as id, its type (dev.comfyfleet.scene.progress, …) as event, and the CloudEvent JSON as data. " +
			"The stream ends after the job's completed, failed or cancelled event.",
		Tags:   []string{"jobs"},
		Errors: []int{http.StatusNotFound},
		Responses: map[string]*huma.Response{
			"200": {Description: "The job's events.", Content: map[string]*huma.MediaType{
				"text/event-stream": {Schema: &huma.Schema{Type: huma.TypeString}},
			}},
		},
	}), in.streamEvents)
}

func (in *intake) streamEvents(ctx context.Context, input *eventsInput) (*huma.StreamResponse, error) {
	job, err := in.tenantJob(ctx, input.ID)
	if err != nil {
		return nil, err
	}
	end := jobEnd{job: job.ID, round: job.Round}
	cfg := jetstream.OrderedConsumerConfig{FilterSubjects: fleet.JobEventsFilter(job.ID)}
	if last := input.LastEventID; last != "" {
		if end.is(last) {
			return &huma.StreamResponse{Body: func(hc huma.Context) { setEventHeaders(hc) }}, nil
		}
		seq, err := in.sequenceOf(ctx, job.ID, last)
		if err != nil {
			return nil, huma.Error503ServiceUnavailable("cannot read the job's events now; retry", err)
		}
		if seq > 0 {
			cfg.DeliverPolicy, cfg.OptStartSeq = jetstream.DeliverByStartSequencePolicy, seq+1
		}
	}
	return &huma.StreamResponse{Body: func(hc huma.Context) { in.sendEvents(hc, end, cfg) }}, nil
}

func setEventHeaders(hc huma.Context) {
	hc.SetHeader("Content-Type", "text/event-stream")
	hc.SetHeader("Cache-Control", "no-cache")
	hc.SetHeader("X-Accel-Buffering", "no")
}

// sendEvents streams the events that cfg selects until the end event, the client
// leaving or the intake stopping.
func (in *intake) sendEvents(hc huma.Context, end jobEnd, cfg jetstream.OrderedConsumerConfig) {
	ctx, cancel := context.WithCancel(hc.Context())
	defer cancel()
	go func() {
		select {
		case <-in.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	log := in.log.With("job", end.job)
	cons, err := in.js.OrderedConsumer(ctx, fleet.StreamEvents, cfg)
	var it jetstream.MessagesContext
	if err == nil {
		it, err = cons.Messages()
	}
	if err != nil {
		log.Warn("follow job events", "err", err)
		hc.SetStatus(http.StatusServiceUnavailable)
		return
	}
	defer in.dropConsumer(it, cons)

	setEventHeaders(hc)
	out := newEventWriter(hc)
	if err := out.flush(); err != nil {
		return
	}
	for {
		wait, stop := context.WithTimeout(ctx, keepAliveInterval)
		msg, err := it.Next(jetstream.NextContext(wait))
		stop()
		switch {
		case ctx.Err() != nil:
			return
		case errors.Is(err, context.DeadlineExceeded):
			if err := out.comment("keep-alive"); err != nil {
				return
			}
			continue
		case err != nil:
			log.Warn("follow job events", "err", err)
			return
		}
		id, err := out.event(msg.Data())
		if err != nil {
			log.Debug("event stream ended", "err", err)
			return
		}
		if end.is(id) {
			return
		}
	}
}

// jobEnd names the events that end a job's stream: the job's terminal event in the
// round it was in when the stream began. A job reopened by a scene retry ends again,
// in a later round; a stream that began before the retry ends with the round it saw.
type jobEnd struct {
	job   string
	round int
}

// is reports whether the event with id ends the stream.
func (e jobEnd) is(id string) bool {
	for _, t := range []fleet.EventType{fleet.EventCompleted, fleet.EventFailed, fleet.EventCancelled} {
		if id == fleet.JobEventID(e.job, t, e.round) {
			return true
		}
	}
	return false
}

// sequenceOf returns the stream sequence of job's event with id, or 0 if the job has
// no such event. It reads the headers of the job's events only.
func (in *intake) sequenceOf(ctx context.Context, job, id string) (uint64, error) {
	cons, err := in.js.OrderedConsumer(ctx, fleet.StreamEvents, jetstream.OrderedConsumerConfig{
		FilterSubjects: fleet.JobEventsFilter(job),
		HeadersOnly:    true,
	})
	if err != nil {
		return 0, fmt.Errorf("look up event %s: %w", id, err)
	}
	it, err := cons.Messages()
	if err != nil {
		return 0, fmt.Errorf("look up event %s: %w", id, err)
	}
	defer in.dropConsumer(it, cons)
	if info := cons.CachedInfo(); info == nil || info.NumPending == 0 {
		return 0, nil
	}
	for {
		msg, err := it.Next(jetstream.NextContext(ctx))
		if err != nil {
			return 0, fmt.Errorf("look up event %s: %w", id, err)
		}
		md, err := msg.Metadata()
		if err != nil {
			return 0, fmt.Errorf("look up event %s: %w", id, err)
		}
		if msg.Headers().Get(jetstream.MsgIDHeader) == id {
			return md.Sequence.Stream, nil
		}
		if md.NumPending == 0 {
			return 0, nil
		}
	}
}

// dropConsumer stops it and deletes its ordered consumer from the server at once,
// rather than leaving it there until it expires.
func (in *intake) dropConsumer(it jetstream.MessagesContext, cons jetstream.Consumer) {
	it.Stop()
	info := cons.CachedInfo()
	if info == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := in.js.DeleteConsumer(ctx, fleet.StreamEvents, info.Name); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
		in.log.Debug("delete event consumer", "consumer", info.Name, "err", err)
	}
}

// eventWriter writes Server-Sent Events to a client, each flushed at once.
type eventWriter struct {
	w  io.Writer
	rc *http.ResponseController
}

func newEventWriter(hc huma.Context) *eventWriter {
	out := &eventWriter{w: hc.BodyWriter()}
	if rw, ok := out.w.(http.ResponseWriter); ok {
		out.rc = http.NewResponseController(rw)
	}
	return out
}

// event writes a stored CloudEvent and returns its id.
func (w *eventWriter) event(data []byte) (string, error) {
	var ev struct {
		ID   string `json:"id"`
		Type string `json:"type"`
	}
	if err := json.Unmarshal(data, &ev); err != nil {
		return "", fmt.Errorf("decode stored event: %w", err)
	}
	var b bytes.Buffer
	fmt.Fprintf(&b, "id: %s\nevent: %s\ndata: ", ev.ID, ev.Type)
	if err := json.Compact(&b, data); err != nil {
		return "", fmt.Errorf("compact stored event %s: %w", ev.ID, err)
	}
	b.WriteString("\n\n")
	return ev.ID, w.write(b.Bytes())
}

// comment writes a comment line, which clients ignore.
func (w *eventWriter) comment(text string) error {
	return w.write([]byte(": " + text + "\n\n"))
}

func (w *eventWriter) write(b []byte) error {
	if w.rc != nil {
		_ = w.rc.SetWriteDeadline(time.Now().Add(eventWriteTimeout))
	}
	if _, err := w.w.Write(b); err != nil {
		return fmt.Errorf("write event: %w", err)
	}
	return w.flush()
}

func (w *eventWriter) flush() error {
	if w.rc == nil {
		return nil
	}
	if err := w.rc.Flush(); err != nil {
		return fmt.Errorf("flush event: %w", err)
	}
	return nil
}
