package comfysim

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
)

// cacheEntry is a node's result, reused by the next prompt that contains
// the same node with the same inputs.
type cacheEntry struct {
	values []value
	ui     obj
}

// String names the outcome as Run.Outcome does.
func (o outcome) String() string {
	switch o {
	case outcomeSuccess:
		return "success"
	case outcomeError:
		return "error"
	case outcomeInterrupted:
		return "interrupted"
	default:
		return "aborted"
	}
}

// uncacheable classes change on every run (IS_CHANGED returns the time).
var uncacheable = map[string]bool{"SaveImageWebsocket": true}

// outcome is how a prompt ended.
type outcome int

const (
	outcomeSuccess outcome = iota
	outcomeError
	outcomeInterrupted
	// outcomeAborted: the server was killed or closed during the run.
	outcomeAborted
)

var (
	errInterrupted = errors.New("processing interrupted")
	errAborted     = errors.New("server stopped")
)

// nodeFailure is the Python exception a node raised.
type nodeFailure struct {
	excType   string
	message   string
	traceback []string
	oom       bool
}

func (f *nodeFailure) Error() string { return f.excType + ": " + f.message }

// work is the worker goroutine: it runs prompts one at a time until the
// instance stops.
func (in *instance) work() {
	for {
		r, ok := in.q.take(in.ctx)
		if !ok {
			return
		}
		start := time.Now()
		e := newExecution(in, r)
		out := e.run()
		end := time.Now()
		if out == outcomeAborted || in.ctx.Err() != nil {
			in.s.countStats(func(st *Stats) {
				st.Runs = append(st.Runs, Run{PromptID: e.pid, Start: start, End: end, Outcome: "aborted", ModelLoaded: e.modelLoaded})
			})
			return
		}
		in.s.countStats(func(st *Stats) {
			st.Runs = append(st.Runs, Run{PromptID: e.pid, Start: start, End: end, Outcome: out.String(), ModelLoaded: e.modelLoaded})
			switch out {
			case outcomeSuccess:
				st.Completed++
				st.Rendered = append(st.Rendered, e.pid)
			case outcomeError:
				st.Failed++
			case outcomeInterrupted:
				st.Interrupted++
			}
		})
		in.q.finish(r, e.historyEntry(out))
		if out == outcomeSuccess && in.s.cfg.OnRendered != nil {
			in.s.cfg.OnRendered(e.pid)
		}
		e.send("executing", obj{{"node", nil}, {"prompt_id", e.pid}})
		in.log.Debug("comfysim: prompt done", "prompt_id", e.pid, "outcome", out)
	}
}

// execution is the run of one prompt.
type execution struct {
	in       *instance
	running  *running
	j        *job
	pid      string
	progress progressRegistry
	messages [][]any
	sigs     map[string]string
	values   map[string][]value
	nodeUI   map[string]obj
	fromHit  map[string]bool
	ui       obj
	meta     obj
	executed []string
	plan     *failurePlan
	// modelLoaded is set when a checkpoint loader began paying
	// Config.ModelLoadDuration.
	modelLoaded bool
}

func newExecution(in *instance, r *running) *execution {
	return &execution{
		in:       in,
		running:  r,
		j:        r.job,
		pid:      r.job.id,
		progress: progressRegistry{nodes: map[string]*nodeProgress{}},
		values:   map[string][]value{},
		nodeUI:   map[string]obj{},
		fromHit:  map[string]bool{},
		ui:       obj{},
		meta:     obj{},
		executed: []string{},
	}
}

func nowMillis() int64 { return time.Now().UnixMilli() }

// send delivers a message to the prompt's client, if it has one.
func (e *execution) send(event string, data any) {
	if e.j.hasClient {
		e.in.hub.send(e.j.clientID, frame{data: message(event, data)})
	}
}

// record sends a message that the history keeps in status.messages.
// Without a client, only broadcast messages go out, to everyone.
func (e *execution) record(event string, data obj, broadcast bool) {
	e.messages = append(e.messages, []any{event, data})
	switch {
	case e.j.hasClient:
		e.in.hub.send(e.j.clientID, frame{data: message(event, data)})
	case broadcast:
		e.in.hub.broadcast(message(event, data))
	}
}

func (e *execution) sendProgressState() {
	e.send("progress_state", e.progress.message(e.pid))
}

func (e *execution) cached(id string) *cacheEntry {
	if e.in.s.cfg.DisableCache {
		return nil
	}
	return e.in.cache[e.sigs[id]]
}

// staleCheckpoint reports whether a cached checkpoint loader must run
// again because, with a load cost, its checkpoint is no longer resident:
// another was loaded since, or /free, an out-of-memory error or a restart
// unloaded it.
func (e *execution) staleCheckpoint(n *promptNode) bool {
	if e.in.s.cfg.ModelLoadDuration <= 0 || !checkpointLoaders[n.ClassType] {
		return false
	}
	name := (&nodeRun{e: e, n: n, c: n.class}).str("ckpt_name")
	return name == "" || name != e.in.gpu.resident()
}

// run executes the prompt and reports how it ended.
func (e *execution) run() outcome {
	defer e.in.hub.endExecution()
	e.record("execution_start", obj{{"prompt_id", e.pid}, {"timestamp", nowMillis()}}, false)

	e.sigs = e.signatures()
	hits := []string{}
	for _, n := range e.j.g.nodes {
		if c := e.cached(n.ID); c != nil && !e.staleCheckpoint(n) {
			hits = append(hits, n.ID)
			e.values[n.ID] = c.values
			e.fromHit[n.ID] = true
		}
	}
	e.record("execution_cached", obj{{"nodes", hits}, {"prompt_id", e.pid}, {"timestamp", nowMillis()}}, false)

	list := newExecList(e.j.g, func(id string) bool { return e.fromHit[id] })
	for _, o := range e.j.outputs {
		list.add(o)
	}
	e.plan = e.in.planFailure(e.j.g, list.willRun())
	e.in.gpu.setActive(activationBytes(e.j.g))
	defer e.in.gpu.setActive(0)

	out := outcomeSuccess
	for out == outcomeSuccess {
		id, err := list.next()
		if err != nil {
			out = e.failed(e.j.g.byID[list.pending[0]], &nodeFailure{
				excType: "comfy_execution.graph.DependencyCycleError", message: "Dependency cycle detected\n", traceback: []string{},
			})
			break
		}
		if id == "" {
			break
		}
		out = e.runNode(e.j.g.byID[id])
		list.done(id)
	}
	if out == outcomeAborted {
		return out
	}
	e.storeCache()
	if out == outcomeSuccess {
		e.record("execution_success", obj{{"prompt_id", e.pid}, {"timestamp", nowMillis()}}, false)
	}
	return out
}

// runNode executes one node, or replays it from the cache.
func (e *execution) runNode(n *promptNode) outcome {
	id := n.ID
	if e.fromHit[id] {
		c := e.cached(id)
		var output any
		if c.ui != nil {
			output = c.ui
			e.ui = e.ui.set(id, c.ui)
			e.meta = e.meta.set(id, nodeMeta(id))
		}
		e.send("executed", obj{{"node", id}, {"display_node", id}, {"output", output}, {"prompt_id", e.pid}})
		e.progress.finish(id)
		e.sendProgressState()
		e.executed = append(e.executed, id)
		return outcomeSuccess
	}

	e.progress.start(id)
	e.sendProgressState()
	executing := message("executing", obj{{"node", id}, {"display_node", id}, {"prompt_id", e.pid}})
	if e.in.q.announce(e.running, func() { e.in.hub.executing(e.j.clientID, e.j.hasClient, id, executing) }) {
		return e.interrupted(n)
	}
	res, err := e.runBehaviour(n)
	var failure *nodeFailure
	switch {
	case errors.Is(err, errAborted):
		return outcomeAborted
	case errors.Is(err, errInterrupted):
		return e.interrupted(n)
	case errors.As(err, &failure):
		return e.failed(n, failure)
	case err != nil:
		return e.failed(n, &nodeFailure{excType: "RuntimeError", message: err.Error() + "\n", traceback: executionFrames})
	}
	e.values[id] = res.values
	if res.ui != nil {
		e.nodeUI[id] = res.ui
		e.ui = e.ui.set(id, res.ui)
		e.meta = e.meta.set(id, nodeMeta(id))
		e.send("executed", obj{{"node", id}, {"display_node", id}, {"output", res.ui}, {"prompt_id", e.pid}})
	}
	e.progress.finish(id)
	e.sendProgressState()
	e.executed = append(e.executed, id)
	return outcomeSuccess
}

func nodeMeta(id string) obj {
	return obj{{"node_id", id}, {"display_node", id}, {"parent_node", nil}, {"real_node_id", id}}
}

func (e *execution) isInterrupted() bool {
	select {
	case <-e.running.interrupt:
		return true
	default:
		return false
	}
}

func (e *execution) interrupted(n *promptNode) outcome {
	e.record("execution_interrupted", obj{
		{"prompt_id", e.pid},
		{"node_id", n.ID},
		{"node_type", n.ClassType},
		{"executed", append([]string{}, e.executed...)},
		{"timestamp", nowMillis()},
	}, true)
	return outcomeInterrupted
}

func (e *execution) failed(n *promptNode, f *nodeFailure) outcome {
	ids := make([]string, 0, len(e.j.g.nodes))
	for _, m := range e.j.g.nodes {
		ids = append(ids, m.ID)
	}
	e.record("execution_error", obj{
		{"prompt_id", e.pid},
		{"node_id", n.ID},
		{"node_type", n.ClassType},
		{"executed", append([]string{}, e.executed...)},
		{"exception_message", f.message},
		{"exception_type", f.excType},
		{"traceback", f.traceback},
		{"current_inputs", e.currentInputs(n)},
		{"current_outputs", ids},
		{"timestamp", nowMillis()},
	}, false)
	if f.oom {
		e.in.gpu.unloadAll()
	}
	return outcomeError
}

// historyEntry is what /history shows for the finished prompt; a prompt
// that failed or was interrupted keeps no outputs.
func (e *execution) historyEntry(out outcome) *historyEntry {
	h := &historyEntry{job: e.j, outputs: e.ui, meta: e.meta}
	status, completed := "success", true
	if out != outcomeSuccess {
		status, completed = "error", false
		h.outputs, h.meta = obj{}, obj{}
	}
	h.status = obj{{"status_str", status}, {"completed", completed}, {"messages", e.messages}}
	return h
}

// signatures keys the node cache: a node's class and inputs, with links
// replaced by the signature of the node they come from.
func (e *execution) signatures() map[string]string {
	g := e.j.g
	memo := map[string]string{}
	visiting := map[string]bool{}
	var sig func(id string) string
	sig = func(id string) string {
		if s, ok := memo[id]; ok {
			return s
		}
		if visiting[id] {
			return "cycle:" + id
		}
		visiting[id] = true
		defer delete(visiting, id)
		n := g.byID[id]
		h := sha256.New()
		fmt.Fprintf(h, "%s\x00", n.ClassType)
		inputs := append([]pyjson.Member(nil), n.Inputs...)
		sort.Slice(inputs, func(a, b int) bool { return inputs[a].Key < inputs[b].Key })
		for _, in := range inputs {
			if l, ok := linkOf(in.Raw); ok && g.byID[l.From] != nil {
				fmt.Fprintf(h, "%s\x00link\x00%s\x00%d\x00", in.Key, sig(l.From), l.Slot)
				continue
			}
			fmt.Fprintf(h, "%s\x00%s\x00", in.Key, canonicalJSON(in.Raw))
		}
		switch {
		case uncacheable[n.ClassType]:
			fmt.Fprintf(h, "run\x00%s\x00%s", e.pid, id)
		case n.ClassType == "LoadImage":
			if raw, ok := n.input("image"); ok {
				dir, sub, base := annotatedPath(pyStr(raw))
				if f, ok := e.in.s.files.get(dir, sub, base); ok {
					fmt.Fprintf(h, "file\x00%d\x00%d", f.modTime.UnixNano(), len(f.data))
				}
			}
		}
		s := hex.EncodeToString(h.Sum(nil))
		memo[id] = s
		return s
	}
	for _, n := range g.nodes {
		sig(n.ID)
	}
	return memo
}

// storeCache keeps the results of this prompt's nodes, and only those,
// as ComfyUI's default cache does.
func (e *execution) storeCache() {
	next := map[string]*cacheEntry{}
	for _, n := range e.j.g.nodes {
		vals, ok := e.values[n.ID]
		if !ok || uncacheable[n.ClassType] {
			continue
		}
		sig := e.sigs[n.ID]
		if e.fromHit[n.ID] {
			next[sig] = e.in.cache[sig]
			continue
		}
		next[sig] = &cacheEntry{values: vals, ui: e.nodeUI[n.ID]}
	}
	e.in.cache = next
}

// canonicalJSON renders a literal input for a cache key, keeping strings
// apart from numbers.
func canonicalJSON(raw []byte) string {
	s := pyStr(raw)
	if pyjson.Kind(raw) == '"' {
		return strconv.Quote(s)
	}
	return s
}
