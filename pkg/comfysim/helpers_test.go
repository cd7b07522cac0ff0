package comfysim_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
)

const transcriptDir = "../comfy/testdata/transcripts"

// waitTimeout bounds every wait on the simulator.
const waitTimeout = 10 * time.Second

// startSim starts a simulator that the test closes.
func startSim(t *testing.T, cfg comfysim.Config) *comfysim.Server {
	t.Helper()
	if cfg.Logger == nil {
		cfg.Logger = testLogger(t)
	}
	s, err := comfysim.Start(cfg)
	if err != nil {
		t.Fatalf("start simulator: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("close simulator: %v", err)
		}
	})
	return s
}

// client is a plain HTTP client with its own connections, closed at the
// end of the test.
type client struct {
	t    *testing.T
	base string
	http *http.Client
}

func newClient(t *testing.T, base string) *client {
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	return &client{t: t, base: base, http: &http.Client{Transport: tr, Timeout: waitTimeout}}
}

// response is an HTTP answer with its body read.
type response struct {
	status int
	header http.Header
	body   []byte
}

func (c *client) do(method, path string, body []byte, header map[string]string) response {
	c.t.Helper()
	resp, err := c.try(method, path, body, header)
	if err != nil {
		c.t.Fatalf("%s %s: %v", method, path, err)
	}
	return resp
}

func (c *client) try(method, path string, body []byte, header map[string]string) (response, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequest(method, c.base+path, rd)
	if err != nil {
		return response{}, err
	}
	for k, v := range header {
		req.Header.Set(k, v)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return response{}, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return response{}, err
	}
	return response{status: resp.StatusCode, header: resp.Header, body: b}, nil
}

func (c *client) get(path string) response { return c.do(http.MethodGet, path, nil, nil) }

func (c *client) postJSON(path string, v any) response {
	c.t.Helper()
	var body []byte
	switch b := v.(type) {
	case string:
		body = []byte(b)
	case []byte:
		body = b
	case json.RawMessage:
		body = b
	default:
		var err error
		if body, err = json.Marshal(v); err != nil {
			c.t.Fatalf("encode request: %v", err)
		}
	}
	return c.do(http.MethodPost, path, body, map[string]string{"Content-Type": "application/json"})
}

// wsFrame is one websocket message received.
type wsFrame struct {
	binary bool
	data   []byte
	typ    string
	at     time.Time
}

// token names a frame for sequence comparisons: its type, with
// "executing:null" for the end marker and "bin1"/"bin4" for binary
// frames.
func (f wsFrame) token() string {
	if f.binary {
		if len(f.data) < 4 {
			return "bin?"
		}
		return fmt.Sprintf("bin%d", binary.BigEndian.Uint32(f.data))
	}
	if f.typ == "executing" && bytes.Contains(f.data, []byte(`"node": null`)) {
		return "executing:null"
	}
	return f.typ
}

func (f wsFrame) promptID() string {
	var m struct {
		Data struct {
			PromptID string `json:"prompt_id"`
		} `json:"data"`
	}
	_ = json.Unmarshal(f.data, &m)
	return m.Data.PromptID
}

// wsRecorder keeps every frame a websocket receives.
type wsRecorder struct {
	t      *testing.T
	conn   *websocket.Conn
	mu     sync.Mutex
	frames []wsFrame
	err    error
	notify chan struct{}
	done   chan struct{}
}

func dialWS(t *testing.T, base, clientID string, featureFlags bool) *wsRecorder {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), waitTimeout)
	defer cancel()
	url := strings.Replace(base, "http://", "ws://", 1) + "/ws"
	if clientID != "" {
		url += "?clientId=" + clientID
	}
	conn, _, err := websocket.Dial(ctx, url, nil)
	if err != nil {
		t.Fatalf("dial %s: %v", url, err)
	}
	conn.SetReadLimit(16 << 20)
	r := &wsRecorder{t: t, conn: conn, notify: make(chan struct{}, 1), done: make(chan struct{})}
	go r.read()
	t.Cleanup(r.close)
	if featureFlags {
		msg := []byte(`{"type": "feature_flags", "data": {"supports_preview_metadata": true}}`)
		if err := conn.Write(ctx, websocket.MessageText, msg); err != nil {
			t.Fatalf("send feature flags: %v", err)
		}
	}
	// Like a real client, wait for the greeting: only then is the socket
	// registered to receive its prompts' messages.
	r.waitType(0, "status", "")
	return r
}

func (r *wsRecorder) read() {
	defer close(r.done)
	for {
		typ, data, err := r.conn.Read(context.Background())
		r.mu.Lock()
		if err != nil {
			r.err = err
			r.mu.Unlock()
			r.signal()
			return
		}
		f := wsFrame{binary: typ == websocket.MessageBinary, data: data, at: time.Now()}
		if !f.binary {
			var m struct {
				Type string `json:"type"`
			}
			_ = json.Unmarshal(data, &m)
			f.typ = m.Type
		}
		r.frames = append(r.frames, f)
		r.mu.Unlock()
		r.signal()
	}
}

func (r *wsRecorder) signal() {
	select {
	case r.notify <- struct{}{}:
	default:
	}
}

func (r *wsRecorder) close() {
	_ = r.conn.CloseNow()
	<-r.done
}

// mark returns the number of frames received so far.
func (r *wsRecorder) mark() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.frames)
}

// since returns the frames received from index i on.
func (r *wsRecorder) since(i int) []wsFrame {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]wsFrame(nil), r.frames[i:]...)
}

// waitFor returns the index of the first frame at or after from that
// matches, waiting for it.
func (r *wsRecorder) waitFor(from int, what string, match func(wsFrame) bool) int {
	r.t.Helper()
	deadline := time.NewTimer(waitTimeout)
	defer deadline.Stop()
	for {
		r.mu.Lock()
		for i := from; i < len(r.frames); i++ {
			if match(r.frames[i]) {
				r.mu.Unlock()
				return i
			}
		}
		err := r.err
		r.mu.Unlock()
		if err != nil {
			r.t.Fatalf("websocket closed while waiting for %s: %v", what, err)
		}
		select {
		case <-r.notify:
		case <-deadline.C:
			r.t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// waitType waits for a text frame of a type (and prompt, if not empty).
func (r *wsRecorder) waitType(from int, typ, promptID string) int {
	r.t.Helper()
	return r.waitFor(from, typ+" "+promptID, func(f wsFrame) bool {
		return f.typ == typ && (promptID == "" || f.promptID() == promptID)
	})
}

// waitDone waits for the executing{node: null} that ends a prompt.
func (r *wsRecorder) waitDone(from int, promptID string) int {
	r.t.Helper()
	return r.waitFor(from, "end of "+promptID, func(f wsFrame) bool {
		return f.token() == "executing:null" && f.promptID() == promptID
	})
}

// waitClosed waits until the server drops the socket.
func (r *wsRecorder) waitClosed() error {
	r.t.Helper()
	select {
	case <-r.done:
		r.mu.Lock()
		defer r.mu.Unlock()
		return r.err
	case <-time.After(waitTimeout):
		r.t.Fatal("websocket still open")
		return nil
	}
}

func tokens(frames []wsFrame) []string {
	out := make([]string, len(frames))
	for i, f := range frames {
		out[i] = f.token()
	}
	return out
}

// transcript is one recorded HTTP exchange.
type transcript struct {
	Request struct {
		Method  string            `json:"method"`
		Path    string            `json:"path"`
		Body    json.RawMessage   `json:"body"`
		BodyRaw *string           `json:"body_raw"`
		Headers map[string]string `json:"headers"`
	} `json:"request"`
	Response struct {
		Status  int               `json:"status"`
		Headers map[string]string `json:"headers"`
		BodyRaw *string           `json:"body_raw"`
		Body    json.RawMessage   `json:"body"`
	} `json:"response"`
}

func loadTranscript(t *testing.T, prefix string) transcript {
	t.Helper()
	matches, err := filepath.Glob(filepath.Join(transcriptDir, prefix+"_*.json"))
	if err != nil || len(matches) != 1 {
		t.Fatalf("transcript %s: %v %v", prefix, matches, err)
	}
	b, err := os.ReadFile(matches[0])
	if err != nil {
		t.Fatalf("read transcript: %v", err)
	}
	var tr transcript
	if err := json.Unmarshal(b, &tr); err != nil {
		t.Fatalf("decode transcript %s: %v", matches[0], err)
	}
	return tr
}

// wsLine is one recorded websocket frame.
type wsLine struct {
	Kind      string          `json:"kind"`
	Raw       string          `json:"raw"`
	EventType int             `json:"event_type"`
	Metadata  json.RawMessage `json:"metadata"`
}

func (l wsLine) token() string {
	if l.Kind == "binary" {
		return fmt.Sprintf("bin%d", l.EventType)
	}
	var m struct {
		Type string `json:"type"`
	}
	_ = json.Unmarshal([]byte(l.Raw), &m)
	if m.Type == "executing" && strings.Contains(l.Raw, `"node": null`) {
		return "executing:null"
	}
	return m.Type
}

func loadWS(t *testing.T, name string) []wsLine {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(transcriptDir, name))
	if err != nil {
		t.Fatalf("read %s: %v", name, err)
	}
	var out []wsLine
	for _, line := range bytes.Split(bytes.TrimSpace(b), []byte("\n")) {
		if len(line) == 0 {
			continue
		}
		var l wsLine
		if err := json.Unmarshal(line, &l); err != nil {
			t.Fatalf("decode %s: %v", name, err)
		}
		out = append(out, l)
	}
	return out
}

func lineTokens(lines []wsLine) []string {
	out := make([]string, len(lines))
	for i, l := range lines {
		out[i] = l.token()
	}
	return out
}

// collapseSteps drops status messages and folds each run of progress
// steps into one "STEP", for sequences whose length depends on timing.
func collapseSteps(toks []string) []string {
	var out []string
	for i := 0; i < len(toks); i++ {
		if toks[i] == "status" {
			continue
		}
		if i+2 < len(toks) && toks[i] == "progress_state" &&
			((toks[i+1] == "progress" && strings.HasPrefix(toks[i+2], "bin")) ||
				(strings.HasPrefix(toks[i+1], "bin") && toks[i+2] == "progress")) {
			if len(out) == 0 || out[len(out)-1] != "STEP" {
				out = append(out, "STEP")
			}
			i += 2
			continue
		}
		out = append(out, toks[i])
	}
	return out
}

// ids maps prompt ids of the transcripts to the simulator's.
type ids map[string]string

func (m ids) apply(s string) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		s = strings.ReplaceAll(s, k, m[k])
	}
	return s
}

var (
	timestampRE = regexp.MustCompile(`"timestamp": [0-9]+`)
	tempNameRE  = regexp.MustCompile(`ComfyUI_temp_[a-z]{5}_`)
)

// normalize replaces what legitimately differs between two runs: prompt
// ids (by the mapping), timestamps and PreviewImage's random file names.
func normalize(s string, m ids) string {
	s = timestampRE.ReplaceAllString(m.apply(s), `"timestamp": 0`)
	return tempNameRE.ReplaceAllString(s, "ComfyUI_temp_xxxxx_")
}

// testLogger sends the simulator's logs to the test log.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// jnode is a JSON value that keeps the order of object keys.
type jnode struct {
	kind byte // '{', '[', '"', 'b', 'n', '0'
	keys []string
	kids []*jnode
	lit  string
}

func parseTree(b []byte) (*jnode, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	n, err := parseNode(dec)
	if err != nil {
		return nil, err
	}
	if dec.More() {
		return nil, fmt.Errorf("trailing data")
	}
	return n, nil
}

func parseNode(dec *json.Decoder) (*jnode, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	switch v := tok.(type) {
	case json.Delim:
		n := &jnode{kind: byte(v)}
		for dec.More() {
			if v == '{' {
				k, err := dec.Token()
				if err != nil {
					return nil, err
				}
				n.keys = append(n.keys, k.(string))
			}
			kid, err := parseNode(dec)
			if err != nil {
				return nil, err
			}
			n.kids = append(n.kids, kid)
		}
		if _, err := dec.Token(); err != nil {
			return nil, err
		}
		return n, nil
	case string:
		return &jnode{kind: '"', lit: v}, nil
	case json.Number:
		return &jnode{kind: '0', lit: v.String()}, nil
	case bool:
		return &jnode{kind: 'b', lit: fmt.Sprint(v)}, nil
	default:
		return &jnode{kind: 'n'}, nil
	}
}

// compareOpts loosens a comparison at some paths ("a.b.0.c").
type compareOpts struct {
	// kindOnly paths compare the kind of value, not the value.
	kindOnly func(path string) bool
	// anyKind paths are not compared at all.
	anyKind func(path string) bool
}

// compareJSON checks that got has the keys of want in the same order,
// recursively, with the same kinds and, unless loosened, the same values.
func compareJSON(t *testing.T, what string, want, got []byte, opts compareOpts) {
	t.Helper()
	w, err := parseTree(want)
	if err != nil {
		t.Fatalf("%s: golden is not JSON: %v\n%s", what, err, want)
	}
	g, err := parseTree(got)
	if err != nil {
		t.Fatalf("%s: answer is not JSON: %v\n%s", what, err, got)
	}
	var problems []string
	walkCompare("", w, g, opts, &problems)
	if len(problems) > 0 {
		if len(problems) > 15 {
			problems = append(problems[:15], "...")
		}
		t.Errorf("%s differs from the real server:\n  %s\ngot: %s", what, strings.Join(problems, "\n  "), truncate(got, 3000))
	}
}

func truncate(b []byte, n int) string {
	if len(b) > n {
		return string(b[:n]) + "..."
	}
	return string(b)
}

func walkCompare(path string, w, g *jnode, opts compareOpts, problems *[]string) {
	if opts.anyKind != nil && opts.anyKind(path) {
		return
	}
	if w.kind != g.kind {
		*problems = append(*problems, fmt.Sprintf("%s: kind %q, want %q", path, g.kind, w.kind))
		return
	}
	if opts.kindOnly != nil && opts.kindOnly(path) {
		return
	}
	join := func(k string) string {
		if path == "" {
			return k
		}
		return path + "." + k
	}
	switch w.kind {
	case '{':
		if strings.Join(w.keys, ",") != strings.Join(g.keys, ",") {
			*problems = append(*problems, fmt.Sprintf("%s: keys %v, want %v", path, g.keys, w.keys))
			return
		}
		for i, k := range w.keys {
			walkCompare(join(k), w.kids[i], g.kids[i], opts, problems)
		}
	case '[':
		if len(w.kids) != len(g.kids) {
			*problems = append(*problems, fmt.Sprintf("%s: %d items, want %d", path, len(g.kids), len(w.kids)))
			return
		}
		for i := range w.kids {
			walkCompare(join(fmt.Sprint(i)), w.kids[i], g.kids[i], opts, problems)
		}
	default:
		if w.lit != g.lit {
			*problems = append(*problems, fmt.Sprintf("%s: %q, want %q", path, g.lit, w.lit))
		}
	}
}

// pathHas reports whether a path contains one of the given segments.
func pathHas(segments ...string) func(string) bool {
	return func(p string) bool {
		for _, part := range strings.Split(p, ".") {
			for _, s := range segments {
				if part == s {
					return true
				}
			}
		}
		return false
	}
}
