package fleettest

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// Events keeps what arrived on a subject (or from anywhere else that calls Add), in
// the order it arrived, for a test to wait on with a deadline: Next for the first
// that matches, Wait for a condition on them all. It is safe for concurrent use; the
// waits fail the test and belong to its goroutine.
type Events[T any] struct {
	what string
	show func(T) string

	mu        sync.Mutex
	got       []T
	undecoded []error
	changed   chan struct{}
	// ended is why nothing more comes, once Close has been called.
	ended error
}

// NewEvents returns an empty log of what ("scene events on fleet.evt.scene.>"), the
// name its failures use; show, if not nil, writes one event in them (%+v if nil).
func NewEvents[T any](what string, show func(T) string) *Events[T] {
	return &Events[T]{what: what, show: show, changed: make(chan struct{})}
}

// Add appends v and wakes the waits.
func (e *Events[T]) Add(v T) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.got = append(e.got, v)
	close(e.changed)
	e.changed = make(chan struct{})
}

// Close says that nothing more will come, because of why: a wait that its events
// do not satisfy then fails at once, naming why, instead of waiting out its time.
func (e *Events[T]) Close(why error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.ended = why
	close(e.changed)
	e.changed = make(chan struct{})
}

// addMessage appends what decode makes of data, or keeps its error for the failures.
func (e *Events[T]) addMessage(data []byte, decode func([]byte) (T, error)) {
	v, err := decode(data)
	if err != nil {
		e.mu.Lock()
		e.undecoded = append(e.undecoded, err)
		e.mu.Unlock()
		return
	}
	e.Add(v)
}

// Follow subscribes nc to the core NATS subject filter until the test ends, and
// keeps each message as decode reads it. The subscription has no pending limit, and
// the server has it before Follow returns.
func Follow[T any](t testing.TB, nc *nats.Conn, filter string, decode func([]byte) (T, error)) *Events[T] {
	t.Helper()
	e := NewEvents[T]("messages on "+filter, nil)
	sub, err := nc.Subscribe(filter, func(m *nats.Msg) { e.addMessage(m.Data, decode) })
	if err != nil {
		t.Fatalf("subscribe to %s: %v", filter, err)
	}
	t.Cleanup(func() { _ = sub.Unsubscribe() })
	if err := sub.SetPendingLimits(-1, -1); err != nil {
		t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		t.Fatalf("subscribe to %s: %v", filter, err)
	}
	return e
}

// FollowStream reads the messages of stream on the subject filter, from the first
// one stored on, with an ordered consumer until the test ends, and keeps each as
// decode reads it: unlike Follow, it sees what was published before it started.
func FollowStream[T any](t testing.TB, js jetstream.JetStream, stream, filter string, decode func([]byte) (T, error)) *Events[T] {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cons, err := js.OrderedConsumer(ctx, stream, jetstream.OrderedConsumerConfig{FilterSubjects: []string{filter}})
	if err != nil {
		t.Fatalf("follow %s in %s: %v", filter, stream, err)
	}
	e := NewEvents[T](filter+" in "+stream, nil)
	cc, err := cons.Consume(func(m jetstream.Msg) { e.addMessage(m.Data(), decode) })
	if err != nil {
		t.Fatalf("follow %s in %s: %v", filter, stream, err)
	}
	t.Cleanup(cc.Stop)
	return e
}

// SceneEvents follows every scene event published on nc (fleet.SceneEventsFilter).
func SceneEvents(t testing.TB, nc *nats.Conn) *Events[fleet.SceneEvent] {
	t.Helper()
	e := Follow(t, nc, fleet.SceneEventsFilter, fleet.DecodeSceneEvent)
	e.show = showScene
	return e
}

// showScene writes a scene event in a word or five.
func showScene(ev fleet.SceneEvent) string {
	s := fmt.Sprintf("%s %s.%d", ev.Type, ev.JobID, ev.Index)
	if ev.Node != "" {
		s += fmt.Sprintf(" on %s (attempt %d)", ev.Node, ev.Attempt)
	}
	if ev.Error != "" {
		s += ": " + ev.Error
	}
	return s
}

// OfType matches the scene events of type typ.
func OfType(typ fleet.EventType) func(fleet.SceneEvent) bool {
	return func(ev fleet.SceneEvent) bool { return ev.Type == typ }
}

// Next returns the first event at or after position from that match accepts (any
// event if match is nil), and the position after it. It fails the test, naming what
// it waited for and the events that came, if none has come within the time given.
// match runs with the log locked: it must not call the log's methods.
func (e *Events[T]) Next(t testing.TB, from int, within time.Duration, what string, match func(T) bool) (T, int) {
	t.Helper()
	var found T
	at := -1
	e.wait(t, within, "no "+what, func(got []T) bool {
		for i := from; i < len(got); i++ {
			if match == nil || match(got[i]) {
				found, at = got[i], i
				return true
			}
		}
		return false
	})
	return found, at + 1
}

// Wait waits until cond holds for the events so far, in the order they came, and
// returns the events then. It fails the test, naming what it waited for and the
// events that came, if cond does not hold within the time given. cond runs with the
// log locked: it must not keep the slice nor call the log's methods.
func (e *Events[T]) Wait(t testing.TB, within time.Duration, what string, cond func([]T) bool) []T {
	t.Helper()
	e.wait(t, within, "not "+what, cond)
	return e.All(nil)
}

// wait calls cond on the events each time they change until it holds.
func (e *Events[T]) wait(t testing.TB, within time.Duration, failure string, cond func([]T) bool) {
	t.Helper()
	timer := time.NewTimer(within)
	defer timer.Stop()
	for {
		e.mu.Lock()
		held := cond(e.got)
		changed, ended := e.changed, e.ended
		e.mu.Unlock()
		if held {
			return
		}
		if ended != nil {
			t.Fatalf("%s: they ended (%v); %s", failure, ended, e.seen())
		}
		select {
		case <-changed:
		case <-timer.C:
			t.Fatalf("%s within %s; %s", failure, within, e.seen())
		}
	}
}

// All returns the events so far that match (every one if match is nil).
func (e *Events[T]) All(match func(T) bool) []T {
	e.mu.Lock()
	defer e.mu.Unlock()
	var out []T
	for _, v := range e.got {
		if match == nil || match(v) {
			out = append(out, v)
		}
	}
	return out
}

// seenShown is how many of the last events a failure shows.
const seenShown = 8

// seen says what came: how many events, the last few of them, and what did not
// decode.
func (e *Events[T]) seen() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	var b strings.Builder
	fmt.Fprintf(&b, "%d %s came", len(e.got), e.what)
	if n := len(e.got); n > 0 {
		b.WriteString(", the last: ")
		for i, v := range e.got[max(0, n-seenShown):] {
			if i > 0 {
				b.WriteString("; ")
			}
			if e.show != nil {
				b.WriteString(e.show(v))
			} else {
				fmt.Fprintf(&b, "%+v", v)
			}
		}
	}
	if n := len(e.undecoded); n > 0 {
		fmt.Fprintf(&b, "; %d did not decode, the first: %v", n, e.undecoded[0])
	}
	return b.String()
}
