package comfysim_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"image"
	"image/gif"
	"image/png"
	"math/rand/v2"
	"mime/multipart"
	"net/http"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
)

func TestTextToImage(t *testing.T) {
	sim := startSim(t, comfysim.Config{StepDuration: time.Millisecond, Name: "NVIDIA GeForce RTX 4090"})
	c := newClient(t, sim.URL())
	ws := dialWS(t, sim.URL(), "t2i", false)

	id, frames := run(t, c, ws, txt2img(12, 42, "t2i"), "t2i")

	var order []string
	var values []float64
	previews := 0
	for _, f := range frames {
		switch {
		case f.typ == "executing" && f.token() != "executing:null":
			order = append(order, frameData(t, f)["node"].(string))
		case f.typ == "progress":
			d := frameData(t, f)
			if d["max"].(float64) != 12 || d["node"] != "3" || d["prompt_id"] != id {
				t.Errorf("progress %v", d)
			}
			values = append(values, d["value"].(float64))
		case f.binary:
			previews++
			if binary.BigEndian.Uint32(f.data) != 1 || binary.BigEndian.Uint32(f.data[4:]) != 2 {
				t.Errorf("preview header % x", f.data[:8])
			}
			if _, err := png.Decode(bytes.NewReader(f.data[8:])); err != nil {
				t.Errorf("preview: %v", err)
			}
		}
	}
	if got := strings.Join(order, ","); got != "4,5,7,6,3,8,9" {
		t.Errorf("execution order %s, want ComfyUI's 4,5,7,6,3,8,9", got)
	}
	if len(values) != 12 || values[0] != 0 || values[11] != 11 || previews != 12 {
		t.Errorf("progress values %v, %d previews; want 0..11 and 12", values, previews)
	}

	out := firstOutput(t, c.history(id), "9", "images")
	if out["filename"] != "t2i_00001_.png" || out["type"] != "output" {
		t.Errorf("output %v", out)
	}
	view := c.get("/view?filename=t2i_00001_.png&type=output")
	img, err := png.Decode(bytes.NewReader(view.body))
	if err != nil || img.Bounds().Dx() != 256 || img.Bounds().Dy() != 256 {
		t.Errorf("saved image: %v, %v", err, img)
	}

	// Another seed renders another image, counted on from the first.
	id2, _ := run(t, c, ws, txt2img(12, 43, "t2i"), "t2i")
	if out := firstOutput(t, c.history(id2), "9", "images"); out["filename"] != "t2i_00002_.png" {
		t.Errorf("second output %v", out)
	}
	view2 := c.get("/view?filename=t2i_00002_.png&type=output")
	if bytes.Equal(view.body, view2.body) {
		t.Errorf("different seeds rendered the same image")
	}
	if st := sim.Stats(); st.Completed != 2 || strings.Join(st.Rendered, ",") != id+","+id2 {
		t.Errorf("stats %+v", st)
	}
}

func TestSystemStatsReportsGPU(t *testing.T) {
	sim := startSim(t, comfysim.Config{Name: "RTX 4090", VRAMTotal: 16 << 30, StepDuration: 20 * time.Millisecond})
	c := newClient(t, sim.URL())
	ws := dialWS(t, sim.URL(), "gpu", false)
	type device struct {
		Name      string `json:"name"`
		Type      string `json:"type"`
		Index     *int   `json:"index"`
		VRAMTotal int64  `json:"vram_total"`
		VRAMFree  int64  `json:"vram_free"`
	}
	stats := func() device {
		var s struct {
			Devices []device `json:"devices"`
		}
		if err := json.Unmarshal(c.get("/system_stats").body, &s); err != nil || len(s.Devices) != 1 {
			t.Fatalf("system_stats: %v", err)
		}
		return s.Devices[0]
	}
	idle := stats()
	if idle.Name != "cuda:0 RTX 4090" || idle.Type != "cuda" || idle.Index == nil || *idle.Index != 0 || idle.VRAMTotal != 16<<30 {
		t.Errorf("device %+v", idle)
	}
	mark := ws.mark()
	id := c.submit(txt2img(50, 1, "vram"), "gpu")
	ws.waitType(mark, "progress", id)
	if busy := stats(); busy.VRAMFree >= idle.VRAMFree {
		t.Errorf("vram_free %d while running, %d idle", busy.VRAMFree, idle.VRAMFree)
	}
	c.postJSON("/interrupt", "")
	ws.waitDone(mark, id)
	loaded := stats()
	c.postJSON("/free", `{"unload_models": true, "free_memory": true}`)
	if freed := stats(); freed.VRAMFree <= loaded.VRAMFree || freed.VRAMFree != idle.VRAMFree {
		t.Errorf("vram_free %d after /free, %d with the model loaded, %d idle", freed.VRAMFree, loaded.VRAMFree, idle.VRAMFree)
	}
}

func TestSpeedScaling(t *testing.T) {
	t.Parallel()
	sim := startSim(t, comfysim.Config{StepDuration: 100 * time.Millisecond, NodeDuration: -1})
	c := newClient(t, sim.URL())
	ws := dialWS(t, sim.URL(), "speed", false)
	// sampling is the time from the sampler's start to the next node's.
	sampling := func(seed uint64) time.Duration {
		_, frames := run(t, c, ws, txt2img(5, seed, "speed"), "speed")
		var start, end time.Time
		for _, f := range frames {
			switch {
			case f.typ == "executing" && strings.Contains(string(f.data), `"node": "3"`):
				start = f.at
			case f.typ == "executing" && strings.Contains(string(f.data), `"node": "8"`):
				end = f.at
			}
		}
		return end.Sub(start)
	}
	// 5 steps of 100 ms: no run at speed 1 takes less than 500 ms, and a loaded
	// machine only makes runs longer. A slower speed shows in that floor raised, a
	// faster one in a run under it (one of several: any run may be slowed). Long
	// steps, so that a loaded machine's delay to each is small beside them. The
	// span is measured between the frames' arrivals: a late first frame shortens
	// it, hence floors of nine tenths.
	const steps = 500 * time.Millisecond
	floor := func(d time.Duration) time.Duration { return d * 9 / 10 }
	if d := sampling(1); d < floor(steps) {
		t.Errorf("5 steps of 100ms took %v at speed 1, want at least %v", d, floor(steps))
	}
	sim.SetSpeed(0.5)
	if d := sampling(2); d < floor(2*steps) {
		t.Errorf("5 steps of 100ms took %v at speed 0.5, want at least %v", d, floor(2*steps))
	}
	sim.SetSpeed(2)
	var runs []time.Duration
	last := steps
	for seed := uint64(3); len(runs) < 10 && last >= floor(steps); seed++ {
		last = sampling(seed)
		runs = append(runs, last)
	}
	if last >= floor(steps) || last < floor(steps/2) {
		t.Errorf("5 steps of 100ms at speed 2 took %v; want one from %v to %v", runs, floor(steps/2), floor(steps))
	}
}

func TestOnePromptAtATime(t *testing.T) {
	sim := startSim(t, comfysim.Config{StepDuration: 2 * time.Millisecond})
	c := newClient(t, sim.URL())
	ws := dialWS(t, sim.URL(), "serial", false)
	mark := ws.mark()
	first := c.submit(txt2img(10, 1, "serial"), "serial")
	second := c.submit(txt2img(10, 2, "serial"), "serial")
	ws.waitType(mark, "execution_start", first)
	var queue struct {
		Running [][]any `json:"queue_running"`
		Pending [][]any `json:"queue_pending"`
	}
	if err := json.Unmarshal(c.get("/queue").body, &queue); err != nil {
		t.Fatal(err)
	}
	if len(queue.Running) != 1 || queue.Running[0][1] != first || len(queue.Pending) != 1 || queue.Pending[0][1] != second {
		t.Errorf("queue while the first runs: %v", queue)
	}
	ws.waitDone(mark, second)
	success := ws.waitType(mark, "execution_success", first)
	start := ws.waitType(mark, "execution_start", second)
	if start < success {
		t.Errorf("second prompt started at frame %d, before the first succeeded at %d", start, success)
	}
}

func TestKillAndRestart(t *testing.T) {
	sim := startSim(t, comfysim.Config{StepDuration: 20 * time.Millisecond})
	c := newClient(t, sim.URL())
	ws := dialWS(t, sim.URL(), "crash", false)

	done, _ := run(t, c, ws, tiny(7, "kept"), "crash")
	mark := ws.mark()
	doomed := c.submit(txt2img(500, 1, "never"), "crash")
	ws.waitType(mark, "progress", doomed)
	sim.Kill()
	if err := ws.waitClosed(); err == nil {
		t.Errorf("websocket closed cleanly by a crash")
	}
	for _, f := range ws.since(mark) {
		if f.typ == "execution_error" || f.typ == "execution_interrupted" || f.token() == "executing:null" {
			t.Errorf("a killed server sent %s", f.data)
		}
	}
	if _, err := c.try(http.MethodGet, "/queue", nil, nil); err == nil {
		t.Errorf("GET /queue answered after Kill")
	}
	if err := sim.Restart(); err != nil {
		t.Fatalf("restart: %v", err)
	}
	if err := sim.Restart(); err == nil {
		t.Errorf("restart of a running server succeeded")
	}
	for _, path := range []string{"/history/" + done, "/history/" + doomed, "/history"} {
		if got := c.get(path); string(got.body) != "{}" {
			t.Errorf("%s after restart: %s", path, got.body)
		}
	}
	if got := c.get("/queue"); string(got.body) != `{"queue_running": [], "queue_pending": []}` {
		t.Errorf("queue after restart: %s", got.body)
	}
	if got := c.get("/view?filename=kept_00001_.png"); got.status != http.StatusOK {
		t.Errorf("output lost by the restart: %d", got.status)
	}
	ws = dialWS(t, sim.URL(), "crash", false)
	id, _ := run(t, c, ws, tiny(8, "kept"), "crash")
	if out := firstOutput(t, c.history(id), "2", "images"); out["filename"] != "kept_00002_.png" {
		t.Errorf("after restart: %v", out)
	}
	if st := sim.Stats(); st.Completed != 2 || st.Failed+st.Interrupted != 0 {
		t.Errorf("stats %+v", st)
	}
}

func TestCloseStopsEveryGoroutine(t *testing.T) {
	sim, err := comfysim.Start(comfysim.Config{StepDuration: 50 * time.Millisecond, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	c := newClient(t, sim.URL())
	ws := dialWS(t, sim.URL(), "closing", true)
	run(t, c, ws, tiny(1, "close"), "closing")
	mark := ws.mark()
	id := c.submit(txt2img(1000, 1, "close"), "closing")
	ws.waitType(mark, "progress", id)
	c.submit(tiny(2, "close"), "closing")

	began := time.Now()
	if err := sim.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	// The running prompt would take 50 s: a close that waited for it shows. The bound
	// leaves room for a loaded machine.
	if d := time.Since(began); d > 10*time.Second {
		t.Errorf("close took %v", d)
	}
	if err := sim.Close(); err != nil {
		t.Errorf("second close: %v", err)
	}
	if err := ws.waitClosed(); websocket.CloseStatus(err) != websocket.StatusGoingAway {
		t.Errorf("websocket close: %v, want status 1001 (going away)", err)
	}
	if err := sim.Restart(); err == nil {
		t.Errorf("restart after close succeeded")
	}
	buf := make([]byte, 1<<20)
	stacks := string(buf[:runtime.Stack(buf, true)])
	for _, g := range strings.Split(stacks, "\n\n") {
		if strings.Contains(g, "pkg/comfysim.") {
			t.Errorf("goroutine left after Close:\n%s", g)
		}
	}
}

// TestEndOfAReplacedSocketUnregistersItsClientID: as in ComfyUI, whose
// websocket handler ends with sockets.pop(sid), a socket that ends after
// another socket took over its client id unregisters the id; the newer
// socket stays open but hears nothing more until the client reconnects.
func TestEndOfAReplacedSocketUnregistersItsClientID(t *testing.T) {
	sim := startSim(t, comfysim.Config{})
	c := newClient(t, sim.URL())
	old := dialWS(t, sim.URL(), "twice", false)
	replacement := dialWS(t, sim.URL(), "twice", false)
	witness := dialWS(t, sim.URL(), "witness", false)
	old.close()

	// The server handles the old socket's end shortly after the close
	// handshake: run prompts until one ends unheard by the replacement.
	deadline := time.Now().Add(waitTimeout)
	for i := 0; ; i++ {
		mark, seen := replacement.mark(), witness.mark()
		c.submit(tiny(i, "twice"), "twice")
		witness.waitFor(seen, "the queue emptied", func(f wsFrame) bool {
			return f.typ == "status" && strings.Contains(string(f.data), `"queue_remaining": 0`)
		})
		if replacement.mark() == mark {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the replacement socket still receives after the old one ended: %v", tokens(replacement.since(mark)))
		}
	}
	replacement.mu.Lock()
	err := replacement.err
	replacement.mu.Unlock()
	if err != nil {
		t.Errorf("the unregistered socket was closed: %v", err)
	}

	again := dialWS(t, sim.URL(), "twice", false)
	mark := again.mark()
	id := c.submit(tiny(0xffffff, "twice"), "twice")
	again.waitDone(mark, id)
}

func TestInterrupt(t *testing.T) {
	sim := startSim(t, comfysim.Config{StepDuration: 10 * time.Millisecond})
	c := newClient(t, sim.URL())
	ws := dialWS(t, sim.URL(), "stop", false)
	mark := ws.mark()
	running := c.submit(txt2img(1000, 1, "stop"), "stop")
	pending := c.submit(tiny(3, "after"), "stop")
	ws.waitType(mark, "progress", running)

	if got := c.postJSON("/interrupt", `{"prompt_id": "`+pending+`"}`); got.status != http.StatusOK || len(got.body) != 0 {
		t.Errorf("interrupt of a pending prompt: %d %s", got.status, got.body)
	}
	c.postJSON("/interrupt", `{"prompt_id": "`+running+`"}`)
	i := ws.waitType(mark, "execution_interrupted", running)
	d := frameData(t, ws.since(i)[0])
	if d["node_id"] != "3" || d["node_type"] != "KSampler" {
		t.Errorf("interrupted at %v", d)
	}
	if executed := fmt.Sprint(d["executed"]); executed != "[4 5 7 6]" {
		t.Errorf("executed %s", executed)
	}
	ws.waitDone(mark, pending)
	entry := c.history(running)
	status := entry["status"].(map[string]any)
	if status["status_str"] != "error" || status["completed"] != false || len(entry["outputs"].(map[string]any)) != 0 {
		t.Errorf("history of the interrupted prompt: %v", entry)
	}
	if st := sim.Stats(); st.Interrupted != 1 || st.Completed != 1 {
		t.Errorf("stats %+v", st)
	}
}

func TestQueueDeleteAndClear(t *testing.T) {
	sim := startSim(t, comfysim.Config{StepDuration: 10 * time.Millisecond})
	c := newClient(t, sim.URL())
	ws := dialWS(t, sim.URL(), "q", false)
	mark := ws.mark()
	head := c.submit(txt2img(1000, 1, "q"), "q")
	ws.waitType(mark, "execution_start", head)
	a := c.submit(tiny(1, "qa"), "q")
	b := c.submit(tiny(2, "qb"), "q")
	d := c.submit(tiny(3, "qc"), "q")
	c.postJSON("/api/queue", `{"delete": ["`+b+`"]}`)
	if got := c.get("/prompt"); string(got.body) != `{"exec_info": {"queue_remaining": 3}}` {
		t.Errorf("after delete: %s", got.body)
	}
	c.postJSON("/queue", `{"clear": true}`)
	if got := c.get("/prompt"); string(got.body) != `{"exec_info": {"queue_remaining": 1}}` {
		t.Errorf("after clear: %s", got.body)
	}
	last := c.submit(tiny(4, "qd"), "q")
	c.postJSON("/interrupt", "")
	ws.waitDone(mark, last)
	for _, id := range []string{a, b, d} {
		if got := c.get("/history/" + id); string(got.body) != "{}" {
			t.Errorf("removed prompt %s has history %s", id, got.body)
		}
	}
	for _, f := range ws.since(mark) {
		if f.typ == "execution_start" && f.promptID() != head && f.promptID() != last {
			t.Errorf("removed prompt %s ran", f.promptID())
		}
	}
}

func TestOriginCheck(t *testing.T) {
	sim := startSim(t, comfysim.Config{})
	c := newClient(t, sim.URL())
	host := strings.TrimPrefix(sim.URL(), "http://")
	cases := []struct {
		origin, host string
		want         int
	}{
		{"http://evil.example", "", http.StatusForbidden},
		{"http://" + host, "", http.StatusOK},
		{"http://localhost:1", "", http.StatusForbidden},
		{"http://evil.example", "comfy.internal:8188", http.StatusOK},
	}
	for _, tc := range cases {
		req, _ := http.NewRequest(http.MethodGet, sim.URL()+"/prompt", nil)
		req.Header.Set("Origin", tc.origin)
		if tc.host != "" {
			req.Host = tc.host
		}
		resp, err := c.http.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != tc.want {
			t.Errorf("Origin %s, Host %s: %d, want %d", tc.origin, tc.host, resp.StatusCode, tc.want)
		}
		if tc.want == http.StatusForbidden && (resp.Header.Get("Content-Type") != "application/octet-stream" || resp.ContentLength != 0) {
			t.Errorf("403 answer: %v", resp.Header)
		}
	}
	req, _ := http.NewRequest(http.MethodGet, sim.URL()+"/ws?clientId=x", nil)
	req.Header.Set("Origin", "http://evil.example")
	req.Header.Set("Connection", "Upgrade")
	req.Header.Set("Upgrade", "websocket")
	req.Header.Set("Sec-WebSocket-Version", "13")
	req.Header.Set("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	resp, err := c.http.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("websocket with a foreign origin: %d", resp.StatusCode)
	}
}

func TestUploadAndLoadImage(t *testing.T) {
	sim := startSim(t, comfysim.Config{})
	c := newClient(t, sim.URL())
	ws := dialWS(t, sim.URL(), "up", false)
	pngOf := func(w, h int) []byte {
		var b bytes.Buffer
		png.Encode(&b, image.NewNRGBA(image.Rect(0, 0, w, h)))
		return b.Bytes()
	}
	upload := func(name string, data []byte, fields map[string]string) map[string]string {
		var body bytes.Buffer
		mw := multipart.NewWriter(&body)
		fw, _ := mw.CreateFormFile("image", name)
		fw.Write(data)
		for k, v := range fields {
			mw.WriteField(k, v)
		}
		mw.Close()
		resp := c.do(http.MethodPost, "/upload/image", body.Bytes(), map[string]string{"Content-Type": mw.FormDataContentType()})
		var out map[string]string
		if err := json.Unmarshal(resp.body, &out); err != nil {
			t.Fatalf("upload %s: %d %s", name, resp.status, resp.body)
		}
		return out
	}
	first := upload("cat.png", pngOf(40, 30), nil)
	same := upload("cat.png", pngOf(40, 30), nil)
	other := upload("cat.png", pngOf(20, 10), nil)
	nested := upload("dog.png", pngOf(8, 8), map[string]string{"subfolder": "pets", "type": "input"})
	if first["name"] != "cat.png" || same["name"] != "cat.png" || other["name"] != "cat (1).png" {
		t.Errorf("names %v %v %v", first, same, other)
	}
	if nested["name"] != "dog.png" || nested["subfolder"] != "pets" || nested["type"] != "input" {
		t.Errorf("nested %v", nested)
	}
	var info map[string]struct {
		Input struct {
			Required struct {
				Image []json.RawMessage `json:"image"`
			} `json:"required"`
		} `json:"input"`
	}
	json.Unmarshal(c.get("/object_info/LoadImage").body, &info)
	if files := string(info["LoadImage"].Input.Required.Image[0]); files != `["cat (1).png", "cat.png", "example.png"]` {
		t.Errorf("LoadImage lists %s", files)
	}
	if got := c.get("/view?filename=dog.png&subfolder=pets&type=input"); got.status != http.StatusOK || got.header.Get("Content-Type") != "image/png" {
		t.Errorf("view of the nested upload: %d", got.status)
	}

	load := func(name string) string {
		return `{"1": {"class_type": "LoadImage", "inputs": {"image": "` + name + `"}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "loaded"}}}`
	}
	for name, want := range map[string]image.Point{"cat (1).png": {20, 10}, "pets/dog.png": {8, 8}} {
		id, _ := run(t, c, ws, load(name), "up")
		out := firstOutput(t, c.history(id), "2", "images")
		img, err := png.Decode(bytes.NewReader(c.get("/view?filename=" + out["filename"].(string)).body))
		if err != nil || img.Bounds().Size() != want {
			t.Errorf("%s saved as %v (%v), want %v", name, img.Bounds().Size(), err, want)
		}
	}
}

func TestVideoOutputs(t *testing.T) {
	sim := startSim(t, comfysim.Config{StepDuration: time.Millisecond})
	c := newClient(t, sim.URL())
	ws := dialWS(t, sim.URL(), "video", false)

	id, _ := run(t, c, ws, svd("example.png", "video/h264-mp4", 14, 4), "video")
	out := firstOutput(t, c.history(id), "7", "gifs")
	for k, want := range map[string]any{"filename": "clip_00001.mp4", "subfolder": "svd", "type": "output", "format": "video/h264-mp4", "frame_rate": 8.0, "workflow": "clip_00001.png"} {
		if out[k] != want {
			t.Errorf("gifs[0].%s = %v, want %v", k, out[k], want)
		}
	}
	mp4 := c.get("/view?filename=clip_00001.mp4&subfolder=svd&type=output")
	if mp4.header.Get("Content-Type") != "video/mp4" || len(mp4.body) < 12 || string(mp4.body[4:8]) != "ftyp" {
		t.Errorf("mp4: %s % x", mp4.header.Get("Content-Type"), mp4.body[:min(12, len(mp4.body))])
	}

	id, _ = run(t, c, ws, svd("example.png", "image/gif", 6, 2), "video")
	out = firstOutput(t, c.history(id), "7", "gifs")
	anim := c.get("/view?filename=" + out["filename"].(string) + "&subfolder=svd")
	g, err := gif.DecodeAll(bytes.NewReader(anim.body))
	if anim.header.Get("Content-Type") != "image/gif" || err != nil || len(g.Image) != 6 {
		t.Errorf("gif %v: %s, %v", out, anim.header.Get("Content-Type"), err)
	}

	_, frames := run(t, c, ws, animatedWebP, "video")
	var executed map[string]any
	for _, f := range frames {
		if f.typ == "executed" {
			executed = frameData(t, f)
		}
	}
	output, _ := executed["output"].(map[string]any)
	if fmt.Sprint(output["animated"]) != "[true]" || fmt.Sprint(output["images"]) != "[map[filename:anim_00001_.webp subfolder: type:output]]" {
		t.Errorf("SaveAnimatedWEBP output %v", output)
	}
	webp := c.get("/view?filename=anim_00001_.webp")
	if webp.header.Get("Content-Type") != "image/webp" || string(webp.body[:4]) != "RIFF" || string(webp.body[8:16]) != "WEBPVP8X" {
		t.Errorf("webp: %s % x", webp.header.Get("Content-Type"), webp.body[:16])
	}
}

func TestFailures(t *testing.T) {
	t.Run("runtime error", func(t *testing.T) {
		sim := startSim(t, comfysim.Config{FailureRate: 1, StepDuration: time.Millisecond, Rand: rand.New(rand.NewPCG(1, 2))})
		c := newClient(t, sim.URL())
		ws := dialWS(t, sim.URL(), "fail", false)
		id, frames := run(t, c, ws, txt2img(5, 1, "fail"), "fail")
		toks := tokens(frames)
		if n := len(toks); n < 4 || toks[n-3] != "execution_error" || toks[n-2] != "status" || toks[n-1] != "executing:null" {
			t.Fatalf("sequence %v", toks)
		}
		golden := loadWS(t, "ws_5_runtime_error.jsonl")
		var want, got map[string]json.RawMessage
		json.Unmarshal([]byte(golden[len(golden)-3].Raw), &want)
		json.Unmarshal(frames[len(frames)-3].data, &got)
		compareJSON(t, "execution_error", want["data"], got["data"], compareOpts{kindOnly: func(p string) bool {
			return p != "" && !strings.Contains(p, ".")
		}})
		entry := c.history(id)
		if st := entry["status"].(map[string]any); st["status_str"] != "error" || st["completed"] != false {
			t.Errorf("status %v", st)
		}
		if sim.Stats().Failed != 1 {
			t.Errorf("stats %+v", sim.Stats())
		}
	})
	t.Run("out of memory", func(t *testing.T) {
		sim := startSim(t, comfysim.Config{OOMRate: 1, StepDuration: time.Millisecond})
		c := newClient(t, sim.URL())
		ws := dialWS(t, sim.URL(), "oom", false)
		_, frames := run(t, c, ws, txt2img(5, 1, "oom"), "oom")
		d := frameData(t, frames[len(frames)-3])
		if d["exception_type"] != "torch.OutOfMemoryError" || !strings.Contains(d["exception_message"].(string), "out of memory") || d["node_id"] != "3" {
			t.Errorf("execution_error %v %v %v", d["exception_type"], d["node_id"], d["exception_message"])
		}
	})
}

func TestCache(t *testing.T) {
	for _, disabled := range []bool{false, true} {
		sim := startSim(t, comfysim.Config{StepDuration: time.Millisecond, DisableCache: disabled})
		c := newClient(t, sim.URL())
		ws := dialWS(t, sim.URL(), "cache", false)
		run(t, c, ws, txt2img(3, 1, "a"), "cache")
		_, frames := run(t, c, ws, txt2img(3, 1, "b"), "cache")
		var cached []any
		for _, f := range frames {
			if f.typ == "execution_cached" {
				cached = frameData(t, f)["nodes"].([]any)
			}
		}
		want := "[3 4 5 6 7 8]"
		if disabled {
			want = "[]"
		}
		if fmt.Sprint(cached) != want {
			t.Errorf("DisableCache %v: cached %v, want %v", disabled, cached, want)
		}
	}
}

func TestDuplicatePromptID(t *testing.T) {
	sim := startSim(t, comfysim.Config{})
	c := newClient(t, sim.URL())
	ws := dialWS(t, sim.URL(), "dup", false)
	body := `{"prompt": ` + tiny(1, "dup") + `, "client_id": "dup", "prompt_id": "mine"}`
	mark := ws.mark()
	if got := c.postJSON("/prompt", body); got.status != http.StatusOK || !strings.Contains(string(got.body), `"prompt_id": "mine"`) {
		t.Fatalf("first: %d %s", got.status, got.body)
	}
	ws.waitDone(mark, "mine")
	got := c.postJSON("/prompt", body)
	if got.status != http.StatusConflict || got.header.Get("Content-Type") != "application/json; charset=utf-8" {
		t.Errorf("duplicate: %d %s", got.status, got.body)
	}
	var e struct {
		Error struct {
			Type string `json:"type"`
		} `json:"error"`
	}
	if json.Unmarshal(got.body, &e); e.Error.Type != "duplicate_prompt_id" {
		t.Errorf("duplicate: %s", got.body)
	}
}

func TestHistoryKeepsMaxHistoryPrompts(t *testing.T) {
	sim := startSim(t, comfysim.Config{MaxHistory: 2})
	c := newClient(t, sim.URL())
	ws := dialWS(t, sim.URL(), "few", false)
	var ids []string
	for i := range 3 {
		id, _ := run(t, c, ws, tiny(i, "few"), "few")
		ids = append(ids, id)
	}
	if got := c.get("/history/" + ids[0]); string(got.body) != "{}" {
		t.Errorf("the oldest of three prompts, with room for two, is still in the history: %s", got.body)
	}
	for _, id := range ids[1:] {
		firstOutput(t, c.history(id), "2", "images")
	}
	var all map[string]any
	if err := json.Unmarshal(c.get("/history").body, &all); err != nil || len(all) != 2 {
		t.Errorf("GET /history holds %d prompts (%v), want 2", len(all), err)
	}
}

func TestRoutes(t *testing.T) {
	sim := startSim(t, comfysim.Config{})
	c := newClient(t, sim.URL())
	cases := []struct {
		method, path string
		body         string
		status       int
		contentType  string
		answer       string
	}{
		{"GET", "/api/prompt", "", 200, "application/json; charset=utf-8", `{"exec_info": {"queue_remaining": 0}}`},
		{"GET", "/api/features", "", 200, "application/json; charset=utf-8", `{"supports_preview_metadata": true, "max_upload_size": 104857600}`},
		{"GET", "/api/history?max_items=3", "", 200, "application/json; charset=utf-8", `{}`},
		{"GET", "/history?max_items=x", "", 500, "text/plain; charset=utf-8", "500 Internal Server Error\n\nServer got itself in trouble"},
		{"GET", "/api/object_info/Nope", "", 200, "application/json; charset=utf-8", `{}`},
		{"GET", "/nowhere", "", 404, "text/plain; charset=utf-8", "404: Not Found"},
		{"DELETE", "/prompt", "", 405, "text/plain; charset=utf-8", "405: Method Not Allowed"},
		{"GET", "/view", "", 404, "application/octet-stream", ""},
		{"GET", "/view?filename=../secret.png", "", 400, "application/octet-stream", ""},
		{"GET", "/view?filename=example.png&type=input&subfolder=../..", "", 403, "application/octet-stream", ""},
		{"GET", "/view?filename=example.png&type=input", "", 200, "image/png", ""},
		{"POST", "/queue", "{not json", 500, "text/plain; charset=utf-8", "500 Internal Server Error\n\nServer got itself in trouble"},
		{"POST", "/api/history", `{"clear": true}`, 200, "application/octet-stream", ""},
		{"POST", "/interrupt", "{not json", 200, "application/octet-stream", ""},
		{"POST", "/upload/image", `{}`, 400, "application/octet-stream", ""},
	}
	for _, tc := range cases {
		var body []byte
		if tc.body != "" {
			body = []byte(tc.body)
		}
		got := c.do(tc.method, tc.path, body, nil)
		if got.status != tc.status || got.header.Get("Content-Type") != tc.contentType || (tc.answer != "" || tc.contentType != "image/png") && string(got.body) != tc.answer {
			t.Errorf("%s %s: %d %q %q, want %d %q %q", tc.method, tc.path, got.status, got.header.Get("Content-Type"), truncate(got.body, 200), tc.status, tc.contentType, tc.answer)
		}
	}
}

// A client that sends feature_flags at once still gets status first, as from
// ComfyUI, which greets before it reads. Many clients at once: the answer used to
// overtake the greeting only when the server was busy.
func TestGreetingComesBeforeTheAnswerToFeatureFlags(t *testing.T) {
	t.Parallel()
	sim := startSim(t, comfysim.Config{})
	for g := range 16 {
		t.Run(fmt.Sprint(g), func(t *testing.T) {
			t.Parallel()
			for i := range 20 {
				ws := dialWS(t, sim.URL(), fmt.Sprintf("client-%d-%d", g, i), true)
				ws.waitType(0, "feature_flags", "")
				if frames := ws.since(0); frames[0].typ != "status" || frames[1].typ != "feature_flags" {
					t.Fatalf("socket %d: first frames %s, %s; want status, feature_flags", i, frames[0].typ, frames[1].typ)
				}
			}
		})
	}
}
