package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	sse "github.com/tmaxmax/go-sse"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// jobFailedError is a watched job that ended failed or cancelled: the command exits
// 1 for it (2 for every other error).
type jobFailedError struct {
	job api.Job
}

func (e *jobFailedError) Error() string {
	count := map[string]int{}
	for _, s := range e.job.Scenes {
		count[s.Status]++
	}
	return fmt.Sprintf("job %s %s: %d of %d scenes failed, %d cancelled", e.job.ID, e.job.Status,
		count[string(fleet.StatusFailed)], len(e.job.Scenes), count[string(fleet.StatusCancelled)])
}

// ExitCode is the exit status of the command.
func (e *jobFailedError) ExitCode() int { return 1 }

// watchJob follows job id to its end, showing each scene's progress on stderr,
// then prints the outcome on stdout and downloads every output into out (unless
// empty). It returns a *jobFailedError when a scene failed or the job was cancelled.
func watchJob(ctx context.Context, c *apiClient, id, out string, stdout, stderr io.Writer) error {
	var job api.Job
	if err := c.call(ctx, "GET", api.JobPath(id), nil, &job); err != nil {
		return err
	}
	view := newProgressView(ctx, stderr, job)
	// The stream replays the job's events from its first: the scenes start queued.
	scenes := make([]sceneState, len(job.Scenes))
	for i := range scenes {
		scenes[i] = sceneState{index: i, status: fleet.StatusQueued}
	}
	err := c.followEvents(ctx, id, func(ev fleet.SceneEvent) {
		if ev.Index < 0 || ev.Index >= len(scenes) {
			return
		}
		if scenes[ev.Index].apply(ev) {
			view.show(scenes[ev.Index])
		}
	})
	if err == nil {
		err = c.call(ctx, "GET", api.JobPath(id), nil, &job)
	}
	if err != nil {
		view.close()
		return err
	}
	for _, s := range job.Scenes {
		view.show(sceneFromJob(s))
	}
	view.close()
	printOutcome(stdout, job)
	if out != "" {
		n, err := c.downloadOutputs(ctx, job, out)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "%d files saved in %s\n", n, out)
	}
	if job.Status != string(fleet.StatusSucceeded) {
		return &jobFailedError{job: job}
	}
	return nil
}

// idleTimeout ends an event stream that has sent nothing, not even its keep-alive
// comment (every 15 s), for this long: the connection is taken as lost.
const idleTimeout = 45 * time.Second

// maxEventBytes bounds one event of the stream: a job's terminal event carries the
// whole job.
const maxEventBytes = 64 << 20

// followEvents calls handle with each scene event of job, from its first, until the
// job has ended. A stream that breaks is resumed with Last-Event-ID.
func (c *apiClient) followEvents(ctx context.Context, job string, handle func(fleet.SceneEvent)) error {
	lastID := ""
	backoff := 250 * time.Millisecond
	for {
		got, err := c.streamEvents(ctx, job, lastID, func(id string, ev fleet.SceneEvent) {
			lastID = id
			handle(ev)
		})
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var apiErr *apiError
		if errors.As(err, &apiErr) && apiErr.status < 500 && apiErr.status != http.StatusTooManyRequests {
			return err
		}
		// The stream ends after the job's end, or broke: ask which.
		var j api.Job
		if jerr := c.call(ctx, "GET", api.JobPath(job), nil, &j); jerr == nil && fleet.Status(j.Status).Terminal() {
			return nil
		} else if errors.As(jerr, &apiErr) && apiErr.status < 500 && apiErr.status != http.StatusTooManyRequests {
			return jerr
		}
		if got {
			backoff = 250 * time.Millisecond
		}
		if err := pause(ctx, backoff); err != nil {
			return err
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// streamEvents reads the job's event stream once, after lastID if not empty, and
// reports whether it got any event.
func (c *apiClient) streamEvents(ctx context.Context, job, lastID string, handle func(id string, ev fleet.SceneEvent)) (got bool, err error) {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	header := http.Header{"Accept": {"text/event-stream"}}
	if lastID != "" {
		header.Set("Last-Event-ID", lastID)
	}
	resp, err := c.send(ctx, "GET", api.JobPath(job)+"/events", nil, header)
	if err != nil {
		return false, err
	}
	defer resp.Body.Close()
	idle := time.AfterFunc(idleTimeout, func() { cancel(fmt.Errorf("no event nor keep-alive for %s", idleTimeout)) })
	defer idle.Stop()
	body := activityReader{r: resp.Body, active: func() { idle.Reset(idleTimeout) }}
	for e, err := range sse.Read(body, &sse.ReadConfig{MaxEventSize: maxEventBytes}) {
		if err != nil {
			return got, fmt.Errorf("read the events of job %s: %w", job, cmp.Or(context.Cause(ctx), err))
		}
		if !strings.HasPrefix(e.Type, "dev.comfyfleet.scene.") {
			continue
		}
		ev, err := fleet.DecodeSceneEvent([]byte(e.Data))
		if err != nil {
			return got, err
		}
		got = true
		handle(e.LastEventID, ev)
	}
	return got, nil
}

// activityReader calls active on every read that returns data.
type activityReader struct {
	r      io.Reader
	active func()
}

func (a activityReader) Read(p []byte) (int, error) {
	n, err := a.r.Read(p)
	if n > 0 {
		a.active()
	}
	return n, err
}

// sceneState is what the live view shows of a scene.
type sceneState struct {
	index   int
	status  fleet.Status
	node    string
	attempt int
	value   int
	max     int
	err     string
	// retrying is set between a failed attempt and the next.
	retrying bool
}

func sceneFromJob(s api.Scene) sceneState {
	st := sceneState{index: s.Index, status: fleet.Status(s.Status), node: s.Node, attempt: s.Attempts, err: s.Error}
	if s.Progress != nil {
		st.value, st.max = s.Progress.Value, s.Progress.Max
	}
	if st.status == fleet.StatusSucceeded {
		st.value, st.max = 1, 1
	}
	return st
}

// apply folds ev into the view's state and reports whether it changed. It shows
// progress only; the job document says how the scene ended.
func (s *sceneState) apply(ev fleet.SceneEvent) bool {
	if s.status.Terminal() && ev.Type != fleet.EventQueued {
		return false
	}
	before := *s
	switch ev.Type {
	case fleet.EventQueued:
		s.status, s.retrying = fleet.StatusQueued, false
	case fleet.EventStarted:
		s.status, s.node, s.attempt, s.value, s.max, s.retrying = fleet.StatusRunning, ev.Node, ev.Attempt, 0, 0, false
	case fleet.EventProgress:
		if ev.Progress != nil {
			s.status, s.value, s.max = fleet.StatusRunning, ev.Progress.Value, ev.Progress.Max
		}
	case fleet.EventRetrying:
		s.status, s.retrying, s.err, s.value = fleet.StatusQueued, true, ev.Error, 0
	case fleet.EventCompleted:
		s.status, s.value, s.max = fleet.StatusSucceeded, 1, 1
	case fleet.EventFailed:
		s.status, s.err = fleet.StatusFailed, ev.Error
	case fleet.EventCancelled:
		s.status = fleet.StatusCancelled
	}
	return *s != before
}

// percent is the scene's sampler progress, 0 to 100.
func (s sceneState) percent() int64 {
	if s.max <= 0 {
		return 0
	}
	return int64(min(100, 100*s.value/s.max))
}

// label is the scene's state in a few words.
func (s sceneState) label() string {
	switch {
	case s.status == fleet.StatusRunning && s.max > 0:
		return fmt.Sprintf("running on %s, step %d/%d", s.node, s.value, s.max)
	case s.status == fleet.StatusRunning:
		return "running on " + s.node
	case s.retrying:
		return fmt.Sprintf("retrying after attempt %d: %s", s.attempt, shorten(s.err, 60))
	case s.status == fleet.StatusFailed:
		return "failed: " + shorten(s.err, 80)
	}
	return string(s.status)
}

// shorten cuts text to its first line and at most n runes.
func shorten(text string, n int) string {
	text, _, _ = strings.Cut(strings.TrimSpace(text), "\n")
	if r := []rune(text); len(r) > n {
		return string(r[:n-1]) + "…"
	}
	return text
}

// printOutcome prints the job's end: each scene's status, node, time and outputs,
// and the error of each scene that failed.
func printOutcome(w io.Writer, job api.Job) {
	took := ""
	if job.FinishedAt != nil {
		took = " in " + job.FinishedAt.Sub(job.CreatedAt).Round(100*time.Millisecond).String()
	}
	fmt.Fprintf(w, "job %s %s%s: %d scenes\n", job.ID, job.Status, took, len(job.Scenes))
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "SCENE\tSTATUS\tNODE\tATTEMPTS\tTIME\tOUTPUTS")
	for _, s := range job.Scenes {
		took := "-"
		if s.StartedAt != nil && s.FinishedAt != nil {
			took = s.FinishedAt.Sub(*s.StartedAt).Round(10 * time.Millisecond).String()
		}
		names := make([]string, len(s.Outputs))
		for i, o := range s.Outputs {
			names[i] = o.Name
		}
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d\t%s\t%s\n", s.Index, s.Status, orDash(s.Node), s.Attempts, took, orDash(strings.Join(names, " ")))
	}
	_ = tw.Flush()
	for _, s := range job.Scenes {
		if s.Status != string(fleet.StatusFailed) {
			continue
		}
		fmt.Fprintf(w, "scene %d failed: %s\n", s.Index, s.Error)
		if len(s.Failures) < 2 {
			continue
		}
		for _, f := range s.Failures {
			fmt.Fprintf(w, "  attempt %d on %s: %s\n", f.Attempt, orDash(f.Node), shorten(f.Error, 200))
		}
	}
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// downloadOutputs saves every output of job in dir, created if need be, under the
// names the API gives them; it returns how many files it saved.
func (c *apiClient) downloadOutputs(ctx context.Context, job api.Job, dir string) (int, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return 0, fmt.Errorf("--out: %w", err)
	}
	root, err := os.OpenRoot(dir)
	if err != nil {
		return 0, fmt.Errorf("--out: %w", err)
	}
	defer root.Close()
	n := 0
	for _, s := range job.Scenes {
		for _, o := range s.Outputs {
			if err := c.download(ctx, api.OutputPath(job.ID, s.Index, o.Name), root, o.Name); err != nil {
				return n, err
			}
			n++
		}
	}
	return n, nil
}

// download saves the file at path as name in root; a name that would leave root
// is refused.
func (c *apiClient) download(ctx context.Context, path string, root *os.Root, name string) error {
	resp, err := c.send(ctx, "GET", path, nil, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	f, err := root.Create(name)
	if err != nil {
		return fmt.Errorf("save %s: %w", name, err)
	}
	if _, err := io.Copy(f, resp.Body); err != nil {
		f.Close()
		return fmt.Errorf("download %s: %w", name, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("save %s: %w", name, err)
	}
	return nil
}

// printJSON prints v as indented JSON, for --json.
func printJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}
