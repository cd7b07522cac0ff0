// Package natsembed runs a nats-server with JetStream inside the process: the broker
// of `comfyfleet up` and of the tests.
package natsembed

import (
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
	// Dir is where JetStream keeps its file store. Required.
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
	// Log turns the server's own log on.
	Log bool
	// StartTimeout bounds the wait for the server to accept connections. Defaults to 10s.
	StartTimeout time.Duration
}

// Start starts the server and waits until it accepts connections.
func Start(cfg Config) (*server.Server, error) {
	if cfg.Dir == "" {
		return nil, fmt.Errorf("embedded nats: a store directory is required")
	}
	name := cfg.Name
	if name == "" {
		name = "comfyfleet"
	}
	opts := &server.Options{
		ServerName: name,
		Host:       cfg.Host,
		Port:       cfg.Port,
		JetStream:  true,
		StoreDir:   cfg.Dir,
		NoSigs:     true,
		NoLog:      !cfg.Log,
	}
	if opts.Host == "" {
		opts.Host = "127.0.0.1"
	}
	if opts.Port == 0 {
		opts.Port = 4222
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

// applyCluster joins the server to its cluster, if cfg names one.
func applyCluster(opts *server.Options, cfg Config) error {
	if cfg.Cluster == "" {
		if len(cfg.Routes) > 0 {
			return fmt.Errorf("embedded nats: routes given without a cluster listen address")
		}
		return nil
	}
	host, port, err := net.SplitHostPort(cfg.Cluster)
	if err != nil {
		return fmt.Errorf("embedded nats: cluster address %q: %w", cfg.Cluster, err)
	}
	opts.Cluster.Host = host
	if opts.Cluster.Port, err = strconv.Atoi(port); err != nil {
		return fmt.Errorf("embedded nats: cluster port %q: %w", port, err)
	}
	opts.Cluster.Name = cfg.ClusterName
	if opts.Cluster.Name == "" {
		opts.Cluster.Name = "comfyfleet"
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
