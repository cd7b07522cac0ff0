package stack_test

import (
	"bytes"
	"context"
	"errors"
	"image"
	"image/png"
	"net/http"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/comfy"
	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/natsembed"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack/stacktest"
	"github.com/comfyfleet/comfyfleet/services/intake/comfydoor"
)

// deployConfig is the nats-server configuration shipped for deployments.
const deployConfig = "../../../deploy/nats/comfyfleet.conf"

// permServer runs a nats-server from deploy/nats/comfyfleet.conf, on a free port and a
// store of the test's own, with a password per user.
func permServer(t *testing.T) (*server.Server, map[string]string) {
	t.Helper()
	passwords := map[string]string{}
	for _, user := range []string{"intake", "dispatcher", "executor", "notifier", "admin"} {
		passwords[user] = "pw-" + user + "-" + t.Name()
		t.Setenv("COMFYFLEET_"+strings.ToUpper(user)+"_PASSWORD", passwords[user])
	}
	opts, err := server.ProcessConfigFile(deployConfig)
	if err != nil {
		t.Fatalf("load %s: %v", deployConfig, err)
	}
	opts.Host, opts.Port = "127.0.0.1", -1
	opts.StoreDir = t.TempDir()
	opts.NoLog, opts.NoSigs = true, true
	srv, err := server.NewServer(opts)
	if err != nil {
		t.Fatalf("nats-server from %s: %v", deployConfig, err)
	}
	go srv.Start()
	if !srv.ReadyForConnections(10 * time.Second) {
		srv.Shutdown()
		t.Fatal("nats-server not ready")
	}
	t.Cleanup(func() { natsembed.Stop(srv) })
	return srv, passwords
}

// userConn is a connection as one user of the deployment configuration, with that
// user's inbox prefix, which records the asynchronous errors the server reports.
type userConn struct {
	nc   *nats.Conn
	js   jetstream.JetStream
	errs *fleettest.Events[error]
}

func dialUser(t *testing.T, srv *server.Server, passwords map[string]string, user string) *userConn {
	t.Helper()
	u := &userConn{errs: fleettest.NewEvents[error]("asynchronous errors of "+user, nil)}
	nc, err := nats.Connect(srv.ClientURL(), nats.UserInfo(user, passwords[user]), nats.CustomInboxPrefix("_INBOX_"+user),
		nats.Name("test-"+user), nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			t.Logf("%s: NATS error: %v", user, err)
			u.errs.Add(err)
		}))
	if err != nil {
		t.Fatalf("connect as %s: %v", user, err)
	}
	u.nc = nc
	if u.js, err = jetstream.New(nc); err != nil {
		t.Fatal(err)
	}
	return u
}

func isViolation(err error) bool { return errors.Is(err, nats.ErrPermissionViolation) }

// violations returns the permission violations reported so far.
func (u *userConn) violations() []error {
	return u.errs.All(isViolation)
}

// waitViolation waits for a permission violation that names subject.
func (u *userConn) waitViolation(t *testing.T, subject string, within time.Duration) {
	t.Helper()
	u.errs.Next(t, 0, within, "permissions violation for "+subject, func(err error) bool {
		return isViolation(err) && strings.Contains(err.Error(), subject)
	})
}

func TestPermissionsOfTheDeployConfigRunAJobAndRefuseTheRest(t *testing.T) {
	srv, passwords := permServer(t)
	hooks := fleettest.StartWebhooks(t)
	sim := fleettest.Sim(t, comfysim.Config{Name: "sim-0", StepDuration: 10 * time.Millisecond})
	node := fleet.NodeConfig{ID: "sim-0", URL: sim.URL(), Pools: []string{"image"}, Weight: 1}
	// Every service connects as its own user; the stack creates the streams as admin.
	var mu sync.Mutex
	conns := map[string]*userConn{}
	b := stacktest.Start(t, func(c *stack.Config) {
		c.NATSURL, c.DataDir, c.Comfy, c.NoAdopt = srv.ClientURL(), "", []fleet.NodeConfig{node}, true
		c.Executor.Name = "exec-0"
		c.Intake.MinJobTTL = time.Second
		c.Connect = func(name string) (*nats.Conn, error) {
			user, _, _ := strings.Cut(name, "-")
			if user == "boot" || user == "test" {
				user = "admin"
			}
			u := dialUser(t, srv, passwords, user)
			mu.Lock()
			conns[name] = u
			mu.Unlock()
			return u.nc, nil
		}
	})
	apiURL := b.APIURL

	// A job end to end, every service as its own user.
	job := fleettest.SubmitJob(t, apiURL, sceneJob(hooks.URL, 2, 10))
	hook := hooks.Wait(t, job.ID, 30*time.Second)
	if hook.Body.Type != "job.completed" || hook.Body.Job.Status != "succeeded" {
		t.Fatalf("webhook %s: job %s", hook.Body.Type, hook.Body.Job.Status)
	}
	for _, s := range hook.Body.Job.Scenes {
		if s.Status != "succeeded" || len(s.Outputs) == 0 {
			t.Fatalf("scene %d: %s with %d outputs (%s)", s.Index, s.Status, len(s.Outputs), s.Error)
		}
		for _, o := range s.Outputs {
			out := fleettest.Do(t, http.MethodGet, o.URL, nil).Want(t, http.StatusOK)
			if _, err := png.Decode(bytes.NewReader(out.Body)); err != nil {
				t.Fatalf("output %s of scene %d is not a PNG: %v", o.Name, s.Index, err)
			}
		}
	}
	if got := fleettest.GetJob(t, apiURL, job.ID); got.Status != "succeeded" {
		t.Errorf("GET job after webhook: %s", got.Status)
	}
	// A job awaited (Prefer: wait), and a node's inventory read again on request.
	if code, _, waited := postJobWaiting(t, apiURL, sceneJob("", 1, 5), 30); code != http.StatusOK || waited.Status != "succeeded" {
		t.Errorf("POST /v1/jobs with Prefer: wait=30: %d, %s", code, waited.Status)
	}
	if a := fleettest.Do(t, http.MethodPost, apiURL+"/v1/nodes/sim-0/refresh", nil); a.Status != http.StatusOK || !strings.Contains(string(a.Body), `"inventory"`) {
		t.Errorf("POST /v1/nodes/sim-0/refresh: %v", a)
	}
	comfyDoorAsItsUser(t, apiURL+"/comfy", sim, node.ID, b.JS)
	// The job list (a watch of the job states), the queues (a dispatcher answers the
	// intake), a job deleted through the API, and one deleted by the notifier's
	// janitor when its ttl has passed.
	var page api.JobPage
	fleettest.Get(t, apiURL+"/v1/jobs?limit=1", &page)
	if len(page.Jobs) != 1 || page.Jobs[0].Status != "succeeded" {
		t.Errorf("GET /v1/jobs?limit=1: %+v, want the last job, succeeded", page.Jobs)
	}
	var queues fleet.QueueSummary
	fleettest.Get(t, apiURL+"/v1/queues", &queues)
	if !slices.ContainsFunc(queues.Pools, func(p fleet.PoolQueue) bool { return p.Pool == "image" && p.Depth == 0 }) {
		t.Errorf("GET /v1/queues: %+v, want the node's pool, empty", queues)
	}
	fleettest.Do(t, http.MethodDelete, apiURL+"/v1/jobs/"+job.ID, nil).Want(t, http.StatusNoContent)
	if gone, left := fleettest.Gone(fleettest.JobPieces(t, b.JS, job.ID)); !gone {
		t.Errorf("after DELETE, the job's %v are left", left)
	}
	expiring := sceneJob(hooks.URL, 1, 5)
	expiring["ttl_s"] = 2
	short := fleettest.SubmitJob(t, apiURL, expiring)
	hooks.Wait(t, short.ID, 30*time.Second)
	var left []string
	fleettest.Eventually(t, 20*time.Second, func() bool {
		var gone bool
		gone, left = fleettest.Gone(fleettest.JobPieces(t, b.JS, short.ID))
		return gone
	}, "the janitor left the expired job's %v", &left)

	// The services ran without hitting a single refusal.
	mu.Lock()
	defer mu.Unlock()
	for user, c := range conns {
		if v := c.violations(); len(v) > 0 {
			t.Errorf("%s's connection was refused: %v", user, v)
		}
	}

	// What each service must not do, on connections of its own user.
	intakeConn := dialUser(t, srv, passwords, "intake")
	executorConn := dialUser(t, srv, passwords, "executor")
	notifierConn := dialUser(t, srv, passwords, "notifier")
	for _, c := range []*userConn{intakeConn, executorConn, notifierConn} {
		t.Cleanup(c.nc.Close)
	}
	refused := func(what string, f func(ctx context.Context) error) {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := f(ctx); err == nil {
			t.Errorf("%s succeeded; want it refused", what)
		}
	}

	// The intake cannot release work to the executors.
	refused("intake publishes fleet.work.image", func(ctx context.Context) error {
		_, err := intakeConn.js.Publish(ctx, fleet.WorkSubject("image"), []byte(`{}`))
		return err
	})
	if err := intakeConn.nc.Publish(fleet.WorkSubject("image"), []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	intakeConn.waitViolation(t, fleet.WorkSubject("image"), 5*time.Second)

	// The executor cannot read the API keys, even one that exists.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	keys, err := b.JS.KeyValue(ctx, fleet.BucketAPIKeys)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := keys.Put(ctx, "some-key-hash", []byte(`{"tenant":"t"}`)); err != nil {
		t.Fatalf("admin writes an API key: %v", err)
	}
	refused("executor reads fleet_apikeys", func(ctx context.Context) error {
		kv, err := executorConn.js.KeyValue(ctx, fleet.BucketAPIKeys)
		if err != nil {
			return err
		}
		_, err = kv.Get(ctx, "some-key-hash")
		return err
	})
	refused("executor watches fleet_apikeys", func(ctx context.Context) error {
		kv, err := executorConn.js.KeyValue(ctx, fleet.BucketAPIKeys)
		if err != nil {
			return err
		}
		lister, err := kv.ListKeys(ctx)
		if err != nil {
			return err
		}
		defer lister.Stop()
		for range lister.Keys() {
			return nil
		}
		return errors.New("no keys listed")
	})
	refused("executor publishes fleet.submit", func(ctx context.Context) error {
		_, err := executorConn.js.Publish(ctx, fleet.SubmitJobSubject("x"), []byte(`{}`))
		return err
	})

	// The notifier cannot submit scenes.
	refused("notifier publishes fleet.submit.x", func(ctx context.Context) error {
		_, err := notifierConn.js.Publish(ctx, "fleet.submit.x", []byte(`{}`))
		return err
	})
	if err := notifierConn.nc.Publish("fleet.submit.x", []byte(`{}`)); err != nil {
		t.Fatal(err)
	}
	notifierConn.waitViolation(t, "fleet.submit.x", 5*time.Second)

	// A user cannot listen to another's replies.
	if _, err := executorConn.nc.SubscribeSync("_INBOX_intake.>"); err != nil {
		t.Fatal(err)
	}
	executorConn.waitViolation(t, "_INBOX_intake.>", 5*time.Second)
}

// comfyDoorAsItsUser uses every part of the ComfyUI-compatible API, whose NATS
// requests the intake's user must be allowed, with the node's object_info published
// (by admin, as an executor would).
func comfyDoorAsItsUser(t *testing.T, door string, sim *comfysim.Server, nodeID string, admin jetstream.JetStream) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	store, err := admin.CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{Bucket: comfydoor.ObjectInfoStore})
	if err != nil {
		t.Fatal(err)
	}
	info := fleettest.Do(t, http.MethodGet, sim.URL()+"/object_info", nil).Body
	if _, err := store.PutBytes(ctx, nodeID, info); err != nil {
		t.Fatal(err)
	}
	cc := comfy.New(door, comfy.WithHTTPClient(fleettest.HTTP))
	defer cc.Close()
	fleettest.Eventually(t, 30*time.Second, func() bool {
		classes, err := cc.ObjectInfo(ctx, "LoadImage")
		return err == nil && len(classes) == 1
	}, "the door does not offer the node's classes")
	var img bytes.Buffer
	if err := png.Encode(&img, image.NewRGBA(image.Rect(0, 0, 8, 8))); err != nil {
		t.Fatal(err)
	}
	ref, err := cc.UploadImage(ctx, "perm.png", img.Bytes(), true)
	if err != nil {
		t.Fatal(err)
	}
	res, err := cc.Run(ctx, comfy.Graph{
		"1": map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": ref.Filename}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "perm"}},
	}, "", nil)
	if err != nil {
		t.Fatalf("a prompt through the door: %v", err)
	}
	d, err := cc.View(ctx, res.Outputs[0].File)
	if err != nil {
		t.Fatal(err)
	}
	d.Body.Close()
	if _, err := cc.RecentHistory(ctx, 5); err != nil {
		t.Error(err)
	}
	if _, err := cc.Queue(ctx); err != nil {
		t.Error(err)
	}
	if _, err := cc.SystemStats(ctx); err != nil {
		t.Error(err)
	}
	if err := cc.Interrupt(ctx, ""); err != nil {
		t.Error(err)
	}
	if _, err := cc.Submit(ctx, comfy.Graph{"1": map[string]any{"class_type": "NoSuchNode", "inputs": map[string]any{}}}, ""); !comfy.IsPermanent(err) {
		t.Errorf("an unknown class: %v; want a rejection", err)
	}
}
