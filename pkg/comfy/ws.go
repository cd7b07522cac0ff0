package comfy

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/url"
	"strconv"
	"sync"
	"unicode/utf8"

	"github.com/coder/websocket"
)

const (
	wsReadLimit       = 64 << 20
	eventsBuffer      = 64
	binaryPreview     = 1
	binaryText        = 3
	binaryPreviewMeta = 4
)

// Event is one websocket message. Type is the message type ("status",
// "execution_start", "executing", "progress", "executed", "execution_success",
// "execution_error", ...). PromptID, Node, Value and Max are lifted from Data
// when present; Node is empty for the executing-null end marker, and holds
// node_id for execution_error and execution_interrupted.
//
// Binary frames become Type "preview" (events 1 and 4: Binary holds the image,
// ImageType its MIME type, and for event 4 PromptID and Node come from the
// frame's metadata, kept in Data) or Type "progress_text" (event 3: Node and
// the UTF-8 text in Binary). Other binary frames are skipped.
type Event struct {
	Type      string
	PromptID  string
	Node      string
	Value     int
	Max       int
	Data      json.RawMessage
	Binary    []byte
	ImageType string
}

// Socket is a websocket connection to the server's /ws endpoint. A goroutine
// owned by the Socket reads messages into Events until the connection ends or
// Close is called.
type Socket struct {
	conn   *websocket.Conn
	events chan Event
	cancel context.CancelFunc
	done   chan struct{}
	log    *slog.Logger
	// hear records that the server spoke.
	hear func()

	closeOnce sync.Once
	mu        sync.Mutex
	closed    bool
	err       error
}

// Connect opens GET /ws?clientId=<ClientID>. ctx bounds the handshake only;
// the Socket lives until Close or until the connection drops. It sends
// nothing unless asked (see Send).
func (c *Client) Connect(ctx context.Context) (*Socket, error) {
	const op = "connect websocket"
	u := c.url("/ws", url.Values{"clientId": {c.clientID}})
	conn, resp, err := websocket.Dial(ctx, u, &websocket.DialOptions{HTTPClient: c.http})
	if err != nil {
		if resp != nil && resp.StatusCode != 101 && resp.StatusCode != 0 {
			var body []byte
			if resp.Body != nil {
				body, _ = io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
			}
			return nil, fmt.Errorf("comfy: %s: %w", op, &HTTPError{Op: op, StatusCode: resp.StatusCode, Body: string(body)})
		}
		return nil, fmt.Errorf("comfy: %s: %w", op, err)
	}
	conn.SetReadLimit(wsReadLimit)
	rctx, cancel := context.WithCancel(context.Background())
	s := &Socket{
		conn:   conn,
		events: make(chan Event, eventsBuffer),
		cancel: cancel,
		done:   make(chan struct{}),
		log:    c.log,
		hear:   c.hear,
	}
	go s.read(rctx)
	return s, nil
}

// Events returns the channel of received messages. It is closed when the
// connection ends; Err then tells why.
func (s *Socket) Events() <-chan Event { return s.events }

// Err returns why the event stream ended: nil while it runs or after Close,
// else the read error (a websocket.CloseError if the server closed it).
func (s *Socket) Err() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// Send writes a {"type": typ, "data": data} text message, e.g. typ
// "feature_flags" with {"supports_preview_metadata": true}.
func (s *Socket) Send(ctx context.Context, typ string, data any) error {
	b, err := json.Marshal(struct {
		Type string `json:"type"`
		Data any    `json:"data"`
	}{typ, data})
	if err != nil {
		return fmt.Errorf("comfy: websocket send %s: %w", typ, err)
	}
	if err := s.conn.Write(ctx, websocket.MessageText, b); err != nil {
		return fmt.Errorf("comfy: websocket send %s: %w", typ, err)
	}
	return nil
}

// Close closes the connection and waits for the reading goroutine to stop.
func (s *Socket) Close() error {
	var err error
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		err = s.conn.Close(websocket.StatusNormalClosure, "")
		s.cancel()
		<-s.done
		if errors.Is(err, net.ErrClosed) || errors.Is(err, context.Canceled) || websocket.CloseStatus(err) != -1 {
			err = nil
		}
	})
	if err != nil {
		return fmt.Errorf("comfy: close websocket: %w", err)
	}
	return nil
}

func (s *Socket) read(ctx context.Context) {
	defer close(s.done)
	defer close(s.events)
	for {
		typ, b, err := s.conn.Read(ctx)
		if err != nil {
			s.mu.Lock()
			if !s.closed {
				s.err = fmt.Errorf("comfy: websocket read: %w", err)
			}
			s.mu.Unlock()
			return
		}
		s.hear()
		ev, ok := parseFrame(typ, b)
		if !ok {
			s.log.Debug("skipping websocket frame", "binary", typ == websocket.MessageBinary, "len", len(b))
			continue
		}
		select {
		case s.events <- ev:
		case <-ctx.Done():
			return
		}
	}
}

func parseFrame(typ websocket.MessageType, b []byte) (Event, bool) {
	if typ == websocket.MessageBinary {
		return parseBinary(b)
	}
	return parseText(b)
}

// parseText reads a text frame, {"type": …, "data": {…}}: ComfyUI sends one for
// every node it starts and every step, most of them progress_state messages that
// carry the state of every node of the prompt. It validates the frame once and then
// picks the members it needs, instead of decoding the frame and its data in turn
// (four scans of each frame).
func parseText(b []byte) (Event, bool) {
	if !json.Valid(b) {
		return Event{}, false
	}
	var ev Event
	var typ []byte
	eachMember(b, func(key, value []byte) {
		switch string(key) {
		case "type":
			typ = value
		case "data":
			ev.Data = value
		}
	})
	if len(typ) < 2 || typ[0] != '"' {
		return Event{}, false
	}
	if ev.Type = jsonString(typ); ev.Type == "" {
		return Event{}, false
	}
	var nodeID []byte
	eachMember(ev.Data, func(key, value []byte) {
		switch string(key) {
		case "prompt_id":
			ev.PromptID = jsonString(value)
		case "node":
			ev.Node = jsonString(value)
		case "node_id":
			nodeID = value
		case "value":
			ev.Value = jsonInt(value)
		case "max":
			ev.Max = jsonInt(value)
		}
	})
	if ev.Node == "" {
		ev.Node = jsonString(nodeID)
	}
	return ev, true
}

// eachMember calls f with the key (as written, between its quotes) and the value
// of each member of the JSON object b, which must be valid JSON; it does nothing
// if b is not an object.
func eachMember(b []byte, f func(key, value []byte)) {
	i := skipSpace(b, 0)
	if i >= len(b) || b[i] != '{' {
		return
	}
	for i++; ; i++ {
		i = skipSpace(b, i)
		if i >= len(b) || b[i] != '"' {
			return
		}
		keyEnd := stringEnd(b, i)
		key := b[i+1 : max(keyEnd-1, i+1)]
		i = skipSpace(b, keyEnd)
		if i >= len(b) || b[i] != ':' {
			return
		}
		i = skipSpace(b, i+1)
		valueEnd := valueEnd(b, i)
		f(key, b[i:valueEnd])
		i = skipSpace(b, valueEnd)
		if i >= len(b) || b[i] != ',' {
			return
		}
	}
}

func skipSpace(b []byte, i int) int {
	for i < len(b) && (b[i] == ' ' || b[i] == '\t' || b[i] == '\n' || b[i] == '\r') {
		i++
	}
	return i
}

// stringEnd returns the index just past the JSON string that starts at b[i].
func stringEnd(b []byte, i int) int {
	for i++; i < len(b); i++ {
		switch b[i] {
		case '\\':
			i++
		case '"':
			return i + 1
		}
	}
	return len(b)
}

// valueEnd returns the index just past the JSON value that starts at b[i].
func valueEnd(b []byte, i int) int {
	if i >= len(b) {
		return len(b)
	}
	switch b[i] {
	case '"':
		return stringEnd(b, i)
	case '{', '[':
		depth := 0
		for ; i < len(b); i++ {
			switch b[i] {
			case '"':
				i = stringEnd(b, i) - 1
			case '{', '[':
				depth++
			case '}', ']':
				if depth--; depth == 0 {
					return i + 1
				}
			}
		}
		return len(b)
	}
	for i < len(b) && b[i] != ',' && b[i] != '}' && b[i] != ']' && b[i] != ' ' && b[i] != '\t' && b[i] != '\n' && b[i] != '\r' {
		i++
	}
	return i
}

// jsonString reads a JSON string or number as text; null and anything else
// read as "".
func jsonString(raw json.RawMessage) string {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 {
		return ""
	}
	if n := len(raw); n >= 2 && raw[0] == '"' && raw[n-1] == '"' && bytes.IndexByte(raw[1:n-1], '\\') < 0 && bytes.IndexByte(raw[1:n-1], '"') < 0 && utf8.Valid(raw[1:n-1]) {
		// No escapes and valid UTF-8: the text as it is (prompt and node ids are).
		return string(raw[1 : n-1])
	}
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s
	}
	var n json.Number
	if json.Unmarshal(raw, &n) == nil {
		return n.String()
	}
	return ""
}

var imageFormats = map[uint32]string{1: "image/jpeg", 2: "image/png", 3: "image/webp"}

// parseBinary decodes the server's binary frames: a big-endian u32 event type,
// then for event 1 a u32 image format and the image, for event 4 a u32
// metadata length, JSON metadata and the image, for event 3 a u32 node id
// length, the node id and UTF-8 text.
func parseBinary(b []byte) (Event, bool) {
	if len(b) < 8 {
		return Event{}, false
	}
	be := binary.BigEndian
	switch be.Uint32(b) {
	case binaryPreview:
		format := be.Uint32(b[4:])
		typ := imageFormats[format]
		if typ == "" {
			typ = "image/x-format-" + strconv.FormatUint(uint64(format), 10)
		}
		return Event{Type: "preview", Binary: b[8:], ImageType: typ}, true
	case binaryPreviewMeta:
		n := uint64(be.Uint32(b[4:]))
		if 8+n > uint64(len(b)) {
			return Event{}, false
		}
		meta := json.RawMessage(b[8 : 8+n])
		var md struct {
			NodeID    json.RawMessage `json:"node_id"`
			PromptID  json.RawMessage `json:"prompt_id"`
			ImageType string          `json:"image_type"`
		}
		if json.Unmarshal(meta, &md) != nil {
			return Event{}, false
		}
		return Event{
			Type: "preview", PromptID: jsonString(md.PromptID), Node: jsonString(md.NodeID),
			Data: meta, Binary: b[8+n:], ImageType: md.ImageType,
		}, true
	case binaryText:
		n := uint64(be.Uint32(b[4:]))
		if 8+n > uint64(len(b)) {
			return Event{}, false
		}
		return Event{Type: "progress_text", Node: string(b[8 : 8+n]), Binary: b[8+n:]}, true
	}
	return Event{}, false
}
