package stack_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"io"
	"mime/multipart"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
	"github.com/google/uuid"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/comfy"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack"
	"github.com/comfyfleet/comfyfleet/services/comfyfleet/stack/stacktest"
	"github.com/comfyfleet/comfyfleet/services/intake/comfydoor"
)

// transcripts are what a real ComfyUI server answered (pkg/comfy/testdata).
const transcripts = "../../../pkg/comfy/testdata/transcripts/"

// publishObjectInfo puts each node's /object_info answer in the store the door reads,
// as the executors publish it, and waits until the door offers what they can run.
func publishObjectInfo(t *testing.T, s *stack.Stack, js jetstream.JetStream, door string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	store, err := js.CreateOrUpdateObjectStore(ctx, jetstream.ObjectStoreConfig{Bucket: comfydoor.ObjectInfoStore})
	if err != nil {
		t.Fatal(err)
	}
	for i, sim := range s.Sims {
		raw := fleettest.Do(t, http.MethodGet, sim.URL()+"/object_info", nil).Body
		if _, err := store.PutBytes(ctx, s.Nodes[i].ID, raw); err != nil {
			t.Fatal(err)
		}
	}
	fleettest.Eventually(t, 30*time.Second, func() bool {
		var info map[string]json.RawMessage
		fleettest.Get(t, door+"/object_info", &info)
		return info["KSampler"] != nil && info["LoadImage"] != nil
	}, "the door does not offer the nodes' classes")
}

// samplerGraph draws an image with a KSampler of steps steps: it reports progress.
func samplerGraph(seed, steps int) map[string]any {
	node := func(class string, inputs map[string]any) map[string]any {
		return map[string]any{"class_type": class, "inputs": inputs}
	}
	return map[string]any{
		"3": node("KSampler", map[string]any{"seed": seed, "steps": steps, "cfg": 7, "sampler_name": "euler", "scheduler": "normal",
			"denoise": 1, "model": []any{"4", 0}, "positive": []any{"6", 0}, "negative": []any{"7", 0}, "latent_image": []any{"5", 0}}),
		"4": node("CheckpointLoaderSimple", map[string]any{"ckpt_name": "v1-5-pruned-emaonly.safetensors"}),
		"5": node("EmptyLatentImage", map[string]any{"width": 64, "height": 64, "batch_size": 1}),
		"6": node("CLIPTextEncode", map[string]any{"text": "a fox at dawn", "clip": []any{"4", 1}}),
		"7": node("CLIPTextEncode", map[string]any{"text": "", "clip": []any{"4", 1}}),
		"8": node("VAEDecode", map[string]any{"samples": []any{"3", 0}, "vae": []any{"4", 2}}),
		"9": node("SaveImage", map[string]any{"images": []any{"8", 0}, "filename_prefix": "door"}),
	}
}

// frame is one text frame of ComfyUI's websocket.
type frame struct {
	Type string          `json:"type"`
	Data json.RawMessage `json:"data"`
	raw  string
}

func (f frame) field(name string) any {
	var m map[string]any
	_ = json.Unmarshal(f.Data, &m)
	return m[name]
}

// keys are the keys of the frame's data, in order.
func (f frame) keys() []string {
	dec := json.NewDecoder(bytes.NewReader(f.Data))
	var out []string
	depth := 0
	for {
		tok, err := dec.Token()
		if err != nil {
			return out
		}
		switch v := tok.(type) {
		case json.Delim:
			if v == '{' || v == '[' {
				depth++
			} else {
				depth--
			}
		case string:
			if depth == 1 {
				out = append(out, v)
				var skip json.RawMessage
				if dec.Decode(&skip) != nil {
					return out
				}
			}
		}
	}
}

// recordedFrames reads the text frames of a websocket transcript.
func recordedFrames(t *testing.T, name string) []frame {
	t.Helper()
	f, err := os.Open(transcripts + name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []frame
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<24)
	for sc.Scan() {
		var line struct {
			Raw any `json:"raw"`
		}
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			t.Fatal(err)
		}
		if raw, ok := line.Raw.(string); ok {
			var fr frame
			if err := json.Unmarshal([]byte(raw), &fr); err != nil {
				t.Fatal(err)
			}
			fr.raw = raw
			out = append(out, fr)
		}
	}
	return out
}

// scriptClient is a client written the way ComfyUI's websocket_api_example.py is: a
// websocket with its client id, POST /prompt, read the socket until the prompt's
// executing message with node null, then /history and /view.
type scriptClient struct {
	t        *testing.T
	base     string
	clientID string
	ws       *websocket.Conn
	hello    frame
}

func newScriptClient(t *testing.T, base string) *scriptClient {
	t.Helper()
	c := &scriptClient{t: t, base: base, clientID: uuid.NewString()}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ws, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(base, "http")+"/ws?clientId="+c.clientID, nil)
	if err != nil {
		t.Fatal(err)
	}
	ws.SetReadLimit(64 << 20)
	t.Cleanup(func() { _ = ws.CloseNow() })
	c.ws = ws
	return c
}

// queuePrompt is queue_prompt: POST /prompt with the client's id.
func (c *scriptClient) queuePrompt(graph map[string]any) string {
	c.t.Helper()
	a := fleettest.Do(c.t, http.MethodPost, c.base+"/prompt", map[string]any{"prompt": graph, "client_id": c.clientID}).Want(c.t, http.StatusOK)
	var r struct {
		PromptID   string          `json:"prompt_id"`
		Number     json.Number     `json:"number"`
		NodeErrors json.RawMessage `json:"node_errors"`
	}
	if a.Decode(c.t, &r); r.PromptID == "" || r.Number == "" || string(r.NodeErrors) != "{}" {
		c.t.Fatalf("POST /prompt answered %s", a.Body)
	}
	return r.PromptID
}

// next reads the next text frame.
func (c *scriptClient) next(ctx context.Context) frame {
	c.t.Helper()
	for {
		typ, b, err := c.ws.Read(ctx)
		if err != nil {
			c.t.Fatalf("read the websocket: %v", err)
		}
		if typ != websocket.MessageText {
			continue
		}
		var f frame
		if err := json.Unmarshal(b, &f); err != nil {
			c.t.Fatalf("frame %s: %v", b, err)
		}
		f.raw = string(b)
		return f
	}
}

// waitEnd reads the socket until the prompt's end marker; it returns every frame
// read, the greeting first if it came now.
func (c *scriptClient) waitEnd(promptID string, within time.Duration) []frame {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), within)
	defer cancel()
	var out []frame
	for {
		f := c.next(ctx)
		out = append(out, f)
		if f.Type == "executing" && f.field("node") == nil && f.field("prompt_id") == promptID {
			return out
		}
	}
}

// history is get_history(prompt_id)[prompt_id].
func (c *scriptClient) history(promptID string) historyEntry {
	c.t.Helper()
	var h map[string]historyEntry
	fleettest.Get(c.t, c.base+"/history/"+promptID, &h)
	e, ok := h[promptID]
	if !ok {
		c.t.Fatalf("no history for prompt %s", promptID)
	}
	return e
}

// view is get_image(filename, subfolder, folder_type).
func (c *scriptClient) view(f comfy.FileRef) []byte {
	c.t.Helper()
	q := url.Values{"filename": {f.Filename}, "subfolder": {f.Subfolder}, "type": {f.Type}}
	return fleettest.Do(c.t, http.MethodGet, c.base+"/view?"+q.Encode(), nil).Want(c.t, http.StatusOK).Body
}

type historyEntry struct {
	Prompt  []json.RawMessage                     `json:"prompt"`
	Outputs map[string]map[string][]comfy.FileRef `json:"outputs"`
	Status  struct {
		StatusStr string              `json:"status_str"`
		Completed bool                `json:"completed"`
		Messages  [][]json.RawMessage `json:"messages"`
	} `json:"status"`
	Meta map[string]json.RawMessage `json:"meta"`
}

// files are the entry's output files, as the example script walks them.
func (h historyEntry) files() []comfy.FileRef {
	var out []comfy.FileRef
	for _, byKind := range h.Outputs {
		for _, fs := range byKind {
			out = append(out, fs...)
		}
	}
	return out
}

func (h historyEntry) messageTypes() []string {
	var out []string
	for _, m := range h.Status.Messages {
		var typ string
		_ = json.Unmarshal(m[0], &typ)
		out = append(out, typ)
	}
	return out
}

// stored returns an output file as the fleet stored it.
func stored(t *testing.T, js jetstream.JetStream, f comfy.FileRef) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	os, err := js.ObjectStore(ctx, fleet.ObjectOutputs)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.GetBytes(ctx, fleet.OutputKey(f.Subfolder, 0, f.Filename))
	if err != nil {
		t.Fatalf("output %s of job %s: %v", f.Filename, f.Subfolder, err)
	}
	return b
}

// checkShapes checks that each frame has the keys ComfyUI's frame of its type has.
func checkShapes(t *testing.T, got []frame, recorded ...[]frame) {
	t.Helper()
	ref := map[string]frame{}
	for _, rs := range recorded {
		for _, f := range rs {
			if _, seen := ref[f.Type]; !seen && !(f.Type == "executing" && f.field("node") == nil) {
				ref[f.Type] = f
			}
		}
	}
	for _, f := range got {
		r, ok := ref[f.Type]
		if f.Type == "executing" && f.field("node") == nil {
			if want := []string{"node", "prompt_id"}; !slices.Equal(f.keys(), want) {
				t.Errorf("end marker %s: keys %v, want %v", f.raw, f.keys(), want)
			}
			continue
		}
		if !ok {
			t.Errorf("frame %s: ComfyUI sends no %s", f.raw, f.Type)
			continue
		}
		if f.Type == "status" {
			continue
		}
		if !slices.Equal(f.keys(), r.keys()) {
			t.Errorf("%s: keys %v, want ComfyUI's %v", f.Type, f.keys(), r.keys())
		}
	}
}

// withoutNodeSteps leaves out the frames of nodes running (executing with a node,
// progress), which depend on the graph.
func withoutNodeSteps(fs []frame) []string {
	var out []string
	for _, f := range fs {
		if f.Type == "progress" || f.Type == "progress_state" || f.Type == "executing" && f.field("node") != nil {
			continue
		}
		out = append(out, f.Type)
	}
	return out
}

func pngOf(t *testing.T, w, h int, c color.NRGBA) []byte {
	t.Helper()
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	for y := range h {
		for x := range w {
			img.SetNRGBA(x, y, c)
		}
	}
	var b bytes.Buffer
	if err := png.Encode(&b, img); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// postUpload posts a file as ComfyUI's clients do: multipart, field image.
func postUpload(t *testing.T, base, name string, data []byte, overwrite bool) (int, []byte) {
	t.Helper()
	var b bytes.Buffer
	mw := multipart.NewWriter(&b)
	fw, _ := mw.CreateFormFile("image", name)
	fw.Write(data)
	mw.WriteField("type", "input")
	mw.WriteField("overwrite", fmt.Sprint(overwrite))
	mw.Close()
	resp, err := fleettest.HTTP.Post(base+"/upload/image", mw.FormDataContentType(), &b)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, out
}

func TestComfyUIClientsRunTheirPromptsOnTheFleet(t *testing.T) {
	b := stacktest.Start(t, stacktest.Nodes(1, 1))
	door := b.APIURL + "/comfy"

	// Before any node published its object_info, the fleet's own graph checks
	// answer, in ComfyUI's words.
	for _, name := range []string{"29_post_prompt_invalid_no_outputs.json", "32_post_prompt_invalid_missing_class_type.json"} {
		body, status, want := recordedExchange(t, name)
		if got := fleettest.Do(t, http.MethodPost, door+"/prompt", body); got.Status != status || string(got.Body) != want {
			t.Errorf("%s without object_info: %d %s\nwant %d %s", name, got.Status, got.Body, status, want)
		}
	}
	publishObjectInfo(t, b.Stack, b.JS, door)

	t.Run("websocket_api_example", func(t *testing.T) {
		c := newScriptClient(t, door)
		id := c.queuePrompt(samplerGraph(1, 40))
		frames := c.waitEnd(id, 60*time.Second)
		if hello := frames[0]; hello.Type != "status" || hello.field("sid") != c.clientID {
			t.Fatalf("first frame %s; want the status greeting with sid %s", hello.raw, c.clientID)
		}
		ws1 := recordedFrames(t, "ws_1_good.jsonl")
		if got, want := withoutNodeSteps(frames[1:]), withoutNodeSteps(ws1); !slices.Equal(got, want) {
			t.Errorf("messages %v\nwant as ComfyUI sends them %v", got, want)
		}
		checkShapes(t, frames[1:], ws1, recordedFrames(t, "ws_6_progress_binary_plain_client.jsonl"))
		progress := 0
		for i, f := range frames {
			if f.Type != "progress" {
				continue
			}
			progress++
			if f.field("node") != "3" || f.field("prompt_id") != id {
				t.Errorf("progress %s; want node 3 of prompt %s", f.raw, id)
			}
			if !slices.ContainsFunc(frames[:i], func(p frame) bool { return p.Type == "executing" && p.field("node") == "3" }) {
				t.Errorf("progress %s before executing node 3", f.raw)
			}
		}
		if progress == 0 {
			t.Error("no progress message for 40 sampler steps")
		}
		for _, f := range frames[1:] {
			if p, ok := f.field("prompt_id").(string); f.Type != "status" && (!ok || p != id) {
				t.Errorf("frame %s is not about prompt %s", f.raw, id)
			}
		}

		h := c.history(id)
		if h.Status.StatusStr != "success" || !h.Status.Completed ||
			!slices.Equal(h.messageTypes(), []string{"execution_start", "execution_cached", "execution_success"}) {
			t.Errorf("history status %+v", h.Status)
		}
		var number json.Number
		var extra struct {
			ClientID string `json:"client_id"`
		}
		json.Unmarshal(h.Prompt[0], &number)
		json.Unmarshal(h.Prompt[3], &extra)
		if len(h.Prompt) != 5 || number == "" || string(h.Prompt[1]) != `"`+id+`"` || extra.ClientID != c.clientID || string(h.Prompt[4]) != `["9"]` {
			t.Errorf("history prompt %s", h.Prompt)
		}
		files := h.files()
		if len(files) != 1 || h.Meta["9"] == nil {
			t.Fatalf("history outputs %+v, meta %s", h.Outputs, h.Meta)
		}
		got := c.view(files[0])
		if want := stored(t, b.JS, files[0]); !bytes.Equal(got, want) {
			t.Errorf("/view gave %d bytes, the fleet stored %d others", len(got), len(want))
		}
		if _, err := png.Decode(bytes.NewReader(got)); err != nil {
			t.Errorf("output is not a PNG: %v", err)
		}
		var executed frame
		for _, f := range frames {
			if f.Type == "executed" {
				executed = f
			}
		}
		if !strings.Contains(executed.raw, `"filename": "`+files[0].Filename+`", "subfolder": "`+files[0].Subfolder+`", "type": "output"`) {
			t.Errorf("executed %s does not name the file history names, %+v", executed.raw, files[0])
		}
	})

	t.Run("upload used by LoadImage", func(t *testing.T) {
		c := newScriptClient(t, door)
		img := pngOf(t, 37, 23, color.NRGBA{10, 200, 30, 255})
		status, body := postUpload(t, door, "door_upload.png", img, true)
		if status != http.StatusOK || string(body) != `{"name": "door_upload.png", "subfolder": "", "type": "input"}` {
			t.Fatalf("upload: %d %s", status, body)
		}
		if status, body = postUpload(t, door, "door_upload.png", pngOf(t, 5, 5, color.NRGBA{1, 2, 3, 255}), false); status != http.StatusOK ||
			string(body) != `{"name": "door_upload (1).png", "subfolder": "", "type": "input"}` {
			t.Errorf("a second file of the same name: %d %s", status, body)
		}
		if got := c.view(comfy.FileRef{Filename: "door_upload.png", Type: "input"}); !bytes.Equal(got, img) {
			t.Errorf("/view of the upload gave %d bytes, not the %d uploaded", len(got), len(img))
		}
		id := c.queuePrompt(map[string]any{
			"1": map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": "door_upload.png"}},
			"2": map[string]any{"class_type": "ImageInvert", "inputs": map[string]any{"image": []any{"1", 0}}},
			"3": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"2", 0}, "filename_prefix": "door_loaded"}},
		})
		frames := c.waitEnd(id, 60*time.Second)
		if !slices.ContainsFunc(frames, func(f frame) bool { return f.Type == "execution_success" }) {
			t.Fatalf("the prompt did not succeed: %v", withoutNodeSteps(frames))
		}
		files := c.history(id).files()
		if len(files) != 1 {
			t.Fatalf("outputs %+v", files)
		}
		out, err := png.Decode(bytes.NewReader(c.view(files[0])))
		if err != nil {
			t.Fatal(err)
		}
		if size := out.Bounds().Size(); size.X != 37 || size.Y != 23 {
			t.Errorf("output is %v; the node did not load the 37×23 upload", size)
		}

		// A file neither uploaded nor on a node is refused as ComfyUI refuses it.
		reqBody, _, want := recordedExchange(t, "60_post_prompt_invalid_load_image_missing_file.json")
		if got := fleettest.Do(t, http.MethodPost, door+"/prompt", reqBody); got.Status != http.StatusBadRequest || string(got.Body) != want {
			t.Errorf("missing file: %d %s\nwant 400 %s", got.Status, got.Body, want)
		}
	})

	t.Run("interrupt", func(t *testing.T) {
		c := newScriptClient(t, door)
		id := c.queuePrompt(samplerGraph(2, 3000))
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		var frames []frame
		for {
			f := c.next(ctx)
			frames = append(frames, f)
			if f.Type == "progress" {
				break
			}
		}
		var q struct {
			Running [][]json.RawMessage `json:"queue_running"`
			Pending [][]json.RawMessage `json:"queue_pending"`
		}
		fleettest.Get(t, door+"/queue", &q)
		if !slices.ContainsFunc(q.Running, func(it []json.RawMessage) bool { return string(it[1]) == `"`+id+`"` }) {
			t.Errorf("GET /queue while it runs: %+v", q)
		}
		if a := fleettest.Do(t, http.MethodPost, door+"/interrupt", map[string]any{"prompt_id": id}); a.Status != http.StatusOK || len(a.Body) != 0 {
			t.Fatalf("POST /interrupt: %v", a)
		}
		frames = append(frames, c.waitEnd(id, 30*time.Second)...)
		types := withoutNodeSteps(frames[1:])
		if want := []string{"status", "status", "execution_start", "execution_cached", "execution_interrupted", "status", "executing"}; !slices.Equal(types, want) {
			t.Errorf("messages %v, want %v", types, want)
		}
		checkShapes(t, frames[1:], recordedFrames(t, "ws_8_slow_queue_interrupt.jsonl"), recordedFrames(t, "ws_1_good.jsonl"))
		for _, f := range frames {
			if f.Type == "execution_interrupted" && (f.field("node_id") != "3" || f.field("node_type") != "KSampler") {
				t.Errorf("%s; want the sampler, node 3, named", f.raw)
			}
		}
		// The node stops too, long before the 3000 steps' 30 s.
		fleettest.Eventually(t, 10*time.Second, func() bool {
			for _, sim := range b.Sims {
				var q struct {
					Running []json.RawMessage `json:"queue_running"`
				}
				fleettest.Get(t, sim.URL()+"/queue", &q)
				if len(q.Running) > 0 {
					return false
				}
			}
			return true
		}, "a node still runs the interrupted prompt")
		h := c.history(id)
		if h.Status.StatusStr != "error" || h.Status.Completed || len(h.Outputs) != 0 ||
			!slices.Equal(h.messageTypes(), []string{"execution_start", "execution_cached", "execution_interrupted"}) {
			t.Errorf("history of the interrupted prompt: %+v", h.Status)
		}
		fleettest.Get(t, door+"/queue", &q)
		if len(q.Running)+len(q.Pending) != 0 {
			t.Errorf("GET /queue after the interrupt: %+v", q)
		}
	})

	t.Run("a socket that connects late", func(t *testing.T) {
		clientID := uuid.NewString()
		var queued struct {
			PromptID string `json:"prompt_id"`
		}
		fleettest.Do(t, http.MethodPost, door+"/prompt", map[string]any{"prompt": samplerGraph(7, 3000), "client_id": clientID}).
			Want(t, http.StatusOK).Decode(t, &queued)
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		ws, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(door, "http")+"/ws?clientId="+clientID, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer ws.CloseNow()
		c := &scriptClient{t: t, base: door, clientID: clientID, ws: ws}
		if err := ws.Write(ctx, websocket.MessageText, []byte(`{"type": "feature_flags", "data": {"supports_preview_metadata": true}}`)); err != nil {
			t.Fatal(err)
		}
		hello := c.next(ctx)
		if want := `{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1}}, "sid": "` + clientID + `"}}`; hello.raw != want {
			t.Errorf("greeting %s, want %s", hello.raw, want)
		}
		// The answer to feature_flags and the prompt's messages come from different
		// goroutines, as in ComfyUI; their order is not fixed.
		var seen []string
		for !slices.Contains(seen, "execution_start") || !slices.Contains(seen, "feature_flags") {
			f := c.next(ctx)
			if f.Type == "feature_flags" && f.raw != `{"type": "feature_flags", "data": {"supports_preview_metadata": true, "max_upload_size": 20971520}}` {
				t.Errorf("feature flags %s", f.raw)
			}
			seen = append(seen, f.Type)
		}
		if status := fleettest.Do(t, http.MethodPost, door+"/interrupt", map[string]any{"prompt_id": queued.PromptID}).Status; status != http.StatusOK {
			t.Fatalf("POST /interrupt: %d", status)
		}
		c.waitEnd(queued.PromptID, 30*time.Second)
	})

	t.Run("rejected prompts answer as ComfyUI", func(t *testing.T) {
		for _, name := range []string{
			"23_post_prompt_invalid_unknown_class.json", "24_post_prompt_invalid_values.json",
			"25_post_prompt_invalid_type.json", "26_post_prompt_invalid_dangling_link.json",
			"27_post_prompt_invalid_above_max.json", "28_post_prompt_invalid_prompt_is_list.json",
			"29_post_prompt_invalid_no_outputs.json", "30_post_prompt_invalid_no_prompt_key.json",
			"31_post_prompt_invalid_json.json", "32_post_prompt_invalid_missing_class_type.json",
		} {
			body, status, want := recordedExchange(t, name)
			if got := fleettest.Do(t, http.MethodPost, door+"/prompt", body); got.Status != status || string(got.Body) != want {
				t.Errorf("%s: %d %s\nwant %d %s", name, got.Status, got.Body, status, want)
			}
		}
	})

	t.Run("prompt_id is idempotent", func(t *testing.T) {
		id := uuid.NewString()
		body := map[string]any{"prompt": samplerGraph(3, 2), "client_id": "idem", "prompt_id": id}
		a1 := fleettest.Do(t, http.MethodPost, door+"/prompt", body)
		a2 := fleettest.Do(t, http.MethodPost, door+"/prompt", body)
		if a1.Status != http.StatusOK || a2.Status != http.StatusOK || !bytes.Equal(a1.Body, a2.Body) || !strings.Contains(string(a1.Body), id) {
			t.Errorf("the same prompt twice: %d %s, %d %s", a1.Status, a1.Body, a2.Status, a2.Body)
		}
		body["prompt"] = samplerGraph(4, 2)
		if a := fleettest.Do(t, http.MethodPost, door+"/prompt", body); a.Status != http.StatusConflict || !strings.Contains(string(a.Body), `"duplicate_prompt_id"`) {
			t.Errorf("another prompt with the same prompt_id: %v", a)
		}
		fleettest.Eventually(t, 30*time.Second, func() bool {
			var h map[string]json.RawMessage
			fleettest.Get(t, door+"/history/"+id, &h)
			return len(h) == 1
		}, "the prompt did not end")
	})

	t.Run("queue: delete, clear, interrupt a client's", func(t *testing.T) {
		var q struct {
			Running [][]json.RawMessage `json:"queue_running"`
			Pending [][]json.RawMessage `json:"queue_pending"`
		}
		listed := func(items [][]json.RawMessage, id string) bool {
			return slices.ContainsFunc(items, func(it []json.RawMessage) bool { return string(it[1]) == `"`+id+`"` })
		}
		// Long prompts, as many as the nodes' slots.
		var fillers []string
		for i := range 2 * fleet.NodeSlots {
			var r struct {
				PromptID string `json:"prompt_id"`
			}
			fleettest.Do(t, http.MethodPost, door+"/prompt", map[string]any{"prompt": samplerGraph(100+i, 3000), "client_id": "filler"}).
				Want(t, http.StatusOK).Decode(t, &r)
			fillers = append(fillers, r.PromptID)
		}
		fleettest.Eventually(t, 30*time.Second, func() bool {
			fleettest.Get(t, door+"/queue", &q)
			return len(q.Running) > 0
		}, "no node runs the long prompts")
		a := fleettest.Do(t, http.MethodPost, door+"/prompt", map[string]any{"prompt": samplerGraph(6, 2), "client_id": "waiting", "front": true})
		var target struct {
			PromptID string  `json:"prompt_id"`
			Number   float64 `json:"number"`
		}
		if json.Unmarshal(a.Body, &target); a.Status != http.StatusOK || target.Number >= 0 {
			t.Fatalf("POST /prompt with front: %v; want a negative number", a)
		}
		fleettest.Get(t, door+"/queue", &q)
		if !listed(q.Pending, target.PromptID) {
			t.Fatalf("GET /queue: %s is not pending", target.PromptID)
		}
		if status := fleettest.Do(t, http.MethodPost, door+"/queue", map[string]any{"delete": []string{target.PromptID}}).Status; status != http.StatusOK {
			t.Fatalf("POST /queue delete: %d", status)
		}
		fleettest.Eventually(t, 10*time.Second, func() bool {
			fleettest.Get(t, door+"/queue", &q)
			return !listed(q.Pending, target.PromptID)
		}, "the deleted prompt is still queued")
		var h map[string]json.RawMessage
		if fleettest.Get(t, door+"/history/"+target.PromptID, &h); len(h) != 0 {
			t.Errorf("history of a prompt deleted before it started: %v", h)
		}
		if status := fleettest.Do(t, http.MethodPost, door+"/queue", map[string]any{"clear": true}).Status; status != http.StatusOK {
			t.Fatalf("POST /queue clear: %d", status)
		}
		fleettest.Eventually(t, 10*time.Second, func() bool {
			fleettest.Get(t, door+"/queue", &q)
			return len(q.Pending) == 0
		}, "clear left prompts waiting")
		ran := len(q.Running)
		if ran == 0 {
			t.Fatal("clear stopped the running prompts too")
		}
		if status := fleettest.Do(t, http.MethodPost, door+"/interrupt", map[string]any{"client_id": "filler"}).Status; status != http.StatusOK {
			t.Fatalf("POST /interrupt of a client: %d", status)
		}
		fleettest.Eventually(t, 10*time.Second, func() bool {
			fleettest.Get(t, door+"/queue", &q)
			return len(q.Pending)+len(q.Running) == 0
		}, "the client's running prompts still run")
		interrupted := 0
		for _, id := range fillers {
			var h map[string]historyEntry
			fleettest.Get(t, door+"/history/"+id, &h)
			if e, ok := h[id]; ok && e.Status.StatusStr == "error" {
				interrupted++
			}
		}
		if interrupted != ran {
			t.Errorf("%d of the long prompts have an interrupted history; want the %d that ran", interrupted, ran)
		}
	})

	t.Run("pkg/comfy client", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		cc := comfy.New(door, comfy.WithHTTPClient(fleettest.HTTP))
		t.Cleanup(func() { cc.Close() })
		var steps int
		res, err := cc.Run(ctx, samplerGraph(5, 30), "", func(p comfy.Progress) {
			if p.Max > 0 {
				steps++
			}
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(res.Outputs) != 1 || res.Outputs[0].NodeID != "9" || res.Cached {
			t.Fatalf("result %+v", res)
		}
		d, err := cc.View(ctx, res.Outputs[0].File)
		if err != nil {
			t.Fatal(err)
		}
		got, _ := io.ReadAll(d.Body)
		d.Body.Close()
		if want := stored(t, b.JS, res.Outputs[0].File); d.ContentType != "image/png" || !bytes.Equal(got, want) {
			t.Errorf("View: %s, %d bytes; the fleet stored %d", d.ContentType, len(got), len(want))
		}
		h, err := cc.History(ctx, res.PromptID)
		if err != nil || h == nil || h.Err() != nil || h.ClientID != cc.ClientID() {
			t.Errorf("History: %+v, %v", h, err)
		}
		stats, err := cc.SystemStats(ctx)
		if err != nil || len(stats.Devices) != 2 || stats.System.ComfyUIVersion == "" {
			t.Errorf("SystemStats: %+v, %v", stats, err)
		}
		features, err := cc.Features(ctx)
		if err != nil || features.MaxUploadSize != fleet.MaxInputBytes {
			t.Errorf("Features: %+v, %v", features, err)
		}
		info, err := cc.ObjectInfo(ctx, "KSampler")
		if err != nil || len(info) != 1 {
			t.Errorf("ObjectInfo(KSampler): %d classes, %v", len(info), err)
		}
		if n, err := cc.QueueRemaining(ctx); err != nil || n != 0 {
			t.Errorf("QueueRemaining: %d, %v", n, err)
		}
		if _, err := cc.Submit(ctx, comfy.Graph{"1": map[string]any{"class_type": "NoSuchNode", "inputs": map[string]any{}}}, ""); !comfy.IsPermanent(err) {
			t.Errorf("Submit of an unknown class: %v; want a permanent rejection", err)
		}
		recent, err := cc.RecentHistory(ctx, 2)
		if err != nil || len(recent) != 2 || !slices.ContainsFunc(recent, func(h *comfy.HistoryEntry) bool { return h.PromptID == res.PromptID }) {
			t.Errorf("RecentHistory(2): %d entries, %v; want the last two, this one among them", len(recent), err)
		}
	})
}

// recordedExchange returns a recorded POST's body, and the status and body ComfyUI
// answered.
func recordedExchange(t *testing.T, name string) (request []byte, status int, body string) {
	t.Helper()
	raw, err := os.ReadFile(transcripts + name)
	if err != nil {
		t.Fatal(err)
	}
	var ex struct {
		Request struct {
			Body    json.RawMessage `json:"body"`
			BodyRaw *string         `json:"body_raw"`
		} `json:"request"`
		Response struct {
			Status  int    `json:"status"`
			BodyRaw string `json:"body_raw"`
		} `json:"response"`
	}
	if err := json.Unmarshal(raw, &ex); err != nil {
		t.Fatal(err)
	}
	request = ex.Request.Body
	if ex.Request.BodyRaw != nil {
		request = []byte(*ex.Request.BodyRaw)
	}
	return request, ex.Response.Status, ex.Response.BodyRaw
}

func TestComfyUIDoorTakesTheKeyAsTokenAndKeepsTenantsApart(t *testing.T) {
	b := startSecureStack(t, 0)
	door := b.APIURL + "/comfy"
	studio, other := b.key(t, "studio", tenancy.RoleSubmit), b.key(t, "other", tenancy.RoleSubmit)

	if status := fleettest.Do(t, http.MethodGet, door+"/queue", nil).Status; status != http.StatusUnauthorized {
		t.Errorf("GET /queue without a key: %d", status)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	wsURL := "ws" + strings.TrimPrefix(door, "http") + "/ws?clientId=studio-1&token=" + url.QueryEscape(studio)
	ws, _, err := websocket.Dial(ctx, wsURL, nil)
	if err != nil {
		t.Fatalf("websocket with ?token=: %v", err)
	}
	defer ws.CloseNow()
	if _, _, err := websocket.Dial(ctx, "ws"+strings.TrimPrefix(door, "http")+"/ws?clientId=x", nil); err == nil {
		t.Error("a websocket without a key was accepted")
	}
	graph := map[string]any{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 32, "height": 32, "batch_size": 1, "color": 255}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "tenant"}},
	}
	var queued struct {
		PromptID string `json:"prompt_id"`
	}
	fleettest.Do(t, http.MethodPost, door+"/prompt?token="+url.QueryEscape(studio), map[string]any{"prompt": graph, "client_id": "studio-1"}).
		Want(t, http.StatusOK).Decode(t, &queued)
	for {
		typ, data, err := ws.Read(ctx)
		if err != nil {
			t.Fatalf("read the websocket: %v", err)
		}
		var f frame
		if typ == websocket.MessageText && json.Unmarshal(data, &f) == nil && f.Type == "executing" && f.field("node") == nil {
			break
		}
	}
	a := fleettest.Do(t, http.MethodGet, door+"/history/"+queued.PromptID, nil, fleettest.Key(studio))
	var h map[string]historyEntry
	json.Unmarshal(a.Body, &h)
	files := h[queued.PromptID].files()
	if a.Status != http.StatusOK || len(files) != 1 {
		t.Fatalf("GET /history: %v", a)
	}
	view := door + "/view?" + url.Values{"filename": {files[0].Filename}, "subfolder": {files[0].Subfolder}, "type": {"output"}}.Encode()
	if status := fleettest.Do(t, http.MethodGet, view, nil, fleettest.Key(studio)).Status; status != http.StatusOK {
		t.Errorf("GET /view by its tenant: %d", status)
	}
	if status := fleettest.Do(t, http.MethodGet, view, nil, fleettest.Key(other)).Status; status != http.StatusNotFound {
		t.Errorf("GET /view by another tenant: %d; want 404", status)
	}
	if a := fleettest.Do(t, http.MethodGet, door+"/history/"+queued.PromptID, nil, fleettest.Key(other)); a.Status != http.StatusOK || string(a.Body) != "{}" {
		t.Errorf("GET /history by another tenant: %v; want {}", a)
	}
	reader := b.key(t, "studio", tenancy.RoleRead)
	if status := fleettest.Do(t, http.MethodPost, door+"/prompt", map[string]any{"prompt": graph}, fleettest.Key(reader)).Status; status != http.StatusForbidden {
		t.Errorf("POST /prompt with a read key: %d; want 403", status)
	}
}
