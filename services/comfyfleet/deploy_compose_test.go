package main

import (
	"context"
	"flag"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/compose-spec/compose-go/v2/loader"
	"github.com/compose-spec/compose-go/v2/types"
	"github.com/nats-io/nats-server/v2/server"
)

// composeAPIKeyCommand is how README and docker-compose.yml create an API key.
var composeAPIKeyCommand = []string{"apikey", "create", "--tenant", "studio", "--role", "submit"}

// loadCompose loads docker-compose.yml as docker compose does (schema validation,
// interpolation, merge keys), with env as the environment of `docker compose`.
func loadCompose(t *testing.T, env map[string]string) *types.Project {
	t.Helper()
	root := repoRoot(t)
	path := filepath.Join(root, "docker-compose.yml")
	// Read here, so that go test's cache knows the test depends on the file.
	content, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	project, err := loader.LoadWithContext(context.Background(), types.ConfigDetails{
		WorkingDir:  root,
		ConfigFiles: []types.ConfigFile{{Filename: path, Content: content}},
		Environment: env,
	}, func(o *loader.Options) { o.SetProjectName("comfyfleet", true) })
	if err != nil {
		t.Fatalf("docker-compose.yml: %v", err)
	}
	return project
}

// composeEnv is a service's environment, every variable set.
func composeEnv(s types.ServiceConfig) map[string]string {
	env := map[string]string{}
	for k, v := range s.Environment {
		if v != nil {
			env[k] = *v
		}
	}
	return env
}

// TestComposeFileRunsAWorkingFleet loads docker-compose.yml with compose-go and checks
// what `docker compose up` would run: NATS from deploy/nats/comfyfleet.conf, each
// service a real comfyfleet command whose flags and COMFYFLEET_* variables parse,
// connecting as its own NATS user with the password NATS expects, health checks that
// probe what the service serves, and executors driving the simulated nodes.
func TestComposeFileRunsAWorkingFleet(t *testing.T) {
	for _, env := range []map[string]string{
		{}, // a fresh checkout: the trial passwords
		{"COMFYFLEET_INTAKE_PASSWORD": "i1", "COMFYFLEET_DISPATCHER_PASSWORD": "d1", "COMFYFLEET_EXECUTOR_PASSWORD": "e1",
			"COMFYFLEET_NOTIFIER_PASSWORD": "n1", "COMFYFLEET_ADMIN_PASSWORD": "a1", "COMFYFLEET_PUBLIC_URL": "https://fleet.example.com"},
	} {
		project := loadCompose(t, env)
		root := repoRoot(t)

		// NATS, as nats-server reads its command line and the mounted configuration.
		nats, ok := project.Services["nats"]
		if !ok {
			t.Fatal("docker-compose.yml has no service nats")
		}
		natsOpts := composeNATSOptions(t, nats, root)
		natsPasswords := composeEnv(nats)

		running := map[string]int{} // comfyfleet command → containers
		sims := map[string]int{}    // simulated node host → port
		var comfyURLs []string
		toolsService := ""
		services := project.AllServices()
		for _, name := range slices.Sorted(func(yield func(string) bool) {
			for name := range services {
				if !yield(name) {
					return
				}
			}
		}) {
			s := services[name]
			if name == "nats" {
				continue
			}
			where := "docker-compose.yml: " + name
			if s.Image != "comfyfleet:latest" || s.Build == nil || s.Build.Context != root {
				t.Errorf("%s: image %q built from %v; want comfyfleet:latest built from the repository's Dockerfile", where, s.Image, s.Build)
				continue
			}
			if len(s.Entrypoint) > 0 {
				t.Errorf("%s: entrypoint %q replaces the image's /comfyfleet", where, s.Entrypoint)
			}
			args := []string(s.Command)
			if slices.Contains(s.Profiles, "tools") {
				args = composeAPIKeyCommand // docker compose run --rm <service> apikey create …
				toolsService = name
			}
			env := composeEnv(s)
			fs := checkCommandLine(t, commandLine{where: where, args: args, env: env})
			if fs == nil {
				continue
			}
			replicas := 1
			if s.Deploy != nil && s.Deploy.Replicas != nil {
				replicas = *s.Deploy.Replicas
			}
			if len(s.Profiles) == 0 {
				running[fs.Name()] += replicas
			}

			if fs.Lookup("nats") != nil {
				checkComposeNATSURL(t, where, fs, s, natsOpts, natsPasswords)
			}
			switch fs.Name() {
			case "sim":
				sims[name] = listenPort(t, flagValue(fs, "addr"))
			case "executor":
				comfyURLs = append(comfyURLs, *fs.Lookup("comfy").Value.(*listFlag)...)
			case "intake":
				port := uint32(listenPort(t, flagValue(fs, "http")))
				if !slices.ContainsFunc(s.Ports, func(p types.ServicePortConfig) bool { return p.Target == port && p.Published != "" }) {
					t.Errorf("%s: the API's port %d is not published", where, port)
				}
				if !strings.HasPrefix(flagValue(fs, "public-url"), "http") {
					t.Errorf("%s: --public-url %q", where, flagValue(fs, "public-url"))
				}
			}
			if len(s.Profiles) > 0 {
				continue // one-off commands need no health check
			}
			if s.HealthCheck == nil || len(s.HealthCheck.Test) < 3 || s.HealthCheck.Test[0] != "CMD" || s.HealthCheck.Test[1] != "/comfyfleet" {
				t.Errorf("%s: health check %v; want [CMD /comfyfleet healthcheck --url …]", where, s.HealthCheck)
				continue
			}
			probe := healthcheckURL(t, commandLine{where: where + " healthcheck", args: s.HealthCheck.Test[2:], env: env})
			if probe == nil {
				continue
			}
			wantPath := map[string]string{"sim": "/system_stats"}[fs.Name()]
			if wantPath == "" {
				wantPath = "/readyz"
			}
			if port := serviceListenPort(t, fs); urlPort(probe) != port || probe.Hostname() != "127.0.0.1" || probe.Path != wantPath {
				t.Errorf("%s: health check probes %s; the service answers on 127.0.0.1:%d%s", where, probe, port, wantPath)
			}
		}

		readme, err := os.ReadFile(filepath.Join(root, "README.md"))
		if err != nil {
			t.Fatal(err)
		}
		if tools := "docker compose run --rm " + toolsService + " " + strings.Join(composeAPIKeyCommand, " "); toolsService == "" || !strings.Contains(string(readme), tools) {
			t.Errorf("README.md does not say how to create an API key as checked here: %s", tools)
		}
		for command, least := range map[string]int{"intake": 1, "dispatcher": 2, "executor": 1, "notifier": 1, "sim": 1} {
			if running[command] < least {
				t.Errorf("docker compose up runs %d %s, want at least %d", running[command], command, least)
			}
		}
		for _, c := range comfyURLs {
			node, _ := parseNode(c)
			u, _ := url.Parse(node.URL)
			if port, ok := sims[u.Hostname()]; !ok || port != urlPort(u) {
				t.Errorf("executor drives %s, which is no simulated node of docker-compose.yml", node.URL)
			}
		}
		if len(comfyURLs) != len(sims) {
			t.Errorf("executors drive %d nodes; docker-compose.yml runs %d simulated ones", len(comfyURLs), len(sims))
		}
	}
}

// composeNATSOptions parses the nats service's command line as nats-server does,
// with the configuration file read from where the service mounts it from, and checks
// its health check, store and volume.
func composeNATSOptions(t *testing.T, nats types.ServiceConfig, root string) *server.Options {
	t.Helper()
	if !strings.HasPrefix(nats.Image, "nats:") {
		t.Errorf("docker-compose.yml: nats runs %q, want the official nats image", nats.Image)
	}
	args := slices.Clone([]string(nats.Command))
	for i, a := range args {
		if (a == "-c" || a == "--config") && i+1 < len(args) {
			args[i+1] = hostPath(t, nats, args[i+1])
		}
	}
	for k, v := range composeEnv(nats) {
		t.Setenv(k, v)
	}
	opts, err := server.ConfigureOptions(flag.NewFlagSet("nats-server", flag.ContinueOnError), args,
		func() { t.Error("nats-server would print its version") }, func() { t.Error("nats-server would print its help") }, func() {})
	if err != nil {
		t.Fatalf("docker-compose.yml: nats-server %q: %v", nats.Command, err)
	}
	if filepath.Dir(opts.ConfigFile) != filepath.Join(root, "deploy", "nats") || !opts.JetStream || opts.Port != 4222 {
		t.Errorf("docker-compose.yml: nats runs %s (JetStream %t, port %d); want deploy/nats/comfyfleet.conf", opts.ConfigFile, opts.JetStream, opts.Port)
	}
	// The store must be on a named volume, so it outlives the container.
	if !slices.ContainsFunc(nats.Volumes, func(v types.ServiceVolumeConfig) bool {
		return v.Type == types.VolumeTypeVolume && strings.HasPrefix(opts.StoreDir+"/", strings.TrimSuffix(v.Target, "/")+"/")
	}) {
		t.Errorf("docker-compose.yml: the JetStream store %s is on no volume", opts.StoreDir)
	}
	test := nats.HealthCheck
	if test == nil || len(test.Test) < 2 {
		t.Fatalf("docker-compose.yml: nats has no health check")
	}
	probe, err := url.Parse(test.Test[len(test.Test)-1])
	if err != nil || urlPort(probe) != opts.HTTPPort || probe.Path != "/healthz" {
		t.Errorf("docker-compose.yml: nats health check %q; monitoring listens on port %d", test.Test, opts.HTTPPort)
	}
	return opts
}

// hostPath is where the file at path inside service s comes from on the host, through
// its bind mounts.
func hostPath(t *testing.T, s types.ServiceConfig, path string) string {
	t.Helper()
	for _, v := range s.Volumes {
		if v.Type != types.VolumeTypeBind {
			continue
		}
		if rel, ok := strings.CutPrefix(path, strings.TrimSuffix(v.Target, "/")+"/"); ok {
			return filepath.Join(v.Source, rel)
		}
	}
	t.Fatalf("docker-compose.yml: %s: %s is on no bind mount", s.Name, path)
	return ""
}

// checkComposeNATSURL checks that a service connects to the nats service as the NATS
// user of its command, with that user's password, and starts after NATS is healthy.
func checkComposeNATSURL(t *testing.T, where string, fs *flag.FlagSet, s types.ServiceConfig, nats *server.Options, passwords map[string]string) {
	t.Helper()
	u, err := url.Parse(flagValue(fs, "nats"))
	if err != nil {
		t.Errorf("%s: --nats: %v", where, err)
		return
	}
	user := fs.Name()
	if user == "apikey create" {
		user = "admin"
	}
	password, _ := u.User.Password()
	if u.Hostname() != "nats" || urlPort(u) != nats.Port || u.User.Username() != user {
		t.Errorf("%s: --nats %s; want nats://%s:…@nats:%d", where, redactURLs(u.String()), user, nats.Port)
	}
	if want := passwords["COMFYFLEET_"+strings.ToUpper(user)+"_PASSWORD"]; password == "" || password != want {
		t.Errorf("%s: the password of NATS user %s is not the one the nats service gives it", where, user)
	}
	if dep, ok := s.DependsOn["nats"]; !ok || dep.Condition != types.ServiceConditionHealthy {
		t.Errorf("%s: does not wait for NATS to be healthy", where)
	}
}
