package fleet

import (
	"encoding/json"
	"fmt"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/jsontree"
)

// EventType is the last token of an event's subject and the suffix of its CloudEvents type.
type EventType string

// Event types of scenes and jobs.
const (
	EventQueued    EventType = "queued"
	EventStarted   EventType = "started"
	EventProgress  EventType = "progress"
	EventRetrying  EventType = "retrying"
	EventCompleted EventType = "completed"
	EventFailed    EventType = "failed"
	EventCancelled EventType = "cancelled"
)

// Terminal reports whether an event of this type ends a scene or a job.
func (t EventType) Terminal() bool {
	return t == EventCompleted || t == EventFailed || t == EventCancelled
}

// CloudEventType is the CloudEvents type attribute of an event of kind ("scene" or
// "job") and type t, e.g. "dev.comfyfleet.scene.completed".
func CloudEventType(kind string, t EventType) string {
	return "dev.comfyfleet." + kind + "." + string(t)
}

// Event is a CloudEvents 1.0 event in its JSON format: the public contract that other
// services subscribe to. ID is stable: the same happening always carries the same ID,
// so a consumer can drop duplicates.
type Event struct {
	SpecVersion     string          `json:"specversion"`
	ID              string          `json:"id"`
	Source          string          `json:"source"`
	Type            string          `json:"type"`
	Subject         string          `json:"subject"`
	Time            time.Time       `json:"time"`
	DataContentType string          `json:"datacontenttype"`
	Data            json.RawMessage `json:"data"`
}

// Encode returns e as json.Marshal writes it, in one pass: e.Data is written as
// it is, so it must be compact JSON, as the Envelope methods make it; empty, it is
// written as null.
func (e Event) Encode() ([]byte, error) {
	at, err := e.Time.MarshalJSON()
	if err != nil {
		return nil, fmt.Errorf("encode event %s: %w", e.ID, err)
	}
	b := make([]byte, 0, 160+len(e.ID)+len(e.Source)+len(e.Subject)+len(e.Data))
	b = append(b, `{"specversion":`...)
	b = jsontree.AppendString(b, e.SpecVersion)
	b = append(b, `,"id":`...)
	b = jsontree.AppendString(b, e.ID)
	b = append(b, `,"source":`...)
	b = jsontree.AppendString(b, e.Source)
	b = append(b, `,"type":`...)
	b = jsontree.AppendString(b, e.Type)
	b = append(b, `,"subject":`...)
	b = jsontree.AppendString(b, e.Subject)
	b = append(b, `,"time":`...)
	b = append(b, at...)
	b = append(b, `,"datacontenttype":`...)
	b = jsontree.AppendString(b, e.DataContentType)
	b = append(b, `,"data":`...)
	if len(e.Data) == 0 {
		b = append(b, "null"...)
	}
	b = append(b, e.Data...)
	return append(b, '}'), nil
}

// SceneEvent is the data of a scene event.
type SceneEvent struct {
	JobID string    `json:"job_id"`
	Index int       `json:"index"`
	Type  EventType `json:"type"`
	// Retry is the run of the scene the event belongs to (see WorkItem.Retry).
	Retry   int    `json:"retry,omitempty"`
	Attempt int    `json:"attempt,omitempty"`
	Node    string `json:"node,omitempty"`
	// Pool is set on queued events.
	Pool     string    `json:"pool,omitempty"`
	Progress *Progress `json:"progress,omitempty"`
	Error    string    `json:"error,omitempty"`
	// Failures are the run's earlier failed attempts, on retrying and failed events,
	// so that the last of them holds the scene's whole history.
	Failures []Attempt `json:"failures,omitempty"`
	Outputs  []Output  `json:"outputs,omitempty"`
	// Duration is how long the attempt ran on its node, on completed events: from
	// the moment ComfyUI started it, so without time queued inside ComfyUI.
	Duration time.Duration `json:"duration_ns,omitempty"`
	// Workflow and Model (the checkpoint) are set on completed events, and
	// ModelLoaded when the node had last run another checkpoint: the dispatcher
	// learns each node's speed and model-load time from them.
	Workflow    string    `json:"workflow,omitempty"`
	Model       string    `json:"model,omitempty"`
	ModelLoaded bool      `json:"model_loaded,omitempty"`
	Time        time.Time `json:"time"`
}

// ID is the event's stable id: one per scene and run for queued and terminal events,
// one per attempt for started and retrying, one per step for progress.
func (e SceneEvent) ID() string {
	base := fmt.Sprintf("scene.%s.%d.%s%s", e.JobID, e.Index, e.Type, retrySuffix(e.Retry))
	switch e.Type {
	case EventStarted, EventRetrying:
		return fmt.Sprintf("%s.%d", base, e.Attempt)
	case EventProgress:
		p := Progress{}
		if e.Progress != nil {
			p = *e.Progress
		}
		return fmt.Sprintf("%s.%d.%s.%d", base, e.Attempt, p.Node, p.Value)
	}
	return base
}

// Envelope wraps the scene event as a CloudEvent from source.
func (e SceneEvent) Envelope(source string) (Event, error) {
	data, err := json.Marshal(e)
	if err != nil {
		return Event{}, fmt.Errorf("encode scene event: %w", err)
	}
	return Event{
		SpecVersion:     "1.0",
		ID:              e.ID(),
		Source:          source,
		Type:            CloudEventType("scene", e.Type),
		Subject:         fmt.Sprintf("jobs/%s/scenes/%d", e.JobID, e.Index),
		Time:            e.Time,
		DataContentType: "application/json",
		Data:            data,
	}, nil
}

// JobEvent is the data of a job event: the job as it stood.
type JobEvent struct {
	Type EventType `json:"type"`
	Job  Job       `json:"job"`
}

// JobEventID is the stable id of the job event of type t in the job's round (see
// Job.Round).
func JobEventID(job string, t EventType, round int) string {
	return "job." + job + "." + string(t) + retrySuffix(round)
}

// Envelope wraps the job event as a CloudEvent from source.
func (e JobEvent) Envelope(source string) (Event, error) {
	data, err := json.Marshal(e)
	if err != nil {
		return Event{}, fmt.Errorf("encode job event: %w", err)
	}
	return Event{
		SpecVersion:     "1.0",
		ID:              JobEventID(e.Job.ID, e.Type, e.Job.Round),
		Source:          source,
		Type:            CloudEventType("job", e.Type),
		Subject:         "jobs/" + e.Job.ID,
		Time:            e.Job.UpdatedAt,
		DataContentType: "application/json",
		Data:            data,
	}, nil
}

// DecodeSceneEvent reads a scene event from a CloudEvent's JSON, in one pass: every
// service reads every scene event, so decoding the envelope and then its data
// again would cost each of them a second scan of every event.
func DecodeSceneEvent(b []byte) (SceneEvent, error) {
	var ev struct {
		ID   string      `json:"id"`
		Data *SceneEvent `json:"data"`
	}
	if err := json.Unmarshal(b, &ev); err != nil {
		return SceneEvent{}, fmt.Errorf("decode scene event %s: %w", ev.ID, err)
	}
	if ev.Data == nil {
		return SceneEvent{}, fmt.Errorf("decode scene event %s: no data", ev.ID)
	}
	return *ev.Data, nil
}
