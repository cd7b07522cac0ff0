package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/services/dispatcher"
)

// failoverBench runs a fleet of two simulated nodes, each driven by an executor in
// its own process, two dispatchers and a notifier, every service a process of its
// own, and times how long work takes to move on when a part of it dies.
type failoverBench struct {
	f          *benchFleet
	nc         *nats.Conn
	js         jetstream.JetStream
	events     chan *nats.Msg
	placements chan *nats.Msg
}

func benchFailover(ctx context.Context, rounds int, settings fleet.Settings, keep bool, stdout io.Writer) error {
	sims := []comfysim.Config{{Name: "gpu-a", StepDuration: 20 * time.Millisecond}, {Name: "gpu-b", StepDuration: 20 * time.Millisecond}}
	f, err := startBenchFleet(ctx, benchFleetOptions{Nodes: sims, Executors: len(sims), Dispatchers: 2, Notifiers: 1, Settings: settings, Keep: keep})
	if err != nil {
		return err
	}
	defer f.stop()
	nc, err := nats.Connect(f.natsURL)
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	defer nc.Close()
	js, err := jetstream.New(nc)
	if err != nil {
		return fmt.Errorf("bench: %w", err)
	}
	b := &failoverBench{f: f, nc: nc, js: js, events: make(chan *nats.Msg, 1<<16), placements: make(chan *nats.Msg, 1<<16)}
	for subject, ch := range map[string]chan *nats.Msg{fleet.SceneEventsFilter: b.events, fleet.WorkFilter: b.placements} {
		sub, err := nc.ChanSubscribe(subject, ch)
		if err != nil {
			return fmt.Errorf("bench: %w", err)
		}
		defer sub.Unsubscribe()
	}

	fmt.Fprintf(stdout, "failover with ack-wait %s, executor heartbeat 1s, lease TTL %s (defaults unless flags say otherwise); every service its own process, two dispatchers; %d rounds each\n\n",
		settings.AckWait, settings.LeaseTTL, rounds)
	tw := tabwriter.NewWriter(stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "scenario\trounds\tmin\tmedian\tmax\t")
	for _, sc := range []struct {
		name  string
		round func(context.Context) (time.Duration, error)
	}{
		{"executor SIGKILL -> scene started on another node", func(ctx context.Context) (time.Duration, error) { return b.moveOn(ctx, b.killExecutor) }},
		{"ComfyUI node dies -> scene started on another node", func(ctx context.Context) (time.Duration, error) { return b.moveOn(ctx, b.killNode) }},
		{"leading dispatcher SIGKILL -> next placement, by the other", b.dispatcherRound},
	} {
		var times []time.Duration
		for range rounds {
			d, err := sc.round(ctx)
			if err != nil {
				return fmt.Errorf("bench %q: %w", sc.name, err)
			}
			times = append(times, d)
		}
		slices.Sort(times)
		fmt.Fprintf(tw, "%s\t%d\t%.2fs\t%.2fs\t%.2fs\t\n", sc.name, len(times),
			times[0].Seconds(), times[len(times)/2].Seconds(), times[len(times)-1].Seconds())
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	moved, err := b.freezes(ctx, rounds, 2*time.Second)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "\nexecutor frozen 2s (SIGSTOP, then SIGCONT; alive but silent, below ack-wait): its scene moved to the other node in %d of %d rounds\n", moved, rounds)
	return nil
}

// moveOn submits one long scene, kills what runs it once it renders, and returns the
// time until it starts on the other node; then it revives the victim and waits for
// the scene to finish.
func (b *failoverBench) moveOn(ctx context.Context, kill func(node string) (revive func() error, err error)) (time.Duration, error) {
	job, err := b.submit(ctx, 1, 150)
	if err != nil {
		return 0, err
	}
	rendering, err := b.await(ctx, job, fleet.EventProgress, "")
	if err != nil {
		return 0, err
	}
	revive, err := kill(rendering.Node)
	if err != nil {
		return 0, err
	}
	killed := time.Now()
	if _, err := b.await(ctx, job, fleet.EventStarted, rendering.Node); err != nil {
		return 0, err
	}
	took := time.Since(killed)
	if err := revive(); err != nil {
		return 0, err
	}
	if _, err := b.await(ctx, job, fleet.EventCompleted, ""); err != nil {
		return 0, err
	}
	return took, b.f.awaitReady(ctx)
}

// dispatcherRound keeps the nodes busy with short scenes, kills the dispatcher that
// places them, and returns the time until the other one places the next scene.
func (b *failoverBench) dispatcherRound(ctx context.Context) (time.Duration, error) {
	job, err := b.submit(ctx, 40, 5)
	if err != nil {
		return 0, err
	}
	if _, err := b.await(ctx, job, fleet.EventCompleted, ""); err != nil {
		return 0, err
	}
	leader, err := b.leader(ctx)
	if err != nil {
		return 0, err
	}
	p := b.f.proc(leader)
	if p == nil {
		return 0, fmt.Errorf("no dispatcher process %q", leader)
	}
	p.kill()
	killed := time.Now()
	for {
		select {
		case m := <-b.placements:
			if by := m.Header.Get(dispatcher.HeaderPlacedBy); by != "" && by != leader {
				took := time.Since(killed)
				if _, err := b.f.restart(p); err != nil {
					return 0, err
				}
				return took, b.awaitJob(ctx, job)
			}
		case <-time.After(time.Minute):
			return 0, fmt.Errorf("no placement by another dispatcher within a minute of killing %s", leader)
		case <-ctx.Done():
			return 0, ctx.Err()
		}
	}
}

// freezes stops the executor running a long scene for d, rounds times, and counts
// the rounds in which the scene started on the other node meanwhile.
func (b *failoverBench) freezes(ctx context.Context, rounds int, d time.Duration) (int, error) {
	moved := 0
	for range rounds {
		job, err := b.submit(ctx, 1, 150)
		if err != nil {
			return 0, err
		}
		rendering, err := b.await(ctx, job, fleet.EventProgress, "")
		if err != nil {
			return 0, err
		}
		p := b.f.proc(b.f.executorOf[rendering.Node])
		_ = p.cmd.Process.Signal(syscall.SIGSTOP)
		frozen := time.NewTimer(d)
		select {
		case <-frozen.C:
		case <-ctx.Done():
			_ = p.cmd.Process.Signal(syscall.SIGCONT)
			return 0, ctx.Err()
		}
		_ = p.cmd.Process.Signal(syscall.SIGCONT)
		done, err := b.awaitAny(ctx, job, func(ev fleet.SceneEvent) bool {
			return ev.Type == fleet.EventCompleted || ev.Type == fleet.EventStarted && ev.Node != rendering.Node
		})
		if err != nil {
			return 0, err
		}
		if done.Type == fleet.EventStarted {
			moved++
			if _, err := b.await(ctx, job, fleet.EventCompleted, ""); err != nil {
				return 0, err
			}
		}
	}
	return moved, nil
}

func (b *failoverBench) submit(ctx context.Context, scenes, steps int) (string, error) {
	list := make([]map[string]any, scenes)
	for i := range list {
		list[i] = map[string]any{"workflow": "txt2img", "params": map[string]any{"steps": steps, "width": 64, "height": 64,
			"seed": time.Now().UnixNano()%1_000_000 + int64(i)}}
	}
	body, err := json.Marshal(map[string]any{"scenes": list})
	if err != nil {
		return "", err
	}
	return b.f.post(ctx, body)
}

// leader is the dispatcher holding the lease.
func (b *failoverBench) leader(ctx context.Context) (string, error) {
	kv, err := b.js.KeyValue(ctx, fleet.BucketLeases)
	if err != nil {
		return "", fmt.Errorf("bench: %w", err)
	}
	e, err := kv.Get(ctx, "dispatcher")
	if err != nil {
		return "", fmt.Errorf("bench: read the dispatchers' lease: %w", err)
	}
	return string(e.Value()), nil
}

// await returns the next event of type typ of job, from a node other than notOn.
func (b *failoverBench) await(ctx context.Context, job string, typ fleet.EventType, notOn string) (fleet.SceneEvent, error) {
	return b.awaitAny(ctx, job, func(ev fleet.SceneEvent) bool { return ev.Type == typ && (notOn == "" || ev.Node != notOn) })
}

// awaitAny returns the next event of job that match accepts.
func (b *failoverBench) awaitAny(ctx context.Context, job string, match func(fleet.SceneEvent) bool) (fleet.SceneEvent, error) {
	deadline := time.After(2 * time.Minute)
	for {
		select {
		case m := <-b.events:
			ev, err := fleet.DecodeSceneEvent(m.Data)
			if err == nil && ev.JobID == job && match(ev) {
				return ev, nil
			}
		case <-deadline:
			return fleet.SceneEvent{}, fmt.Errorf("no awaited event of job %s within 2 minutes", job)
		case <-ctx.Done():
			return fleet.SceneEvent{}, ctx.Err()
		}
	}
}

// awaitJob waits until every scene of job has completed.
func (b *failoverBench) awaitJob(ctx context.Context, job string) error {
	deadline := time.Now().Add(2 * time.Minute)
	for time.Now().Before(deadline) {
		var j struct {
			Status string `json:"status"`
		}
		if err := b.f.get(ctx, "/v1/jobs/"+job, &j); err == nil && j.Status == string(fleet.StatusSucceeded) {
			return nil
		}
		fleet.Pause(ctx, 100*time.Millisecond)
		if ctx.Err() != nil {
			return ctx.Err()
		}
	}
	return fmt.Errorf("job %s did not succeed within 2 minutes", job)
}

func (b *failoverBench) killExecutor(node string) (func() error, error) {
	p := b.f.proc(b.f.executorOf[node])
	if p == nil {
		return nil, fmt.Errorf("no executor of node %s", node)
	}
	p.kill()
	return func() error {
		_, err := b.f.restart(p)
		return err
	}, nil
}

func (b *failoverBench) killNode(node string) (func() error, error) {
	for i, n := range b.f.nodes {
		if n.ID == node {
			sim := b.f.sims[i]
			sim.Kill()
			return sim.Restart, nil
		}
	}
	return nil, fmt.Errorf("no node %s", node)
}
