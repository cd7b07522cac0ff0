package fleet

import (
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Settings are the delivery and storage knobs that every service must agree on,
// because whichever service starts first creates the streams and consumers with them.
type Settings struct {
	// Storage is where streams and buckets keep their data. Defaults to file storage
	// (the zero value).
	Storage jetstream.StorageType
	// Replicas is the number of copies of each stream in a NATS cluster. Defaults to 1.
	Replicas int
	// AckWait is how long a work message may go without an acknowledgement or an
	// InProgress heartbeat before it is redelivered to another executor. It decides how
	// fast a dead executor's scene moves on. Defaults to 4s.
	AckWait time.Duration
	// MaxAttempts is how many times a scene is tried before it becomes a dead letter.
	// Defaults to 3.
	MaxAttempts int
	// RetryBackoff is the first delay before a failed attempt is tried again; it doubles
	// per attempt up to 30 times its value. Defaults to 1s.
	RetryBackoff time.Duration
	// Retention is how long a job and everything of it are kept after its
	// submission: its record and state, its scenes' payloads and events, its input
	// images and its outputs. JetStream removes them by itself (the age limits of the
	// streams, buckets and object stores); a job may ask for less (its ttl_s), which
	// the notifier's janitor enforces. At least 1s. Defaults to 7 days.
	Retention time.Duration
	// DuplicateWindow is how long JetStream remembers message ids to drop duplicate
	// publishes; never more than Retention. Defaults to 10 minutes. It should outlast
	// CommitGrace by far: the router sends again what an intake that stopped half-way
	// sent, when the job's commit fires.
	DuplicateWindow time.Duration
	// NodeTTL is how long a node's observed state outlives its last heartbeat.
	// Defaults to 10s.
	NodeTTL time.Duration
	// LeaseTTL is how long a standby dispatcher waits, after the leading one stops
	// renewing its lease, before it takes over. Defaults to 1s.
	LeaseTTL time.Duration
}

// DefaultRetention is how long jobs are kept unless Settings.Retention says otherwise.
const DefaultRetention = 7 * 24 * time.Hour

// DefaultSettings returns Settings with every default filled in.
func DefaultSettings() Settings {
	var s Settings
	s.fill()
	return s
}

func (s *Settings) fill() {
	if s.Replicas == 0 {
		s.Replicas = 1
	}
	if s.AckWait == 0 {
		s.AckWait = 4 * time.Second
	}
	if s.MaxAttempts == 0 {
		s.MaxAttempts = 3
	}
	if s.RetryBackoff == 0 {
		s.RetryBackoff = time.Second
	}
	if s.Retention == 0 {
		s.Retention = DefaultRetention
	}
	if s.DuplicateWindow == 0 {
		s.DuplicateWindow = 10 * time.Minute
	}
	// JetStream refuses a stream whose duplicate window outlasts its messages.
	s.DuplicateWindow = min(s.DuplicateWindow, s.Retention)
	if s.NodeTTL == 0 {
		s.NodeTTL = 10 * time.Second
	}
	if s.LeaseTTL == 0 {
		s.LeaseTTL = time.Second
	}
}

// Normalize fills in defaults and checks the values.
func (s Settings) Normalize() (Settings, error) {
	s.fill()
	var errs []error
	if s.AckWait < 500*time.Millisecond {
		errs = append(errs, fmt.Errorf("ack wait %s is below 500ms: heartbeats could not keep up", s.AckWait))
	}
	if s.MaxAttempts < 1 || s.MaxAttempts > 100 {
		errs = append(errs, fmt.Errorf("max attempts %d is outside 1..100", s.MaxAttempts))
	}
	if s.Retention < time.Second {
		errs = append(errs, fmt.Errorf("retention %s is below 1s", s.Retention))
	}
	if s.NodeTTL < time.Second {
		errs = append(errs, fmt.Errorf("node TTL %s is below 1s", s.NodeTTL))
	}
	if s.LeaseTTL < 250*time.Millisecond {
		errs = append(errs, fmt.Errorf("lease TTL %s is below 250ms: renewals could not keep up", s.LeaseTTL))
	}
	return s, errors.Join(errs...)
}

// HeartbeatInterval is how often a running scene's work message is marked in
// progress: a third of AckWait, so two lost heartbeats do not cause a redelivery.
func (s Settings) HeartbeatInterval() time.Duration { return s.AckWait / 3 }
