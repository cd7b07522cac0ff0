package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/natsembed"
)

func runSim(ctx context.Context, args []string, stdout, _ io.Writer) error {
	fs := flag.NewFlagSet("sim", flag.ContinueOnError)
	addr := fs.String("addr", "127.0.0.1:8188", "listen address")
	name := fs.String("name", "sim", "device name shown in /system_stats")
	speed := fs.Float64("speed", 1, "relative GPU speed (2 = twice as fast)")
	step := fs.Duration("step", 150*time.Millisecond, "time of one sampler step at speed 1")
	failures := fs.Float64("failure-rate", 0, "probability that a prompt ends in an execution error")
	logRenders := fs.Bool("log-renders", false, `print "rendered <prompt_id>" for every prompt that runs to success`)
	if err := parse(fs, args); err != nil {
		return err
	}
	cfg := comfysim.Config{Name: *name, Addr: *addr, Speed: *speed, StepDuration: *step, FailureRate: *failures}
	if *logRenders {
		var mu sync.Mutex
		cfg.OnRendered = func(id string) {
			mu.Lock()
			defer mu.Unlock()
			fmt.Fprintf(stdout, "rendered %s\n", id)
		}
	}
	sim, err := comfysim.Start(cfg)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "simulated ComfyUI %q listening on %s\n", *name, sim.URL())
	<-ctx.Done()
	return sim.Close()
}

func runNATS(ctx context.Context, args []string, stdout, _ io.Writer) error {
	fs := flag.NewFlagSet("nats", flag.ContinueOnError)
	config := fs.String("config", "", "a nats-server configuration file, such as deploy/nats/hub.conf or leaf-<region>.conf, run as it says "+
		"($VARIABLES from the environment); the flags below then override it only where given")
	host := fs.String("host", "127.0.0.1", "listen host")
	port := fs.Int("port", 4222, "client port (-1 picks a free one)")
	store := fs.String("store", "./.comfyfleet", "JetStream file store directory")
	syncPolicy := fs.String("sync", "2m", `file store sync policy: "always" or an interval`)
	monitorPort := fs.Int("http-port", 0, "monitoring port (/healthz, /varz); 0: as --config says, else none")
	clusterPort := fs.Int("cluster-port", 0, "with --config: the cluster's route port instead of the file's")
	leafPort := fs.Int("leaf-port", 0, "with --config: the leaf-node port instead of the file's")
	if err := parse(fs, args); err != nil {
		return err
	}
	cfg := natsembed.Config{Dir: *store, Host: *host, Port: *port, Sync: *syncPolicy, MonitorPort: *monitorPort}
	if *config != "" {
		// The file decides what the flags left at their defaults would otherwise.
		given := givenFlags(fs)
		cfg = natsembed.Config{ConfigFile: *config, MonitorPort: *monitorPort, ClusterPort: *clusterPort, LeafPort: *leafPort, Log: true}
		if given["host"] {
			cfg.Host = *host
		}
		if given["port"] {
			cfg.Port = *port
		}
		if given["store"] {
			cfg.Dir = *store
		}
		if given["sync"] {
			cfg.Sync = *syncPolicy
		}
	}
	s, err := natsembed.Start(cfg)
	if err != nil {
		return err
	}
	switch {
	case *config != "":
		fmt.Fprintf(stdout, "nats-server %s from %s listening on %s\n", s.Name(), *config, s.ClientURL())
	default:
		fmt.Fprintf(stdout, "nats-server with JetStream listening on %s, store %s\n", s.ClientURL(), *store)
	}
	<-ctx.Done()
	natsembed.Stop(s)
	return nil
}
