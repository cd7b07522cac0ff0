// Package natsembed runs a nats-server with JetStream inside the process: the broker
// of `comfyfleet up` and of the tests.
package natsembed

import (
	"cmp"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Config configures the embedded server.
type Config struct {
	// ConfigFile, if set, is a nats-server configuration file (such as those of
	// deploy/nats) that the server runs as it says, reading its $VARIABLES from the
	// environment: JetStream, cluster, leaf nodes, users and permissions are the
	// file's. The other fields then override the file only where they are set.
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
	// Name is the server's name, unique in a cluster. Defaults to "comfyfleet".
	Name string
	// Cluster is the host:port where the server listens for the other servers of its
	// cluster; empty runs it alone. Routes are those servers' cluster URLs
	// (nats://host:port), and ClusterName the cluster's name (default "comfyfleet").
	Cluster     string
	Routes      []string
	ClusterName string
	// MonitorPort, when not zero, is the port of the monitoring endpoint (/healthz,
	// /varz), and LeafPort, with ConfigFile, the port leaf nodes connect to instead of
	// the file's; -1 picks a free one.
	MonitorPort, LeafPort int
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
	opts.NoSigs, opts.NoLog = true, !cfg.Log
	if cfg.MonitorPort != 0 {
		opts.HTTPHost, opts.HTTPPort = cmp.Or(opts.HTTPHost, opts.Host), cfg.MonitorPort
	}
	if err := applySync(opts, cfg.Sync); err != nil {
		return nil, err
	}
	if err := applyCluster(opts, cfg); err != nil {
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

// options are ConfigFile's options with cfg's overrides, or those of a server with
// JetStream that runs alone unless cfg names a cluster.
func options(cfg Config) (*server.Options, error) {
	if cfg.ConfigFile == "" {
		if cfg.Dir == "" {
			return nil, fmt.Errorf("embedded nats: a store directory is required")
		}
		return &server.Options{ServerName: cmp.Or(cfg.Name, "comfyfleet"), Host: cmp.Or(cfg.Host, "127.0.0.1"),
			Port: cmp.Or(cfg.Port, 4222), JetStream: true, StoreDir: cfg.Dir}, nil
	}
	opts, err := server.ProcessConfigFile(cfg.ConfigFile)
	if err != nil {
		return nil, fmt.Errorf("embedded nats: %w", err)
	}
	opts.ServerName = cmp.Or(cfg.Name, opts.ServerName)
	opts.Host = cmp.Or(cfg.Host, opts.Host)
	opts.Port = cmp.Or(cfg.Port, opts.Port)
	opts.StoreDir = cmp.Or(cfg.Dir, opts.StoreDir)
	if cfg.LeafPort != 0 {
		opts.LeafNode.Host, opts.LeafNode.Port = cmp.Or(opts.LeafNode.Host, opts.Host), cfg.LeafPort
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

// applyCluster joins the server to the cluster cfg names, or moves the cluster of
// its configuration file: Cluster is its listen address, Routes replace the file's
// routes, ClusterName its name (default "comfyfleet").
func applyCluster(opts *server.Options, cfg Config) error {
	if cfg.Cluster != "" {
		host, port, err := net.SplitHostPort(cfg.Cluster)
		if err != nil {
			return fmt.Errorf("embedded nats: cluster address %q: %w", cfg.Cluster, err)
		}
		opts.Cluster.Host = host
		if opts.Cluster.Port, err = strconv.Atoi(port); err != nil {
			return fmt.Errorf("embedded nats: cluster port %q: %w", port, err)
		}
	}
	if opts.Cluster.Port == 0 {
		if len(cfg.Routes) > 0 {
			return fmt.Errorf("embedded nats: routes given without a cluster listen address")
		}
		return nil
	}
	opts.Cluster.Name = cmp.Or(cfg.ClusterName, opts.Cluster.Name, "comfyfleet")
	if len(cfg.Routes) > 0 {
		opts.Routes = nil
	}
	for _, r := range cfg.Routes {
		u, err := url.Parse(r)
		if err != nil || u.Host == "" {
			return fmt.Errorf("embedded nats: route %q: use nats://host:port", r)
		}
		opts.Routes = append(opts.Routes, u)
	}
	return nil
}
