package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/callback"
	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/telemetry"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
	"github.com/comfyfleet/comfyfleet/services/dispatcher"
	"github.com/comfyfleet/comfyfleet/services/executor"
)

func runUp(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("up", flag.ContinueOnError)
	var (
		dataDir   = fs.String("data", "./.comfyfleet", "directory of the embedded NATS file store")
		httpAddr  = fs.String("http", "127.0.0.1:8080", "API listen address")
		publicURL = fs.String("public-url", "", "base URL clients reach the API at (default http://<--http>)")
		natsHost  = fs.String("nats-host", "127.0.0.1", "embedded NATS listen host")
		natsPort  = fs.Int("nats-port", 4222, "embedded NATS client port (-1 picks a free one)")
		sync      = fs.String("sync", "2m", `file store sync policy: "always" (fsync each write) or an interval`)
		sims      = fs.Int("sim", 3, "simulated ComfyUI nodes to start when no --comfy is given (speeds 1, 1, 2, 1, 1, 2, …)")
		simStep   = fs.Duration("sim-step", 150*time.Millisecond, "time of one sampler step on a simulated node of speed 1")
		auth      = fs.String("auth", "", `"open" (no API keys; only allowed on a loopback --http) or "keys" (default: open on loopback, keys otherwise)`)
		inputWait = fs.Duration("input-timeout", time.Minute, "longest download of a scene's input image, from its URL or the fleet's store")
		policy    = fs.String("policy", string(dispatcher.FastestFinish), "scheduling policy: fastest-finish, round-robin, least-conn or weighted")
		loadCost  = fs.Duration("model-load", 5*time.Second, "model-load time fastest-finish assumes for a node until it has measured one")
		regionPen = fs.Duration("region-penalty", 10*time.Second, "time fastest-finish adds to a scene on a node outside the region it prefers")
		invEvery  = fs.Duration("inventory-interval", 5*time.Minute, "how often each node's inventory (/object_info: node classes, model files) is read again")
		comfy     listFlag
		allow     = listFlag{"127.0.0.0/8", "::1"}
		settings  settingsFlags
		rates     rateFlags
		logs      logFlags
		outs      outputsFlags
	)
	fs.Var(&comfy, "comfy", "a real ComfyUI node: URL[,id=NAME][,pool=image+video][,weight=W][,region=R] (repeatable)")
	fs.Var(&allow, "allow-callback", "internal addresses or CIDR prefixes that callback URLs may reach (repeatable; default loopback)")
	outs.register(fs, true)
	settings.register(fs)
	rates.register(fs, true)
	logs.register(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	log, err := logs.logger(stderr)
	if err != nil {
		return err
	}
	st, err := settings.settings()
	if err != nil {
		return err
	}
	open, err := openAPI(*auth, *httpAddr)
	if err != nil {
		return err
	}
	allowed, err := callback.ParsePrefixes(allow)
	if err != nil {
		return fmt.Errorf("--allow-callback: %w", err)
	}
	cfg := stack.Config{
		DataDir: *dataDir, NATSHost: *natsHost, NATSPort: *natsPort, Sync: *sync,
		HTTPAddr: *httpAddr, PublicURL: *publicURL, Open: open, CallbackAllow: allowed, Settings: st, Logger: log,
		Executor: executor.Config{InputTimeout: *inputWait, InventoryInterval: *invEvery}, Outputs: outs.spec,
	}
	cfg.Intake.OutputURLTTL, cfg.Notifier.OutputURLTTL = outs.ttl, outs.ttl
	cfg.Intake.SubmitRate, cfg.Intake.ReadRate = rates.limits(open)
	if cfg.Dispatcher.Policy, err = dispatcher.ParsePolicy(*policy); err != nil {
		return fmt.Errorf("--policy: %w", err)
	}
	cfg.Dispatcher.ModelLoadPenalty, cfg.Dispatcher.RegionPenalty = *loadCost, *regionPen
	for _, c := range comfy {
		n, err := parseNode(c)
		if err != nil {
			return err
		}
		cfg.Comfy = append(cfg.Comfy, n)
	}
	if len(cfg.Comfy) == 0 {
		if *sims < 1 {
			return fmt.Errorf("--sim %d: name real nodes with --comfy, or start at least one simulated node", *sims)
		}
		cfg.Sims = make([]comfysim.Config, *sims)
		for i := range cfg.Sims {
			speed := 1.0
			if i%3 == 2 {
				speed = 2
			}
			cfg.Sims[i] = comfysim.Config{Name: fmt.Sprintf("sim-%d", i+1), Speed: speed, StepDuration: *simStep}
		}
	}
	if err := os.MkdirAll(*dataDir, 0o755); err != nil {
		return fmt.Errorf("create --data %s: %w", *dataDir, err)
	}
	shutdown, err := telemetry.Setup(ctx, "comfyfleet")
	if err != nil {
		return err
	}
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = shutdown(ctx)
	}()

	s, err := stack.Start(ctx, cfg)
	if err != nil {
		return err
	}
	printBanner(stdout, s)
	if open {
		fmt.Fprintln(stdout, "The API is open: no API key needed, on loopback only. --auth keys requires keys (comfyfleet apikey create).")
	}
	<-ctx.Done()
	fmt.Fprintln(stdout, "stopping…")
	return s.Wait()
}

// openAPI decides whether the API runs without keys: only ever on loopback.
func openAPI(auth, httpAddr string) (bool, error) {
	host, _, err := net.SplitHostPort(httpAddr)
	if err != nil {
		return false, fmt.Errorf("--http %q: %w", httpAddr, err)
	}
	ip, err := netip.ParseAddr(host)
	loopback := host == "localhost" || err == nil && ip.IsLoopback()
	switch auth {
	case "keys":
		return false, nil
	case "open":
		if !loopback {
			return false, fmt.Errorf("--auth open serves anyone who reaches %s: only allowed on a loopback address", httpAddr)
		}
		return true, nil
	case "":
		return loopback, nil
	}
	return false, fmt.Errorf("--auth %q: use open or keys", auth)
}

func printBanner(w io.Writer, s *stack.Stack) {
	fmt.Fprintf(w, "comfyfleet is up\n  panel   %s/\n  API     %s/v1/jobs\n  docs    %s/docs  (OpenAPI: %s/openapi.json)\n  metrics %s/metrics\n  NATS    %s\n  nodes\n",
		s.APIURL, s.APIURL, s.APIURL, s.APIURL, s.APIURL, s.NATS.ClientURL())
	for _, n := range s.Nodes {
		kind := "ComfyUI"
		if n.Labels["simulated"] == "true" {
			kind = "simulated"
		}
		fmt.Fprintf(w, "    %-10s %s  %s  pools %v  weight %g\n", n.ID, n.URL, kind, n.Pools, n.Weight)
	}
	fmt.Fprintln(w, "Ctrl-C stops everything.")
}
