package dispatcher

import (
	"context"
	"encoding/json"
	"errors"
	"testing"
	"time"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

// routerRig is a fleet with a running dispatcher, and a committed job of two scenes
// whose intake stored the payload of its first scene only: its request failed.
type routerRig struct {
	js   jetstream.JetStream
	jobs *fleet.Jobs
	pub  *fleet.Publisher
	job  *fleet.Job
}

func newRouterRig(t *testing.T, settings fleet.Settings) *routerRig {
	t.Helper()
	_, nc, js := fleettest.Fleet(t, settings)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	jobs, err := fleet.OpenJobs(ctx, js)
	if err != nil {
		t.Fatal(err)
	}
	run, stop := context.WithCancel(context.Background())
	stopped := make(chan error, 1)
	go func() { stopped <- Run(run, Config{Conn: nc, Settings: settings, Logger: fleettest.Logger(t)}) }()
	t.Cleanup(func() {
		stop()
		if err := <-stopped; err != nil {
			t.Errorf("dispatcher: %v", err)
		}
	})
	now := time.Now().UTC()
	r := &routerRig{js: js, jobs: jobs, pub: fleet.NewPublisher(js, "test"), job: &fleet.Job{ID: "job-half-stored", Status: fleet.StatusQueued,
		Priority: 5, CreatedAt: now, UpdatedAt: now, Scenes: []fleet.Scene{
			{Index: 0, Pool: "image", Status: fleet.StatusQueued, QueuedAt: now},
			{Index: 1, Pool: "image", Status: fleet.StatusQueued, QueuedAt: now},
		}}}
	encoded, err := json.Marshal(r.job)
	if err != nil {
		t.Fatal(err)
	}
	if err := r.pub.Batch(ctx, []fleet.Outgoing{r.payload(0), fleet.JobCommit(r.job, encoded)}); err != nil {
		t.Fatal(err)
	}
	return r
}

func (r *routerRig) payload(index int) fleet.Outgoing {
	p := fleet.ScenePayload{JobID: r.job.ID, Index: index, Graph: fleet.Graph{}, Timeout: time.Minute}
	return fleet.Outgoing{Subject: fleet.ScenePayloadSubject(r.job.ID, index), MsgID: p.MsgID(), Value: p}
}

// routerInfo is the router consumer's state, nil while it cannot be read.
func (r *routerRig) routerInfo() *jetstream.ConsumerInfo {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := r.js.Consumer(ctx, fleet.StreamSubmit, fleet.RouterConsumer().Durable)
	if err != nil {
		return nil
	}
	info, err := c.Info(ctx)
	if err != nil {
		return nil
	}
	return info
}

// redelivered reports whether the router has had the job's fired commit delivered
// again: it handled it and asked for it later.
func (r *routerRig) redelivered() bool {
	info := r.routerInfo()
	return info != nil && info.NumRedelivered > 0
}

// settled reports whether the router has handled the job's fired commit for good.
func (r *routerRig) settled() bool {
	info := r.routerInfo()
	return info != nil && info.Delivered.Consumer > 0 && info.NumAckPending == 0
}

func (r *routerRig) recorded(t *testing.T) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err := r.jobs.Record(ctx, r.job.ID)
	if err != nil && !errors.Is(err, fleet.ErrJobNotFound) {
		t.Fatal(err)
	}
	return err == nil
}

// A commit that fires while a scene's payload is missing belongs to a request that
// failed; the job is queued once the payload comes (the client sent the request
// again), not before: its scenes would use up their attempts on a payload that is
// not there.
func TestACommitWaitsForItsScenesPayloads(t *testing.T) {
	t.Parallel()
	r := newRouterRig(t, fleet.Settings{})
	fleettest.Eventually(t, 30*time.Second, r.redelivered,
		"the router did not look twice at the commit of a job with a payload missing")
	if r.recorded(t) {
		t.Fatal("the job was recorded with the payload of a scene missing")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := r.pub.Batch(ctx, []fleet.Outgoing{r.payload(1)}); err != nil {
		t.Fatal(err)
	}
	fleettest.Eventually(t, 30*time.Second, func() bool { return r.recorded(t) },
		"the job was not recorded once its payloads were all stored")
}

// A commit whose payloads do not come within the duplicate window is dropped: a
// request sent again later commits the job anew.
func TestACommitWhosePayloadsNeverComeIsDropped(t *testing.T) {
	t.Parallel()
	r := newRouterRig(t, fleet.Settings{DuplicateWindow: 2 * time.Second})
	fleettest.Eventually(t, 30*time.Second, r.settled,
		"the router did not settle the commit of a job whose payload never came")
	if r.recorded(t) {
		t.Fatal("the job was recorded with the payload of a scene missing")
	}
}
