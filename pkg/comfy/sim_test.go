package comfy

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/google/uuid"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

// startSim starts a simulator whose nodes take a millisecond.
func startSim(t *testing.T) *comfysim.Server {
	t.Helper()
	sim, err := comfysim.Start(comfysim.Config{NodeDuration: time.Millisecond, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	return sim
}

// connections returns how many websocket connections the client's current
// stream made and whether one is up: 0 without a stream.
func connections(c *Client) (n uint64, up bool) {
	c.streamMu.Lock()
	s := c.stream
	c.streamMu.Unlock()
	if s == nil {
		return 0, false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.conn, s.up
}

// tinyGraph is a two-node prompt that the simulator runs in about two node
// durations; i makes each one distinct.
func tinyGraph(i int) Graph {
	return Graph{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 8, "height": 8, "batch_size": 1, "color": i}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "short"}},
	}
}

// TestShortPromptsNeverWaitForTheWatchdog drives many one-millisecond prompts
// through one Client against the simulator, one at a time (the shared
// websocket's last watcher leaves between prompts) and two at a time (one
// running, one queued, as the executor keeps a node busy). Every prompt's
// messages must reach its Run: with the watchdog out of reach, a Run that
// missed them would hit its deadline instead of returning.
func TestShortPromptsNeverWaitForTheWatchdog(t *testing.T) {
	t.Parallel()
	sim := startSim(t)
	c := New(sim.URL(), WithLogger(testLogger(t)))
	t.Cleanup(func() { c.Close() })
	c.watchdogInterval = time.Hour

	const perPrompt = 5 * time.Second
	run := func(i int) error {
		ctx, cancel := context.WithTimeout(context.Background(), perPrompt)
		defer cancel()
		start := time.Now()
		res, err := c.Run(ctx, tinyGraph(i), "", nil)
		switch {
		case err != nil:
			return fmt.Errorf("prompt %d: %w after %s", i, err, time.Since(start).Round(time.Millisecond))
		case len(res.Outputs) != 1:
			return fmt.Errorf("prompt %d: outputs %+v, want one image", i, res.Outputs)
		}
		return nil
	}

	const sequential, paired = 100, 100
	for i := range sequential {
		if err := run(i); err != nil {
			t.Fatalf("one at a time: %v", err)
		}
	}
	next := make(chan int)
	errs := make(chan error, 2)
	var wg sync.WaitGroup
	for range 2 {
		wg.Go(func() {
			for i := range next {
				if err := run(i); err != nil {
					errs <- err
					return
				}
			}
		})
	}
feed:
	for i := sequential; i < sequential+paired; i++ {
		select {
		case next <- i:
		case err := <-errs:
			t.Errorf("two at a time: %v", err)
			break feed
		}
	}
	close(next)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("two at a time: %v", err)
	}
	if got := sim.Stats().Completed; got != sequential+paired && !t.Failed() {
		t.Errorf("simulator completed %d prompts, want %d", got, sequential+paired)
	}
	if n, _ := connections(c); n != 1 {
		t.Errorf("%d websocket connections, want one kept for every prompt", n)
	}
}

// TestDeafSocketIsRedialled: another connection with the client's id takes
// the client's registration on the server and ends, as a stale connection of
// the same id does when the server notices it late. The client's socket stays
// open but hears nothing; the next Run notices that its submission was not
// even followed by the status broadcast, follows its prompt by polling, and
// drops the socket, so that the Run after it hears its prompt again.
func TestDeafSocketIsRedialled(t *testing.T) {
	t.Parallel()
	sim := startSim(t)
	c := New(sim.URL(), WithLogger(testLogger(t)), WithClientID("deaf"), WithPollInterval(20*time.Millisecond))
	t.Cleanup(func() { c.Close() })
	c.watchdogInterval = time.Hour
	c.silenceTimeout = 100 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Run(ctx, tinyGraph(1), "", nil); err != nil {
		t.Fatal(err)
	}

	intruder, _, err := websocket.Dial(ctx, strings.Replace(sim.URL(), "http", "ws", 1)+"/ws?clientId=deaf", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := intruder.Read(ctx); err != nil { // the greeting: it is registered
		t.Fatal(err)
	}
	intruder.CloseNow()

	if _, err := c.Run(ctx, tinyGraph(2), "", nil); err != nil {
		t.Fatalf("Run on a deaf socket: %v", err)
	}
	// The server may handle the end of the dropped socket only after the
	// next one registered, which is then deaf too: the client recovers the
	// same way.
	for i := range 5 {
		var p progressLog
		if _, err := c.Run(ctx, tinyGraph(3+i), "", p.add); err != nil {
			t.Fatal(err)
		}
		if len(p.nodes()) > 0 {
			return
		}
	}
	t.Error("no Run heard its prompt after the socket went deaf")
}

// TestPromptOutlivesADeafReconnection: the websocket drops while a prompt renders
// and comes back, and the server then forgets it, as ComfyUI does when the dropped
// socket's end reaches it after the new one registered. The Run follows its prompt
// to the end by polling, not by the watchdog.
func TestPromptOutlivesADeafReconnection(t *testing.T) {
	t.Parallel()
	sim, err := comfysim.Start(comfysim.Config{StepDuration: 20 * time.Millisecond, NodeDuration: time.Millisecond, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	c := New(sim.URL(), WithLogger(testLogger(t)), WithClientID("flaky"), WithPollInterval(20*time.Millisecond))
	t.Cleanup(func() { c.Close() })
	c.watchdogInterval = time.Hour
	c.reconnectMin = time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()

	var g Graph
	if err := json.Unmarshal([]byte(`{
  "3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 40, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
  "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
  "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
  "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a lighthouse", "clip": ["4", 1]}},
  "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text", "clip": ["4", 1]}},
  "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
  "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "deaf", "images": ["8", 0]}}
}`), &g); err != nil {
		t.Fatal(err)
	}
	sampling := make(chan struct{})
	var once sync.Once
	type result struct {
		res Result
		err error
	}
	ran := make(chan result, 1)
	go func() {
		res, err := c.Run(ctx, g, "", func(p Progress) {
			if p.Max > 0 {
				once.Do(func() { close(sampling) })
			}
		})
		ran <- result{res, err}
	}()
	select {
	case <-sampling:
	case r := <-ran:
		t.Fatalf("Run ended before sampling: %+v, %v", r.res, r.err)
	}

	// Another socket takes the client's id; the client's socket drops and comes
	// back; then the other socket ends, and the server forgets the client's.
	intruder, _, err := websocket.Dial(ctx, strings.Replace(sim.URL(), "http", "ws", 1)+"/ws?clientId=flaky", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := intruder.Read(ctx); err != nil { // the greeting: it is registered
		t.Fatal(err)
	}
	before, _ := connections(c)
	c.streamMu.Lock()
	c.stream.redial(before)
	c.streamMu.Unlock()
	fleettest.Eventually(t, 10*time.Second, func() bool {
		n, up := connections(c)
		return n > before && up
	}, "the websocket did not come back")
	intruder.CloseNow()

	r := <-ran
	if r.err != nil {
		t.Fatalf("Run after a deaf reconnection: %v", r.err)
	}
	if len(r.res.Outputs) != 1 {
		t.Errorf("outputs %+v, want the saved image", r.res.Outputs)
	}
}

// TestIdleSocketCloses: the socket outlives a Run by the idle timeout, then
// closes; the next Run connects again.
func TestIdleSocketCloses(t *testing.T) {
	t.Parallel()
	sim := startSim(t)
	c := New(sim.URL(), WithLogger(testLogger(t)))
	t.Cleanup(func() { c.Close() })
	c.idleTimeout = 20 * time.Millisecond
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i := range 2 {
		if _, err := c.Run(ctx, tinyGraph(i), "", nil); err != nil {
			t.Fatal(err)
		}
		c.streamMu.Lock()
		s := c.stream
		c.streamMu.Unlock()
		if s == nil {
			t.Fatal("no websocket stream right after Run")
		}
		fleettest.Eventually(t, 5*time.Second, func() bool {
			select {
			case <-s.done:
				return true
			default:
				return false
			}
		}, "the idle websocket stayed open")
		if n, _ := connections(c); n != 0 {
			t.Errorf("a retired stream is still the client's")
		}
	}
}

// lateSubmit is a transport whose POST /prompt cancels the Run that sends it, as a
// drain or removal of the node would while the request is in flight. A request the
// client gave up on still reaches the server, after the client's next look at the
// queue: the server had read it whole and queues it late.
type lateSubmit struct {
	base      http.RoundTripper
	cancelRun context.CancelFunc
	wg        sync.WaitGroup
	queueRead chan struct{}
	once      sync.Once
}

func (l *lateSubmit) RoundTrip(req *http.Request) (*http.Response, error) {
	switch {
	case req.Method == http.MethodPost && req.URL.Path == "/prompt":
		l.cancelRun()
		if err := req.Context().Err(); err != nil {
			late := req.Clone(context.Background())
			l.wg.Go(func() {
				select {
				case <-l.queueRead:
				case <-time.After(5 * time.Second):
				}
				if resp, err := l.base.RoundTrip(late); err == nil {
					resp.Body.Close()
				}
			})
			return nil, err
		}
	case req.Method == http.MethodGet && req.URL.Path == "/queue":
		resp, err := l.base.RoundTrip(req)
		l.once.Do(func() { close(l.queueRead) })
		return resp, err
	}
	return l.base.RoundTrip(req)
}

// TestRunCancelledDuringSubmissionLeavesNothingRunning: a Run cancelled while its
// POST /prompt is in flight waits for the answer, then removes the prompt, so that
// ComfyUI does not render a prompt nobody follows.
func TestRunCancelledDuringSubmissionLeavesNothingRunning(t *testing.T) {
	t.Parallel()
	sim, err := comfysim.Start(comfysim.Config{NodeDuration: 500 * time.Millisecond, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sim.Close() })
	ctx, cancel := context.WithCancel(testContext(t))
	defer cancel()
	tr := &lateSubmit{base: http.DefaultTransport.(*http.Transport).Clone(), cancelRun: cancel, queueRead: make(chan struct{})}
	t.Cleanup(tr.wg.Wait)
	c := New(sim.URL(), WithLogger(testLogger(t)), WithHTTPClient(&http.Client{Transport: tr}))
	t.Cleanup(func() { c.Close() })

	if _, err := c.Run(ctx, tinyGraph(1), uuid.NewString(), nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("Run: %v, want context.Canceled", err)
	}
	fleettest.Eventually(t, 10*time.Second, func() bool {
		q, err := c.Queue(testContext(t))
		return err == nil && sim.Stats().Prompts == 1 && len(q.Running) == 0 && len(q.Pending) == 0
	}, "the prompt never reached the simulator, or it still runs")
	if st := sim.Stats(); len(st.Rendered) != 0 {
		t.Errorf("the simulator rendered %v; want the prompt of the cancelled Run removed or interrupted", st.Rendered)
	}
}
