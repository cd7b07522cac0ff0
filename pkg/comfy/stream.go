package comfy

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// stream shares one websocket among the Runs of a Client: the server keeps a
// single socket per client id, so a second connection would silently steal
// the first one's messages. It connects when the first watcher joins,
// reconnects with back-off while any watcher remains, and stops with the last.
type stream struct {
	c      *Client
	refs   int // guarded by c.streamMu
	cancel context.CancelFunc
	done   chan struct{}
	kick   chan struct{}

	mu       sync.Mutex
	watchers map[string]*watcher
	up       bool
	failures int
	lastErr  error
	changed  chan struct{} // closed and replaced whenever up/failures change
	current  string        // prompt the server is executing, for messages without prompt_id
}

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
// websocket is connected, so that nothing sent after it returns is missed.
// The caller must release the watcher.
func (c *Client) watch(ctx context.Context, promptID string) (*watcher, error) {
	c.streamMu.Lock()
	s := c.stream
	if s == nil {
		s = c.startStream()
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

func (w *watcher) release() {
	s, c := w.s, w.s.c
	c.streamMu.Lock()
	s.mu.Lock()
	if s.watchers[w.id] == w {
		delete(s.watchers, w.id)
	}
	s.mu.Unlock()
	s.refs--
	last := s.refs == 0
	if last && c.stream == s {
		c.stream = nil
	}
	c.streamMu.Unlock()
	if last {
		s.cancel()
		<-s.done
	}
}

func (c *Client) startStream() *stream {
	ctx, cancel := context.WithCancel(context.Background())
	s := &stream{
		c:        c,
		cancel:   cancel,
		done:     make(chan struct{}),
		kick:     make(chan struct{}, 1),
		watchers: map[string]*watcher{},
		changed:  make(chan struct{}),
	}
	go s.run(ctx)
	return s
}

func (s *stream) setState(up bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.up = up
	s.current = ""
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

func (s *stream) run(ctx context.Context) {
	defer close(s.done)
	log := s.c.log
	backoff := s.c.reconnectMin
	for {
		sock, err := s.c.Connect(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			log.Warn("websocket connect failed", "error", err, "retry_in", backoff)
			s.setState(false, err)
			if !s.sleep(ctx, backoff) {
				return
			}
			backoff = min(2*backoff, s.c.reconnectMax)
			continue
		}
		connectedAt := time.Now()
		s.setState(true, nil)
		err = s.pump(ctx, sock)
		_ = sock.Close()
		if ctx.Err() != nil {
			return
		}
		if time.Since(connectedAt) > s.c.reconnectMax {
			backoff = s.c.reconnectMin
		}
		log.Warn("websocket dropped", "error", err, "retry_in", backoff)
		s.setState(false, fmt.Errorf("comfy: websocket dropped: %w", err))
		if !s.sleep(ctx, backoff) {
			return
		}
		backoff = min(2*backoff, s.c.reconnectMax)
	}
}

// sleep waits d, or less if a new watcher kicks, and reports false once ctx
// is done.
func (s *stream) sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
	case <-s.kick:
	}
	return true
}

func (s *stream) pump(ctx context.Context, sock *Socket) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
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

// runEvents are the message types Run acts on; the rest (status,
// progress_state, previews, ...) are not forwarded.
var runEvents = map[string]bool{
	"execution_start": true, "execution_cached": true, "executing": true, "progress": true,
	"executed": true, "execution_success": true, "execution_error": true, "execution_interrupted": true,
}

func (s *stream) dispatch(ev Event) {
	s.mu.Lock()
	defer s.mu.Unlock()
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
