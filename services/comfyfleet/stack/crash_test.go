package stack_test

import (
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/natsembed"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack/stacktest"
)

// TestACommittedJobRunsThoughItsIntakeStopsBeforeRecordingIt stops the intake's
// request right after the job's commit, before the intake records the job or
// answers: the dispatcher's router records it and queues its scenes, and the job
// runs to its end.
func TestACommittedJobRunsThoughItsIntakeStopsBeforeRecordingIt(t *testing.T) {
	t.Parallel()
	committed := make(chan string, 1)
	b := stacktest.Start(t, stacktest.Nodes(1, 1), func(c *stack.Config) {
		c.Intake.AfterCommit = func(job string) error {
			committed <- job
			return errors.New("the intake died here")
		}
	})
	scenes := []map[string]any{}
	for i := range 6 {
		scenes = append(scenes, map[string]any{"workflow": "demo", "params": map[string]any{"size": 64, "color": i}})
	}
	if a := fleettest.Do(t, http.MethodPost, b.APIURL+"/v1/jobs", map[string]any{"scenes": scenes}); a.Status != http.StatusServiceUnavailable {
		t.Fatalf("%v, want the request to fail after the commit", a)
	}
	var id string
	select {
	case id = <-committed:
	case <-time.After(10 * time.Second):
		t.Fatal("the job was never committed")
	}
	// The job is not found until the router records it.
	fleettest.Eventually(t, 30*time.Second, func() bool {
		var job struct {
			Status string `json:"status"`
		}
		return fleettest.Call(t, http.MethodGet, b.APIURL+"/v1/jobs/"+id, nil, &job) == http.StatusOK && job.Status == "succeeded"
	}, "job %s never succeeded", id)
	job := fleettest.GetJob(t, b.APIURL, id)
	for _, s := range job.Scenes {
		if s.Status != "succeeded" || len(s.Outputs) != 1 {
			t.Errorf("scene %d: %s with %d outputs, want succeeded with one", s.Index, s.Status, len(s.Outputs))
		}
	}
}

// TestAJobItsIntakeCouldNotQueueRunsFromItsCommit gives the intake a NATS user that
// may not publish tickets: the intake records the job and publishes its scenes'
// queued events, but its tickets are refused, so it leaves the job's commit in place.
// The commit fires for the router, which sends the job's messages again (those
// stored already are dropped as duplicates) and queues its scenes: the job runs,
// each scene once.
func TestAJobItsIntakeCouldNotQueueRunsFromItsCommit(t *testing.T) {
	t.Parallel()
	opts := &server.Options{Host: "127.0.0.1", Port: -1, JetStream: true, StoreDir: t.TempDir(), NoLog: true, NoSigs: true,
		Users: []*server.User{
			{Username: "admin", Password: "admin"},
			{Username: "intake", Password: "intake", Permissions: &server.Permissions{
				Publish: &server.SubjectPermission{Allow: []string{">"}, Deny: []string{fleet.QueueFilter}}}},
		}}
	srv, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		srv.Shutdown()
		t.Fatal("nats-server not ready")
	}
	t.Cleanup(func() { natsembed.Stop(srv) })
	b := stacktest.Start(t, stacktest.Nodes(1, 1), func(c *stack.Config) {
		c.NATSURL, c.DataDir = srv.ClientURL(), ""
		// The refused tickets are never acknowledged: the intake's shutdown need not
		// wait for their acknowledgements to time out.
		c.Intake.ShutdownTimeout = time.Second
		c.Connect = func(name string) (*nats.Conn, error) {
			user := "admin"
			if service, _, _ := strings.Cut(name, "-"); service == "intake" {
				user = "intake"
			}
			return nats.Connect(srv.ClientURL(), nats.UserInfo(user, user), nats.MaxReconnects(-1))
		}
	})
	scenes := []map[string]any{}
	for i := range 4 {
		scenes = append(scenes, map[string]any{"workflow": "demo", "params": map[string]any{"size": 64, "color": i}})
	}
	job := fleettest.SubmitJob(t, b.APIURL, map[string]any{"scenes": scenes})
	fleettest.Eventually(t, 30*time.Second, func() bool {
		return fleettest.GetJob(t, b.APIURL, job.ID).Status == "succeeded"
	}, "job %s never succeeded", job.ID)
	for i := range scenes {
		for _, typ := range []fleet.EventType{fleet.EventQueued, fleet.EventStarted, fleet.EventCompleted} {
			if n := fleettest.Count(t, b.JS, fleet.StreamEvents, fleet.SceneEventSubject(job.ID, i, typ)); n != 1 {
				t.Errorf("scene %d: %d %s events, want 1", i, n, typ)
			}
		}
	}
}
