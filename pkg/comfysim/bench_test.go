package comfysim_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
)

// cpuTime is the CPU time the process used so far, user and system.
func cpuTime(tb testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatalf("getrusage: %v", err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// rss is the process's resident set size in bytes, from /proc/self/status.
func rss(tb testing.TB) int64 {
	f, err := os.Open("/proc/self/status")
	if err != nil {
		tb.Skipf("resident set size: %v", err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
			if err != nil {
				tb.Fatalf("VmRSS %q: %v", rest, err)
			}
			return kb << 10
		}
	}
	tb.Skip("no VmRSS in /proc/self/status")
	return 0
}

// idleSocket is a websocket to a simulator that only reads, as the comfy
// client keeps one open per node.
func idleSocket(tb testing.TB, base, clientID string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, _, err := websocket.Dial(ctx, strings.Replace(base, "http://", "ws://", 1)+"/ws?clientId="+clientID, nil)
	if err != nil {
		tb.Fatalf("dial: %v", err)
	}
	if _, _, err := conn.Read(ctx); err != nil { // the greeting
		tb.Fatalf("greeting: %v", err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			if _, _, err := conn.Read(context.Background()); err != nil {
				return
			}
		}
	}()
	tb.Cleanup(func() {
		conn.CloseNow()
		<-done
	})
}

// BenchmarkIdleServers measures what N simulators cost while nothing runs,
// each with one open websocket as the executor keeps: goroutines, live heap
// and stacks, resident memory and CPU per server, over an idle second (the
// reading side of each websocket, in the same process, is included). Run it
// once per size:
//
//	go test ./pkg/comfysim -run '^$' -bench IdleServers -benchtime 1x
func BenchmarkIdleServers(b *testing.B) {
	for _, n := range []int{16, 500} {
		b.Run(fmt.Sprintf("servers=%d", n), func(b *testing.B) {
			for b.Loop() {
				measureIdle(b, n)
			}
		})
	}
}

// liveBytes is the memory held by live heap objects and goroutine stacks
// after a collection.
func liveBytes() int64 {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapAlloc + ms.StackInuse)
}

func measureIdle(b *testing.B, n int) {
	const window = time.Second
	live := liveBytes()
	goroutines, mem := runtime.NumGoroutine(), rss(b)
	quiet := slog.New(slog.DiscardHandler)
	for i := range n {
		sim, err := comfysim.Start(comfysim.Config{Logger: quiet})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { sim.Close() })
		idleSocket(b, sim.URL(), fmt.Sprintf("idle-%d", i))
	}
	b.ReportMetric(float64(liveBytes()-live)/float64(n)/1024, "KiB-live/server")
	b.ReportMetric(float64(runtime.NumGoroutine()-goroutines)/float64(n), "goroutines/server")
	b.ReportMetric(float64(rss(b)-mem)/float64(n)/1024, "KiB-RSS/server")

	before := cpuTime(b)
	time.Sleep(window) // the measurement window: nothing to wait for
	idle := cpuTime(b) - before
	b.ReportMetric(float64(idle.Microseconds())/window.Seconds(), "cpu-µs/s")
	b.ReportMetric(float64(idle.Nanoseconds())/window.Seconds()/float64(n), "cpu-ns/s/server")
}

// demoGraph is the shipped demo workflow (workflows/demo.json): a 512×512
// colour, inverted, scaled to 256×256 and saved.
func demoGraph(color int) string {
	return fmt.Sprintf(`{
  "1": {"class_type": "EmptyImage", "inputs": {"width": 512, "height": 512, "batch_size": 1, "color": %d}},
  "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
  "3": {"class_type": "ImageScale", "inputs": {"image": ["2", 0], "upscale_method": "bilinear", "width": 256, "height": 256, "crop": "disabled"}},
  "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": "bench"}}
}`, color)
}

// BenchmarkScene runs one-millisecond-a-node scenes through a simulator as
// the executor does: POST /prompt, the websocket messages up to the end
// marker, GET /history/{id} and GET /view of the image. Every node runs
// (DisableCache, as for scenes that differ in their seeds). The demo
// workflow with its default parameters repeats its colour; new-colour scenes
// miss the simulator's cache of encoded images. cpu-µs/scene is the whole
// process, client and simulator; the simulator's share shows with
//
//	go test ./pkg/comfysim -run '^$' -bench Scene -cpuprofile /tmp/scene.prof
//	go tool pprof -tags /tmp/scene.prof   # side: sim / client
func BenchmarkScene(b *testing.B) {
	for _, tc := range []struct {
		name  string
		graph func(int) string
	}{
		{"demo-default-colour", func(int) string { return demoGraph(16744448) }},
		{"demo-new-colour", demoGraph},
		{"tiny-new-colour", func(i int) string { return tiny(i, "bench") }},
	} {
		b.Run(tc.name, func(b *testing.B) {
			var sim *comfysim.Server
			pprof.Do(context.Background(), pprof.Labels("side", "sim"), func(context.Context) {
				var err error
				sim, err = comfysim.Start(comfysim.Config{NodeDuration: time.Millisecond, DisableCache: true, Logger: slog.New(slog.DiscardHandler)})
				if err != nil {
					b.Fatal(err)
				}
			})
			b.Cleanup(func() { sim.Close() })
			pprof.Do(context.Background(), pprof.Labels("side", "client"), func(ctx context.Context) {
				sc := newSceneClient(b, sim.URL())
				i := 0
				start := cpuTime(b)
				for b.Loop() {
					sc.run(ctx, tc.graph(i%0xffffff))
					i++
				}
				b.ReportMetric(float64((cpuTime(b)-start).Microseconds())/float64(i), "cpu-µs/scene")
			})
		})
	}
}

// sceneClient is a minimal ComfyUI client: enough to drive scenes without
// measuring the comfy package's own cost.
type sceneClient struct {
	tb   testing.TB
	base string
	http *http.Client
	ws   *websocket.Conn
}

func newSceneClient(tb testing.TB, base string) *sceneClient {
	tr := &http.Transport{}
	tb.Cleanup(tr.CloseIdleConnections)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, strings.Replace(base, "http://", "ws://", 1)+"/ws?clientId=bench", nil)
	if err != nil {
		tb.Fatalf("dial: %v", err)
	}
	tb.Cleanup(func() { ws.CloseNow() })
	ws.SetReadLimit(16 << 20)
	if _, _, err := ws.Read(ctx); err != nil {
		tb.Fatalf("greeting: %v", err)
	}
	return &sceneClient{tb: tb, base: base, http: &http.Client{Transport: tr}, ws: ws}
}

func (c *sceneClient) get(ctx context.Context, path string) []byte {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+path, nil)
	if err != nil {
		c.tb.Fatal(err)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		c.tb.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		c.tb.Fatalf("GET %s: %d %v", path, resp.StatusCode, err)
	}
	return body
}

func (c *sceneClient) run(ctx context.Context, graph string) {
	body := `{"prompt": ` + graph + `, "client_id": "bench"}`
	resp, err := c.http.Post(c.base+"/prompt", "application/json", strings.NewReader(body))
	if err != nil {
		c.tb.Fatal(err)
	}
	var sub struct {
		PromptID string `json:"prompt_id"`
	}
	err = json.NewDecoder(resp.Body).Decode(&sub)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		c.tb.Fatalf("POST /prompt: %d %v", resp.StatusCode, err)
	}
	end := []byte(`{"type": "executing", "data": {"node": null, "prompt_id": "` + sub.PromptID + `"}}`)
	for {
		_, frame, err := c.ws.Read(ctx)
		if err != nil {
			c.tb.Fatalf("websocket: %v", err)
		}
		if bytes.Equal(frame, end) {
			break
		}
	}
	var history map[string]struct {
		Outputs map[string]struct {
			Images []struct {
				Filename string `json:"filename"`
			} `json:"images"`
		} `json:"outputs"`
	}
	if err := json.Unmarshal(c.get(ctx, "/history/"+sub.PromptID), &history); err != nil {
		c.tb.Fatal(err)
	}
	for _, out := range history[sub.PromptID].Outputs {
		for _, img := range out.Images {
			c.get(ctx, "/view?type=output&filename="+img.Filename)
		}
	}
}
