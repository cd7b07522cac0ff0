// Package natsembed runs a nats-server with JetStream inside the process: the broker
// of `comfyfleet up` and of the tests.
package natsembed

import (
	"cmp"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Config configures the embedded server.
type Config struct {
	// ConfigFile, if set, is a nats-server configuration file (such as those of
	// deploy/nats) that the server runs as it says, reading its $VARIABLES from the
	// environment: JetStream, cluster, leaf nodes, users and permissions are the
	// file's. Host, Port, Dir, Sync and the ports below then override the file only
	// where they are set.
	ConfigFile string
	// Dir is where JetStream keeps its file store. Required without ConfigFile.
	Dir string
	// Host is the address clients connect to. Defaults to "127.0.0.1".
	Host string
	// Port is the client port; -1 picks a free one. Defaults to 4222 when zero.
	Port int
	// Sync is the file store's sync policy: "always" (fsync every write: nothing
	// acknowledged is lost on power failure, slower), or a duration such as "2m" (the
	// nats-server default) or "1s". Defaults to "2m".
	Sync string
	// MonitorPort, ClusterPort and LeafPort, when not zero, are the listen ports of
	// the monitoring endpoint (/healthz, /varz), of the cluster's routes and of leaf
	// nodes instead of ConfigFile's; -1 picks a free one (not for a cluster whose
	// routes name its port). Without ConfigFile only MonitorPort applies.
	MonitorPort, ClusterPort, LeafPort int
	// Log turns the server's own log on.
	Log bool
	// StartTimeout bounds the wait for the server to accept connections. Defaults to 10s.
	StartTimeout time.Duration
}

// Start starts the server and waits until it accepts connections.
func Start(cfg Config) (*server.Server, error) {
	opts, err := options(cfg)
	if err != nil {
		return nil, err
	}
	if cfg.MonitorPort != 0 {
		opts.HTTPPort = cfg.MonitorPort
		if opts.HTTPHost == "" {
			opts.HTTPHost = opts.Host
		}
	}
	opts.NoSigs, opts.NoLog = true, !cfg.Log
	if err := applySync(opts, cfg.Sync); err != nil {
		return nil, err
	}
	timeout := cfg.StartTimeout
	if timeout == 0 {
		timeout = 10 * time.Second
	}
	s, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("embedded nats: %w", err)
	}
	if cfg.Log {
		s.ConfigureLogger()
	}
	go s.Start()
	if !s.ReadyForConnections(timeout) {
		s.Shutdown()
		return nil, fmt.Errorf("embedded nats: not ready for connections after %s (is port %d in use?)", timeout, opts.Port)
	}
	return s, nil
}

// options are the server's options: ConfigFile's with cfg's overrides, or a single
// JetStream server.
func options(cfg Config) (*server.Options, error) {
	if cfg.ConfigFile == "" {
		if cfg.Dir == "" {
			return nil, fmt.Errorf("embedded nats: a store directory is required")
		}
		opts := &server.Options{ServerName: "comfyfleet", Host: cmp.Or(cfg.Host, "127.0.0.1"), Port: cmp.Or(cfg.Port, 4222),
			JetStream: true, StoreDir: cfg.Dir}
		return opts, nil
	}
	opts, err := server.ProcessConfigFile(cfg.ConfigFile)
	if err != nil {
		return nil, fmt.Errorf("embedded nats: %w", err)
	}
	opts.Host = cmp.Or(cfg.Host, opts.Host)
	opts.Port = cmp.Or(cfg.Port, opts.Port)
	opts.StoreDir = cmp.Or(cfg.Dir, opts.StoreDir)
	if cfg.ClusterPort != 0 {
		opts.Cluster.Port = cfg.ClusterPort
		opts.Cluster.Host = cmp.Or(opts.Cluster.Host, opts.Host)
	}
	if cfg.LeafPort != 0 {
		opts.LeafNode.Port = cfg.LeafPort
		opts.LeafNode.Host = cmp.Or(opts.LeafNode.Host, opts.Host)
	}
	return opts, nil
}

// Stop shuts the server down and waits until it has.
func Stop(s *server.Server) {
	s.Shutdown()
	s.WaitForShutdown()
}

func applySync(opts *server.Options, sync string) error {
	switch strings.ToLower(strings.TrimSpace(sync)) {
	case "", "default":
		return nil
	case "always":
		opts.SyncAlways = true
		return nil
	}
	d, err := time.ParseDuration(sync)
	if err != nil || d <= 0 {
		return fmt.Errorf("embedded nats: sync %q is neither \"always\" nor a positive duration", sync)
	}
	opts.SyncInterval = d
	return nil
}
