// Command comfyfleet runs a fleet of ComfyUI machines as one generation service.
//
//	comfyfleet up            everything in one process: embedded NATS, the four
//	                         services, simulated ComfyUI nodes unless --comfy names real ones
//	comfyfleet intake        the HTTP API alone, against --nats
//	comfyfleet dispatcher    the scheduler alone
//	comfyfleet executor      drives the ComfyUI nodes named by --comfy
//	comfyfleet notifier      completions and webhooks
//	comfyfleet sim           one simulated ComfyUI node
//	comfyfleet nats          a NATS server with JetStream, for running the services apart,
//	                         or as a deploy/nats configuration says (--config)
//	comfyfleet bench NAME    a benchmark that prints a table (failover)
//	comfyfleet apikey       create, list and revoke API keys, straight in NATS
//	comfyfleet submit       submit a job through the API, follow it, download its outputs
//	comfyfleet jobs         list, show, cancel, delete, retry and follow jobs through the API
//	comfyfleet nodes        list, add, drain, undrain and remove nodes through the API
//	comfyfleet healthcheck  exit 0 if --url answers 2xx (container health checks)
//
// Every flag can also be set by an environment variable: COMFYFLEET_ and the flag's
// name in upper case with '-' as '_' (COMFYFLEET_HTTP=0.0.0.0:8080). Flags win.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
)

type command struct {
	name    string
	summary string
	run     func(ctx context.Context, args []string, stdout, stderr io.Writer) error
}

func commands() []command {
	return []command{
		{"up", "start the whole fleet in one process (embedded NATS, all services, simulated nodes)", runUp},
		{"intake", "run the HTTP API against an external NATS", runIntake},
		{"dispatcher", "run the dispatcher against an external NATS", runDispatcher},
		{"executor", "run an executor for the ComfyUI nodes named by --comfy", runExecutor},
		{"notifier", "run the notifier against an external NATS", runNotifier},
		{"sim", "run one simulated ComfyUI node", runSim},
		{"nats", "run a NATS server with JetStream (embedded nats-server) alone, or as a nats-server configuration says (--config deploy/nats/hub.conf)", runNATS},
		{"bench", "run a benchmark and print its table: throughput, backlog, burst, failover or scheduling", runBench},
		{"submit", "submit a job (-f job.json, or --workflow txt2img --param prompt=… --count 6); --wait follows it, --out DIR downloads its outputs", runSubmit},
		{"jobs", "jobs list|get|cancel|delete|retry|watch, through the API (--api, --key)", runJobs},
		{"nodes", "nodes list|add|drain|undrain|rm, through the API (--api, --key)", runNodes},
		{"apikey", "API keys, straight in NATS: apikey create --tenant NAME --role read|submit|admin, apikey list, apikey revoke ID", runAPIKey},
		{"healthcheck", "exit 0 if --url answers 2xx: a container health check without curl", runHealthcheck},
	}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, os.Args[1:], os.Stdout, os.Stderr); err != nil {
		if !errors.Is(err, flag.ErrHelp) {
			fmt.Fprintln(os.Stderr, "comfyfleet:", err)
		}
		var coded interface{ ExitCode() int }
		if errors.As(err, &coded) {
			os.Exit(coded.ExitCode())
		}
		os.Exit(2)
	}
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		if len(args) == 0 {
			return errors.New("no command given")
		}
		return nil
	}
	for _, c := range commands() {
		if c.name == args[0] {
			return c.run(ctx, args[1:], stdout, stderr)
		}
	}
	usage(stderr)
	return fmt.Errorf("unknown command %q", args[0])
}

func usage(w io.Writer) {
	fmt.Fprintln(w, "usage: comfyfleet <command> [flags]\n\ncommands:")
	for _, c := range commands() {
		fmt.Fprintf(w, "  %-11s %s\n", c.name, c.summary)
	}
	fmt.Fprintln(w, "\n'comfyfleet <command> -h' lists a command's flags and their environment variables.")
}

// parsed, when set, is called with a command's flag set once its arguments have
// parsed, and its error is returned instead of running the command: tests check
// command lines (docker-compose.yml, deploy/k8s) with it.
var parsed func(*flag.FlagSet) error

// parse parses args into fs after applying COMFYFLEET_* environment variables, so
// that flags on the command line win.
func parse(fs *flag.FlagSet, args []string) error {
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		name := envName(f.Name)
		f.Usage += " [$" + name + "]"
		v, ok := os.LookupEnv(name)
		if !ok {
			return
		}
		if multi, isMulti := f.Value.(*listFlag); isMulti {
			for _, item := range strings.Fields(v) {
				errs = append(errs, multi.Set(item))
			}
			return
		}
		if err := f.Value.Set(v); err != nil {
			errs = append(errs, fmt.Errorf("$%s: %w", name, err))
		}
	})
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if parsed != nil {
		return parsed(fs)
	}
	return nil
}

// givenFlags reports which flags of fs were given, on the command line or by their
// environment variables, once parse has run.
func givenFlags(fs *flag.FlagSet) map[string]bool {
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	fs.VisitAll(func(f *flag.Flag) {
		if _, ok := os.LookupEnv(envName(f.Name)); ok {
			given[f.Name] = true
		}
	})
	return given
}

// parseArgs is parse for a command that takes arguments among its flags, as in
// "nodes add gpu-1 --url http://…": it returns the arguments that are not flags.
func parseArgs(fs *flag.FlagSet, args []string) ([]string, error) {
	if err := parse(fs, args); err != nil {
		return nil, err
	}
	var positional []string
	for fs.NArg() > 0 {
		rest := fs.Args()
		positional = append(positional, rest[0])
		if err := fs.Parse(rest[1:]); err != nil {
			return nil, err
		}
	}
	return positional, nil
}

func envName(flagName string) string {
	return "COMFYFLEET_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// listFlag is a repeatable string flag.
type listFlag []string

func (l *listFlag) String() string { return strings.Join(*l, " ") }

func (l *listFlag) Set(v string) error {
	*l = append(*l, v)
	return nil
}

// logFlags are the logging flags every command has.
type logFlags struct {
	level  string
	format string
}

func (l *logFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&l.level, "log-level", "info", "log level: debug, info, warn or error")
	fs.StringVar(&l.format, "log-format", "text", "log format: text or json")
}

func (l *logFlags) logger(w io.Writer) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(l.level)); err != nil {
		return nil, fmt.Errorf("--log-level: %w", err)
	}
	opts := &slog.HandlerOptions{Level: level}
	switch l.format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("--log-format %q: use text or json", l.format)
}
