package comfysim

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"log/slog"
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"

	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
)

// writeTimeout bounds one websocket write to a client that stopped
// reading.
const writeTimeout = 10 * time.Second

// clientBacklog is how many frames may wait for a slow websocket before
// the server gives up on it and closes it.
const clientBacklog = 8192

// Binary event types of ComfyUI's websocket protocol.
const (
	eventPreviewImage             = 1
	eventPreviewImageWithMetadata = 4
	imageFormatPNG                = 2
)

// frame is one websocket message waiting to be written.
type frame struct {
	binary bool
	data   []byte
}

// wsClient is one open websocket.
type wsClient struct {
	sid string
	// out holds the frames waiting to be written, guarded by the hub's
	// mutex; it grows only as far as a backlog needs, so that an idle
	// socket costs little. ready has a token while out is not empty.
	out             []frame
	ready           chan struct{}
	gone            chan struct{}
	goneOnce        sync.Once
	previewMetadata atomic.Bool
	tooSlow         atomic.Bool
}

func newWSClient(sid string) *wsClient {
	return &wsClient{sid: sid, ready: make(chan struct{}, 1), gone: make(chan struct{})}
}

func (c *wsClient) markGone() {
	c.goneOnce.Do(func() { close(c.gone) })
}

// hub routes messages to websockets: status to all, everything else to
// the socket registered under the prompt's client_id. A new socket with
// the same clientId replaces the old one, which stays open but no longer
// receives anything; and, as in ComfyUI, when any socket of a client id
// ends, the id is unregistered, even if a newer socket had taken it over.
type hub struct {
	log *slog.Logger

	mu      sync.Mutex
	stopped bool
	clients map[string]*wsClient
	// execClient and execNode remember the node being executed, which a
	// client reconnecting during the run is told about.
	execClient string
	execNode   string
}

func newHub(log *slog.Logger) *hub {
	return &hub{log: log, clients: map[string]*wsClient{}}
}

// stop drops every later message.
func (h *hub) stop() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.stopped = true
}

func (h *hub) enqueueLocked(c *wsClient, f frame) {
	if len(c.out) >= clientBacklog {
		if !c.tooSlow.Swap(true) {
			h.log.Warn("comfysim: websocket client too slow, closing it", "client_id", c.sid, "backlog", clientBacklog)
		}
		if h.clients[c.sid] == c {
			delete(h.clients, c.sid)
		}
		c.markGone()
		return
	}
	c.out = append(c.out, f)
	select {
	case c.ready <- struct{}{}:
	default:
	}
}

// takeOut returns the frames waiting for c, in order, and empties its queue.
func (h *hub) takeOut(c *wsClient) []frame {
	h.mu.Lock()
	defer h.mu.Unlock()
	out := c.out
	c.out = nil
	return out
}

// attach registers a socket and queues its greeting: status with its sid
// and, if its prompt is running, the node being executed.
func (h *hub) attach(c *wsClient, remaining int) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.stopped {
		return false
	}
	h.clients[c.sid] = c
	h.enqueueLocked(c, frame{data: statusMessage(remaining, c.sid)})
	if h.execClient == c.sid && h.execNode != "" {
		h.enqueueLocked(c, frame{data: message("executing", obj{{"node", h.execNode}})})
	}
	return true
}

// detach unregisters the client id of a socket that ended. Like ComfyUI's
// websocket handler (its finally: sockets.pop(sid)), it does so even when
// a newer socket with the same id took the old one's place: that socket
// stays open but receives nothing more, not even status broadcasts.
func (h *hub) detach(c *wsClient) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.clients, c.sid)
}

func (h *hub) broadcast(data []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.stopped {
		return
	}
	for _, c := range h.clients {
		h.enqueueLocked(c, frame{data: data})
	}
}

// send queues frames, in order, for the socket of a client id.
func (h *hub) send(sid string, frames ...frame) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.sendLocked(sid, frames...)
}

func (h *hub) sendLocked(sid string, frames ...frame) {
	if h.stopped {
		return
	}
	c, ok := h.clients[sid]
	if !ok {
		return
	}
	for _, f := range frames {
		h.enqueueLocked(c, f)
	}
}

// executing records the node being executed and tells its client.
func (h *hub) executing(sid string, hasClient bool, node string, data []byte) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if !hasClient {
		return
	}
	h.execClient, h.execNode = sid, node
	h.sendLocked(sid, frame{data: data})
}

// endExecution forgets the executed node once a prompt is done.
func (h *hub) endExecution() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.execClient, h.execNode = "", ""
}

// step sends one progress update: progress_state, then progress and the
// preview image, the image first for clients that negotiated
// supports_preview_metadata.
func (h *hub) step(sid string, state, progress []byte, png []byte, meta obj) {
	h.mu.Lock()
	defer h.mu.Unlock()
	c, ok := h.clients[sid]
	if !ok || h.stopped {
		return
	}
	if c.previewMetadata.Load() {
		h.sendLocked(sid, frame{data: state}, frame{binary: true, data: previewWithMetadata(meta, png)}, frame{data: progress})
		return
	}
	h.sendLocked(sid, frame{data: state}, frame{data: progress}, frame{binary: true, data: previewPlain(png)})
}

func previewPlain(png []byte) []byte {
	out := make([]byte, 8, 8+len(png))
	binary.BigEndian.PutUint32(out[0:], eventPreviewImage)
	binary.BigEndian.PutUint32(out[4:], imageFormatPNG)
	return append(out, png...)
}

func previewWithMetadata(meta obj, png []byte) []byte {
	m, err := pyjson.Marshal(meta)
	if err != nil {
		m = []byte("{}")
	}
	out := make([]byte, 8, 8+len(m)+len(png))
	binary.BigEndian.PutUint32(out[0:], eventPreviewImageWithMetadata)
	binary.BigEndian.PutUint32(out[4:], uint32(len(m)))
	return append(append(out, m...), png...)
}

// message encodes {"type": typ, "data": data} as the server sends it.
func message(typ string, data any) []byte {
	b, err := pyjson.Marshal(obj{{"type", typ}, {"data", data}})
	if err != nil {
		// Every payload is built from encodable values.
		panic("comfysim: encode " + typ + ": " + err.Error())
	}
	return b
}

// statusMessage is the status broadcast; sid is set only in the greeting.
func statusMessage(remaining int, sid string) []byte {
	data := obj{{"status", obj{{"exec_info", obj{{"queue_remaining", remaining}}}}}}
	if sid != "" {
		data = append(data, kv{"sid", sid})
	}
	return message("status", data)
}

// serverFeatures is the answer to GET /features and to a client's
// feature_flags message.
func serverFeatures() obj {
	return obj{{"supports_preview_metadata", true}, {"max_upload_size", maxUploadSize}}
}

// serveWS upgrades the request and hands the websocket to a goroutine of
// the instance: http.Server.Shutdown does not wait for hijacked
// connections, Close and Kill wait for the instance's goroutines.
func (in *instance) serveWS(w http.ResponseWriter, r *http.Request) {
	if !in.track() {
		writeBare(w, http.StatusServiceUnavailable)
		return
	}
	defer in.wg.Done()
	conn, err := websocket.Accept(w, r, &websocket.AcceptOptions{InsecureSkipVerify: true})
	if err != nil {
		in.log.Debug("comfysim: websocket handshake", "err", err)
		return
	}
	sid := query(r).Get("clientId")
	if sid == "" {
		sid = in.s.newSID()
	}
	// Started through WaitGroup.Go, whose Done runs after the goroutine's
	// own frames have returned, so nothing of it is left once Wait returns.
	in.wg.Go(func() { in.runWS(conn, sid) })
}

// runWS serves one websocket until the client leaves or the server stops.
func (in *instance) runWS(conn *websocket.Conn, sid string) {
	c := newWSClient(sid)
	// The greeting is queued before anything the client sends is read: ComfyUI
	// sends status before it reads a message, so its answer to feature_flags
	// comes second.
	attached := in.hub.attach(c, int(in.q.remaining.Load()))
	readCtx, stopReading := context.WithCancel(context.Background())
	defer stopReading()
	readDone := make(chan struct{})
	in.wg.Go(func() {
		defer close(readDone)
		in.readWS(readCtx, conn, c)
	})

	if attached {
		in.writeWS(conn, c)
	}
	in.hub.detach(c)
	switch {
	case in.killed.Load():
		_ = conn.CloseNow()
	case in.ctx.Err() != nil:
		_ = conn.Close(websocket.StatusGoingAway, "server shutting down")
	case c.tooSlow.Load():
		_ = conn.Close(websocket.StatusPolicyViolation, "client too slow")
	default:
		_ = conn.CloseNow()
	}
	stopReading()
	<-readDone
}

func (in *instance) writeWS(conn *websocket.Conn, c *wsClient) {
	for {
		select {
		case <-in.ctx.Done():
			return
		case <-c.gone:
			return
		case <-c.ready:
		}
		for _, f := range in.hub.takeOut(c) {
			select {
			case <-in.ctx.Done():
				return
			case <-c.gone:
				return
			default:
			}
			typ := websocket.MessageText
			if f.binary {
				typ = websocket.MessageBinary
			}
			ctx, cancel := context.WithTimeout(in.killCtx, writeTimeout)
			err := conn.Write(ctx, typ, f.data)
			cancel()
			if err != nil {
				in.log.Debug("comfysim: websocket write", "client_id", c.sid, "err", err)
				c.markGone()
				return
			}
		}
	}
}

// readWS reads until the socket closes. The first text message may be
// {"type": "feature_flags", "data": {...}}, which the server answers
// with its own features.
func (in *instance) readWS(ctx context.Context, conn *websocket.Conn, c *wsClient) {
	defer c.markGone()
	first := true
	for {
		typ, data, err := conn.Read(ctx)
		if err != nil {
			return
		}
		if typ != websocket.MessageText || !first {
			continue
		}
		var msg struct {
			Type string          `json:"type"`
			Data json.RawMessage `json:"data"`
		}
		if err := json.Unmarshal(data, &msg); err != nil {
			continue
		}
		first = false
		if msg.Type != "feature_flags" {
			continue
		}
		flags, _ := pyjson.ParseObject(msg.Data)
		if v, ok := pyjson.Lookup(flags, "supports_preview_metadata"); ok && pyjson.Truthy(v) {
			c.previewMetadata.Store(true)
		}
		in.hub.mu.Lock()
		if !in.hub.stopped {
			in.hub.enqueueLocked(c, frame{data: message("feature_flags", serverFeatures())})
		}
		in.hub.mu.Unlock()
	}
}
