package comfy

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/coder/websocket"
)

const transcripts = "testdata/transcripts"

// exchange is one NN_*.json golden file.
type exchange struct {
	name    string
	Request struct {
		Method  string            `json:"method"`
		Path    string            `json:"path"`
		Headers map[string]string `json:"headers"`
		Body    json.RawMessage   `json:"body"`
	} `json:"request"`
	Response struct {
		Status       int               `json:"status"`
		Headers      map[string]string `json:"headers"`
		BodyRaw      *string           `json:"body_raw"`
		Body         json.RawMessage   `json:"body"`
		BodyLen      int               `json:"body_len"`
		BodyMagicHex string            `json:"body_magic_hex"`
	} `json:"response"`
}

// loadExchange reads the golden file whose name starts with prefix ("10" or
// "10_post_prompt_good").
func loadExchange(t testing.TB, prefix string) *exchange {
	t.Helper()
	matches, _ := filepath.Glob(filepath.Join(transcripts, prefix+"*.json"))
	if len(matches) != 1 {
		t.Fatalf("transcript %q: %d matches", prefix, len(matches))
	}
	b, err := os.ReadFile(matches[0])
	if err != nil {
		t.Fatal(err)
	}
	e := &exchange{name: strings.TrimSuffix(filepath.Base(matches[0]), ".json")}
	if err := json.Unmarshal(b, e); err != nil {
		t.Fatalf("%s: %v", matches[0], err)
	}
	return e
}

// responseBody rebuilds the recorded body: body_raw, else the .bin file, else
// the recorded magic bytes padded to body_len, else the (trimmed) parsed body.
func (e *exchange) responseBody(t testing.TB) []byte {
	t.Helper()
	r := e.Response
	if r.BodyRaw != nil {
		return []byte(*r.BodyRaw)
	}
	if b, err := os.ReadFile(filepath.Join(transcripts, e.name+".bin")); err == nil {
		return b
	}
	if r.BodyLen > 0 {
		magic, err := hex.DecodeString(r.BodyMagicHex)
		if err != nil {
			t.Fatal(err)
		}
		return append(magic, make([]byte, r.BodyLen-len(magic))...)
	}
	if len(r.Body) > 0 && string(r.Body) != "null" {
		var m map[string]json.RawMessage
		if err := json.Unmarshal(r.Body, &m); err != nil {
			t.Fatal(err)
		}
		delete(m, "body_note")
		delete(m, "all_node_classes")
		b, _ := json.Marshal(m)
		return b
	}
	return nil
}

// responder is one canned HTTP answer; hangUp closes the connection instead.
type responder struct {
	status int
	header map[string]string
	body   []byte
	hangUp bool
}

func (e *exchange) responder(t testing.TB) responder {
	return responder{status: e.Response.Status, header: e.Response.Headers, body: e.responseBody(t)}
}

func jsonResponder(status int, body string) responder {
	return responder{status: status, header: map[string]string{"Content-Type": "application/json; charset=utf-8"}, body: []byte(body)}
}

// recorded is a request the replay server received.
type recorded struct {
	Method string
	Path   string
	Query  url.Values
	Header http.Header
	Body   []byte
}

// wsStep is one step of a websocket script: send a frame, wait for the
// prompt to be posted or for a client message, or drop the connection.
type wsStep struct {
	text        string
	bin         []byte
	awaitPost   int    // wait until this many prompts were posted
	awaitGet    string // wait until a GET of this path was received
	awaitClient string
	drop        bool
	closeNormal bool
	reject      int
}

// replay answers requests with golden responses over a real loopback socket.
type replay struct {
	t   testing.TB
	srv *httptest.Server

	mu       sync.Mutex
	routes   map[string][]responder
	hits     map[string]int
	requests []recorded
	scripts  [][]wsStep
	wsConns  int

	byPromptID  map[string]responder
	posts       int
	postChanged chan struct{} // closed and replaced on every POST /prompt
	received    chan struct{} // closed and replaced on every request
	quit        chan struct{}
	wg          sync.WaitGroup
}

func newReplay(t testing.TB) *replay {
	rp := &replay{
		t:           t,
		routes:      map[string][]responder{},
		hits:        map[string]int{},
		byPromptID:  map[string]responder{},
		postChanged: make(chan struct{}),
		received:    make(chan struct{}),
		quit:        make(chan struct{}),
	}
	rp.srv = httptest.NewServer(rp)
	t.Cleanup(func() {
		close(rp.quit)
		rp.srv.Close()
		rp.wg.Wait()
	})
	return rp
}

func (rp *replay) URL() string { return rp.srv.URL }

func routeKey(method, path string, q url.Values) string {
	path = strings.TrimPrefix(path, "/api")
	clean := url.Values{}
	for k, vs := range q {
		for _, v := range vs {
			if v != "" {
				clean.Add(k, v)
			}
		}
	}
	return method + " " + path + "?" + clean.Encode()
}

// serve answers the exchange's request with its recorded response. Several
// responders for one request are used in turn, the last one repeatedly.
func (rp *replay) serve(e *exchange) {
	rp.on(e.Request.Method, e.Request.Path, e.responder(rp.t))
}

func (rp *replay) on(method, pathQuery string, r ...responder) {
	u, err := url.Parse(strings.ReplaceAll(pathQuery, ";", "%3B"))
	if err != nil {
		rp.t.Fatal(err)
	}
	key := routeKey(method, u.Path, u.Query())
	rp.mu.Lock()
	rp.routes[key] = append(rp.routes[key], r...)
	rp.mu.Unlock()
}

// servePrompts answers POST /prompt with the exchange whose prompt_id the
// request names, for concurrent Runs.
func (rp *replay) servePrompts(es ...*exchange) {
	rp.mu.Lock()
	defer rp.mu.Unlock()
	for _, e := range es {
		rp.byPromptID[promptIDOf(rp.t, e)] = e.responder(rp.t)
	}
}

// waitPosts waits until n prompts were posted.
func (rp *replay) waitPosts(ctx context.Context, n int) bool {
	for {
		rp.mu.Lock()
		posts, changed := rp.posts, rp.postChanged
		rp.mu.Unlock()
		if posts >= n {
			return true
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return false
		}
	}
}

// waitGet waits until a GET of path was received.
func (rp *replay) waitGet(ctx context.Context, path string) bool {
	for {
		rp.mu.Lock()
		received := rp.received
		rp.mu.Unlock()
		if len(rp.recorded(http.MethodGet, path)) > 0 {
			return true
		}
		select {
		case <-received:
		case <-ctx.Done():
			return false
		}
	}
}

func (rp *replay) script(steps ...[]wsStep) {
	rp.mu.Lock()
	rp.scripts = append(rp.scripts, steps...)
	rp.mu.Unlock()
}

func (rp *replay) recorded(method, path string) []recorded {
	rp.mu.Lock()
	defer rp.mu.Unlock()
	var out []recorded
	for _, r := range rp.requests {
		if r.Method == method && strings.TrimPrefix(r.Path, "/api") == path {
			out = append(out, r)
		}
	}
	return out
}

func (rp *replay) allRequests() []recorded {
	rp.mu.Lock()
	defer rp.mu.Unlock()
	return append([]recorded(nil), rp.requests...)
}

func (rp *replay) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, _ := io.ReadAll(r.Body)
	rp.mu.Lock()
	rp.requests = append(rp.requests, recorded{Method: r.Method, Path: r.URL.Path, Query: r.URL.Query(), Header: r.Header.Clone(), Body: body})
	close(rp.received)
	rp.received = make(chan struct{})
	rp.mu.Unlock()

	if strings.TrimPrefix(r.URL.Path, "/api") == "/ws" {
		rp.serveWS(w, r)
		return
	}
	key := routeKey(r.Method, r.URL.Path, r.URL.Query())
	rp.mu.Lock()
	list := rp.routes[key]
	n := rp.hits[key]
	rp.hits[key]++
	isPost := r.Method == http.MethodPost && strings.TrimPrefix(r.URL.Path, "/api") == "/prompt"
	var byID responder
	if isPost {
		var req struct {
			PromptID string `json:"prompt_id"`
		}
		_ = json.Unmarshal(body, &req)
		byID = rp.byPromptID[req.PromptID]
	}
	rp.mu.Unlock()
	var resp responder
	switch {
	case byID.status != 0 || byID.hangUp:
		resp = byID
	case len(list) > 0:
		resp = list[min(n, len(list)-1)]
	default:
		rp.t.Logf("replay: no response for %s", key)
		http.Error(w, "replay: no route", http.StatusNotImplemented)
		return
	}
	if isPost {
		rp.mu.Lock()
		rp.posts++
		close(rp.postChanged)
		rp.postChanged = make(chan struct{})
		rp.mu.Unlock()
	}
	if resp.hangUp {
		conn, _, err := http.NewResponseController(w).Hijack()
		if err != nil {
			rp.t.Errorf("replay: hijack: %v", err)
			return
		}
		_ = conn.Close()
		return
	}
	for k, v := range resp.header {
		if k != "Content-Length" && k != "Connection" {
			w.Header().Set(k, v)
		}
	}
	w.WriteHeader(resp.status)
	_, _ = w.Write(resp.body)
}

func (rp *replay) serveWS(w http.ResponseWriter, r *http.Request) {
	rp.mu.Lock()
	idx := rp.wsConns
	rp.wsConns++
	var steps []wsStep
	if len(rp.scripts) > 0 {
		steps = rp.scripts[min(idx, len(rp.scripts)-1)]
	}
	rp.mu.Unlock()
	if len(steps) > 0 && steps[0].reject != 0 {
		http.Error(w, "replay: websocket refused", steps[0].reject)
		return
	}
	conn, err := websocket.Accept(w, r, nil)
	if err != nil {
		rp.t.Errorf("replay: accept: %v", err)
		return
	}
	rp.wg.Add(1)
	defer rp.wg.Done()
	conn.SetReadLimit(1 << 20)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() {
		select {
		case <-rp.quit:
			cancel()
		case <-ctx.Done():
		}
	}()

	clientMsgs := make(chan []byte, 16)
	readDone := make(chan struct{})
	go func() {
		defer close(readDone)
		for {
			_, b, err := conn.Read(ctx)
			if err != nil {
				cancel()
				return
			}
			select {
			case clientMsgs <- b:
			default:
			}
		}
	}()
	defer func() { <-readDone }()

	clientID := r.URL.Query().Get("clientId")
	for _, st := range steps {
		switch {
		case st.awaitPost > 0:
			if !rp.waitPosts(ctx, st.awaitPost) {
				return
			}
		case st.awaitGet != "":
			if !rp.waitGet(ctx, st.awaitGet) {
				return
			}
		case st.awaitClient != "":
			select {
			case b := <-clientMsgs:
				var m struct{ Type string }
				if json.Unmarshal(b, &m) != nil || m.Type != st.awaitClient {
					rp.t.Errorf("replay: client sent %s, want type %s", b, st.awaitClient)
				}
			case <-ctx.Done():
				return
			}
		case st.drop:
			_ = conn.CloseNow()
			return
		case st.closeNormal:
			_ = conn.Close(websocket.StatusNormalClosure, "")
			return
		case st.bin != nil:
			if conn.Write(ctx, websocket.MessageBinary, st.bin) != nil {
				return
			}
		default:
			text := strings.ReplaceAll(st.text, "{clientId}", clientID)
			if conn.Write(ctx, websocket.MessageText, []byte(text)) != nil {
				return
			}
		}
	}
	<-ctx.Done()
	_ = conn.CloseNow()
}

// wsRecord is one line of a ws_*.jsonl golden file.
type wsRecord struct {
	I           int             `json:"i"`
	Kind        string          `json:"kind"`
	Raw         string          `json:"raw"`
	JSON        json.RawMessage `json:"json"`
	Len         int             `json:"len"`
	EventType   uint32          `json:"event_type"`
	ImageFormat string          `json:"image_format"`
	ImageBytes  int             `json:"image_bytes"`
	MetadataLen int             `json:"metadata_len"`
	Metadata    json.RawMessage `json:"metadata"`
}

func (r wsRecord) msg() (typ string, data map[string]any) {
	var m struct {
		Type string         `json:"type"`
		Data map[string]any `json:"data"`
	}
	_ = json.Unmarshal(r.JSON, &m)
	return m.Type, m.Data
}

func (r wsRecord) isConnectStatus() bool {
	typ, data := r.msg()
	return typ == "status" && data["sid"] != nil
}

func loadWS(t testing.TB, name string) []wsRecord {
	t.Helper()
	f, err := os.Open(filepath.Join(transcripts, name))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []wsRecord
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		if len(bytes.TrimSpace(sc.Bytes())) == 0 {
			continue
		}
		var r wsRecord
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		out = append(out, r)
	}
	if err := sc.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

var pngMagic = []byte{0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'}

// binaryFrame rebuilds a recorded binary frame: the captured .bin example when
// the length matches, else a frame synthesised from the recorded header.
func (r wsRecord) binaryFrame(t testing.TB) []byte {
	t.Helper()
	example := map[uint32]string{1: "ws_first_binary_frame_event1.bin", 4: "ws_first_binary_frame_event4.bin"}[r.EventType]
	if example != "" {
		if b, err := os.ReadFile(filepath.Join(transcripts, example)); err == nil && len(b) == r.Len {
			return b
		}
	}
	image := append(append([]byte(nil), pngMagic...), make([]byte, r.ImageBytes-len(pngMagic))...)
	head := binary.BigEndian.AppendUint32(nil, r.EventType)
	switch r.EventType {
	case 1:
		format := uint32(2)
		if r.ImageFormat == "JPEG" {
			format = 1
		}
		return append(binary.BigEndian.AppendUint32(head, format), image...)
	case 4:
		meta, _ := json.Marshal(json.RawMessage(r.Metadata))
		return append(append(binary.BigEndian.AppendUint32(head, uint32(len(meta))), meta...), image...)
	}
	t.Fatalf("cannot rebuild binary event %d", r.EventType)
	return nil
}

func (r wsRecord) step(t testing.TB) wsStep {
	if r.Kind == "binary" {
		return wsStep{bin: r.binaryFrame(t)}
	}
	return wsStep{text: r.Raw}
}

const connectStatus = `{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "{clientId}"}}`

// connectSteps returns the frames a server sends on connection: the recorded
// sid status if the transcript starts with one, else a synthetic one.
func connectSteps(t testing.TB, recs []wsRecord) ([]wsStep, []wsRecord) {
	if len(recs) > 0 && recs[0].isConnectStatus() {
		return []wsStep{recs[0].step(t)}, recs[1:]
	}
	return []wsStep{{text: connectStatus}}, recs
}

// promptScript is the websocket of a Run: connect frames, then, once the
// prompt is posted, the transcript's frames (or only the first n if n >= 0,
// followed by a dropped connection).
func promptScript(t testing.TB, name string, n int) []wsStep {
	steps, rest := connectSteps(t, loadWS(t, name))
	steps = append(steps, wsStep{awaitPost: 1})
	for i, r := range rest {
		if n >= 0 && i == n {
			return append(steps, wsStep{drop: true})
		}
		steps = append(steps, r.step(t))
	}
	return steps
}

// testLogger logs through t.Log, at debug level when -v is given.
func testLogger(t testing.TB) *slog.Logger {
	if !testing.Verbose() {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(tWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tWriter struct{ t testing.TB }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

const testClientID = "acceptance-8e35a1d2"

func newTestClient(t testing.TB, rp *replay, opts ...Option) *Client {
	c := New(rp.URL(), append([]Option{
		WithHTTPClient(rp.srv.Client()),
		WithClientID(testClientID),
		WithLogger(testLogger(t)),
		WithPollInterval(20 * time.Millisecond),
		WithReconnectBackoff(10*time.Millisecond, 50*time.Millisecond),
	}, opts...)...)
	c.endGrace = 200 * time.Millisecond
	c.cleanupTimeout = 2 * time.Second
	return c
}

func testContext(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// requestJSON decodes a recorded request body for comparison.
func requestJSON(t testing.TB, b []byte) any {
	t.Helper()
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("request body %q: %v", b, err)
	}
	return v
}

// graphOf returns the prompt of a recorded POST /prompt request.
func graphOf(t testing.TB, e *exchange) Graph {
	t.Helper()
	var body struct {
		Prompt Graph `json:"prompt"`
	}
	if err := json.Unmarshal(e.Request.Body, &body); err != nil || body.Prompt == nil {
		t.Fatalf("%s: no graph in request (%v)", e.name, err)
	}
	return body.Prompt
}

func promptIDOf(t testing.TB, e *exchange) string {
	t.Helper()
	var r struct {
		PromptID string `json:"prompt_id"`
	}
	if err := json.Unmarshal([]byte(*e.Response.BodyRaw), &r); err != nil {
		t.Fatal(err)
	}
	return r.PromptID
}

func isHTTPStatus(err error, status int) bool {
	var he *HTTPError
	return errors.As(err, &he) && he.StatusCode == status
}
