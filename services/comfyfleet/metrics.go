package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/telemetry"
)

// metricsFlag is --metrics: where a service without an HTTP API of its own serves its
// Prometheus metrics. The intake serves them at /metrics on its API.
type metricsFlag struct {
	addr string
}

func (m *metricsFlag) register(fs *flag.FlagSet) {
	fs.StringVar(&m.addr, "metrics", "", "address to serve Prometheus metrics at /metrics, e.g. 127.0.0.1:9464 (default off)")
}

// serve serves /metrics at the flag's address until ctx is done or stop is called;
// with no address it serves nothing. stop ends the server and waits for it.
func (m *metricsFlag) serve(ctx context.Context, log *slog.Logger) (addr net.Addr, stop func(), err error) {
	if m.addr == "" {
		return nil, func() {}, nil
	}
	ln, err := net.Listen("tcp", m.addr)
	if err != nil {
		return nil, nil, fmt.Errorf("--metrics: listen on %s: %w", m.addr, err)
	}
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", telemetry.MetricsHandler())
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	served := make(chan struct{})
	go func() {
		defer close(served)
		if err := srv.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
			log.Error("metrics server stopped", "err", err)
		}
	}()
	ctx, cancel := context.WithCancel(ctx)
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		<-ctx.Done()
		shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdownCtx)
	}()
	log.Info("metrics listening", "url", "http://"+ln.Addr().String()+"/metrics")
	return ln.Addr(), func() { cancel(); <-stopped; <-served }, nil
}
