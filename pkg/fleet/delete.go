package fleet

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// ErrJobRunning is returned by Delete for a job that has not ended, when it was not
// asked to cancel it.
var ErrJobRunning = errors.New("job has not ended")

// FileRemover removes stored files by key, a missing file being no error: where a
// job's outputs are kept (outputs.Store is one).
type FileRemover interface {
	Delete(ctx context.Context, key string) error
}

// Delete removes job id and everything of it: its commands still waiting on the
// submit stream, its scenes' payloads, its input images, its outputs (from outputs,
// or from the ObjectOutputs store if nil), its dead letters, its events, its record
// and its state. A job that has not ended is cancelled first through cancel, as a
// client's cancellation does; with a nil cancel, Delete refuses it with
// ErrJobRunning.
//
// Delete is idempotent: run again after a failure, it removes what is left. The
// record goes last but one, so that a job whose deletion failed half-way can still be
// found and deleted; the state goes last, with a purge marker that watchers of the
// bucket see. A job whose record is gone already gives ErrJobNotFound, after what is
// left of it by id (all but the files, whose names the record and events hold) is
// removed. Files stored for the job after Delete, by an attempt that was already
// uploading, go with the object stores' age limit (Settings.Retention).
func (s *Jobs) Delete(ctx context.Context, id string, outputs FileRemover, cancel *Publisher) error {
	if !ValidToken(id) {
		return ErrJobNotFound
	}
	job, err := s.Get(ctx, id)
	if err != nil && !errors.Is(err, ErrJobNotFound) {
		return err
	}
	found := err == nil
	if found && !job.Status.Terminal() {
		if cancel == nil {
			return fmt.Errorf("delete job %s: %w: it is %s", id, ErrJobRunning, job.Status)
		}
		// Executors stop the job's running attempts and drop its queued scenes; the
		// payloads purged below keep any scene from starting that missed this.
		if err := cancel.SceneEvents(ctx, CancelEvents(job, time.Now().UTC())); err != nil {
			return fmt.Errorf("delete job %s: cancel it: %w", id, err)
		}
	}
	// First what could bring the job back or run its scenes (a commit the router has
	// not taken yet, the scenes' payloads) and its expiry schedule; then its files,
	// while its record and events still name them; then the rest.
	if err := s.purgeAll(ctx, []subjects{
		{StreamSubmit, SubmitFilters(id)},
		{StreamScenes, []string{ScenePayloadsFilter(id)}},
		{StreamExpiry, []string{ExpiryScheduleSubject(id)}},
	}); err != nil {
		return fmt.Errorf("delete job %s: %w", id, err)
	}
	if found {
		if err := s.deleteFiles(ctx, job, outputs); err != nil {
			return fmt.Errorf("delete job %s: %w", id, err)
		}
	}
	if err := s.purgeAll(ctx, []subjects{
		{"KV_" + BucketDeadLetters, []string{DeadLettersFilter(id)}},
		{StreamEvents, JobEventsFilter(id)},
		{"KV_" + BucketJobs, []string{kvSubject(BucketJobs, id)}},
	}); err != nil {
		return fmt.Errorf("delete job %s: %w", id, err)
	}
	if err := s.states.Purge(ctx, id); err != nil {
		return fmt.Errorf("delete job %s: purge its state: %w", id, err)
	}
	if !found {
		return ErrJobNotFound
	}
	return nil
}

// deleteFiles removes the job's input images and the outputs of its scenes, from
// outputs or, if nil, the ObjectOutputs store.
func (s *Jobs) deleteFiles(ctx context.Context, job *Job, outputs FileRemover) error {
	inputs, err := s.js.ObjectStore(ctx, ObjectInputs)
	if err != nil {
		return fmt.Errorf("open object store %s: %w", ObjectInputs, err)
	}
	if outputs == nil {
		store, err := s.js.ObjectStore(ctx, ObjectOutputs)
		if err != nil {
			return fmt.Errorf("open object store %s: %w", ObjectOutputs, err)
		}
		outputs = objectRemover{store}
	}
	for _, sc := range job.Scenes {
		for _, in := range sc.Spec.Inputs {
			if in.Object == "" {
				continue
			}
			if err := inputs.Delete(ctx, in.Object); err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
				return fmt.Errorf("delete input %s: %w", in.Object, err)
			}
		}
		for _, o := range sc.Outputs {
			key := OutputKey(job.ID, sc.Index, o.Name)
			if err := outputs.Delete(ctx, key); err != nil {
				return fmt.Errorf("delete output %s: %w", key, err)
			}
		}
	}
	return nil
}

// objectRemover removes files from a JetStream object store.
type objectRemover struct{ store jetstream.ObjectStore }

func (r objectRemover) Delete(ctx context.Context, key string) error {
	if err := r.store.Delete(ctx, key); err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
		return err
	}
	return nil
}

// subjects are the subjects of one stream that match filters.
type subjects struct {
	stream  string
	filters []string
}

// purgeAll removes the messages on every one of subjects, in order.
func (s *Jobs) purgeAll(ctx context.Context, all []subjects) error {
	for _, sub := range all {
		st, err := s.js.Stream(ctx, sub.stream)
		if err != nil {
			return fmt.Errorf("open stream %s: %w", sub.stream, err)
		}
		for _, f := range sub.filters {
			if err := st.Purge(ctx, jetstream.WithPurgeSubject(f)); err != nil {
				return fmt.Errorf("purge %s from %s: %w", f, sub.stream, err)
			}
		}
	}
	return nil
}
