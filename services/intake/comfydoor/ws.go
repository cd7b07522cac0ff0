package comfydoor

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/google/uuid"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/comfyfacade"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// wsWriteTimeout bounds one write to a client that stopped reading.
const wsWriteTimeout = 10 * time.Second

// serveWS answers GET /ws?clientId=…: ComfyUI's messages about the prompts sent with
// that client id, from whichever intake took them. The socket greets with the status
// and its sid, follows the client's prompts that have not ended from their start, and
// every prompt the client sends once the socket is open. It does not send status
// messages of other clients' prompts, and no previews.
func (d *Door) serveWS(w http.ResponseWriter, r *http.Request, c Caller) {
	sid := r.URL.Query().Get("clientId")
	if sid == "" {
		sid = strings.ReplaceAll(uuid.NewString(), "-", "")
	}
	ctx, cancel := context.WithCancel(r.Context())
	defer cancel()
	// Watched before the socket opens: a prompt sent once the client sees it open is
	// recorded after, so the watch announces it.
	watch, err := d.prompts.kv.Watch(ctx, "p."+c.Tenant+".*", jetstream.UpdatesOnly())
	if err != nil {
		d.unavailable(w, "follow the prompts", err)
		return
	}
	defer func() { _ = watch.Stop() }()
	open, err := d.waitingPrompts(ctx, c.Tenant)
	if err != nil {
		d.unavailable(w, "follow the prompts", err)
		return
	}
	conn, err := websocket.Accept(w, r, nil)
	if err != nil {
		d.log.Debug("websocket handshake", "err", err)
		return
	}
	s := &socket{d: d, conn: conn, sid: sid, out: make(chan []byte, 64), following: map[string]bool{}}
	var mine []*record
	for _, p := range open {
		if p.rec.ClientID == sid {
			mine = append(mine, p.rec)
		}
	}
	s.run(ctx, cancel, watch, mine)
}

// socket is one open websocket and the prompts it follows.
type socket struct {
	d    *Door
	conn *websocket.Conn
	sid  string
	out  chan []byte
	// remaining counts the prompts followed that have not ended: the client's
	// queue_remaining.
	remaining atomic.Int64

	mu        sync.Mutex
	following map[string]bool
}

// run serves the socket until the client leaves, a write fails or the intake stops.
func (s *socket) run(ctx context.Context, cancel context.CancelFunc, watch jetstream.KeyWatcher, open []*record) {
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
		_ = s.conn.CloseNow()
	}()
	s.remaining.Store(int64(len(open)))
	if !s.write(ctx, comfyfacade.Hello(len(open), s.sid)) {
		return
	}
	wg.Go(func() { s.read(ctx, cancel) })
	wg.Go(func() { s.watch(ctx, &wg, watch) })
	for _, rec := range open {
		s.follow(ctx, &wg, rec, false)
	}
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.d.cfg.Done:
			_ = s.conn.Close(websocket.StatusGoingAway, "the server stops")
			return
		case frame := <-s.out:
			wctx, stop := context.WithTimeout(ctx, wsWriteTimeout)
			err := s.conn.Write(wctx, websocket.MessageText, frame)
			stop()
			if err != nil {
				s.d.log.Debug("websocket write", "client_id", s.sid, "err", err)
				return
			}
		}
	}
}

// write writes one message at once.
func (s *socket) write(ctx context.Context, m comfyfacade.Message) bool {
	b, err := m.Frame()
	if err != nil {
		s.d.log.Error("encode websocket message", "type", m.Type, "err", err)
		return false
	}
	wctx, stop := context.WithTimeout(ctx, wsWriteTimeout)
	defer stop()
	return s.conn.Write(wctx, websocket.MessageText, b) == nil
}

// send queues messages for the writer, in order.
func (s *socket) send(ctx context.Context, msgs ...comfyfacade.Message) bool {
	for _, m := range msgs {
		b, err := m.Frame()
		if err != nil {
			s.d.log.Error("encode websocket message", "type", m.Type, "err", err)
			continue
		}
		select {
		case s.out <- b:
		case <-ctx.Done():
			return false
		}
	}
	return true
}

// read reads what the client sends: a feature_flags message is answered with the
// door's features, anything else is ignored. The client leaving ends the socket.
func (s *socket) read(ctx context.Context, cancel context.CancelFunc) {
	defer cancel()
	for {
		typ, b, err := s.conn.Read(ctx)
		if err != nil {
			return
		}
		var m struct {
			Type string `json:"type"`
		}
		if typ == websocket.MessageText && json.Unmarshal(b, &m) == nil && m.Type == "feature_flags" {
			s.send(ctx, comfyfacade.Message{Type: "feature_flags", Data: features()})
		}
	}
}

// watch follows every prompt of the client recorded from now on.
func (s *socket) watch(ctx context.Context, wg *sync.WaitGroup, w jetstream.KeyWatcher) {
	for {
		select {
		case <-ctx.Done():
			return
		case e, ok := <-w.Updates():
			if !ok {
				return
			}
			if e == nil || e.Operation() != jetstream.KeyValuePut {
				continue
			}
			rec, err := decodeRecord(e)
			if err == nil && rec.ClientID == s.sid {
				s.follow(ctx, wg, rec, true)
			}
		}
	}
}

// follow starts following a prompt, unless the socket does already; uncounted says
// that remaining does not count it yet.
func (s *socket) follow(ctx context.Context, wg *sync.WaitGroup, rec *record, uncounted bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.following[rec.Job] {
		return
	}
	s.following[rec.Job] = true
	if uncounted {
		s.remaining.Add(1)
	}
	wg.Go(func() { s.followPrompt(ctx, rec) })
}

// followPrompt sends the messages of a prompt's scene events, from the first, until
// the prompt ends.
func (s *socket) followPrompt(ctx context.Context, rec *record) {
	log := s.d.log.With("prompt_id", rec.PromptID, "job", rec.Job)
	cons, err := s.d.cfg.JS.OrderedConsumer(ctx, fleet.StreamEvents, jetstream.OrderedConsumerConfig{
		FilterSubjects: []string{fleet.SceneEventSubject(rec.Job, 0, "*")},
	})
	var it jetstream.MessagesContext
	if err == nil {
		it, err = cons.Messages()
	}
	if err != nil {
		log.Warn("follow a prompt's events", "err", err)
		return
	}
	defer s.d.dropConsumer(it, cons)
	p := &comfyfacade.Prompt{ID: rec.PromptID, Classes: rec.Classes, Subfolder: rec.Job}
	for {
		msg, err := it.Next(jetstream.NextContext(ctx))
		if err != nil {
			if ctx.Err() == nil {
				log.Warn("follow a prompt's events", "err", err)
			}
			return
		}
		ev, err := fleet.DecodeSceneEvent(msg.Data())
		if err != nil {
			continue
		}
		if ev.Type.Terminal() {
			s.remaining.Add(-1)
		}
		if !s.send(ctx, p.Apply(ev, int(max(s.remaining.Load(), 0)))...) || ev.Type.Terminal() {
			return
		}
	}
}

// dropConsumer stops it and deletes its ordered consumer at once, rather than
// leaving it until it expires.
func (d *Door) dropConsumer(it jetstream.MessagesContext, cons jetstream.Consumer) {
	it.Stop()
	info := cons.CachedInfo()
	if info == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := d.cfg.JS.DeleteConsumer(ctx, fleet.StreamEvents, info.Name); err != nil && !errors.Is(err, jetstream.ErrConsumerNotFound) {
		d.log.Debug("delete event consumer", "consumer", info.Name, "err", err)
	}
}
