package comfysim_test

import (
	"fmt"
	"net/http"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
)

const (
	ckptA = "v1-5-pruned-emaonly.safetensors"
	ckptB = "sd_xl_base_1.0.safetensors"
)

// txt2imgWith is the default workflow with another checkpoint.
func txt2imgWith(ckpt string, steps int, seed uint64, prefix string) string {
	return strings.Replace(txt2img(steps, seed, prefix), ckptA, ckpt, 1)
}

var nodeIDRE = regexp.MustCompile(`"([3-9])"`)

// twoCheckpoints renders with A (nodes 3-9) and with B (nodes 13-19) in
// one prompt, so that the node cache holds loaders for both.
func twoCheckpoints(seed uint64) string {
	a := txt2imgWith(ckptA, 2, seed, "both")
	b := nodeIDRE.ReplaceAllString(txt2imgWith(ckptB, 2, seed, "both"), `"1$1"`)
	return strings.TrimSuffix(strings.TrimSpace(a), "}") + "," + strings.TrimPrefix(strings.TrimSpace(b), "{")
}

// runOf returns the Run of a prompt from the stats.
func runOf(t *testing.T, sim *comfysim.Server, id string) comfysim.Run {
	t.Helper()
	for _, r := range sim.Stats().Runs {
		if r.PromptID == id {
			return r
		}
	}
	t.Fatalf("no run of %s in %+v", id, sim.Stats().Runs)
	return comfysim.Run{}
}

// cachedNodes returns the nodes execution_cached lists in a prompt's frames.
func cachedNodes(t *testing.T, frames []wsFrame) string {
	t.Helper()
	for _, f := range frames {
		if f.typ == "execution_cached" {
			return fmt.Sprint(frameData(t, f)["nodes"])
		}
	}
	t.Fatalf("no execution_cached")
	return ""
}

func TestModelLoadDuration(t *testing.T) {
	t.Parallel()
	// Long, so that a run without a load stays well under it on a loaded machine.
	const load = time.Second
	sim := startSim(t, comfysim.Config{StepDuration: time.Millisecond, ModelLoadDuration: load})
	c := newClient(t, sim.URL())
	ws := dialWS(t, sim.URL(), "load", false)
	if m := sim.Model(); m != "" {
		t.Errorf("model %q before any prompt", m)
	}

	for i, ckpt := range []string{ckptA, ckptB, ckptA} {
		id, _ := run(t, c, ws, txt2imgWith(ckpt, 3, uint64(i), "load"), "load")
		r := runOf(t, sim, id)
		if !r.ModelLoaded || r.Outcome != "success" || r.End.Sub(r.Start) < load {
			t.Errorf("run %d (%s): %+v, took %v; want a load of at least %v", i, ckpt, r, r.End.Sub(r.Start), load)
		}
		if m := sim.Model(); m != ckpt {
			t.Errorf("run %d: model %q, want %q", i, m, ckpt)
		}
	}
	id, frames := run(t, c, ws, txt2imgWith(ckptA, 3, 10, "load"), "load")
	r := runOf(t, sim, id)
	if r.ModelLoaded || r.End.Sub(r.Start) >= load {
		t.Errorf("A after A: %+v, took %v; want no load", r, r.End.Sub(r.Start))
	}
	if got := cachedNodes(t, frames); got != "[4 5 6 7]" {
		t.Errorf("A after A cached %s, want the loader and the unchanged nodes", got)
	}

	// /free unloads: the cached loader of A runs again and pays the load.
	if got := c.postJSON("/free", `{"unload_models": true}`); got.status != http.StatusOK {
		t.Fatalf("/free: %d %s", got.status, got.body)
	}
	if m := sim.Model(); m != "" {
		t.Errorf("model %q after /free", m)
	}
	id, frames = run(t, c, ws, txt2imgWith(ckptA, 3, 11, "load"), "load")
	if r := runOf(t, sim, id); !r.ModelLoaded || r.End.Sub(r.Start) < load {
		t.Errorf("A after /free: %+v, took %v; want a load", r, r.End.Sub(r.Start))
	}
	if got := cachedNodes(t, frames); got != "[5 6 7]" {
		t.Errorf("A after /free cached %s, want the loader to run again", got)
	}

	if st := sim.Stats(); len(st.Runs) != 5 || st.Completed != 5 {
		t.Errorf("stats %+v", st)
	}
}

func TestModelLoadCacheHoldsOtherCheckpoint(t *testing.T) {
	const load = 100 * time.Millisecond
	sim := startSim(t, comfysim.Config{StepDuration: time.Millisecond, ModelLoadDuration: load})
	c := newClient(t, sim.URL())
	ws := dialWS(t, sim.URL(), "both", false)

	id, _ := run(t, c, ws, twoCheckpoints(1), "both")
	if r := runOf(t, sim, id); !r.ModelLoaded || r.Outcome != "success" || r.End.Sub(r.Start) < 2*load {
		t.Fatalf("two checkpoints: %+v, took %v; want two loads", r, r.End.Sub(r.Start))
	}
	resident, evicted, evictedLoader := sim.Model(), ckptA, "4"
	if resident == ckptA {
		evicted, evictedLoader = ckptB, "14"
	} else if resident != ckptB {
		t.Fatalf("model %q after loading both", resident)
	}

	// Both loaders are in the cache, but only one checkpoint is resident.
	prompt := txt2imgWith(evicted, 2, 2, "both")
	if evictedLoader == "14" {
		prompt = nodeIDRE.ReplaceAllString(prompt, `"1$1"`)
	}
	id, frames := run(t, c, ws, prompt, "both")
	if r := runOf(t, sim, id); !r.ModelLoaded || r.End.Sub(r.Start) < load {
		t.Errorf("evicted checkpoint: %+v, took %v; want a load", r, r.End.Sub(r.Start))
	}
	if got := cachedNodes(t, frames); slices.Contains(strings.Fields(strings.Trim(got, "[]")), evictedLoader) {
		t.Errorf("the loader of the evicted checkpoint %s was cached: %s", evicted, got)
	}
	if m := sim.Model(); m != evicted {
		t.Errorf("model %q, want %q", m, evicted)
	}
}

func TestRunsBackToBack(t *testing.T) {
	sim := startSim(t, comfysim.Config{StepDuration: 2 * time.Millisecond})
	c := newClient(t, sim.URL())
	ws := dialWS(t, sim.URL(), "b2b", false)
	mark := ws.mark()
	first := c.submit(txt2img(10, 1, "b2b"), "b2b")
	second := c.submit(txt2img(10, 2, "b2b"), "b2b")
	ws.waitDone(mark, second)
	ws.waitDone(mark, first)

	runs := sim.Stats().Runs
	if len(runs) != 2 || runs[0].PromptID != first || runs[1].PromptID != second {
		t.Fatalf("runs %+v, want %s then %s", runs, first, second)
	}
	for _, r := range runs {
		if r.Outcome != "success" || r.ModelLoaded || !r.End.After(r.Start) {
			t.Errorf("run %+v", r)
		}
	}
	gap := runs[1].Start.Sub(runs[0].End)
	if gap < 0 || gap >= 50*time.Millisecond {
		t.Errorf("idle gap %v between back-to-back prompts", gap)
	}
	t.Logf("idle gap %v", gap)

	// Stats returns a copy.
	runs[0].PromptID = "changed"
	if sim.Stats().Runs[0].PromptID != first {
		t.Errorf("Stats shares Runs with the server")
	}
}

func TestKillForgetsModel(t *testing.T) {
	const load = 100 * time.Millisecond
	sim := startSim(t, comfysim.Config{StepDuration: time.Millisecond, ModelLoadDuration: load})
	c := newClient(t, sim.URL())
	ws := dialWS(t, sim.URL(), "forget", false)
	run(t, c, ws, txt2imgWith(ckptA, 2, 1, "forget"), "forget")
	if m := sim.Model(); m != ckptA {
		t.Fatalf("model %q, want %q", m, ckptA)
	}
	sim.Kill()
	if m := sim.Model(); m != "" {
		t.Errorf("model %q after Kill", m)
	}
	if err := sim.Restart(); err != nil {
		t.Fatalf("restart: %v", err)
	}
	if m := sim.Model(); m != "" {
		t.Errorf("model %q after Restart", m)
	}
	// A new client: the old one's kept-alive connection died with the server, and
	// an HTTP client does not send a POST again on a connection that turns out dead.
	c = newClient(t, sim.URL())
	ws = dialWS(t, sim.URL(), "forget", false)
	id, _ := run(t, c, ws, txt2imgWith(ckptA, 2, 1, "forget"), "forget")
	if r := runOf(t, sim, id); !r.ModelLoaded || r.End.Sub(r.Start) < load {
		t.Errorf("after restart: %+v, took %v; want a load", r, r.End.Sub(r.Start))
	}
}

func TestModelLoadInterruptedAndAborted(t *testing.T) {
	sim := startSim(t, comfysim.Config{StepDuration: time.Millisecond, ModelLoadDuration: time.Minute})
	c := newClient(t, sim.URL())
	ws := dialWS(t, sim.URL(), "stop", false)
	isLoader := func(id string) func(wsFrame) bool {
		return func(f wsFrame) bool {
			return f.typ == "executing" && f.promptID() == id && strings.Contains(string(f.data), `"node": "4"`)
		}
	}

	mark := ws.mark()
	id := c.submit(txt2img(2, 1, "stop"), "stop")
	ws.waitFor(mark, "the loader of "+id, isLoader(id))
	c.postJSON("/interrupt", "")
	i := ws.waitType(mark, "execution_interrupted", id)
	if d := frameData(t, ws.since(i)[0]); d["node_id"] != "4" {
		t.Errorf("interrupted at %v, want the loader", d)
	}
	ws.waitDone(mark, id)
	if r := runOf(t, sim, id); r.Outcome != "interrupted" || !r.ModelLoaded {
		t.Errorf("interrupted load: %+v", r)
	}
	if m := sim.Model(); m != "" {
		t.Errorf("model %q after an interrupted load", m)
	}

	mark = ws.mark()
	id = c.submit(txt2img(2, 2, "stop"), "stop")
	ws.waitFor(mark, "the loader of "+id, isLoader(id))
	sim.Kill()
	st := sim.Stats()
	if len(st.Runs) != 2 || st.Runs[1].PromptID != id || st.Runs[1].Outcome != "aborted" {
		t.Errorf("runs after Kill %+v", st.Runs)
	}
}
