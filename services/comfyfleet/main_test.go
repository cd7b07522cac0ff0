package main

import (
	"bufio"
	"context"
	"flag"
	"io"
	"net/http"
	"reflect"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

// TestUpStartsTheFleetAndStopsOnCancel runs `comfyfleet up` as the README does, on
// free ports, and checks that it serves and stops cleanly.
func TestUpStartsTheFleetAndStopsOnCancel(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	r, w := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"up", "--data", t.TempDir(), "--http", "127.0.0.1:0", "--nats-port", "-1",
			"--sim-step", "5ms", "--log-level", "warn"}, w, io.Discard)
		w.Close()
	}()
	apiLine := regexp.MustCompile(`API\s+(http://\S+)/v1/jobs`)
	sc := bufio.NewScanner(r)
	var api string
	sims := 0
	for sc.Scan() && (api == "" || sims < 3) {
		if m := apiLine.FindStringSubmatch(sc.Text()); m != nil {
			api = m[1]
		}
		if regexp.MustCompile(`sim-\d\s+http://`).MatchString(sc.Text()) {
			sims++
		}
	}
	go func() { _, _ = io.Copy(io.Discard, r) }()
	if api == "" || sims != 3 {
		t.Fatalf("banner gave API %q and %d simulated nodes, want an API and 3", api, sims)
	}
	for _, path := range []string{"/readyz", "/openapi.json", "/docs", "/v1/workflows", "/", "/metrics"} {
		resp, err := fleettest.HTTP.Get(api + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s: %s", path, resp.Status)
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("up returned %v", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("up still running 20s after cancel")
	}
}

func TestParseNode(t *testing.T) {
	t.Parallel()
	got, err := parseNode("http://10.0.0.5:8188/,id=a100,pool=image+video,weight=4,region=shanghai")
	want := fleet.NodeConfig{ID: "a100", URL: "http://10.0.0.5:8188", Pools: []string{"image", "video"}, Weight: 4, Region: "shanghai"}
	if err != nil || !reflect.DeepEqual(got, want) {
		t.Errorf("parseNode = %+v, %v; want %+v", got, err, want)
	}
	got, err = parseNode("http://gpu-7.lan:8188")
	if err != nil || got.ID != "gpu-7-lan-8188" || len(got.Pools) != 2 || got.Weight != 1 {
		t.Errorf("defaults: %+v, %v", got, err)
	}
	for _, bad := range []string{"gpu:8188", "ftp://x", "http://x,weight=0", "http://x,colour=red", "http://x,id=a.b", "http://x,novalue", "http://x,region=cn south"} {
		if _, err := parseNode(bad); err == nil {
			t.Errorf("parseNode(%q) accepted it", bad)
		}
	}
}

func TestFlagsFromEnvironmentYieldToTheCommandLine(t *testing.T) {
	t.Setenv("COMFYFLEET_HTTP", "0.0.0.0:9999")
	t.Setenv("COMFYFLEET_SIM", "5")
	t.Setenv("COMFYFLEET_COMFY", "http://a:1 http://b:2")
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	httpAddr := fs.String("http", "127.0.0.1:8080", "")
	sims := fs.Int("sim", 3, "")
	var comfy listFlag
	fs.Var(&comfy, "comfy", "")
	if err := parse(fs, []string{"--sim", "2"}); err != nil {
		t.Fatal(err)
	}
	if *httpAddr != "0.0.0.0:9999" || *sims != 2 || len(comfy) != 2 {
		t.Errorf("http %q sim %d comfy %v; want the environment's http, the flag's sim, two nodes", *httpAddr, *sims, comfy)
	}
}

func TestRedactURLsHidesCredentials(t *testing.T) {
	got := redactURLs("nats://intake:s3cret@nats-1:4222, nats://tok3n@nats-2:4222,nats://nats-3:4222")
	if strings.Contains(got, "s3cret") || strings.Contains(got, "tok3n") {
		t.Fatalf("redactURLs leaks a secret: %s", got)
	}
	if want := "nats://intake:xxxxx@nats-1:4222,nats://xxxxx@nats-2:4222,nats://nats-3:4222"; got != want {
		t.Errorf("redactURLs = %q, want %q", got, want)
	}
}

func TestRateFlags(t *testing.T) {
	t.Parallel()
	off := intake.RateLimit{PerSecond: intake.Unlimited}
	for _, tc := range []struct {
		args         []string
		open         bool
		submit, read intake.RateLimit
	}{
		{nil, false, intake.RateLimit{PerSecond: 20}, intake.RateLimit{PerSecond: 200}},
		{nil, true, off, off},
		{[]string{"--rate-read", "50"}, true, off, intake.RateLimit{PerSecond: 50}},
		{[]string{"--rate-submit", "5", "--rate-submit-burst", "7", "--rate-read", "0"}, false, intake.RateLimit{PerSecond: 5, Burst: 7}, off},
	} {
		fs := flag.NewFlagSet("x", flag.ContinueOnError)
		var r rateFlags
		r.register(fs, true)
		if err := fs.Parse(tc.args); err != nil {
			t.Fatal(err)
		}
		submit, read := r.limits(tc.open)
		if submit != tc.submit || read != tc.read {
			t.Errorf("%v (open %v): submit %+v read %+v, want %+v and %+v", tc.args, tc.open, submit, read, tc.submit, tc.read)
		}
	}
	fs := flag.NewFlagSet("x", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var r rateFlags
	r.register(fs, false)
	if err := fs.Parse([]string{"--rate-read", "-1"}); err == nil {
		t.Error("--rate-read -1 was accepted")
	}
}
