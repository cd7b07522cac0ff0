package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/comfyfleet/comfyfleet/pkg/callback"
	"github.com/comfyfleet/comfyfleet/services/dispatcher"
)

// repoRoot is the root of the repository, where docker-compose.yml, the Dockerfile
// and deploy/ live.
func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// errCommandLineChecked stops a command checked by checkCommandLine once its flags
// have parsed.
var errCommandLineChecked = errors.New("command line checked")

// commandLine is a comfyfleet command line as a container runs it.
type commandLine struct {
	// where names it in failures, e.g. "docker-compose.yml: intake".
	where string
	// args follow the binary: the command and its flags.
	args []string
	// env is the container's environment.
	env map[string]string
	// sharedEnv says env is that of another command of the container too (a health
	// check's): its variables need not all be flags of this command.
	sharedEnv bool
}

// checkCommandLine parses c as comfyfleet would, without running the command: the
// command must exist, its flags and COMFYFLEET_* variables parse, every COMFYFLEET_*
// variable names a flag of that command, nothing is left over, and the values that
// are checked only at run time (--comfy, --allow-callback, --policy, the log flags,
// --storage) are valid. It returns the command's parsed flags, or nil after reporting
// why they did not parse.
func checkCommandLine(t *testing.T, c commandLine) *flag.FlagSet {
	t.Helper()
	var fs *flag.FlagSet
	t.Run(c.where, func(t *testing.T) {
		for _, kv := range os.Environ() {
			if name, _, _ := strings.Cut(kv, "="); strings.HasPrefix(name, "COMFYFLEET_") {
				t.Setenv(name, "")
				os.Unsetenv(name)
			}
		}
		for k, v := range c.env {
			t.Setenv(k, v)
		}
		var got *flag.FlagSet
		parsed = func(fs *flag.FlagSet) error {
			got = fs
			return errCommandLineChecked
		}
		defer func() { parsed = nil }()
		err := run(context.Background(), c.args, io.Discard, io.Discard)
		if !errors.Is(err, errCommandLineChecked) || got == nil {
			t.Errorf("comfyfleet %s: %v", strings.Join(c.args, " "), err)
			return
		}
		for name := range c.env {
			flagName, ok := strings.CutPrefix(name, "COMFYFLEET_")
			if !ok || c.sharedEnv {
				continue
			}
			flagName = strings.ToLower(strings.ReplaceAll(flagName, "_", "-"))
			if got.Lookup(flagName) == nil {
				t.Errorf("$%s: %s has no flag --%s", name, got.Name(), flagName)
			}
		}
		if got.NArg() > 0 {
			t.Errorf("comfyfleet %s: arguments %q left over after the flags", strings.Join(c.args, " "), got.Args())
		}
		if err := checkRunTimeValues(got); err != nil {
			t.Error(err)
		}
		fs = got
	})
	return fs
}

// checkRunTimeValues checks the flag values that commands check only once they run.
func checkRunTimeValues(fs *flag.FlagSet) error {
	var errs []error
	// VisitAll: values set from COMFYFLEET_* variables do not count as set for Visit.
	fs.VisitAll(func(f *flag.Flag) {
		v := f.Value.String()
		var err error
		switch f.Name {
		case "comfy":
			for _, node := range *f.Value.(*listFlag) {
				if _, e := parseNode(node); e != nil {
					err = errors.Join(err, e)
				}
			}
		case "allow-callback":
			_, err = callback.ParsePrefixes(*f.Value.(*listFlag))
		case "policy":
			_, err = dispatcher.ParsePolicy(v)
		case "storage":
			if v != "file" && v != "memory" {
				err = fmt.Errorf("--storage %q: use file or memory", v)
			}
		case "log-level", "log-format":
			l := logFlags{level: fs.Lookup("log-level").Value.String(), format: fs.Lookup("log-format").Value.String()}
			_, err = l.logger(io.Discard)
		}
		if err != nil {
			errs = append(errs, err)
		}
	})
	return errors.Join(errs...)
}

// flagValue is the value of flag name in fs, or "" when fs has no such flag.
func flagValue(fs *flag.FlagSet, name string) string {
	if f := fs.Lookup(name); f != nil {
		return f.Value.String()
	}
	return ""
}

// listenPort is the port of a listen address such as "0.0.0.0:8080".
func listenPort(t *testing.T, addr string) int {
	t.Helper()
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Errorf("listen address %q: %v", addr, err)
		return 0
	}
	p, _ := strconv.Atoi(port)
	return p
}

// urlPort is the port of an http, https or nats URL, its scheme's default if none.
func urlPort(u *url.URL) int {
	if p, err := strconv.Atoi(u.Port()); err == nil {
		return p
	}
	return map[string]int{"http": 80, "https": 443, "nats": 4222}[u.Scheme]
}

// healthcheckURL checks that a container's health check command is a `comfyfleet
// healthcheck` command line and returns the URL it probes.
func healthcheckURL(t *testing.T, c commandLine) *url.URL {
	t.Helper()
	c.sharedEnv = true
	fs := checkCommandLine(t, c)
	if fs == nil {
		return nil
	}
	if fs.Name() != "healthcheck" {
		t.Errorf("%s: %q is no healthcheck command", c.where, c.args)
		return nil
	}
	u, err := url.Parse(flagValue(fs, "url"))
	if err != nil {
		t.Errorf("%s: --url: %v", c.where, err)
		return nil
	}
	return u
}

// serviceListenPort is the port a comfyfleet service command answers health checks
// on: the API's for the intake, --addr for a simulated node, --health otherwise.
func serviceListenPort(t *testing.T, fs *flag.FlagSet) int {
	t.Helper()
	switch fs.Name() {
	case "intake":
		return listenPort(t, flagValue(fs, "http"))
	case "sim":
		return listenPort(t, flagValue(fs, "addr"))
	}
	if flagValue(fs, "health") == "" {
		t.Errorf("%s: no --health listener for its probes", fs.Name())
		return 0
	}
	return listenPort(t, flagValue(fs, "health"))
}
