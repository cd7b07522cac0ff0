package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime/debug"
	"strings"
	"time"
)

func runBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	benchmarks := map[string]func(context.Context, []string, io.Writer, io.Writer) error{
		"throughput": runBenchThroughput,
		"backlog":    runBenchBacklog,
		"burst":      runBenchBurst,
		"failover":   runBenchFailover,
		"scheduling": runBenchScheduling,
	}
	if len(args) > 0 && benchmarks[args[0]] != nil && os.Getenv("GOGC") == "" {
		// This process (simulated nodes, clients, recorders) shares the cores with
		// the services it measures: collecting its garbage less often leaves them
		// more. The services' processes keep Go's default.
		debug.SetGCPercent(harnessGCPercent)
	}
	return subcommand(ctx, "bench", benchmarks, args, stdout, stderr)
}

func runBenchFailover(ctx context.Context, args []string, stdout, _ io.Writer) error {
	fs := flag.NewFlagSet("bench failover", flag.ContinueOnError)
	rounds := fs.Int("rounds", 5, "rounds of each scenario")
	keep := fs.Bool("keep", false, "keep the fleet's NATS store and the services' logs, and print where")
	var settings settingsFlags
	settings.register(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	st, err := settings.settings()
	if err != nil {
		return err
	}
	return benchFailover(ctx, *rounds, st, *keep, stdout)
}

// harnessGCPercent is the bench process's GOGC, unless the environment sets one.
const harnessGCPercent = 400

var benchClient = &http.Client{Timeout: 30 * time.Second}

func newJSONRequest(ctx context.Context, url, body string) (*http.Request, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, url, strings.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("request %s: %w", url, err)
	}
	req.Header.Set("Content-Type", "application/json")
	return req, nil
}
