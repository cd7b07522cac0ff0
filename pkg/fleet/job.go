package fleet

import (
	"errors"

	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/inventory"
)

// Status is the state of a scene or a job.
type Status string

// Scene and job states. A scene moves queued → running → succeeded | failed
// (running → queued again between attempts), or to cancelled from any state that is
// not terminal; a job is running while any scene is not terminal, then failed if a
// scene failed, else cancelled if a scene was cancelled, else succeeded.
const (
	StatusQueued    Status = "queued"
	StatusRunning   Status = "running"
	StatusSucceeded Status = "succeeded"
	StatusFailed    Status = "failed"
	StatusCancelled Status = "cancelled"
)

// Terminal reports whether nothing more will happen to a scene or job in this state.
func (s Status) Terminal() bool {
	return s == StatusSucceeded || s == StatusFailed || s == StatusCancelled
}

// Attempt records one try of a scene that did not succeed.
type Attempt struct {
	Attempt int       `json:"attempt"`
	Node    string    `json:"node,omitempty"`
	Error   string    `json:"error"`
	At      time.Time `json:"at"`
}

// Scene is the state of one scene of a job.
type Scene struct {
	Index int       `json:"index"`
	Spec  SceneSpec `json:"spec"`
	Pool  string    `json:"pool"`
	// Model is the checkpoint the scene's graph loads first.
	Model string `json:"model,omitempty"`
	// NeedsKey names the scene's requirements in the job's Needs.
	NeedsKey string `json:"needs_key,omitempty"`
	// Region and PreferRegion are as on the Ticket.
	Region       string `json:"region,omitempty"`
	PreferRegion string `json:"prefer_region,omitempty"`
	Status       Status `json:"status"`
	Node         string `json:"node,omitempty"`
	Attempts     int    `json:"attempts"`
	// Retries counts the runs started by hand after the scene failed.
	Retries    int        `json:"retries,omitempty"`
	Progress   *Progress  `json:"progress,omitempty"`
	Error      string     `json:"error,omitempty"`
	Failures   []Attempt  `json:"failures,omitempty"`
	Outputs    []Output   `json:"outputs,omitempty"`
	QueuedAt   time.Time  `json:"queued_at"`
	StartedAt  *time.Time `json:"started_at,omitempty"`
	FinishedAt *time.Time `json:"finished_at,omitempty"`
}

// Job is the state of a job, kept in BucketJobs.
type Job struct {
	ID          string `json:"id"`
	Tenant      string `json:"tenant,omitempty"`
	Status      Status `json:"status"`
	Priority    int    `json:"priority"`
	CallbackURL string `json:"callback_url,omitempty"`
	// RequestHash fingerprints the request that created the job, to tell a replayed
	// Idempotency-Key from a reused one.
	RequestHash string     `json:"request_hash,omitempty"`
	Scenes      []Scene    `json:"scenes"`
	CreatedAt   time.Time  `json:"created_at"`
	UpdatedAt   time.Time  `json:"updated_at"`
	FinishedAt  *time.Time `json:"finished_at,omitempty"`
	// Round counts how often the job was reopened by a scene retry.
	Round int `json:"round,omitempty"`
	// Needs are the requirements of the job's scenes, by key: scenes of one template
	// share theirs.
	Needs map[string]*inventory.Requirements `json:"needs,omitempty"`
	// ExpiresAt is when the job and everything of it are deleted, if its client
	// asked for less than the retention (see Expiry).
	ExpiresAt *time.Time `json:"expires_at,omitempty"`
}

// Ticket is the ticket of scene index of j, as it first enters the queue.
func (j *Job) Ticket(index int) Ticket {
	s := j.Scenes[index]
	return Ticket{JobID: j.ID, Index: index, Tenant: j.Tenant, Priority: j.Priority, Pool: s.Pool,
		Workflow: s.Spec.Workflow, Model: s.Model, Needs: j.Needs[s.NeedsKey], Region: s.Region, PreferRegion: s.PreferRegion,
		SubmittedAt: j.CreatedAt}
}

// Expiry is when a job created at created is deleted: at expiresAt, if the job has
// one, or after the retention, whichever comes first. An expired job is gone, though
// pieces of it may still wait for JetStream or the janitor to remove them.
func Expiry(created time.Time, expiresAt *time.Time, retention time.Duration) time.Time {
	at := created.Add(retention)
	if expiresAt != nil && expiresAt.Before(at) {
		at = *expiresAt
	}
	return at
}

// CancelEvents are the events that cancel every scene of j that has not ended, as
// of at, each for the scene's current run.
func CancelEvents(j *Job, at time.Time) []SceneEvent {
	var events []SceneEvent
	for _, s := range j.Scenes {
		if !s.Status.Terminal() {
			events = append(events, SceneEvent{JobID: j.ID, Index: s.Index, Retry: s.Retries, Type: EventCancelled, Time: at})
		}
	}
	return events
}

// Apply folds a scene event into the job and reports whether anything changed.
// It is idempotent and tolerates events out of order or from stale attempts: a
// terminal scene never changes again within its run, an event of an earlier run
// (see Retries) is ignored, an event of a later run reopens the scene, and an event
// of an older attempt than the one recorded is ignored, except a completion (the
// work is done, whichever attempt did it) and a cancellation (it applies to the
// scene, whichever attempt runs).
func (j *Job) Apply(e SceneEvent) bool {
	if e.Index < 0 || e.Index >= len(j.Scenes) {
		return false
	}
	s := &j.Scenes[e.Index]
	at := e.Time
	reopened := false
	if e.Retry > s.Retries {
		s.Retries, s.Status, s.Error, s.Progress, s.FinishedAt, s.QueuedAt = e.Retry, StatusQueued, "", nil, nil, at
		reopened = true
	}
	stale := e.Retry < s.Retries || e.Attempt < s.Attempts && e.Type != EventCompleted && e.Type != EventCancelled
	if s.Status.Terminal() || stale {
		return false
	}
	switch e.Type {
	case EventQueued:
		if !reopened && (s.Status != StatusQueued || s.Pool == e.Pool || e.Pool == "") {
			return false
		}
		if e.Pool != "" {
			s.Pool = e.Pool
		}
	case EventStarted:
		if e.Attempt == s.Attempts && s.Status == StatusRunning {
			return false
		}
		s.Status, s.Node, s.Attempts, s.Progress = StatusRunning, e.Node, e.Attempt, nil
		if s.StartedAt == nil {
			s.StartedAt = &at
		}
	case EventProgress:
		if s.Status != StatusRunning || e.Attempt != s.Attempts || e.Progress == nil {
			return false
		}
		p := *e.Progress
		s.Progress = &p
	case EventRetrying:
		if s.Status == StatusQueued && len(s.Failures) > 0 && s.Failures[len(s.Failures)-1].Attempt == e.Attempt {
			return false
		}
		s.Status, s.Progress, s.Attempts = StatusQueued, nil, e.Attempt
		s.Failures = mergeFailures(s.Failures, e.Failures, Attempt{Attempt: e.Attempt, Node: e.Node, Error: e.Error, At: at})
	case EventCompleted:
		s.Status, s.Node, s.Outputs, s.Error = StatusSucceeded, e.Node, e.Outputs, ""
		s.Attempts = max(s.Attempts, e.Attempt)
		s.Progress = nil
		s.FinishedAt = &at
	case EventFailed:
		s.Status, s.Error = StatusFailed, e.Error
		s.Attempts = max(s.Attempts, e.Attempt)
		if e.Node != "" {
			s.Node = e.Node
		}
		s.Failures = mergeFailures(s.Failures, e.Failures, Attempt{Attempt: e.Attempt, Node: e.Node, Error: e.Error, At: at})
		s.Progress = nil
		s.FinishedAt = &at
	case EventCancelled:
		s.Status, s.Progress = StatusCancelled, nil
		s.FinishedAt = &at
	default:
		return reopened
	}
	if at.After(j.UpdatedAt) {
		j.UpdatedAt = at
	}
	j.settle(at)
	return true
}

// mergeFailures adds the failures an event carries, and the one it reports, to
// those recorded, once per attempt, in attempt order.
func mergeFailures(recorded, carried []Attempt, last Attempt) []Attempt {
	out := recorded
	for _, f := range append(slices.Clip(carried), last) {
		if !slices.ContainsFunc(out, func(o Attempt) bool { return o.Attempt == f.Attempt }) {
			out = append(out, f)
		}
	}
	slices.SortStableFunc(out, func(a, b Attempt) int { return a.Attempt - b.Attempt })
	return out
}

// ErrNotRetryable is returned by Reopen for a scene that has not failed.
var ErrNotRetryable = errors.New("only a failed scene can be retried")

// Reopen queues scene index of a failed job again, keeping its attempts and
// failures, and returns the work item's run number. A scene already reopened and
// not yet started again is returned as it is, so a retried request is harmless.
func (j *Job) Reopen(index int, at time.Time) (retry int, err error) {
	if index < 0 || index >= len(j.Scenes) {
		return 0, fmt.Errorf("job %s has no scene %d", j.ID, index)
	}
	s := &j.Scenes[index]
	if s.Status == StatusQueued && s.Retries > 0 {
		return s.Retries, nil
	}
	if s.Status != StatusFailed {
		return 0, fmt.Errorf("scene %d is %s: %w", index, s.Status, ErrNotRetryable)
	}
	s.Retries++
	s.Status, s.Error, s.Progress, s.FinishedAt, s.QueuedAt = StatusQueued, "", nil, nil, at
	j.Round++
	j.Status, j.FinishedAt, j.UpdatedAt = StatusRunning, nil, at
	return s.Retries, nil
}

// settle derives the job's status from its scenes.
func (j *Job) settle(at time.Time) {
	status, open, started := StatusSucceeded, false, false
	for _, s := range j.Scenes {
		switch {
		case !s.Status.Terminal():
			open = true
			started = started || s.Status == StatusRunning || s.Attempts > 0
		case s.Status == StatusFailed:
			status, started = StatusFailed, true
		case s.Status == StatusCancelled:
			if status == StatusSucceeded {
				status = StatusCancelled
			}
		default:
			started = true
		}
	}
	switch {
	case !open:
		j.Status = status
		if j.FinishedAt == nil || at.After(*j.FinishedAt) {
			j.FinishedAt = &at
		}
	case started:
		j.Status, j.FinishedAt = StatusRunning, nil
	default:
		j.Status, j.FinishedAt = StatusQueued, nil
	}
}

// Outcome bytes of JobState.Outcomes.
const (
	outcomeOpen      = '.'
	outcomeSucceeded = 's'
	outcomeFailed    = 'f'
	outcomeCancelled = 'c'
)

// JobState is a job's progress, kept in BucketJobState apart from the job's record
// so that the end of a scene rewrites a record of about one byte per scene rather
// than the whole job: what completion and job lists need.
type JobState struct {
	ID       string `json:"id"`
	Tenant   string `json:"tenant,omitempty"`
	Priority int    `json:"priority"`
	Status   Status `json:"status"`
	// Round counts how often the job was reopened by a scene retry.
	Round int `json:"round,omitempty"`
	// Outcomes holds one byte per scene: '.' not ended, 's' succeeded, 'f' failed,
	// 'c' cancelled.
	Outcomes string `json:"outcomes"`
	// Retries are the runs by hand of the scenes retried, by index.
	Retries    map[int]int `json:"retries,omitempty"`
	CreatedAt  time.Time   `json:"created_at"`
	UpdatedAt  time.Time   `json:"updated_at"`
	StartedAt  *time.Time  `json:"started_at,omitempty"`
	FinishedAt *time.Time  `json:"finished_at,omitempty"`
	// ExpiresAt is the job's own expiry, as on its record.
	ExpiresAt *time.Time `json:"expires_at,omitempty"`
}

// NewJobState is the state of job j as it was submitted: every scene open.
func NewJobState(j *Job) *JobState {
	return &JobState{
		ID: j.ID, Tenant: j.Tenant, Priority: j.Priority, Status: StatusQueued,
		Outcomes:  strings.Repeat(string(rune(outcomeOpen)), len(j.Scenes)),
		CreatedAt: j.CreatedAt, UpdatedAt: j.CreatedAt, ExpiresAt: j.ExpiresAt,
	}
}

func (s *JobState) clone() *JobState {
	c := *s
	c.Retries = maps.Clone(s.Retries)
	return &c
}

// Scenes is the number of scenes of the job.
func (s *JobState) Scenes() int { return len(s.Outcomes) }

// Counts returns how many scenes succeeded, failed and were cancelled.
func (s *JobState) Counts() (succeeded, failed, cancelled int) {
	for i := range len(s.Outcomes) {
		switch s.Outcomes[i] {
		case outcomeSucceeded:
			succeeded++
		case outcomeFailed:
			failed++
		case outcomeCancelled:
			cancelled++
		}
	}
	return succeeded, failed, cancelled
}

// Start records that a scene of the job started; it reports whether that changed
// the state.
func (s *JobState) Start(at time.Time) bool {
	if s.Status != StatusQueued {
		return false
	}
	s.Status, s.StartedAt, s.UpdatedAt = StatusRunning, &at, at
	return true
}

// End records the end of run retry of scene index by an event of type t, and
// reports whether that changed the state. The first end of a run counts; ends of
// earlier runs are ignored.
func (s *JobState) End(index, retry int, t EventType, at time.Time) bool {
	if index < 0 || index >= len(s.Outcomes) || retry < s.Retries[index] || s.Outcomes[index] != outcomeOpen {
		return false
	}
	var o byte
	switch t {
	case EventCompleted:
		o = outcomeSucceeded
	case EventFailed:
		o = outcomeFailed
	case EventCancelled:
		o = outcomeCancelled
	default:
		return false
	}
	b := []byte(s.Outcomes)
	b[index] = o
	s.Outcomes, s.UpdatedAt = string(b), at
	if s.StartedAt == nil {
		s.StartedAt = &at
	}
	s.settle(at)
	return true
}

// Reopen records run retry of scene index, started by hand after the scene failed,
// and reports whether that changed the state. Asking again for the same run changes
// nothing.
func (s *JobState) Reopen(index, retry int, at time.Time) bool {
	if index < 0 || index >= len(s.Outcomes) || retry <= s.Retries[index] {
		return false
	}
	if s.Retries == nil {
		s.Retries = map[int]int{}
	}
	s.Retries[index] = retry
	b := []byte(s.Outcomes)
	b[index] = outcomeOpen
	s.Outcomes, s.UpdatedAt = string(b), at
	s.Round++
	s.settle(at)
	return true
}

// Ended reports whether every scene has ended.
func (s *JobState) Ended() bool { return !strings.ContainsRune(s.Outcomes, outcomeOpen) }

func (s *JobState) settle(at time.Time) {
	if !s.Ended() {
		s.Status, s.FinishedAt = StatusRunning, nil
		return
	}
	_, failed, cancelled := s.Counts()
	switch {
	case failed > 0:
		s.Status = StatusFailed
	case cancelled > 0:
		s.Status = StatusCancelled
	default:
		s.Status = StatusSucceeded
	}
	s.FinishedAt = &at
}
