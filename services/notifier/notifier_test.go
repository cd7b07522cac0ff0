package notifier_test

import (
	"bytes"
	"context"
	"net/http"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/notifier"
)

// A job's end announced before a server of the cluster shows it (a replica that has
// not caught up answers the notifier's reads) is read again until it shows, however
// many reads that takes: those reads are no webhook attempts. Were each a delivery of
// the end, a replica behind for a few seconds would use them up, the server would
// drop the end, and the tracker's own announcement of it, a duplicate, would be
// dropped too: the job would never call back.
func TestAnEndReadBeforeItShowsIsNoWebhookAttempt(t *testing.T) {
	t.Parallel()
	srv, nc, js := fleettest.Fleet(t, fleet.Settings{})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	hooks := fleettest.StartWebhooks(t)
	jobs, err := fleet.OpenJobs(ctx, js)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now().UTC()
	job := &fleet.Job{ID: "job-read-early", Status: fleet.StatusQueued, CallbackURL: hooks.URL, CreatedAt: now, UpdatedAt: now,
		Scenes: []fleet.Scene{{Index: 0, Pool: "image", Status: fleet.StatusQueued, QueuedAt: now}}}
	if err := jobs.Create(ctx, job); err != nil {
		t.Fatal(err)
	}

	// Every read of the job's scene events, seen on the bus.
	spy, _ := fleettest.Connect(t, srv)
	var reads atomic.Int64
	sub, err := spy.Subscribe("$JS.API.DIRECT.GET."+fleet.StreamEvents, func(m *nats.Msg) {
		if bytes.Contains(m.Data, []byte(job.ID)) {
			reads.Add(1)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer sub.Unsubscribe()
	if err := spy.Flush(); err != nil {
		t.Fatal(err)
	}

	const attempts = 2
	run, stop := context.WithCancel(context.Background())
	stopped := make(chan error, 1)
	go func() {
		stopped <- notifier.Run(run, notifier.Config{Conn: nc, HTTPClient: http.DefaultClient,
			WebhookAttempts: attempts, Logger: fleettest.Logger(t)})
	}()
	t.Cleanup(func() {
		stop()
		if err := <-stopped; err != nil {
			t.Errorf("notifier: %v", err)
		}
	})

	// The end is announced while every read still shows the scene queued.
	pub := fleet.NewPublisher(js, "test")
	done := fleet.DoneMsg{JobID: job.ID, Scenes: 1}
	if err := pub.JSON(ctx, fleet.DoneSubject(job.ID), done.MsgID(), done); err != nil {
		t.Fatal(err)
	}
	fleettest.Eventually(t, 30*time.Second, func() bool { return reads.Load() > 2*attempts },
		"the notifier stopped reading the job before its end showed")

	// Now the scene's end shows.
	if err := pub.SceneEvent(ctx, fleet.SceneEvent{JobID: job.ID, Index: 0, Type: fleet.EventCompleted, Node: "gpu", Attempt: 1, Time: time.Now()}); err != nil {
		t.Fatal(err)
	}
	hook := hooks.Wait(t, job.ID, 30*time.Second)
	if hook.Body.Type != "job.completed" || hook.Body.Job.Status != "succeeded" {
		t.Errorf("webhook %s, job %s; want job.completed, succeeded", hook.Body.Type, hook.Body.Job.Status)
	}
}
