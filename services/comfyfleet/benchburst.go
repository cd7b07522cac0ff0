package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// runBenchBurst posts small bursts on a few nodes again and again: every run should
// take about as long as its scenes need, with no scene waiting while a node idles.
func runBenchBurst(ctx context.Context, args []string, stdout, _ io.Writer) error {
	fs := flag.NewFlagSet("bench burst", flag.ContinueOnError)
	var (
		runs      = fs.Int("runs", 10, "bursts, one after another")
		jobs      = fs.Int("jobs", 10, "jobs posted at once in a burst")
		scenes    = fs.Int("scenes", 50, "scenes per job")
		nodes     = fs.Int("nodes", 4, "simulated ComfyUI nodes")
		sceneTime = fs.Duration("scene-time", time.Millisecond, "time a simulated node takes for one scene")
		keep      = fs.Bool("keep", false, "keep the fleet's NATS store and the services' logs, and print where")
	)
	if err := parse(fs, args); err != nil {
		return err
	}
	sims := fastSims(*nodes, *sceneTime)
	f, err := startBenchFleet(ctx, benchFleetOptions{Nodes: sims, Executors: 1, Dispatchers: 1, Notifiers: 1,
		Settings: fleet.DefaultSettings(), Keep: *keep})
	if err != nil {
		return err
	}
	defer f.stop()
	rec, err := newEventRecorder(f.natsURL)
	if err != nil {
		return err
	}
	defer rec.close()
	fmt.Fprintf(stdout, "burst: %d runs of %d jobs of %d scenes posted at once on %d simulated nodes of %s scenes; every service its own process\n\n",
		*runs, *jobs, *scenes, *nodes, *sceneTime)

	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "run\tlast job ended after\tslowest scene, queued to completed\tlost / twice\t")
	var worst time.Duration
	for run := range *runs {
		res, err := runLoad(ctx, f, rec, *jobs, *scenes, *jobs, run*(*jobs)*(*scenes))
		if err != nil {
			return fmt.Errorf("run %d: %w", run+1, err)
		}
		worst = max(worst, res.endedIn)
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d / %d\t\n", run+1, ms(res.endedIn), ms(res.slowest), res.lost, res.twice)
	}
	fmt.Fprintf(tw, "slowest run\t%s\t\t\t\n", ms(worst))
	return tw.Flush()
}
