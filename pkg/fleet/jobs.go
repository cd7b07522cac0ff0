package fleet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go/jetstream"
)

// ErrJobNotFound is returned for a job id that is not in the bucket.
var ErrJobNotFound = errors.New("job not found")

// ErrNoChange may be returned by an Update mutation to skip the write.
var ErrNoChange = errors.New("no change")

// Jobs reads and writes job state in BucketJobs. Every write is a compare-and-set on
// the entry's revision, so concurrent updates never overwrite each other.
type Jobs struct {
	kv jetstream.KeyValue
}

// OpenJobs binds to the jobs bucket, which Ensure must have created.
func OpenJobs(ctx context.Context, js jetstream.JetStream) (*Jobs, error) {
	kv, err := js.KeyValue(ctx, BucketJobs)
	if err != nil {
		return nil, fmt.Errorf("open bucket %s: %w", BucketJobs, err)
	}
	return &Jobs{kv: kv}, nil
}

// Create stores a new job; it fails if the id exists.
func (s *Jobs) Create(ctx context.Context, j *Job) error {
	b, err := json.Marshal(j)
	if err != nil {
		return fmt.Errorf("encode job %s: %w", j.ID, err)
	}
	if _, err := s.kv.Create(ctx, j.ID, b); err != nil {
		return fmt.Errorf("create job %s: %w", j.ID, err)
	}
	return nil
}

// Get returns the job and its revision.
func (s *Jobs) Get(ctx context.Context, id string) (*Job, uint64, error) {
	if !ValidToken(id) {
		return nil, 0, ErrJobNotFound
	}
	e, err := s.kv.Get(ctx, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, 0, ErrJobNotFound
	}
	if err != nil {
		return nil, 0, fmt.Errorf("get job %s: %w", id, err)
	}
	var j Job
	if err := json.Unmarshal(e.Value(), &j); err != nil {
		return nil, 0, fmt.Errorf("decode job %s: %w", id, err)
	}
	return &j, e.Revision(), nil
}

// Update reads the job, applies mutate and writes it back if the revision is still
// the one read, retrying on conflict. mutate may return ErrNoChange to skip the write.
// It returns the job as written (or as read, when nothing changed).
func (s *Jobs) Update(ctx context.Context, id string, mutate func(*Job) error) (*Job, error) {
	for {
		j, rev, err := s.Get(ctx, id)
		if err != nil {
			return nil, err
		}
		if err := mutate(j); errors.Is(err, ErrNoChange) {
			return j, nil
		} else if err != nil {
			return nil, err
		}
		b, err := json.Marshal(j)
		if err != nil {
			return nil, fmt.Errorf("encode job %s: %w", id, err)
		}
		_, err = s.kv.Update(ctx, id, b, rev)
		if err == nil {
			return j, nil
		}
		if !errors.Is(err, jetstream.ErrKeyExists) {
			return nil, fmt.Errorf("update job %s: %w", id, err)
		}
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
	}
}
