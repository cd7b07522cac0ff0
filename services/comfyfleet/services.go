package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/services/dispatcher"
	"github.com/comfyfleet/comfyfleet/services/executor"
	"github.com/comfyfleet/comfyfleet/services/intake"
	"github.com/comfyfleet/comfyfleet/services/notifier"
	"github.com/comfyfleet/comfyfleet/workflows"
)

func runIntake(ctx context.Context, args []string, _, stderr io.Writer) error {
	fs := flag.NewFlagSet("intake", flag.ContinueOnError)
	var sf serviceFlags
	httpAddr := fs.String("http", "127.0.0.1:8080", "API listen address")
	publicURL := fs.String("public-url", "", "base URL clients reach the API at (default http://<--http>)")
	maxScenes := fs.Int("max-scenes", 1000, "most scenes in one job")
	var rates rateFlags
	rates.register(fs, false)
	var allow allowFlag
	allow.register(fs)
	var outs outputsFlags
	outs.register(fs, true)
	sf.register(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	guard, err := allow.guard()
	if err != nil {
		return err
	}
	store, err := outs.open(ctx)
	if err != nil {
		return err
	}
	svc, err := sf.start(ctx, "intake", stderr)
	if err != nil {
		return err
	}
	defer svc.close()
	ln, err := net.Listen("tcp", *httpAddr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", *httpAddr, err)
	}
	queueConn, queueClosed, err := sf.dial("intake", "queuer", svc.log)
	if err != nil {
		_ = ln.Close()
		return err
	}
	defer closeConn(queueConn, queueClosed, svc.log)
	submitRate, readRate := rates.limits(false)
	return intake.Run(ctx, intake.Config{Conn: svc.conn, QueueConn: queueConn, Settings: svc.settings, Templates: workflows.FS, Listener: ln,
		PublicURL: *publicURL, MaxScenes: *maxScenes, CallbackGuard: guard, Outputs: store, OutputURLTTL: outs.ttl,
		SubmitRate: submitRate, ReadRate: readRate, Logger: svc.log})
}

func runDispatcher(ctx context.Context, args []string, _, stderr io.Writer) error {
	fs := flag.NewFlagSet("dispatcher", flag.ContinueOnError)
	var metrics metricsFlag
	metrics.register(fs)
	var sf serviceFlags
	policy := fs.String("policy", string(dispatcher.FastestFinish), "scheduling policy: fastest-finish, round-robin, least-conn or weighted")
	loadCost := fs.Duration("model-load", 5*time.Second, "model-load time fastest-finish assumes for a node until it has measured one")
	name := fs.String("name", "", "dispatcher name in logs, its lease and queue summaries (default host-pid)")
	regionPenalty := fs.Duration("region-penalty", 10*time.Second, "time fastest-finish adds to a scene on a node outside the region it prefers")
	sf.register(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	svc, err := sf.start(ctx, "dispatcher", stderr)
	if err != nil {
		return err
	}
	defer svc.close()
	_, stopMetrics, err := metrics.serve(ctx, svc.log)
	if err != nil {
		return err
	}
	defer stopMetrics()
	return dispatcher.Run(ctx, dispatcher.Config{Conn: svc.conn, Settings: svc.settings, Logger: svc.log, Name: *name,
		Policy: dispatcher.Policy(*policy), ModelLoadPenalty: *loadCost, RegionPenalty: *regionPenalty})
}

func runExecutor(ctx context.Context, args []string, _, stderr io.Writer) error {
	fs := flag.NewFlagSet("executor", flag.ContinueOnError)
	var metrics metricsFlag
	metrics.register(fs)
	var (
		sf    serviceFlags
		comfy listFlag
	)
	name := fs.String("name", "", "executor name in node state and logs (default host-pid)")
	region := fs.String("region", "", "region of the nodes this executor drives that name none (--comfy without region=, nodes it adopts), e.g. shenzhen; none by default")
	var allow allowFlag
	allow.register(fs)
	inputTimeout := fs.Duration("input-timeout", time.Minute, "longest download of a scene's input image, from its URL or the fleet's store")
	adopt := fs.Bool("adopt", false, "also drive the nodes registered through the API (PUT /v1/nodes/{id}) that no executor drives yet")
	inventoryInterval := fs.Duration("inventory-interval", 5*time.Minute, "how often each node's inventory (/object_info: node classes, model files) is read again")
	fs.Var(&comfy, "comfy", "a ComfyUI node to drive: URL[,id=NAME][,pool=image+video][,weight=W][,region=R] (repeatable)")
	var outs outputsFlags
	outs.register(fs, false)
	sf.register(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	store, err := outs.open(ctx)
	if err != nil {
		return err
	}
	var nodes []fleet.NodeConfig
	for _, c := range comfy {
		n, err := parseNode(c)
		if err != nil {
			return err
		}
		nodes = append(nodes, n)
	}
	guard, err := allow.guard()
	if err != nil {
		return err
	}
	svc, err := sf.start(ctx, "executor", stderr)
	if err != nil {
		return err
	}
	defer svc.close()
	_, stopMetrics, err := metrics.serve(ctx, svc.log)
	if err != nil {
		return err
	}
	defer stopMetrics()
	return executor.Run(ctx, executor.Config{Conn: svc.conn, Settings: svc.settings, Nodes: nodes, Adopt: *adopt, Name: *name, Region: *region, URLGuard: guard,
		InputTimeout: *inputTimeout, InventoryInterval: *inventoryInterval, Outputs: store, Logger: svc.log})
}

func runNotifier(ctx context.Context, args []string, _, stderr io.Writer) error {
	fs := flag.NewFlagSet("notifier", flag.ContinueOnError)
	var metrics metricsFlag
	metrics.register(fs)
	var sf serviceFlags
	publicURL := fs.String("public-url", "http://127.0.0.1:8080", "the API's base URL, for output links in webhooks")
	attempts := fs.Int("webhook-attempts", 20, "webhook attempts before a callback is given up")
	var allow allowFlag
	allow.register(fs)
	var outs outputsFlags
	outs.register(fs, true)
	sf.register(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	guard, err := allow.guard()
	if err != nil {
		return err
	}
	store, err := outs.open(ctx)
	if err != nil {
		return err
	}
	svc, err := sf.start(ctx, "notifier", stderr)
	if err != nil {
		return err
	}
	defer svc.close()
	_, stopMetrics, err := metrics.serve(ctx, svc.log)
	if err != nil {
		return err
	}
	defer stopMetrics()
	return notifier.Run(ctx, notifier.Config{Conn: svc.conn, Settings: svc.settings, PublicURL: *publicURL,
		WebhookAttempts: *attempts, CallbackGuard: guard, Outputs: store, OutputURLTTL: outs.ttl, Logger: svc.log})
}
