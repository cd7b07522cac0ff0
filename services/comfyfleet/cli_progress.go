package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"sync/atomic"

	"github.com/vbauerster/mpb/v8"
	"github.com/vbauerster/mpb/v8/decor"
	"golang.org/x/term"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// progressView shows the scenes of a job while it runs.
type progressView interface {
	// show draws a scene's state; calls come from one goroutine.
	show(s sceneState)
	// close draws the last state and returns once it is on the output.
	close()
}

// newProgressView draws a progress bar per scene on a terminal, and plain lines
// otherwise (a pipe, a file, a CI log).
func newProgressView(ctx context.Context, w io.Writer, job api.Job) progressView {
	if f, ok := w.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		return newBarsView(ctx, w, job)
	}
	fmt.Fprintf(w, "job %s: %d scenes\n", job.ID, len(job.Scenes))
	return &linesView{w: w, last: map[int]string{}}
}

// barsView is a progress bar per scene, drawn by mpb.
type barsView struct {
	progress *mpb.Progress
	bars     []*mpb.Bar
	labels   []atomic.Pointer[string]
}

func newBarsView(ctx context.Context, w io.Writer, job api.Job) *barsView {
	v := &barsView{
		progress: mpb.NewWithContext(ctx, mpb.WithOutput(w), mpb.WithWidth(100), mpb.WithQueueLen(len(job.Scenes))),
		labels:   make([]atomic.Pointer[string], len(job.Scenes)),
	}
	for i := range job.Scenes {
		label := "queued"
		v.labels[i].Store(&label)
		v.bars = append(v.bars, v.progress.AddBar(100,
			mpb.BarWidth(30),
			mpb.PrependDecorators(decor.Name(fmt.Sprintf("scene %d", i), decor.WCSyncSpaceR)),
			mpb.AppendDecorators(decor.Any(func(decor.Statistics) string { return *v.labels[i].Load() })),
		))
	}
	return v
}

func (v *barsView) show(s sceneState) {
	if s.index < 0 || s.index >= len(v.bars) {
		return
	}
	label := s.label()
	v.labels[s.index].Store(&label)
	bar := v.bars[s.index]
	switch s.status {
	case fleet.StatusSucceeded:
		bar.SetCurrent(100)
	case fleet.StatusFailed, fleet.StatusCancelled:
		bar.Abort(false)
	default:
		bar.SetCurrent(min(99, s.percent())) // completes only when the scene has succeeded
	}
}

func (v *barsView) close() {
	for _, bar := range v.bars {
		if !bar.AbortedOrCompleted() {
			bar.Abort(false)
		}
	}
	v.progress.Wait()
}

// linesView prints a line when a scene changes state, and at every quarter of its
// sampler steps.
type linesView struct {
	w    io.Writer
	last map[int]string
}

func (v *linesView) show(s sceneState) {
	line := string(s.status)
	switch {
	case s.status == fleet.StatusRunning:
		line = fmt.Sprintf("running on %s, %d%%", s.node, s.percent()/25*25)
	case s.status == fleet.StatusQueued && s.retrying:
		line = s.label()
	case s.status == fleet.StatusFailed:
		line = "failed: " + s.err
	}
	if v.last[s.index] == line {
		return
	}
	v.last[s.index] = line
	fmt.Fprintf(v.w, "scene %d: %s\n", s.index, line)
}

func (v *linesView) close() {}
