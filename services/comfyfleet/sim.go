package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
)

func runSim(ctx context.Context, args []string, stdout io.Writer) error {
	fs := flag.NewFlagSet("sim", flag.ContinueOnError)
	addr := fs.String("addr", "127.0.0.1:8188", "listen address")
	name := fs.String("name", "sim", "device name shown in /system_stats")
	speed := fs.Float64("speed", 1, "relative GPU speed (2 = twice as fast)")
	step := fs.Duration("step", 150*time.Millisecond, "time of one sampler step at speed 1")
	failures := fs.Float64("failure-rate", 0, "probability that a prompt ends in an execution error")
	if err := parse(fs, args); err != nil {
		return err
	}
	sim, err := comfysim.Start(comfysim.Config{Name: *name, Addr: *addr, Speed: *speed, StepDuration: *step, FailureRate: *failures})
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "simulated ComfyUI %q listening on %s\n", *name, sim.URL())
	<-ctx.Done()
	return sim.Close()
}
