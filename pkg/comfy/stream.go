package comfy

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// stream shares one websocket among the Runs of a Client. ComfyUI keeps one
// socket per client id: a second connection takes the first one's messages,
// and when any connection of the id ends, the server unregisters the id
// (its handler ends with sockets.pop(sid)), even if a newer connection had
// taken it over, which then hears nothing more. So the stream dials when the
// first watcher joins and keeps its socket while watchers come and go, and
// for idleTimeout after the last one left, rather than re-dialling between
// prompts. A connection counts as up once the server's greeting arrived: the
// server registers a socket before it greets it, so a prompt submitted after
// that has its messages routed to it. The stream reconnects with back-off
// after a drop while any watcher remains, and when a watcher found the socket
// deaf (see redial).
type stream struct {
	c      *Client
	refs   int // guarded by c.streamMu
	cancel context.CancelFunc
	done   chan struct{}
	kick   chan struct{} // a watcher joined: skip the rest of the back-off
	idle   chan struct{} // the last watcher left
	deaf   chan uint64   // the connection of that number hears nothing

	mu       sync.Mutex
	watchers map[string]*watcher
	up       bool
	conn     uint64 // connections that came up so far: the current one's number while up
	frames   uint64 // frames received on the current connection
	failures int
	lastErr  error
	changed  chan struct{} // closed and replaced whenever up/failures change
	current  string        // prompt the server is executing, for messages without prompt_id
}

var (
	errIdle = errors.New("idle")
	errDeaf = errors.New("the server sends this connection nothing")
)

// linkState tells a watcher that the websocket went down or came back, so
// that it polls meanwhile and re-checks the prompt's fate after a gap.
type linkState int

const (
	linkNone linkState = iota
	linkDown
	linkUp
)

type item struct {
	ev   Event
	link linkState
}

// watcher receives the stream's messages for one prompt.
type watcher struct {
	s      *stream
	id     string
	notify chan struct{}

	mu    sync.Mutex
	queue []item
	down  bool
}

func (w *watcher) push(it item) {
	w.mu.Lock()
	w.queue = append(w.queue, it)
	w.mu.Unlock()
	select {
	case w.notify <- struct{}{}:
	default:
	}
}

func (w *watcher) take() []item {
	w.mu.Lock()
	defer w.mu.Unlock()
	q := w.queue
	w.queue = nil
	return q
}

// watch registers interest in promptID's messages and waits until the shared
// websocket is connected and registered by the server, so that nothing sent
// after it returns is missed. The caller must release the watcher.
func (c *Client) watch(ctx context.Context, promptID string) (*watcher, error) {
	c.streamMu.Lock()
	if c.closed {
		c.streamMu.Unlock()
		return nil, ErrClientClosed
	}
	s := c.stream
	if s == nil {
		s = c.startStream(c.lastStream)
		c.stream = s
	}
	s.refs++
	w := &watcher{s: s, id: promptID, notify: make(chan struct{}, 1)}
	s.mu.Lock()
	s.watchers[promptID] = w
	failures := s.failures
	s.mu.Unlock()
	c.streamMu.Unlock()

	select {
	case s.kick <- struct{}{}:
	default:
	}
	for {
		s.mu.Lock()
		up, nowFailures, err, changed := s.up, s.failures, s.lastErr, s.changed
		s.mu.Unlock()
		switch {
		case up:
			return w, nil
		case nowFailures > failures:
			w.release()
			return nil, err
		}
		select {
		case <-changed:
		case <-ctx.Done():
			w.release()
			return nil, ctx.Err()
		}
	}
}

// rekey moves the watcher to the id the server assigned.
func (w *watcher) rekey(id string) {
	w.s.mu.Lock()
	if w.s.watchers[w.id] == w {
		delete(w.s.watchers, w.id)
	}
	w.id = id
	w.s.watchers[id] = w
	w.s.mu.Unlock()
}

// release unregisters the watcher; the last one to leave starts the
// stream's idle countdown.
func (w *watcher) release() {
	s, c := w.s, w.s.c
	c.streamMu.Lock()
	s.mu.Lock()
	if s.watchers[w.id] == w {
		delete(s.watchers, w.id)
	}
	s.mu.Unlock()
	s.refs--
	idle := s.refs == 0
	c.streamMu.Unlock()
	if idle {
		select {
		case s.idle <- struct{}{}:
		default:
		}
	}
}

// retire detaches s from its client when no watcher uses it, so that the
// next watcher starts a new stream, and reports whether s may stop.
func (c *Client) retire(s *stream) bool {
	c.streamMu.Lock()
	defer c.streamMu.Unlock()
	if s.refs > 0 {
		return false
	}
	if c.stream == s {
		c.stream = nil
		c.lastStream = s.done
	}
	return true
}

// startStream starts a stream that dials once prev (the previous stream's
// done, or nil) is closed, so that the server sees the previous connection
// end before the new one registers.
func (c *Client) startStream(prev <-chan struct{}) *stream {
	ctx, cancel := context.WithCancel(context.Background())
	s := &stream{
		c:        c,
		cancel:   cancel,
		done:     make(chan struct{}),
		kick:     make(chan struct{}, 1),
		idle:     make(chan struct{}, 1),
		deaf:     make(chan uint64, 1),
		watchers: map[string]*watcher{},
		changed:  make(chan struct{}),
	}
	go s.run(ctx, prev)
	return s
}

func (s *stream) setState(up bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.up = up
	s.current = ""
	if up {
		s.conn++
		s.frames = 0
	}
	if err != nil {
		s.lastErr = err
		if !up {
			s.failures++
		}
	}
	close(s.changed)
	s.changed = make(chan struct{})
	for _, w := range s.watchers {
		switch {
		case !up && !w.down:
			w.down = true
			w.push(item{link: linkDown})
		case up && w.down:
			w.down = false
			w.push(item{link: linkUp})
		}
	}
}

func (s *stream) run(ctx context.Context, prev <-chan struct{}) {
	defer close(s.done)
	if prev != nil {
		// The server unregisters the client id when it handles the end of
		// the previous connection: give it time to, before registering anew.
		select {
		case <-prev:
		case <-ctx.Done():
			return
		}
		if !s.sleep(ctx, s.c.reconnectMin, false) {
			return
		}
	}
	log := s.c.log
	backoff := s.c.reconnectMin
	for {
		sock, greeting, err := s.connect(ctx)
		ownClose := false
		if err == nil {
			connectedAt := time.Now()
			s.setState(true, nil)
			s.dispatch(greeting)
			err = s.pump(ctx, sock)
			_ = sock.Close()
			if time.Since(connectedAt) > s.c.reconnectMax {
				backoff = s.c.reconnectMin
			}
			if errors.Is(err, errIdle) {
				return
			}
			ownClose = errors.Is(err, errDeaf)
			err = fmt.Errorf("comfy: websocket dropped: %w", err)
		}
		if ctx.Err() != nil {
			s.setState(false, ErrClientClosed)
			return
		}
		s.setState(false, err)
		if s.c.retire(s) {
			return
		}
		log.Warn("websocket down", "error", err, "retry_in", backoff)
		if !s.sleep(ctx, backoff, !ownClose) {
			return
		}
		backoff = min(2*backoff, s.c.reconnectMax)
	}
}

// connect dials the websocket and waits for the server's greeting, the
// status message it sends once it has registered the socket.
func (s *stream) connect(ctx context.Context) (*Socket, Event, error) {
	ctx, cancel := context.WithTimeout(ctx, s.c.connectTimeout)
	defer cancel()
	sock, err := s.c.Connect(ctx)
	if err != nil {
		return nil, Event{}, err
	}
	select {
	case ev, open := <-sock.Events():
		if open {
			return sock, ev, nil
		}
		if err = sock.Err(); err == nil {
			err = errors.New("connection closed")
		}
	case <-ctx.Done():
		err = ctx.Err()
	}
	_ = sock.Close()
	return nil, Event{}, fmt.Errorf("comfy: websocket: no greeting from the server: %w", err)
}

// sleep waits d, or, if kickable, less when a new watcher kicks, and reports
// false once ctx is done or the last watcher left. After closing a connection
// of its own, the stream waits the whole time: the server must handle that
// end before the next connection registers.
func (s *stream) sleep(ctx context.Context, d time.Duration, kickable bool) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	kick := s.kick
	if !kickable {
		kick = nil
	}
	for {
		select {
		case <-ctx.Done():
			return false
		case <-s.idle:
			if s.c.retire(s) {
				return false
			}
		case <-t.C:
			return true
		case <-kick:
			return true
		}
	}
}

// pump delivers the socket's messages until it ends, the stream is
// cancelled, it has been idle for idleTimeout (errIdle) or a watcher found it
// deaf (errDeaf).
func (s *stream) pump(ctx context.Context, sock *Socket) error {
	var idle *time.Timer
	var idleC <-chan time.Time
	defer func() {
		if idle != nil {
			idle.Stop()
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-s.idle:
			if idle == nil {
				idle = time.NewTimer(s.c.idleTimeout)
			} else {
				idle.Reset(s.c.idleTimeout)
			}
			idleC = idle.C
		case <-idleC:
			idleC = nil
			if s.c.retire(s) {
				return errIdle
			}
		case n := <-s.deaf:
			s.mu.Lock()
			current := s.conn
			s.mu.Unlock()
			if n == current {
				return errDeaf
			}
		case ev, open := <-sock.Events():
			if !open {
				if err := sock.Err(); err != nil {
					return err
				}
				return fmt.Errorf("connection closed")
			}
			s.dispatch(ev)
		}
	}
}

// earmark is how much a connection had received at some point.
type earmark struct{ conn, frames uint64 }

func (s *stream) mark() earmark {
	s.mu.Lock()
	defer s.mu.Unlock()
	return earmark{s.conn, s.frames}
}

// silent reports whether the connection of m is still up and has received
// nothing since m.
func (s *stream) silent(m earmark) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.up && s.conn == m.conn && s.frames == m.frames
}

// redial drops connection conn, if it is still the current one, and
// connects again: the server no longer routes this client's messages to it.
func (s *stream) redial(conn uint64) {
	select {
	case s.deaf <- conn:
	default:
	}
}

// runEvents are the message types Run acts on; the rest (status,
// progress_state, previews, ...) are not forwarded.
var runEvents = map[string]bool{
	"execution_start": true, "execution_cached": true, "executing": true, "progress": true,
	"executed": true, "execution_success": true, "execution_error": true, "execution_interrupted": true,
}

func (s *stream) dispatch(ev Event) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.frames++
	id := ev.PromptID
	if id == "" {
		id = s.current
	} else if ev.Type != "status" {
		s.current = id
	}
	if ev.Type == "executing" && ev.Node == "" {
		s.current = ""
	}
	if id == "" || !runEvents[ev.Type] {
		return
	}
	if w := s.watchers[id]; w != nil {
		w.push(item{ev: ev})
	}
}
