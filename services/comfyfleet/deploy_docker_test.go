package main

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/moby/buildkit/frontend/dockerfile/instructions"
	"github.com/moby/buildkit/frontend/dockerfile/linter"
	"github.com/moby/buildkit/frontend/dockerfile/parser"
	"github.com/moby/patternmatcher"
	"github.com/moby/patternmatcher/ignorefile"
	"golang.org/x/mod/modfile"
)

// dockerBuildCommand is how the Dockerfile builds the binary: static, without paths
// or symbols of the build machine.
const dockerBuildCommand = `CGO_ENABLED=0 go build -trimpath -ldflags='-s -w' -o /comfyfleet ./services/comfyfleet`

// TestDockerfileBuildsAStaticBinaryIntoANonRootImage parses the Dockerfile with
// BuildKit's own parser and linter (a misspelt instruction or flag fails) and checks
// its two stages: the Go workspace built by dockerBuildCommand on a Go image that has
// the workspace's Go version, then the binary alone on distroless as nonroot, run as
// the entry point, with a default command that parses.
func TestDockerfileBuildsAStaticBinaryIntoANonRootImage(t *testing.T) {
	root := repoRoot(t)
	data, err := os.ReadFile(filepath.Join(root, "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	ast, err := parser.Parse(bytes.NewReader(data))
	if err != nil {
		t.Fatalf("Dockerfile: %v", err)
	}
	for _, w := range ast.Warnings {
		t.Errorf("Dockerfile: %s", w.Short)
	}
	lint := linter.New(&linter.Config{Warn: func(rule, _, _, msg string, loc []parser.Range) {
		t.Errorf("Dockerfile:%v: %s: %s", loc, rule, msg)
	}})
	stages, _, err := instructions.Parse(ast.AST, lint)
	if err != nil {
		t.Fatalf("Dockerfile: %v", err)
	}
	if len(stages) != 2 {
		t.Fatalf("Dockerfile has %d stages, want a build stage and the image", len(stages))
	}
	build, image := stages[0], stages[1]

	work, err := os.ReadFile(filepath.Join(root, "go.work"))
	if err != nil {
		t.Fatal(err)
	}
	wf, err := modfile.ParseWork("go.work", work, nil)
	if err != nil {
		t.Fatal(err)
	}
	goImage, ok := strings.CutPrefix(build.BaseName, "golang:")
	if goVersion := strings.Join(strings.SplitN(wf.Go.Version, ".", 3)[:2], "."); !ok || !strings.HasPrefix(goImage, goVersion) {
		t.Errorf("Dockerfile builds on %s; go.work wants Go %s (golang:%s)", build.BaseName, wf.Go.Version, goVersion)
	}
	var built bool
	for _, cmd := range build.Commands {
		if run, ok := cmd.(*instructions.RunCommand); ok && strings.Join(run.CmdLine, " ") == dockerBuildCommand {
			built = true
		}
	}
	if !built {
		t.Errorf("the build stage does not RUN %s", dockerBuildCommand)
	}

	if !strings.HasPrefix(image.BaseName, "gcr.io/distroless/static") || !strings.HasSuffix(image.BaseName, ":nonroot") {
		t.Errorf("the image is based on %s, want distroless static, nonroot", image.BaseName)
	}
	var (
		copied, nonroot bool
		entrypoint, cmd []string
	)
	for _, c := range image.Commands {
		switch c := c.(type) {
		case *instructions.CopyCommand:
			copied = copied || c.From == build.Name && strings.Join(c.SourcePaths, " ") == "/comfyfleet" && c.DestPath == "/comfyfleet"
		case *instructions.UserCommand:
			nonroot = c.User == "nonroot" || strings.HasPrefix(c.User, "nonroot:") || strings.HasPrefix(c.User, "65532")
		case *instructions.EntrypointCommand:
			if c.PrependShell {
				t.Error("ENTRYPOINT in shell form: the image has no shell")
			}
			entrypoint = c.CmdLine
		case *instructions.CmdCommand:
			if c.PrependShell {
				t.Error("CMD in shell form: the image has no shell")
			}
			cmd = c.CmdLine
		}
	}
	if !copied {
		t.Errorf("the image does not COPY --from=%s /comfyfleet /comfyfleet", build.Name)
	}
	if !nonroot {
		t.Error("the image does not run as the user nonroot")
	}
	if strings.Join(entrypoint, " ") != "/comfyfleet" {
		t.Errorf("ENTRYPOINT %q, want [\"/comfyfleet\"]", entrypoint)
	}
	checkCommandLine(t, commandLine{where: "Dockerfile CMD", args: cmd})
}

// TestDockerBuildContextHoldsTheWorkspace builds the context docker sends for the
// Dockerfile (the repository less .dockerignore, read by Docker's own matcher) and
// loads the binary's packages there as the Dockerfile's build does: every module of
// the workspace, every embedded file must be in it; history, data and build outputs
// must not.
func TestDockerBuildContextHoldsTheWorkspace(t *testing.T) {
	root := repoRoot(t)
	f, err := os.Open(filepath.Join(root, ".dockerignore"))
	if err != nil {
		t.Fatal(err)
	}
	patterns, err := ignorefile.ReadAll(f)
	f.Close()
	if err != nil {
		t.Fatalf(".dockerignore: %v", err)
	}
	ignore, err := patternmatcher.New(patterns)
	if err != nil {
		t.Fatalf(".dockerignore: %v", err)
	}
	for _, path := range []string{".git", ".comfyfleet", "bin", "comfyfleet", "services/comfyfleet/comfyfleet", "deploy/nats/hub.conf", "services/x/cpu.prof"} {
		if excluded, _ := ignore.MatchesOrParentMatches(path); !excluded {
			t.Errorf(".dockerignore lets %s into the build context", path)
		}
	}

	buildContext := t.TempDir()
	err = filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		if rel == "." {
			return nil
		}
		if excluded, _ := ignore.MatchesOrParentMatches(filepath.ToSlash(rel)); excluded {
			if d.IsDir() && !ignore.Exclusions() {
				return filepath.SkipDir
			}
			return nil
		}
		if d.IsDir() || !d.Type().IsRegular() {
			return nil
		}
		return copyFile(path, filepath.Join(buildContext, rel))
	})
	if err != nil {
		t.Fatal(err)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	list := exec.CommandContext(ctx, "go", "list", "-deps", "-f", "{{if .EmbedFiles}}{{.ImportPath}} {{.EmbedFiles}}{{end}}", "./services/comfyfleet")
	list.Dir = buildContext
	list.Env = append(os.Environ(), "CGO_ENABLED=0", "GOFLAGS=", "GOWORK=")
	out, err := list.CombinedOutput()
	if err != nil {
		t.Fatalf("the build context cannot build ./services/comfyfleet: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "workflows [") {
		t.Errorf("the workflow templates are not embedded from the build context:\n%s", out)
	}
}

func copyFile(from, to string) error {
	if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
		return err
	}
	src, err := os.Open(from)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := os.Create(to)
	if err != nil {
		return err
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		return fmt.Errorf("copy %s: %w", from, err)
	}
	return dst.Close()
}
