package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/natsembed"
)

// natsDeployDir holds the nats-server configurations shipped for deployments.
const natsDeployDir = "../../deploy/nats"

// natsUsers are the users of the deploy/nats configurations, each with a password
// from COMFYFLEET_<USER>_PASSWORD.
var natsUsers = []string{"intake", "dispatcher", "executor", "notifier", "admin", "leaf", "route"}

// setNATSEnv sets the environment the deploy/nats configurations read: a password per
// user and, for hub.conf and the leaf nodes, a server name, routes and the hub's URL,
// all pointing at hosts named as in deploy/k8s. It returns the passwords.
func setNATSEnv(t *testing.T) map[string]string {
	t.Helper()
	passwords := map[string]string{}
	for _, user := range natsUsers {
		passwords[user] = "pw-" + user
		t.Setenv("COMFYFLEET_"+strings.ToUpper(user)+"_PASSWORD", passwords[user])
	}
	t.Setenv("COMFYFLEET_NATS_SERVER_NAME", "nats-0")
	var routes []string
	for i := range 3 {
		routes = append(routes, fmt.Sprintf("nats-route://route:%s@nats-%d.nats:6222", passwords["route"], i))
	}
	t.Setenv("COMFYFLEET_NATS_ROUTES", "["+strings.Join(routes, ", ")+"]")
	t.Setenv("COMFYFLEET_HUB_URL", "nats-leaf://leaf:"+passwords["leaf"]+"@nats.example.net:7422")
	return passwords
}

func loadNATSConfig(t *testing.T, name string) *server.Options {
	t.Helper()
	opts, err := server.ProcessConfigFile(filepath.Join(natsDeployDir, name))
	if err != nil {
		t.Fatalf("load deploy/nats/%s: %v", name, err)
	}
	return opts
}

func usersByName(opts *server.Options) map[string]*server.User {
	out := map[string]*server.User{}
	for _, u := range opts.Users {
		out[u.Username] = u
	}
	return out
}

// TestNATSConfigsLoadAndShareTheirPermissions loads every server configuration of
// deploy/nats as nats-server does, and checks what each is for: the single server and
// the hub give every service the same permissions, the hub is a three-server JetStream
// cluster with a leaf-node listener whose user has the executor's permissions, and a
// region's leaf node runs no JetStream, has only executors, and dials the hub.
func TestNATSConfigsLoadAndShareTheirPermissions(t *testing.T) {
	setNATSEnv(t)
	files, err := filepath.Glob(filepath.Join(natsDeployDir, "*.conf"))
	if err != nil {
		t.Fatal(err)
	}
	included := map[string]bool{}
	var leaves []string
	for _, f := range files {
		name := filepath.Base(f)
		switch {
		case strings.HasPrefix(name, "permissions-"):
			included[name] = false
		case strings.HasPrefix(name, "leaf-"):
			leaves = append(leaves, name)
		case name != "comfyfleet.conf" && name != "hub.conf":
			t.Errorf("deploy/nats/%s: a configuration this test does not know; say here what it must mean", name)
		}
	}
	if len(leaves) == 0 {
		t.Error("deploy/nats has no leaf-<region>.conf")
	}

	single, hub := loadNATSConfig(t, "comfyfleet.conf"), loadNATSConfig(t, "hub.conf")
	services := []string{"intake", "dispatcher", "executor", "notifier"}
	for _, opts := range []*server.Options{single, hub} {
		if !opts.JetStream {
			t.Errorf("%s: JetStream is off", opts.ConfigFile)
		}
		users := usersByName(opts)
		for _, name := range append(services, "admin") {
			u := users[name]
			if u == nil || u.Permissions == nil || u.Password != "pw-"+name {
				t.Errorf("%s: user %s missing, without permissions or without its password variable", opts.ConfigFile, name)
				continue
			}
			if name == "admin" {
				continue
			}
			file := "permissions-" + name + ".conf"
			if _, ok := included[file]; !ok {
				t.Errorf("deploy/nats/%s is missing", file)
			}
			included[file] = true
			want := []string{"_INBOX_" + name + ".>"}
			switch name {
			case "executor":
				// And the dispatchers' liveness requests, and those to read its
				// nodes' inventories again,
				want = append(want, "fleet.exec.alive.>", fleet.NodeRefreshSubject("*"))
			case "intake":
				// whose answers the intake takes.
				want = append(want, "fleet.node.refreshed.*.*")
			}
			if sub := u.Permissions.Subscribe; sub == nil || !reflect.DeepEqual(sub.Allow, want) && name != "dispatcher" {
				t.Errorf("%s: %s may subscribe to %+v, want %v only", opts.ConfigFile, name, sub, want)
			}
		}
	}
	singleUsers, hubUsers := usersByName(single), usersByName(hub)
	// fleet's readers ask a stream's leader (STREAM.MSG.GET) when a replica's direct
	// get finds nothing; the events stream is read by batched direct gets only.
	for _, name := range services {
		allowed := singleUsers[name].Permissions.Publish.Allow
		for _, subject := range allowed {
			stream, ok := strings.CutPrefix(subject, "$JS.API.DIRECT.GET.")
			if ok && !strings.Contains(stream, ".") && stream != fleet.StreamEvents && !slices.Contains(allowed, "$JS.API.STREAM.MSG.GET."+stream) {
				t.Errorf("%s may read %s by a direct get but not from its leader", name, stream)
			}
		}
	}
	for _, name := range services {
		if a, b := singleUsers[name], hubUsers[name]; a != nil && b != nil && !reflect.DeepEqual(a.Permissions, b.Permissions) {
			t.Errorf("%s has other permissions in hub.conf than in comfyfleet.conf", name)
		}
	}

	if hub.Cluster.Name == "" || hub.Cluster.Port != 6222 || hub.Cluster.Username != "route" || len(hub.Routes) != 3 {
		t.Errorf("hub.conf cluster: name %q, port %d, route user %q, %d routes; want a named cluster on 6222 with route auth and 3 routes",
			hub.Cluster.Name, hub.Cluster.Port, hub.Cluster.Username, len(hub.Routes))
	}
	if hub.ServerName != "nats-0" || hub.LeafNode.Port != 7422 || hub.HTTPPort != 8222 || hub.StoreDir == "" {
		t.Errorf("hub.conf: server name %q, leaf port %d, monitoring port %d, store %q", hub.ServerName, hub.LeafNode.Port, hub.HTTPPort, hub.StoreDir)
	}
	if !hub.LeafNode.NoAdvertise {
		t.Error("hub.conf: the leaf-node listener advertises the servers' own addresses to the regions; they dial the hub's public name only (no_advertise)")
	}
	if hub.JetStreamDomain != "hub" {
		t.Errorf("hub.conf: JetStream domain %q; the leaf nodes map their JetStream API to the domain hub", hub.JetStreamDomain)
	}
	leaf := hubUsers["leaf"]
	switch {
	case leaf == nil:
		t.Fatal("hub.conf has no user leaf")
	case !reflect.DeepEqual(leaf.Permissions, onLeafLink(hubUsers["executor"].Permissions)):
		t.Error("hub.conf: the leaf user's permissions are not the executor's as they read on the link: " +
			"permissions-executor-leaf.conf must be permissions-executor.conf with $JS.API. as $JS.hub.API. and $KV. as $JS.hub.API.$KV.")
	case len(leaf.AllowedConnectionTypes) != 1 || !hasKey(leaf.AllowedConnectionTypes, "LEAFNODE"):
		t.Errorf("hub.conf: the leaf user may connect as %v, want LEAFNODE only", leaf.AllowedConnectionTypes)
	}
	included["permissions-executor-leaf.conf"] = true

	for _, name := range leaves {
		opts := loadNATSConfig(t, name)
		region := strings.TrimSuffix(strings.TrimPrefix(name, "leaf-"), ".conf")
		if opts.JetStream {
			t.Errorf("%s runs JetStream: a region's executors must use the hub's", name)
		}
		if opts.ServerName != "leaf-"+region {
			t.Errorf("%s: server name %q, want leaf-%s", name, opts.ServerName, region)
		}
		users := usersByName(opts)
		if len(users) != 1 || users["executor"] == nil || !reflect.DeepEqual(users["executor"].Permissions, leaf.Permissions) {
			t.Errorf("%s: users %v; want only executor, with the permissions of the hub's leaf user", name, keys(users))
		}
		if len(opts.LeafNode.Remotes) != 1 || len(opts.LeafNode.Remotes[0].URLs) != 1 ||
			opts.LeafNode.Remotes[0].URLs[0].Host != "nats.example.net:7422" || opts.LeafNode.Remotes[0].URLs[0].User.Username() != "leaf" {
			t.Errorf("%s: leaf remotes %+v, want one, $COMFYFLEET_HUB_URL", name, opts.LeafNode.Remotes)
		}
	}
	for file, used := range included {
		if !used {
			t.Errorf("deploy/nats/%s is included by no configuration", file)
		}
	}
}

// freePorts returns n loopback TCP ports that were free a moment ago (freePort).
func freePorts(t *testing.T, n int) []int {
	t.Helper()
	var ports []int
	for range n {
		ports = append(ports, testPort(t))
	}
	return ports
}

// onLeafLink returns an executor's permissions as they read on a leaf node and its
// link to the hub: JetStream API subjects in the hub's domain.
func onLeafLink(p *server.Permissions) *server.Permissions {
	rewrite := func(subjects []string) []string {
		var out []string
		for _, s := range subjects {
			switch {
			case strings.HasPrefix(s, "$JS.API."):
				s = "$JS.hub.API." + strings.TrimPrefix(s, "$JS.API.")
			case strings.HasPrefix(s, "$KV."):
				s = "$JS.hub.API." + s
			}
			out = append(out, s)
		}
		return out
	}
	out := &server.Permissions{Subscribe: p.Subscribe, Response: p.Response}
	if p.Publish != nil {
		out.Publish = &server.SubjectPermission{Allow: rewrite(p.Publish.Allow), Deny: rewrite(p.Publish.Deny)}
	}
	return out
}

func hasKey[V any](m map[string]V, k string) bool {
	_, ok := m[k]
	return ok
}

func keys[V any](m map[string]V) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	return out
}

// startNATSFromConfig starts a nats-server from opts loaded from a deploy/nats file,
// with every listener moved to a free loopback port (the cluster's to clusterPort) and
// the store to a temporary directory.
func startNATSFromConfig(t *testing.T, opts *server.Options, clusterPort int) *server.Server {
	t.Helper()
	opts.Host, opts.Port = "127.0.0.1", -1
	if opts.HTTPPort != 0 {
		opts.HTTPHost, opts.HTTPPort = "127.0.0.1", -1
	}
	if opts.Cluster.Port != 0 {
		opts.Cluster.Host, opts.Cluster.Port = "127.0.0.1", clusterPort
	}
	if opts.LeafNode.Port != 0 {
		opts.LeafNode.Host, opts.LeafNode.Port = "127.0.0.1", -1
	}
	if opts.JetStream {
		opts.StoreDir = t.TempDir()
	}
	opts.NoLog, opts.NoSigs = true, true
	s, err := server.NewServer(opts)
	if err != nil {
		t.Fatalf("nats-server from %s: %v", opts.ConfigFile, err)
	}
	go s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		s.Shutdown()
		t.Fatalf("nats-server from %s not ready", opts.ConfigFile)
	}
	t.Cleanup(func() { natsembed.Stop(s) })
	return s
}

// connectAs connects to s as one user of the deploy configurations, with that user's
// inbox prefix, as the services do.
func connectAs(t *testing.T, s *server.Server, user, password string) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(s.ClientURL(), nats.UserInfo(user, password), nats.CustomInboxPrefix("_INBOX_"+user))
	if err != nil {
		t.Fatalf("connect to %s as %s: %v", s.Name(), user, err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// TestHubClusterAndRegionLeafFromDeployConfigs starts the three hub servers from
// hub.conf and a region's leaf node from its leaf-<region>.conf, runs an executor in
// that region against the leaf node, and checks that the hub sees it (its node in the
// registry, its state in the nodes' bucket), that the executor user of the region stores outputs and
// takes and acknowledges work in the hub's JetStream, and that the link carries what
// an executor may publish and nothing else.
func TestHubClusterAndRegionLeafFromDeployConfigs(t *testing.T) {
	passwords := setNATSEnv(t)
	// JetStream needs its routes configured before the cluster starts, so the
	// cluster ports are chosen first.
	clusterPorts := freePorts(t, 3)
	var routes []string
	for _, port := range clusterPorts {
		routes = append(routes, fmt.Sprintf("nats-route://route:%s@127.0.0.1:%d", passwords["route"], port))
	}
	t.Setenv("COMFYFLEET_NATS_ROUTES", "["+strings.Join(routes, ", ")+"]")
	var hubs []*server.Server
	for i, port := range clusterPorts {
		t.Setenv("COMFYFLEET_NATS_SERVER_NAME", fmt.Sprintf("nats-%d", i))
		opts := loadNATSConfig(t, "hub.conf")
		hubs = append(hubs, startNATSFromConfig(t, opts, port))
	}
	// Longer than the waits below together: a region's executor that creates its
	// streams in a cluster just formed, on a busy machine, takes a while to register.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	admin := connectAs(t, hubs[0], "admin", passwords["admin"])
	adminJS, err := jetstream.New(admin)
	if err != nil {
		t.Fatal(err)
	}
	fleettest.Eventually(t, 20*time.Second, func() bool {
		for _, h := range hubs {
			if h.NumRoutes() < 2 {
				return false
			}
		}
		callCtx, cancel := context.WithTimeout(ctx, time.Second)
		defer cancel()
		_, err := adminJS.AccountInfo(callCtx)
		return err == nil
	}, "the hub cluster formed no JetStream cluster")

	varz, err := hubs[0].Varz(nil)
	if err != nil {
		t.Fatal(err)
	}
	hubLeafAddr := fmt.Sprintf("127.0.0.1:%d", varz.LeafNode.Port)
	region := "shenzhen"
	t.Setenv("COMFYFLEET_HUB_URL", fmt.Sprintf("nats-leaf://leaf:%s@%s", passwords["leaf"], hubLeafAddr))
	leaf := startNATSFromConfig(t, loadNATSConfig(t, "leaf-"+region+".conf"), 0)
	fleettest.Eventually(t, 10*time.Second, func() bool { return leaf.NumLeafNodes() == 1 && hubs[0].NumLeafNodes() == 1 },
		"leaf-%s.conf made no leaf connection to the hub", region)

	// An executor in the region, with its ComfyUI, connected to the leaf node only.
	sim := fleettest.Sim(t, comfysim.Config{Addr: "127.0.0.1:0", StepDuration: time.Millisecond})
	execCtx, stopExec := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	var execLog fleettest.Buffer
	wg.Go(func() {
		leafURL := fmt.Sprintf("nats://executor:%s@%s", url.QueryEscape(passwords["executor"]), strings.TrimPrefix(leaf.ClientURL(), "nats://"))
		err := run(execCtx, []string{"executor", "--nats", leafURL, "--name", "executor-" + region,
			"--comfy", sim.URL() + ",id=gpu-" + region + ",pool=image", "--log-level", "warn"}, io.Discard, &execLog)
		if err != nil && !errors.Is(err, context.Canceled) {
			t.Errorf("executor through the leaf node: %v", err)
		}
	})
	t.Cleanup(func() {
		stopExec()
		wg.Wait()
		if t.Failed() {
			t.Logf("--- log of the %s executor:\n%s", region, execLog.String())
		}
	})

	intake := connectAs(t, hubs[2], "intake", passwords["intake"])
	intakeJS, err := jetstream.New(intake)
	if err != nil {
		t.Fatal(err)
	}
	node := "gpu-" + region
	// The hub's intake reads a key by a direct get, which the replica on its own
	// server answers; on a cluster just formed, on a busy machine, a replica still
	// catching up answers "not found" for a while (seen for over a minute). The
	// stream's leader has what the executor wrote.
	inHub := func(bucket, key string) bool {
		callCtx, cancel := context.WithTimeout(ctx, 2*time.Second)
		defer cancel()
		if kv, err := intakeJS.KeyValue(callCtx, bucket); err == nil {
			if _, err := kv.Get(callCtx, key); err == nil {
				return true
			}
		}
		resp, err := admin.RequestWithContext(callCtx, "$JS.API.STREAM.MSG.GET.KV_"+bucket,
			fmt.Appendf(nil, `{"last_by_subj":"$KV.%s.%s"}`, bucket, key))
		if err != nil {
			return false
		}
		var got struct {
			Message *struct{} `json:"message"`
		}
		if json.Unmarshal(resp.Data, &got) != nil || got.Message == nil {
			return false
		}
		t.Logf("%s/%s: not yet in the replica the intake read, but in the stream's leader", bucket, key)
		return true
	}
	for _, bucket := range []string{fleet.BucketRegistry, fleet.BucketNodes, fleet.BucketInventory} {
		fleettest.Eventually(t, 60*time.Second, func() bool { return inHub(bucket, node) },
			"the %s executor's node %s is not in the hub's %s", region, node, bucket)
	}

	// The hub's intake asks the region's executor to read its node's inventory again,
	// and gets its answer back across the link.
	refreshed, err := fleet.RefreshNode(ctx, intake, node)
	if err != nil || refreshed.Version == "" || refreshed.Error != "" {
		t.Fatalf("refresh of a node in %s from the hub: %+v, %v", region, refreshed, err)
	}

	// An output stored in the region lands in the hub's object store.
	regional := connectAs(t, leaf, "executor", passwords["executor"])
	regionalJS, err := jetstream.New(regional)
	if err != nil {
		t.Fatal(err)
	}
	outputs, err := regionalJS.ObjectStore(ctx, "fleet_outputs")
	if err != nil {
		t.Fatalf("the outputs' object store through the leaf node: %v", err)
	}
	if _, err := outputs.PutBytes(ctx, "job/0/out.png", []byte("png")); err != nil {
		t.Fatalf("store an output through the leaf node: %v", err)
	}
	// Read through two servers of the hub: the replica on the intake's may still be
	// catching up (see inHub).
	fleettest.Eventually(t, 60*time.Second, func() bool {
		for _, js := range []jetstream.JetStream{intakeJS, adminJS} {
			hubOutputs, err := js.ObjectStore(ctx, "fleet_outputs")
			if err != nil {
				continue
			}
			if got, err := hubOutputs.GetBytes(ctx, "job/0/out.png"); err == nil && string(got) == "png" {
				return true
			}
		}
		return false
	}, "the output stored in %s cannot be read in the hub", region)

	// A scene event published in the region is stored in the hub's events stream:
	// the hub's interest in it crosses the link.
	fleettest.Eventually(t, 10*time.Second, func() bool {
		_, err := regionalJS.Publish(ctx, "fleet.evt.scene.probe.0.started", []byte("{}"))
		return err == nil
	}, "a scene event published through the leaf node reached no stream")

	// Work placed in the hub reaches a consumer in the region, and its ack returns.
	probe, err := regionalJS.CreateOrUpdateConsumer(ctx, fleet.StreamWork, jetstream.ConsumerConfig{
		Durable: "node-probe", FilterSubject: fleet.WorkSubject("probe"), AckPolicy: jetstream.AckExplicitPolicy})
	if err != nil {
		t.Fatalf("a work consumer through the leaf node: %v", err)
	}
	if _, err := adminJS.Publish(ctx, fleet.WorkSubject("probe"), []byte("{}")); err != nil {
		t.Fatal(err)
	}
	batch, err := probe.Fetch(1, jetstream.FetchMaxWait(10*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	work, ok := <-batch.Messages()
	if !ok {
		t.Fatalf("no work reached the region: %v", batch.Error())
	}
	if err := work.DoubleAck(ctx); err != nil {
		t.Fatalf("ack work through the leaf node: %v", err)
	}

	// Whatever a region runs, its link carries no more than an executor may publish:
	// a leaf node without any users of its own, logged in as the leaf user.
	rogue := startNATSFromConfig(t, &server.Options{LeafNode: server.LeafNodeOpts{Remotes: []*server.RemoteLeafOpts{{
		URLs: []*url.URL{{Scheme: "nats-leaf", User: url.UserPassword("leaf", passwords["leaf"]), Host: hubLeafAddr}},
	}}}}, 0)
	fleettest.Eventually(t, 10*time.Second, func() bool { return rogue.NumLeafNodes() == 1 }, "the second leaf node made no connection")
	seen, err := admin.SubscribeSync("fleet.>")
	if err != nil {
		t.Fatal(err)
	}
	if err := admin.Flush(); err != nil {
		t.Fatal(err)
	}
	anyone, err := nats.Connect(rogue.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	defer anyone.Close()
	// A denied subject first, then an allowed one, on one connection and one link:
	// once the allowed one arrives, the denied one would have arrived before it.
	for {
		for _, subject := range []string{"fleet.submit.job.0", "fleet.work.gpu-" + region, "fleet.evt.scene.probe.0.cancelled", "fleet.evt.scene.probe.0.progress"} {
			if err := anyone.Publish(subject, []byte("{}")); err != nil {
				t.Fatal(err)
			}
		}
		if err := anyone.Flush(); err != nil {
			t.Fatal(err)
		}
		msg, err := seen.NextMsg(100 * time.Millisecond)
		if errors.Is(err, nats.ErrTimeout) && ctx.Err() == nil {
			continue // the hub's interest has not reached the leaf node yet
		}
		if err != nil {
			t.Fatalf("nothing crossed the leaf link: %v", err)
		}
		if msg.Subject != "fleet.evt.scene.probe.0.progress" {
			t.Fatalf("the leaf link carried %s, which an executor may not publish", msg.Subject)
		}
		break
	}
}

// TestServicesReadAJobBeforeItsStateIsWritten connects to a server of comfyfleet.conf
// as each service's user and reads the state of a job recorded without one, and of a
// job that does not exist. fleet.Jobs.State then asks the leaders of the buckets'
// streams, after the direct gets found nothing, as it does whenever a replica is
// behind: each user that reads a job's state must be allowed both. (The intake once
// could not: in a hub of three servers on a loaded machine, a job read from a replica
// behind answered 503 after a 10 s wait.)
func TestServicesReadAJobBeforeItsStateIsWritten(t *testing.T) {
	passwords := setNATSEnv(t)
	s := startNATSFromConfig(t, loadNATSConfig(t, "comfyfleet.conf"), 0)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	adminJS, err := jetstream.New(connectAs(t, s, "admin", passwords["admin"]))
	if err != nil {
		t.Fatal(err)
	}
	if err := fleet.Ensure(ctx, adminJS, fleet.DefaultSettings()); err != nil {
		t.Fatal(err)
	}
	records, err := adminJS.KeyValue(ctx, fleet.BucketJobs)
	if err != nil {
		t.Fatal(err)
	}
	const id = "recorded-job"
	if _, err := records.Put(ctx, id, []byte(`{"id": "recorded-job", "status": "queued", "priority": 5}`)); err != nil {
		t.Fatal(err)
	}
	for _, user := range []string{"intake", "dispatcher", "executor", "notifier"} {
		js, err := jetstream.New(connectAs(t, s, user, passwords[user]))
		if err != nil {
			t.Fatal(err)
		}
		jobs, err := fleet.OpenJobs(ctx, js)
		if err != nil {
			t.Fatalf("%s: %v", user, err)
		}
		readCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		st, rev, err := jobs.State(readCtx, id)
		if err != nil || rev != 0 || st.Status != fleet.StatusQueued {
			t.Errorf("%s: the state of a job just recorded: %+v at revision %d, %v; want it queued, as recorded", user, st, rev, err)
		}
		if _, _, err := jobs.State(readCtx, "no-such-job"); !errors.Is(err, fleet.ErrJobNotFound) {
			t.Errorf("%s: the state of no job: %v, want fleet.ErrJobNotFound", user, err)
		}
		cancel()
	}
}
