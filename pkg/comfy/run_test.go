package comfy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"strings"
	"sync"
	"testing"
)

const emptyQueue = `{"queue_running": [], "queue_pending": []}`

// queueWith answers GET /queue with the prompt running or pending.
func queueWith(id string, running bool) responder {
	item := fmt.Sprintf(`[[7, %q, {}, {"client_id": %q}, ["9"]]]`, id, testClientID)
	if running {
		return jsonResponder(200, `{"queue_running": `+item+`, "queue_pending": []}`)
	}
	return jsonResponder(200, `{"queue_running": [], "queue_pending": `+item+`}`)
}

// derivedHistory answers with a recorded history body rewritten for another
// prompt of the same shape (the transcripts lack some prompts' history).
func derivedHistory(t testing.TB, prefix string, replace ...string) responder {
	r := loadExchange(t, prefix).responder(t)
	r.body = []byte(strings.NewReplacer(replace...).Replace(string(r.body)))
	return r
}

// progressLog collects what Run reports.
type progressLog struct {
	mu  sync.Mutex
	got []Progress
}

func (p *progressLog) add(pr Progress) {
	p.mu.Lock()
	p.got = append(p.got, pr)
	p.mu.Unlock()
}

func (p *progressLog) nodes() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for _, pr := range p.got {
		if pr.Max == 0 {
			out = append(out, pr.Node)
		}
	}
	return out
}

func (p *progressLog) steps() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	var out []string
	for _, pr := range p.got {
		if pr.Max != 0 {
			out = append(out, fmt.Sprintf("%s:%d/%d", pr.Node, pr.Value, pr.Max))
		}
	}
	return out
}

func stepsOf(node string, n int) []string {
	var out []string
	for i := range n {
		out = append(out, fmt.Sprintf("%s:%d/%d", node, i, n))
	}
	return out
}

// checkOneSubmission verifies that the prompt was posted exactly once, under
// its id and our client id, with no Origin header anywhere.
func checkOneSubmission(t *testing.T, rp *replay, id, clientID string) {
	t.Helper()
	posts := rp.recorded("POST", "/prompt")
	if len(posts) != 1 {
		t.Fatalf("POST /prompt sent %d times, want once", len(posts))
	}
	body := requestJSON(t, posts[0].Body).(map[string]any)
	if id == "" {
		id, _ = body["prompt_id"].(string) // Run chose one
	}
	if body["prompt_id"] != id || id == "" || body["client_id"] != clientID {
		t.Errorf("posted prompt_id %v client_id %v", body["prompt_id"], body["client_id"])
	}
	for _, r := range rp.allRequests() {
		if o := r.Header.Get("Origin"); o != "" {
			t.Errorf("%s %s sent Origin %q", r.Method, r.Path, o)
		}
		if r.Path == "/ws" && r.Query.Get("clientId") != clientID {
			t.Errorf("websocket clientId %q", r.Query.Get("clientId"))
		}
	}
}

// checkStopped closes the client, which stops its websocket stream at once.
func checkStopped(t *testing.T, c *Client) {
	t.Helper()
	c.streamMu.Lock()
	s := c.stream
	c.streamMu.Unlock()
	c.Close()
	if s == nil {
		return
	}
	select {
	case <-s.done:
	default:
		t.Error("websocket stream still running after Close")
	}
}

// TestRunTranscripts runs a prompt against each websocket transcript of a
// prompt run, with the recorded POST /prompt and /history answers.
func TestRunTranscripts(t *testing.T) {
	ok := func(outputs []Output, cached bool, nodes []string, steps []string) func(*testing.T, Result, error, *progressLog) {
		return func(t *testing.T, res Result, err error, p *progressLog) {
			if err != nil {
				t.Fatalf("Run: %v", err)
			}
			if !reflect.DeepEqual(res.Outputs, outputs) || res.Cached != cached {
				t.Errorf("Result %+v, want outputs %+v cached %v", res, outputs, cached)
			}
			if got := p.nodes(); !reflect.DeepEqual(got, nodes) {
				t.Errorf("node changes %v, want %v", got, nodes)
			}
			if got := p.steps(); !reflect.DeepEqual(got, steps) {
				t.Errorf("progress %v, want %v", got, steps)
			}
		}
	}
	for _, tc := range []struct {
		ws, post, history string
		derived           []string // replacements making history from another prompt's
		clientID          string
		check             func(*testing.T, Result, error, *progressLog)
	}{
		{ws: "ws_1_good.jsonl", post: "10", history: "12",
			check: ok([]Output{image("4", "acceptance_00001_.png", "output")}, false, []string{"1", "2", "3", "4"}, nil)},
		{ws: "ws_2_cached_rerun.jsonl", post: "19", history: "20",
			check: ok([]Output{image("4", "acceptance_00001_.png", "output")}, true, nil, nil)},
		{ws: "ws_3_client_prompt_id.jsonl", post: "21", history: "22",
			check: ok([]Output{image("4", "acceptance_b_00001_.png", "output")}, false, []string{"1", "2", "3", "4"}, nil)},
		{ws: "ws_4_invalid.jsonl", post: "23", check: func(t *testing.T, res Result, err error, p *progressLog) {
			if rej, ok := errors.AsType[*RejectedError](err); !ok || rej.Type != "invalid_prompt" || !IsPermanent(err) {
				t.Fatalf("Run: %v, want a permanent invalid_prompt rejection", err)
			}
		}},
		{ws: "ws_5_runtime_error.jsonl", post: "34", history: "35", check: func(t *testing.T, res Result, err error, p *progressLog) {
			ee, ok := errors.AsType[*ExecutionError](err)
			if !ok || ee.ExceptionType != "IndexError" || ee.NodeID != "2" || ee.NodeType != "ImageToMask" ||
				ee.PromptID != "907e62f8-52bc-4276-a5c3-968187ef9697" || len(ee.Traceback) == 0 || !IsPermanent(err) {
				t.Fatalf("Run: %#v, want a permanent IndexError", err)
			}
			if got := p.nodes(); !reflect.DeepEqual(got, []string{"1", "2"}) {
				t.Errorf("node changes %v", got)
			}
		}},
		{ws: "ws_6_progress_binary_plain_client.jsonl", post: "36", history: "37",
			check: ok(nil, false, []string{"1", "2"}, stepsOf("2", 4))},
		{ws: "ws_7_progress_binary_feature_flag_client.jsonl", post: "38", history: "37", clientID: "acceptance-ff-ed731530",
			derived: []string{"9d9714c0-67f7-4a52-a13f-81e7849fcb3d", "36f38381-8605-4244-b040-80671d67a790"},
			check:   ok(nil, false, []string{"1", "2"}, stepsOf("2", 3))},
		{ws: "ws_8_slow_queue_interrupt.jsonl", post: "39", history: "49", check: func(t *testing.T, res Result, err error, p *progressLog) {
			ie, ok := errors.AsType[*InterruptedError](err)
			if !ok || !errors.Is(err, ErrInterrupted) || ie.NodeID != "2" || ie.NodeType != "SaveImageWebsocket" || IsPermanent(err) {
				t.Fatalf("Run: %v, want interrupted in node 2", err)
			}
			if got := p.steps(); !reflect.DeepEqual(got, stepsOf("2", 300)[:264]) {
				t.Errorf("progress: %d steps, want 0..263 of 300", len(got))
			}
		}},
		{ws: "ws_8_slow_queue_interrupt.jsonl", post: "40", history: "12",
			derived: []string{"61b8ded9-2c66-4167-b4bb-021628f05a63", "d8a8df6b-d207-4f43-8729-c46e6527f7e6", "acceptance_0", "acceptance_c_0"},
			check:   ok([]Output{image("4", "acceptance_c_00001_.png", "output")}, false, []string{"1", "2", "3", "4"}, nil)},
		{ws: "ws_9_slow_stock_complete.jsonl", post: "51", history: "52",
			check: ok([]Output{image("99", "ComfyUI_temp_kyhev_00001_.png", "temp")}, false, []string{"1", "10", "11", "12", "99"}, nil)},
		{ws: "ws_9c_load_image.jsonl", post: "58", history: "59",
			check: ok([]Output{image("3", "acceptance_loaded_00001_.png", "output")}, false, []string{"1", "2", "3"}, nil)},
		{ws: "ws_A_same_client_id_during_run.jsonl", post: "58", history: "59",
			check: ok([]Output{image("3", "acceptance_loaded_00001_.png", "output")}, false, []string{"1", "2", "3"}, nil)},
		{ws: "ws_A.jsonl", post: "34", history: "35", check: func(t *testing.T, res Result, err error, p *progressLog) {
			if ee, ok := errors.AsType[*ExecutionError](err); !ok || ee.ExceptionType != "IndexError" {
				t.Fatalf("Run: %v, want the IndexError of the fourth prompt", err)
			}
			if got := p.nodes(); !reflect.DeepEqual(got, []string{"1", "2"}) {
				t.Errorf("node changes %v: other prompts' messages leaked", got)
			}
		}},
	} {
		t.Run(tc.ws+"/"+tc.post, func(t *testing.T) {
			t.Parallel()
			clientID := tc.clientID
			if clientID == "" {
				clientID = testClientID
			}
			post := loadExchange(t, tc.post)
			id := promptIDOf(t, post)
			rp := newReplay(t)
			rp.serve(post)
			rp.on("GET", "/queue", jsonResponder(200, emptyQueue))
			if tc.history != "" {
				rp.on("GET", "/history/"+id, derivedHistory(t, tc.history, tc.derived...))
			}
			rp.script(promptScript(t, tc.ws, -1))
			c := newTestClient(t, rp, WithClientID(clientID))

			var p progressLog
			res, err := c.Run(testContext(t), graphOf(t, post), id, p.add)
			if err == nil && res.PromptID != id {
				t.Errorf("Result for %s, want %s", res.PromptID, id)
			}
			tc.check(t, res, err, &p)
			checkOneSubmission(t, rp, id, clientID)
			// The socket heard each run whole: the outcome comes from it, and it is
			// what the recorded history says.
			if n := len(rp.recorded("GET", "/history/"+id)); n != 0 {
				t.Errorf("%d history requests, want none", n)
			}
			if err == nil && tc.history != "" {
				var m map[string]json.RawMessage
				if err := json.Unmarshal(derivedHistory(t, tc.history, tc.derived...).body, &m); err != nil {
					t.Fatal(err)
				}
				h, err := parseHistoryEntry(id, m[id])
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(res.Outputs, h.Outputs) || res.Cached != h.AllCached() {
					t.Errorf("Result %+v; history has outputs %+v, all cached %v", res, h.Outputs, h.AllCached())
				}
			}
			checkStopped(t, c)
			if n := len(rp.recorded("POST", "/interrupt")); n != 0 {
				t.Errorf("%d interrupts sent", n)
			}
		})
	}
}

// TestRunReconnectsAfterDrop drops the websocket mid-prompt; the new socket
// hears nothing more, and history answers the success.
func TestRunReconnectsAfterDrop(t *testing.T) {
	post := loadExchange(t, "10")
	id := promptIDOf(t, post)
	rp := newReplay(t)
	rp.serve(post)
	rp.serve(loadExchange(t, "12"))
	rp.serve(loadExchange(t, "13"))
	reconnect, _ := connectSteps(t, loadWS(t, "ws_A_reconnect.jsonl"))
	rp.script(promptScript(t, "ws_1_good.jsonl", 8), reconnect)
	c := newTestClient(t, rp)

	var p progressLog
	res, err := c.Run(testContext(t), graphOf(t, post), id, p.add)
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if want := []Output{image("4", "acceptance_00001_.png", "output")}; !reflect.DeepEqual(res.Outputs, want) {
		t.Errorf("outputs %+v", res.Outputs)
	}
	if got := p.nodes(); !reflect.DeepEqual(got, []string{"1"}) {
		t.Errorf("node changes %v, want [1] before the drop", got)
	}
	if n := len(rp.recorded("GET", "/ws")); n != 2 {
		t.Errorf("%d websocket connections, want 2", n)
	}
	checkOneSubmission(t, rp, id, testClientID)
	checkStopped(t, c)
}

// TestRunReadsHistoryAfterAGap drops the websocket after the prompt started; the
// new socket hears the rest of the run but not the output node's executed
// message, sent while it was down. The outputs come from history.
func TestRunReadsHistoryAfterAGap(t *testing.T) {
	post := loadExchange(t, "10")
	id := promptIDOf(t, post)
	rp := newReplay(t)
	rp.serve(post)
	running := loadExchange(t, "11").responder(t)
	rp.on("GET", "/queue", running, running, running, running, running)
	rp.on("GET", "/history/"+id, derivedHistory(t, "12"))
	steps, rest := connectSteps(t, loadWS(t, "ws_1_good.jsonl"))
	const dropAt, executedAt = 8, 15
	if typ, _ := rest[executedAt].msg(); typ != "executed" {
		t.Fatalf("frame %d of ws_1_good is %s, want executed", executedAt, typ)
	}
	after := steps
	for i, r := range rest[dropAt:] {
		if dropAt+i != executedAt {
			after = append(after, r.step(t))
		}
	}
	rp.script(promptScript(t, "ws_1_good.jsonl", dropAt), after)
	c := newTestClient(t, rp)

	res, err := c.Run(testContext(t), graphOf(t, post), id, nil)
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if want := []Output{image("4", "acceptance_00001_.png", "output")}; !reflect.DeepEqual(res.Outputs, want) {
		t.Errorf("outputs %+v, want %+v from history", res.Outputs, want)
	}
	if n := len(rp.recorded("GET", "/history/"+id)); n == 0 {
		t.Error("history never read")
	}
	checkOneSubmission(t, rp, id, testClientID)
	checkStopped(t, c)
}

// TestRunPollsWhileWebsocketDown drops the websocket and refuses reconnection:
// Run follows the prompt through /queue until /history has it.
func TestRunPollsWhileWebsocketDown(t *testing.T) {
	post := loadExchange(t, "10")
	id := promptIDOf(t, post)
	rp := newReplay(t)
	rp.serve(post)
	rp.serve(loadExchange(t, "12"))
	running := loadExchange(t, "11").responder(t)
	rp.on("GET", "/queue", running, running, running, loadExchange(t, "13").responder(t))
	rp.script(promptScript(t, "ws_1_good.jsonl", 6), []wsStep{{reject: 503}})
	c := newTestClient(t, rp)

	res, err := c.Run(testContext(t), graphOf(t, post), id, nil)
	if err != nil || len(res.Outputs) != 1 {
		t.Fatalf("Run = %+v, %v", res, err)
	}
	if n := len(rp.recorded("GET", "/queue")); n < 4 {
		t.Errorf("queue read %d times, want >= 4", n)
	}
	if n := len(rp.recorded("GET", "/ws")); n < 2 {
		t.Errorf("%d websocket attempts, want reconnection attempts", n)
	}
	checkOneSubmission(t, rp, id, testClientID)
	checkStopped(t, c)
}

// TestRunInterruptSeenAfterReconnect replays the recorded reconnection: the
// first socket stops after node 10 starts, the second (same clientId) gets
// the rest, including executing without prompt_id and the interrupt.
func TestRunInterruptSeenAfterReconnect(t *testing.T) {
	post := loadExchange(t, "53")
	id := promptIDOf(t, post)
	rp := newReplay(t)
	rp.serve(post)
	rp.serve(loadExchange(t, "55"))
	rp.on("GET", "/queue", queueWith(id, true))
	first := promptScript(t, "ws_9b_slow_stock_interrupted_seen_by_A.jsonl", -1)
	rp.script(append(first, wsStep{drop: true}), promptScript(t, "ws_9b_slow_stock_interrupted_seen_by_A3.jsonl", -1))
	c := newTestClient(t, rp)

	var p progressLog
	_, err := c.Run(testContext(t), graphOf(t, post), id, p.add)
	ie, ok := errors.AsType[*InterruptedError](err)
	if !ok || ie.NodeID != "11" || ie.NodeType != "ImageScale" || ie.PromptID != id {
		t.Fatalf("Run: %v, want interrupted in node 11", err)
	}
	if got := p.nodes(); !reflect.DeepEqual(got, []string{"1", "10", "11"}) {
		t.Errorf("node changes %v", got)
	}
	checkOneSubmission(t, rp, id, testClientID)
	checkStopped(t, c)
}

// TestRunPromptLost: the socket drops and the server knows nothing of the
// prompt any more (restarted).
func TestRunPromptLost(t *testing.T) {
	post := loadExchange(t, "10")
	id := promptIDOf(t, post)
	rp := newReplay(t)
	rp.serve(post)
	rp.on("GET", "/history/"+id, jsonResponder(200, "{}"))
	rp.on("GET", "/queue", jsonResponder(200, emptyQueue))
	reconnect, _ := connectSteps(t, loadWS(t, "ws_A_reconnect.jsonl"))
	rp.script(promptScript(t, "ws_1_good.jsonl", 6), reconnect)
	c := newTestClient(t, rp)

	_, err := c.Run(testContext(t), graphOf(t, post), id, nil)
	if !errors.Is(err, ErrPromptLost) || IsPermanent(err) {
		t.Fatalf("Run: %v, want transient ErrPromptLost", err)
	}
	checkOneSubmission(t, rp, id, testClientID)
}

// TestRunCancelInterruptsRunningPrompt cancels Run while node 10 runs.
func TestRunCancelInterruptsRunningPrompt(t *testing.T) {
	post := loadExchange(t, "51")
	id := promptIDOf(t, post)
	rp := newReplay(t)
	rp.serve(post)
	rp.on("GET", "/queue", queueWith(id, true))
	rp.serve(loadExchange(t, "54"))
	rp.script(promptScript(t, "ws_9_slow_stock_complete.jsonl", -1)[:2+9])
	c := newTestClient(t, rp)

	ctx, cancel := context.WithCancel(testContext(t))
	defer cancel()
	_, err := c.Run(ctx, graphOf(t, post), id, func(p Progress) {
		if p.Node == "10" {
			cancel()
		}
	})
	if !errors.Is(err, context.Canceled) || IsPermanent(err) {
		t.Fatalf("Run: %v, want context.Canceled", err)
	}
	postedJSON(t, rp, "/interrupt", fmt.Sprintf(`{"prompt_id": %q}`, id))
	if n := len(rp.recorded("POST", "/queue")); n != 0 {
		t.Errorf("running prompt deleted from the queue %d times", n)
	}
	checkOneSubmission(t, rp, id, testClientID)
	checkStopped(t, c)
}

// TestRunCancelDeletesPendingPrompt cancels Run while the prompt waits in the
// queue: it is deleted, and nothing is interrupted.
func TestRunCancelDeletesPendingPrompt(t *testing.T) {
	post := loadExchange(t, "40")
	id := promptIDOf(t, post)
	rp := newReplay(t)
	rp.serve(post)
	rp.on("GET", "/queue", queueWith(id, false))
	rp.serve(loadExchange(t, "45"))
	rp.script([]wsStep{{text: connectStatus}})
	c := newTestClient(t, rp)

	ctx, cancel := context.WithCancel(testContext(t))
	defer cancel()
	go func() {
		if rp.waitPosts(ctx, 1) {
			cancel()
		}
	}()
	_, err := c.Run(ctx, graphOf(t, post), id, nil)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Run: %v, want context.Canceled", err)
	}
	postedJSON(t, rp, "/queue", fmt.Sprintf(`{"delete": [%q]}`, id))
	if n := len(rp.recorded("POST", "/interrupt")); n != 0 {
		t.Errorf("pending prompt interrupted %d times", n)
	}
	checkStopped(t, c)
}

// TestRunPromptExists: a newer server refuses a known prompt_id with 409;
// Run reports ErrPromptExists and Await then follows the existing prompt on
// the same websocket.
func TestRunPromptExists(t *testing.T) {
	post := loadExchange(t, "10")
	id := promptIDOf(t, post)
	rp := newReplay(t)
	rp.on("POST", "/prompt", jsonResponder(409, `{"error": {"type": "prompt_id_exists", "message": "Prompt ID already exists"}}`))
	rp.serve(loadExchange(t, "11"))
	rp.serve(loadExchange(t, "12"))
	steps, rest := connectSteps(t, loadWS(t, "ws_1_good.jsonl"))
	steps = append(steps, wsStep{awaitGet: "/queue"}) // Await's first check
	for _, r := range rest {
		steps = append(steps, r.step(t))
	}
	rp.script(steps)
	c := newTestClient(t, rp)
	ctx := testContext(t)

	_, err := c.Run(ctx, graphOf(t, post), id, nil)
	if !errors.Is(err, ErrPromptExists) || !isHTTPStatus(err, 409) || IsPermanent(err) {
		t.Fatalf("Run: %v, want ErrPromptExists", err)
	}
	checkOneSubmission(t, rp, id, testClientID)

	var p progressLog
	res, err := c.Await(ctx, id, p.add)
	if err != nil || res.PromptID != id || len(res.Outputs) != 1 {
		t.Fatalf("Await = %+v, %v", res, err)
	}
	if n := len(rp.recorded("POST", "/prompt")); n != 1 {
		t.Errorf("Await posted the prompt again")
	}
	if n := len(rp.recorded("GET", "/ws")); n != 1 {
		t.Errorf("%d websocket connections, want one for Run and Await", n)
	}
	checkStopped(t, c)
}

// TestRunOutOfMemory: an OOM execution_error is an ExecutionError that is not
// permanent.
func TestRunOutOfMemory(t *testing.T) {
	post := loadExchange(t, "10")
	id := promptIDOf(t, post)
	rp := newReplay(t)
	rp.serve(post)
	oom := fmt.Sprintf(`{"type": "execution_error", "data": {"prompt_id": %q, "node_id": "3", "node_type": "KSampler", "executed": ["1", "2"], "exception_message": "CUDA out of memory. Tried to allocate 2.00 GiB", "exception_type": "torch.OutOfMemoryError", "traceback": ["..."], "current_inputs": {}, "current_outputs": [], "timestamp": 1}}`, id)
	rp.script([]wsStep{{text: connectStatus}, {awaitPost: 1}, {text: oom}})
	c := newTestClient(t, rp)

	_, err := c.Run(testContext(t), graphOf(t, post), id, nil)
	ee, ok := errors.AsType[*ExecutionError](err)
	if !ok || !ee.OutOfMemory() || ee.NodeType != "KSampler" || IsPermanent(err) {
		t.Fatalf("Run: %v, want a transient out-of-memory ExecutionError", err)
	}
}

// TestRunServerAssignsOwnID: a server that ignores the requested prompt_id
// answers with its own; Run follows that one.
func TestRunServerAssignsOwnID(t *testing.T) {
	post := loadExchange(t, "10")
	id := promptIDOf(t, post)
	rp := newReplay(t)
	rp.serve(post)
	rp.serve(loadExchange(t, "12"))
	rp.serve(loadExchange(t, "13"))
	rp.script(promptScript(t, "ws_1_good.jsonl", -1))
	c := newTestClient(t, rp)

	res, err := c.Run(testContext(t), graphOf(t, post), "", nil)
	if err != nil || res.PromptID != id || len(res.Outputs) != 1 {
		t.Fatalf("Run = %+v, %v", res, err)
	}
	checkStopped(t, c)
}

// TestConcurrentRunsShareOneSocket runs the three prompts of ws_8 at once on
// one Client: a single websocket carries them, and each Run gets only its
// prompt's messages.
func TestConcurrentRunsShareOneSocket(t *testing.T) {
	slow, front, behind := loadExchange(t, "39"), loadExchange(t, "42"), loadExchange(t, "40")
	rp := newReplay(t)
	rp.servePrompts(slow, front, behind)
	rp.on("GET", "/queue", jsonResponder(200, emptyQueue))
	rp.serve(loadExchange(t, "49"))
	for _, e := range []*exchange{front, behind} {
		prefix := graphOf(t, e)["4"].(map[string]any)["inputs"].(map[string]any)["filename_prefix"].(string)
		rp.on("GET", "/history/"+promptIDOf(t, e), derivedHistory(t, "12",
			"61b8ded9-2c66-4167-b4bb-021628f05a63", promptIDOf(t, e), "acceptance_0", prefix+"_0"))
	}
	steps, rest := connectSteps(t, loadWS(t, "ws_8_slow_queue_interrupt.jsonl"))
	steps = append(steps, wsStep{awaitPost: 3})
	for _, r := range rest {
		steps = append(steps, r.step(t))
	}
	rp.script(steps)
	c := newTestClient(t, rp)
	ctx := testContext(t)

	type outcome struct {
		res Result
		err error
		log *progressLog
	}
	results := make([]outcome, 3)
	var wg sync.WaitGroup
	for i, e := range []*exchange{slow, front, behind} {
		wg.Go(func() {
			results[i].log = &progressLog{}
			results[i].res, results[i].err = c.Run(ctx, graphOf(t, e), promptIDOf(t, e), results[i].log.add)
		})
	}
	wg.Wait()

	if !errors.Is(results[0].err, ErrInterrupted) || len(results[0].log.steps()) != 264 {
		t.Errorf("slow prompt: %v with %d progress steps", results[0].err, len(results[0].log.steps()))
	}
	for i, name := range map[int]string{1: "acceptance_front_00001_.png", 2: "acceptance_c_00001_.png"} {
		r := results[i]
		if r.err != nil || !reflect.DeepEqual(r.res.Outputs, []Output{image("4", name, "output")}) {
			t.Errorf("prompt %d: %+v, %v", i, r.res, r.err)
		}
		if got := r.log.nodes(); !reflect.DeepEqual(got, []string{"1", "2", "3", "4"}) || len(r.log.steps()) != 0 {
			t.Errorf("prompt %d: progress %v %v", i, got, r.log.steps())
		}
	}
	if n := len(rp.recorded("GET", "/ws")); n != 1 {
		t.Errorf("%d websocket connections, want one shared", n)
	}
	if n := len(rp.recorded("POST", "/prompt")); n != 3 {
		t.Errorf("%d prompts posted, want 3", n)
	}
	checkStopped(t, c)
}

// TestRunAdoptsPromptQueuedDespiteLostResponse: the connection breaks before
// POST /prompt is answered, but the server queued the prompt; Run follows it
// rather than failing (and the caller submitting it again).
func TestRunAdoptsPromptQueuedDespiteLostResponse(t *testing.T) {
	post := loadExchange(t, "10")
	id := promptIDOf(t, post)
	rp := newReplay(t)
	rp.on("POST", "/prompt", responder{hangUp: true})
	rp.serve(loadExchange(t, "11"))
	rp.serve(loadExchange(t, "12"))
	rp.script(promptScript(t, "ws_1_good.jsonl", -1))
	c := newTestClient(t, rp)

	res, err := c.Run(testContext(t), graphOf(t, post), id, nil)
	if err != nil || len(res.Outputs) != 1 {
		t.Fatalf("Run = %+v, %v", res, err)
	}
	checkOneSubmission(t, rp, id, testClientID)
}

// TestRunSubmitLostInTransit: the connection breaks and the prompt is not on
// the server: Run returns the transient transport error.
func TestRunSubmitLostInTransit(t *testing.T) {
	post := loadExchange(t, "10")
	id := promptIDOf(t, post)
	rp := newReplay(t)
	rp.on("POST", "/prompt", responder{hangUp: true})
	rp.serve(loadExchange(t, "13"))
	rp.on("GET", "/history/"+id, jsonResponder(200, "{}"))
	rp.script([]wsStep{{text: connectStatus}})
	c := newTestClient(t, rp)

	_, err := c.Run(testContext(t), graphOf(t, post), id, nil)
	if err == nil || IsPermanent(err) || !strings.HasPrefix(err.Error(), "comfy: submit prompt: ") {
		t.Fatalf("Run: %v, want a transient submit error", err)
	}
	checkOneSubmission(t, rp, id, testClientID)
	checkStopped(t, c)
}
