package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/telemetry"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
	"github.com/comfyfleet/comfyfleet/services/executor"
)

func runUp(ctx context.Context, args []string, stdout io.Writer) error {
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
		inputWait = fs.Duration("input-timeout", time.Minute, "longest download of a scene's input image given by URL")
		comfy     listFlag
		settings  settingsFlags
		logs      logFlags
	)
	fs.Var(&comfy, "comfy", "a real ComfyUI node: URL[,id=NAME][,pool=image+video][,weight=W] (repeatable)")
	settings.register(fs)
	logs.register(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	log, err := logs.logger(os.Stderr)
	if err != nil {
		return err
	}
	st, err := settings.settings()
	if err != nil {
		return err
	}
	cfg := stack.Config{
		DataDir: *dataDir, NATSHost: *natsHost, NATSPort: *natsPort, Sync: *sync,
		HTTPAddr: *httpAddr, PublicURL: *publicURL, Settings: st, Logger: log,
		Executor: executor.Config{InputTimeout: *inputWait},
	}
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
	<-ctx.Done()
	fmt.Fprintln(stdout, "stopping…")
	return s.Wait()
}

func printBanner(w io.Writer, s *stack.Stack) {
	fmt.Fprintf(w, "comfyfleet is up\n  API     %s/v1/jobs\n  docs    %s/docs  (OpenAPI: %s/openapi.json)\n  NATS    %s\n  nodes\n",
		s.APIURL, s.APIURL, s.APIURL, s.NATS.ClientURL())
	for _, n := range s.Nodes {
		kind := "ComfyUI"
		if n.Labels["simulated"] == "true" {
			kind = "simulated"
		}
		fmt.Fprintf(w, "    %-10s %s  %s  pools %v  weight %g\n", n.ID, n.URL, kind, n.Pools, n.Weight)
	}
	fmt.Fprintln(w, "Ctrl-C stops everything.")
}
