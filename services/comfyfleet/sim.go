package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"strings"
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
		"($VARIABLES from the environment); the other flags then override it only where given")
	host := fs.String("host", "127.0.0.1", "listen host")
	port := fs.Int("port", 4222, "client port (-1 picks a free one)")
	store := fs.String("store", "./.comfyfleet", "JetStream file store directory")
	syncPolicy := fs.String("sync", "2m", `file store sync policy: "always" or an interval`)
	name := fs.String("name", "comfyfleet", "server name, unique in a cluster")
	cluster := fs.String("cluster", "", "host:port where this server listens for the other servers of its cluster (default: no cluster, or --config's)")
	clusterName := fs.String("cluster-name", "comfyfleet", "name of the cluster")
	var routes listFlag
	fs.Var(&routes, "routes", "cluster URL of another server of the cluster, nats://host:port (repeatable, or comma-separated)")
	monitorPort := fs.Int("http-port", 0, "monitoring port (/healthz, /varz); 0: --config's, else none")
	leafPort := fs.Int("leaf-port", 0, "with --config: the port leaf nodes connect to, instead of the file's")
	pprofAddr := fs.String("pprof", "", "serve Go's pprof profiles (/debug/pprof/) of the server on this address, e.g. 127.0.0.1:6060 (default off)")
	if err := parse(fs, args); err != nil {
		return err
	}
	stopProfiles, err := serveProfiles(*pprofAddr, slog.Default())
	if err != nil {
		return err
	}
	defer stopProfiles()
	var routeURLs []string
	for _, r := range routes {
		routeURLs = append(routeURLs, strings.Split(r, ",")...)
	}
	cfg := natsembed.Config{Dir: *store, Host: *host, Port: *port, Sync: *syncPolicy,
		Name: *name, Cluster: *cluster, ClusterName: *clusterName, Routes: routeURLs, MonitorPort: *monitorPort}
	if *config != "" {
		// The file decides what the flags left at their defaults would otherwise.
		given := givenFlags(fs)
		keep := func(flag string, v string) string {
			if given[flag] {
				return v
			}
			return ""
		}
		cfg = natsembed.Config{ConfigFile: *config, Host: keep("host", *host), Dir: keep("store", *store), Sync: keep("sync", *syncPolicy),
			Name: keep("name", *name), Cluster: *cluster, ClusterName: keep("cluster-name", *clusterName), Routes: routeURLs,
			MonitorPort: *monitorPort, LeafPort: *leafPort, Log: true}
		if given["port"] {
			cfg.Port = *port
		}
	}
	s, err := natsembed.Start(cfg)
	if err != nil {
		return err
	}
	if *config != "" {
		fmt.Fprintf(stdout, "nats-server %s from %s listening on %s\n", s.Name(), *config, s.ClientURL())
	} else {
		fmt.Fprintf(stdout, "nats-server with JetStream listening on %s, store %s\n", s.ClientURL(), *store)
	}
	<-ctx.Done()
	natsembed.Stop(s)
	return nil
}
