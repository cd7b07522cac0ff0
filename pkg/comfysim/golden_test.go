package comfysim_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"image/png"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
)

const (
	clientA  = "acceptance-8e35a1d2"
	clientFF = "acceptance-ff-ed731530"
	// slow makes every node take 50ms (NodeDuration 1ms at speed 0.02),
	// for the moments the session must catch a prompt while it runs.
	slow = 0.02
)

// session replays the recorded session against one simulator, in the
// recorded order, so that queue numbers, counters and history line up.
type session struct {
	t   *testing.T
	sim *comfysim.Server
	c   *client
	ws  *wsRecorder
	ids ids
}

// replay sends the request of transcript nn, with prompt ids mapped.
func (s *session) replay(nn string) (transcript, response) {
	s.t.Helper()
	tr := loadTranscript(s.t, nn)
	var body []byte
	switch {
	case tr.Request.BodyRaw != nil:
		body = []byte(*tr.Request.BodyRaw)
	case tr.Request.Body != nil:
		body = []byte(s.ids.apply(string(tr.Request.Body)))
	}
	return tr, s.c.do(tr.Request.Method, s.ids.apply(tr.Request.Path), body, tr.Request.Headers)
}

// checkStatus compares status and content type with the transcript.
func (s *session) checkStatus(nn string, tr transcript, got response) {
	s.t.Helper()
	if got.status != tr.Response.Status {
		s.t.Errorf("%s: status %d, want %d (%s)", nn, got.status, tr.Response.Status, truncate(got.body, 500))
	}
	if want := tr.Response.Headers["Content-Type"]; got.header.Get("Content-Type") != want {
		s.t.Errorf("%s: Content-Type %q, want %q", nn, got.header.Get("Content-Type"), want)
	}
}

// exact replays nn and expects the recorded body byte for byte.
func (s *session) exact(nn string) response {
	s.t.Helper()
	tr, got := s.replay(nn)
	s.checkStatus(nn, tr, got)
	want := ""
	if tr.Response.BodyRaw != nil {
		want = normalize(*tr.Response.BodyRaw, s.ids)
	}
	if normalize(string(got.body), nil) != want {
		s.t.Errorf("%s: body\n got %s\nwant %s", nn, truncate(got.body, 2000), truncate([]byte(want), 2000))
	}
	return got
}

// shaped replays nn and compares the JSON answer with the recorded one.
func (s *session) shaped(nn string, opts compareOpts) response {
	s.t.Helper()
	tr, got := s.replay(nn)
	s.checkStatus(nn, tr, got)
	want := normalize(*tr.Response.BodyRaw, s.ids)
	compareJSON(s.t, nn, []byte(want), []byte(normalize(string(got.body), nil)), opts)
	return got
}

// post replays a POST /prompt that must be accepted, maps the recorded
// prompt id to the new one, and checks the answer's shape and number.
func (s *session) post(nn string) string {
	s.t.Helper()
	tr, got := s.replay(nn)
	s.checkStatus(nn, tr, got)
	var want, have struct {
		PromptID string `json:"prompt_id"`
	}
	if err := json.Unmarshal([]byte(*tr.Response.BodyRaw), &want); err != nil {
		s.t.Fatalf("%s: golden: %v", nn, err)
	}
	if err := json.Unmarshal(got.body, &have); err != nil || have.PromptID == "" {
		s.t.Fatalf("%s: answer %s: %v", nn, got.body, err)
	}
	s.ids[want.PromptID] = have.PromptID
	if normalize(*tr.Response.BodyRaw, s.ids) != string(got.body) {
		s.t.Errorf("%s: body %s, want %s", nn, got.body, normalize(*tr.Response.BodyRaw, s.ids))
	}
	return have.PromptID
}

// checkSequence compares the frames of one prompt with a recorded run:
// the same message types in the same order and, for text frames, the
// same text once ids and timestamps are normalised.
func (s *session) checkSequence(name string, got []wsFrame, lines []wsLine, loose compareOpts) {
	s.t.Helper()
	if g, w := strings.Join(tokens(got), " "), strings.Join(lineTokens(lines), " "); g != w {
		s.t.Errorf("%s: message sequence\n got %s\nwant %s", name, g, w)
		return
	}
	for i, l := range lines {
		if l.Kind == "binary" {
			checkPreviewFrame(s.t, name, got[i], l, s.ids)
			continue
		}
		want, have := normalize(l.Raw, s.ids), normalize(string(got[i].data), nil)
		if got[i].typ == "execution_error" {
			compareJSON(s.t, name+" "+got[i].typ, []byte(want), []byte(have), loose)
			continue
		}
		if want != have {
			s.t.Errorf("%s: frame %d\n got %s\nwant %s", name, i, truncate([]byte(have), 1500), truncate([]byte(want), 1500))
		}
	}
}

// checkPreviewFrame checks a binary preview frame's header and image.
func checkPreviewFrame(t *testing.T, name string, f wsFrame, l wsLine, m ids) {
	t.Helper()
	if !f.binary || len(f.data) < 8 {
		t.Errorf("%s: want a binary frame, got %s", name, truncate(f.data, 100))
		return
	}
	img := f.data[8:]
	if l.EventType == 4 {
		n := binary.BigEndian.Uint32(f.data[4:])
		if int(n)+8 > len(f.data) {
			t.Errorf("%s: metadata length %d beyond frame", name, n)
			return
		}
		compareJSON(t, name+" preview metadata", []byte(m.apply(string(l.Metadata))), f.data[8:8+n], compareOpts{})
		img = f.data[8+n:]
	} else if format := binary.BigEndian.Uint32(f.data[4:]); format != 2 {
		t.Errorf("%s: preview format %d, want 2 (PNG)", name, format)
	}
	if _, err := png.Decode(bytes.NewReader(img)); err != nil {
		t.Errorf("%s: preview image: %v", name, err)
	}
}

// promptFrames returns the frames of a prompt: from the first frame
// after mark to its executing{node: null}.
func (s *session) promptFrames(mark int, promptID string) []wsFrame {
	s.t.Helper()
	end := s.ws.waitDone(mark, promptID)
	return s.ws.since(mark)[:end-mark+1]
}

func TestGoldenSession(t *testing.T) {
	sim := startSim(t, comfysim.Config{NodeDuration: time.Millisecond, StepDuration: time.Millisecond})
	s := &session{t: t, sim: sim, c: newClient(t, sim.URL()), ids: ids{}}
	s.ws = dialWS(t, sim.URL(), clientA, false)
	s.ws.waitType(0, "status", "")

	statsShape := compareOpts{
		kindOnly: func(string) bool { return true },
		anyKind:  func(p string) bool { return p == "devices.0.index" },
	}
	s.shaped("01", statsShape)
	s.exact("02")
	s.exact("03")
	s.exact("04")
	s.exact("05")
	checkObjectInfo(t, s.c)
	s.exact("07")
	s.exact("08")
	s.exact("09")

	// A good prompt, caught while it runs.
	sim.SetSpeed(slow)
	mark := s.ws.mark()
	good := s.post("10")
	s.ws.waitType(mark, "execution_start", good)
	s.shaped("11", compareOpts{})
	sim.SetSpeed(1)
	s.checkSequence("ws_1", s.promptFrames(mark, good), loadWS(t, "ws_1_good.jsonl"), compareOpts{})
	s.shaped("12", compareOpts{})
	s.exact("13")
	s.exact("14")
	checkView(t, s)
	s.exact("16")
	s.exact("17")
	checkPreviewWebP(t, s)

	// The same prompt again comes from the cache.
	mark = s.ws.mark()
	cached := s.post("19")
	s.checkSequence("ws_2", s.promptFrames(mark, cached), loadWS(t, "ws_2_cached_rerun.jsonl"), compareOpts{})
	s.shaped("20", compareOpts{})

	// A client-chosen prompt_id and extra_data.
	mark = s.ws.mark()
	chosen := s.post("21")
	s.checkSequence("ws_3", s.promptFrames(mark, chosen), loadWS(t, "ws_3_client_prompt_id.jsonl"), compareOpts{})
	s.shaped("22", compareOpts{})

	// Rejected prompts: exact errors, and not a single websocket frame.
	mark = s.ws.mark()
	for _, nn := range []string{"23", "24", "25", "26", "27", "28", "29", "30", "31", "32", "33"} {
		s.exact(nn)
	}
	failing := s.post("34")
	first := s.ws.waitType(mark, "status", "")
	if first != mark {
		t.Errorf("ws_4: rejected prompts produced frames: %v", tokens(s.ws.since(mark)[:first-mark]))
	}
	if n := len(loadWS(t, "ws_4_invalid.jsonl")); n != 0 {
		t.Fatalf("ws_4 golden has %d frames", n)
	}
	errorOpts := compareOpts{kindOnly: pathHas("current_outputs")}
	s.checkSequence("ws_5", s.promptFrames(mark, failing), loadWS(t, "ws_5_runtime_error.jsonl"), errorOpts)
	s.shaped("35", errorOpts)

	// Progress from SaveImageWebsocket, to a plain client.
	mark = s.ws.mark()
	progress := s.post("36")
	s.checkSequence("ws_6", s.promptFrames(mark, progress), loadWS(t, "ws_6_progress_binary_plain_client.jsonl"), compareOpts{})
	s.shaped("37", compareOpts{})

	// The same to a client that negotiated preview metadata; the other
	// client sees only status.
	ff := dialWS(t, sim.URL(), clientFF, true)
	flags := loadWS(t, "ws_B_feature_flags.jsonl")
	ff.waitType(0, "feature_flags", "")
	s.checkSequence("ws_B greeting", ff.since(0)[:2], flags[:2], compareOpts{})
	mark, ffMark := s.ws.mark(), ff.mark()
	withMeta := s.post("38")
	end := ff.waitDone(ffMark, withMeta)
	s.checkSequence("ws_7", ff.since(ffMark)[:end-ffMark+1], loadWS(t, "ws_7_progress_binary_feature_flag_client.jsonl"), compareOpts{})
	s.ws.waitFor(mark+2, "status 0", func(f wsFrame) bool {
		return f.typ == "status" && strings.Contains(string(f.data), `"queue_remaining": 0`)
	})
	if g, w := tokens(s.ws.since(mark)), lineTokens(loadWS(t, "ws_7_seen_by_other_client_A.jsonl")); strings.Join(g, " ") != strings.Join(w, " ") {
		t.Errorf("ws_7_seen_by_other_client_A: got %v, want %v", g, w)
	}

	queueAndInterrupt(t, s)
	stockInterrupt(t, s)

	// Upload, LoadImage, and history paging and deletion.
	upload(t, s)
	s.exact("57")
	mark = s.ws.mark()
	loaded := s.post("58")
	s.checkSequence("ws_9c", s.promptFrames(mark, loaded), loadWS(t, "ws_9c_load_image.jsonl"), compareOpts{})
	s.shaped("59", compareOpts{})
	s.exact("60")
	s.shaped("61", compareOpts{})
	s.exact("62")
	s.exact("63")
	s.exact("64")
	s.exact("65")
	s.checkSequence("ws_A_same_client_id_during_run", s.ws.since(0), loadWS(t, "ws_A_same_client_id_during_run.jsonl"), compareOpts{})

	// An idle reconnect is greeted with status only.
	again := dialWS(t, sim.URL(), clientA, false)
	again.waitType(0, "status", "")
	s.checkSequence("ws_A_reconnect", again.since(0)[:1], loadWS(t, "ws_A_reconnect.jsonl"), compareOpts{})
}

// checkObjectInfo compares the classes transcript 06 kept with ours.
func checkObjectInfo(t *testing.T, c *client) {
	t.Helper()
	tr := loadTranscript(t, "06")
	got := c.get("/object_info")
	if got.status != http.StatusOK || got.header.Get("Content-Type") != tr.Response.Headers["Content-Type"] {
		t.Fatalf("06: %d %s", got.status, got.header.Get("Content-Type"))
	}
	var want, have map[string]json.RawMessage
	if err := json.Unmarshal(tr.Response.Body, &want); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(got.body, &have); err != nil {
		t.Fatalf("06: %v", err)
	}
	for name, w := range want {
		h, ok := have[name]
		if !ok {
			t.Errorf("06: class %s missing", name)
			continue
		}
		compareJSON(t, "06 "+name, w, h, compareOpts{})
	}
}

// checkView checks transcript 15: the saved PNG as /view serves it.
func checkView(t *testing.T, s *session) {
	t.Helper()
	tr, got := s.replay("15")
	s.checkStatus("15", tr, got)
	for _, h := range []string{"Content-Disposition", "Accept-Ranges"} {
		if got.header.Get(h) != tr.Response.Headers[h] {
			t.Errorf("15: %s %q, want %q", h, got.header.Get(h), tr.Response.Headers[h])
		}
	}
	for _, h := range []string{"Etag", "Last-Modified", "Content-Length"} {
		if got.header.Get(h) == "" {
			t.Errorf("15: no %s header", h)
		}
	}
	img, err := png.Decode(bytes.NewReader(got.body))
	if err != nil {
		t.Fatalf("15: not a PNG: %v", err)
	}
	if b := img.Bounds(); b.Dx() != 256 || b.Dy() != 256 {
		t.Errorf("15: image is %v, want 256×256", b)
	}
	if !bytes.Contains(got.body[:64], []byte("tEXtprompt\x00{")) {
		t.Errorf("15: no prompt tEXt chunk after IHDR")
	}
	golden, err := os.ReadFile(filepath.Join(transcriptDir, "15_get_view_output.bin"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got.body[:16], golden[:16]) {
		t.Errorf("15: PNG header % x, want % x", got.body[:16], golden[:16])
	}
}

// checkPreviewWebP checks transcript 18: ?preview=webp;50.
func checkPreviewWebP(t *testing.T, s *session) {
	t.Helper()
	tr, got := s.replay("18")
	s.checkStatus("18", tr, got)
	if cd := got.header.Get("Content-Disposition"); cd != tr.Response.Headers["Content-Disposition"] {
		t.Errorf("18: Content-Disposition %q", cd)
	}
	if len(got.body) < 12 || string(got.body[:4]) != "RIFF" || string(got.body[8:12]) != "WEBP" {
		t.Errorf("18: not a WebP: % x", got.body[:min(16, len(got.body))])
	}
}

// queueAndInterrupt replays 39–50: a long prompt, three queued behind it
// (one in front), a deletion, a stray and a real interrupt.
func queueAndInterrupt(t *testing.T, s *session) {
	t.Helper()
	s.sim.SetSpeed(slow)
	mark := s.ws.mark()
	long := s.post("39")
	s.ws.waitType(mark, "execution_start", long)
	s.post("40")
	s.post("41")
	last := s.post("42")
	s.shaped("43", compareOpts{})
	s.exact("44")
	s.exact("45")
	s.shaped("46", compareOpts{})
	s.exact("47")
	s.ws.waitType(mark, "progress", long)
	s.exact("48")
	s.sim.SetSpeed(1)
	behind := s.ids["d8a8df6b-d207-4f43-8729-c46e6527f7e6"]
	s.ws.waitDone(mark, behind)
	got := collapseSteps(tokens(s.ws.since(mark)))
	// The recording starts with two status frames before this session's
	// first POST; collapseSteps drops status anyway.
	want := collapseSteps(lineTokens(loadWS(t, "ws_8_slow_queue_interrupt.jsonl")))
	if strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("ws_8: sequence\n got %v\nwant %v", got, want)
	}
	order := []string{long, last, behind}
	var ran []string
	for _, f := range s.ws.since(mark) {
		if f.typ == "execution_start" {
			ran = append(ran, f.promptID())
		}
	}
	if strings.Join(ran, ",") != strings.Join(order, ",") {
		t.Errorf("run order %v, want %v (front first, deleted never)", ran, order)
	}
	s.shaped("49", compareOpts{})
	s.exact("50")
}

// stockInterrupt replays 51–55: a chain of stock nodes, then the same
// chain interrupted, watched by a second socket with the same clientId.
func stockInterrupt(t *testing.T, s *session) {
	t.Helper()
	tempName := regexp.MustCompile(`^ComfyUI_temp_[a-z]{5}_00001_\.png$`)
	mark := s.ws.mark()
	chain := s.post("51")
	s.checkSequence("ws_9", s.promptFrames(mark, chain), loadWS(t, "ws_9_slow_stock_complete.jsonl"), compareOpts{})
	got := s.shaped("52", compareOpts{})
	if m := regexp.MustCompile(`ComfyUI_temp_[a-z_0-9]+\.png`).FindString(string(got.body)); !tempName.MatchString(m) {
		t.Errorf("52: PreviewImage file %q, want %s", m, tempName)
	}

	s.sim.SetSpeed(slow)
	mark = s.ws.mark()
	stopped := s.post("53")
	s.ws.waitFor(mark, "executing 10", func(f wsFrame) bool {
		return f.typ == "executing" && strings.Contains(string(f.data), `"node": "10"`)
	})
	old := s.ws
	replaced := old.mark()
	s.ws = dialWS(t, s.sim.URL(), clientA, false)
	s.ws.waitType(0, "executing", "")
	s.exact("54")
	end := s.ws.waitDone(0, stopped)
	s.sim.SetSpeed(1)
	s.checkSequence("ws_9b_A3", s.ws.since(0)[:end+1], loadWS(t, "ws_9b_slow_stock_interrupted_seen_by_A3.jsonl"), compareOpts{})
	if n := old.mark(); n != replaced {
		t.Errorf("replaced socket received %v", tokens(old.since(replaced)))
	}
	s.checkSequence("ws_9b_seen_by_A", old.since(mark), loadWS(t, "ws_9b_slow_stock_interrupted_seen_by_A.jsonl"), compareOpts{})
	// Over the whole session, the first socket saw what the recorded one
	// did (statuses aside, whose interleaving depends on timing).
	if g, w := collapseSteps(tokens(old.since(0))), collapseSteps(lineTokens(loadWS(t, "ws_A.jsonl"))); strings.Join(g, " ") != strings.Join(w, " ") {
		t.Errorf("ws_A: sequence\n got %v\nwant %v", g, w)
	}
	s.shaped("55", compareOpts{})
}

// upload replays 56: a multipart upload of the PNG of transcript 15.
func upload(t *testing.T, s *session) {
	t.Helper()
	tr := loadTranscript(t, "56")
	image, err := os.ReadFile(filepath.Join(transcriptDir, "15_get_view_output.bin"))
	if err != nil {
		t.Fatal(err)
	}
	var body bytes.Buffer
	mw := multipart.NewWriter(&body)
	fw, err := mw.CreateFormFile("image", "acceptance_upload.png")
	if err != nil {
		t.Fatal(err)
	}
	fw.Write(image)
	mw.WriteField("type", "input")
	mw.WriteField("overwrite", "true")
	mw.Close()
	got := s.c.do(http.MethodPost, "/upload/image", body.Bytes(), map[string]string{"Content-Type": mw.FormDataContentType()})
	s.checkStatus("56", tr, got)
	if string(got.body) != *tr.Response.BodyRaw {
		t.Errorf("56: body %s, want %s", got.body, *tr.Response.BodyRaw)
	}
	view := s.c.get("/view?filename=acceptance_upload.png&type=input")
	if view.status != http.StatusOK || !bytes.Equal(view.body, image) {
		t.Errorf("view of the upload: %d, %d bytes", view.status, len(view.body))
	}
}
