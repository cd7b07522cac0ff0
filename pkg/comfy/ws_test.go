package comfy

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/coder/websocket"
)

// TestSocketReplaysEveryTranscript replays each ws_*.jsonl through Connect
// and checks that every recorded frame comes out as the matching Event.
func TestSocketReplaysEveryTranscript(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join(transcripts, "ws_*.jsonl"))
	if len(files) != 17 {
		t.Fatalf("found %d websocket transcripts, want 17", len(files))
	}
	for _, path := range files {
		name := filepath.Base(path)
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			recs := loadWS(t, name)
			steps, rest := connectSteps(t, recs)
			want := recs
			if len(rest) == len(recs) {
				want = append([]wsRecord{{Kind: "text", Raw: connectStatus, JSON: json.RawMessage(connectStatus)}}, recs...)
			}
			clientID := testClientID
			for _, r := range rest {
				if typ, _ := r.msg(); typ == "feature_flags" {
					steps = append(steps, wsStep{awaitClient: "feature_flags"})
					clientID = "acceptance-ff-ed731530"
				}
				steps = append(steps, r.step(t))
			}
			steps = append(steps, wsStep{closeNormal: true})

			rp := newReplay(t)
			rp.script(steps)
			c := newTestClient(t, rp, WithClientID(clientID))
			ctx := testContext(t)
			s, err := c.Connect(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()

			var got []Event
			timeout := time.After(5 * time.Second)
		loop:
			for {
				select {
				case ev, open := <-s.Events():
					if !open {
						break loop
					}
					got = append(got, ev)
					if len(got) == 1 && clientID != testClientID {
						if err := s.Send(ctx, "feature_flags", map[string]any{"supports_preview_metadata": true}); err != nil {
							t.Fatal(err)
						}
					}
				case <-timeout:
					t.Fatalf("timed out after %d events", len(got))
				}
			}
			if websocket.CloseStatus(s.Err()) != websocket.StatusNormalClosure {
				t.Errorf("Err() = %v, want a normal closure", s.Err())
			}
			if len(got) != len(want) {
				t.Fatalf("got %d events, want %d", len(got), len(want))
			}
			for i, r := range want {
				checkEvent(t, i, r, got[i], clientID)
			}
			if err := s.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		})
	}
}

func checkEvent(t *testing.T, i int, r wsRecord, ev Event, clientID string) {
	t.Helper()
	if r.Kind == "binary" {
		if ev.Type != "preview" || len(ev.Binary) != r.ImageBytes || !bytes.HasPrefix(ev.Binary, pngMagic) || ev.ImageType != "image/png" {
			t.Errorf("frame %d: got %s with %d bytes (%s), want preview of %d PNG bytes", i, ev.Type, len(ev.Binary), ev.ImageType, r.ImageBytes)
		}
		if r.EventType == 4 {
			var md struct{ NodeID, PromptID string }
			_ = json.Unmarshal(r.Metadata, &struct {
				NodeID   *string `json:"node_id"`
				PromptID *string `json:"prompt_id"`
			}{&md.NodeID, &md.PromptID})
			if ev.PromptID != md.PromptID || ev.Node != md.NodeID {
				t.Errorf("frame %d: preview for %s/%s, want %s/%s", i, ev.PromptID, ev.Node, md.PromptID, md.NodeID)
			}
		}
		return
	}
	typ, data := r.msg()
	if ev.Type != typ {
		t.Fatalf("frame %d: type %q, want %q", i, ev.Type, typ)
	}
	if want, _ := data["prompt_id"].(string); ev.PromptID != want {
		t.Errorf("frame %d (%s): prompt id %q, want %q", i, typ, ev.PromptID, want)
	}
	switch typ {
	case "executing":
		if want, _ := data["node"].(string); ev.Node != want {
			t.Errorf("frame %d: node %q, want %q", i, ev.Node, want)
		}
	case "progress":
		if ev.Value != int(data["value"].(float64)) || ev.Max != int(data["max"].(float64)) || ev.Node != data["node"] {
			t.Errorf("frame %d: progress %s %d/%d, want %v", i, ev.Node, ev.Value, ev.Max, data)
		}
	case "execution_error", "execution_interrupted":
		if ev.Node != data["node_id"] {
			t.Errorf("frame %d: node %q, want %v", i, ev.Node, data["node_id"])
		}
	case "status":
		if sid, ok := data["sid"].(string); ok && sid != clientID && sid != "{clientId}" {
			t.Errorf("frame %d: sid %q, want %q", i, sid, clientID)
		}
	}
	var gotData, wantData any
	_ = json.Unmarshal(ev.Data, &gotData)
	_ = json.Unmarshal(r.JSON, &struct {
		Data *any `json:"data"`
	}{&wantData})
	if typ != "status" && !jsonEqual(gotData, wantData) {
		t.Errorf("frame %d: data %s differs from the recording", i, ev.Data)
	}
}

func jsonEqual(a, b any) bool {
	ab, _ := json.Marshal(a)
	bb, _ := json.Marshal(b)
	return bytes.Equal(ab, bb)
}

func TestParseBinaryFrames(t *testing.T) {
	ev1, _ := os.ReadFile(filepath.Join(transcripts, "ws_first_binary_frame_event1.bin"))
	ev4, _ := os.ReadFile(filepath.Join(transcripts, "ws_first_binary_frame_event4.bin"))
	if len(ev1) != 1329 || len(ev4) != 665 {
		t.Fatalf("example frames are %d and %d bytes", len(ev1), len(ev4))
	}
	e, ok := parseBinary(ev1)
	if !ok || e.Type != "preview" || e.ImageType != "image/png" || len(e.Binary) != 1321 {
		t.Errorf("event 1: %+v", e)
	}
	e, ok = parseBinary(ev4)
	if !ok || e.Type != "preview" || e.ImageType != "image/png" || len(e.Binary) != 492 ||
		e.PromptID != "36f38381-8605-4244-b040-80671d67a790" || e.Node != "2" || len(e.Data) != 165 {
		t.Errorf("event 4: %+v", e)
	}
	text := binary.BigEndian.AppendUint32(nil, 3)
	text = binary.BigEndian.AppendUint32(text, 2)
	text = append(text, "12hello"...)
	if e, ok := parseBinary(text); !ok || e.Type != "progress_text" || e.Node != "12" || string(e.Binary) != "hello" {
		t.Errorf("event 3: %+v %v", e, ok)
	}
	jpeg := append(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 1), 1), 0xff, 0xd8)
	if e, ok := parseBinary(jpeg); !ok || e.ImageType != "image/jpeg" {
		t.Errorf("jpeg preview: %+v", e)
	}

	for name, b := range map[string][]byte{
		"empty":            nil,
		"short":            {0, 0, 0, 1},
		"unknown event":    binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 9), 0),
		"metadata overrun": binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 4), 1000),
		"bad metadata":     append(binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 4), 3), "{{{"...),
		"text overrun":     binary.BigEndian.AppendUint32(binary.BigEndian.AppendUint32(nil, 3), 1<<31),
	} {
		if e, ok := parseBinary(b); ok {
			t.Errorf("%s: parsed as %+v, want skipped", name, e)
		}
	}
}

func TestParseTextFrames(t *testing.T) {
	for _, tc := range []struct {
		in   string
		ok   bool
		want Event
	}{
		{`{"type":"executing","data":{"node":null,"prompt_id":"p"}}`, true, Event{Type: "executing", PromptID: "p"}},
		{`{"type":"executing","data":{"node":"10"}}`, true, Event{Type: "executing", Node: "10"}},
		{`{"type":"progress","data":{"value":3,"max":20}}`, true, Event{Type: "progress", Value: 3, Max: 20}},
		{`{"type":"progress","data":{"value":1.0,"max":4.0,"node":7,"prompt_id":"p"}}`, true, Event{Type: "progress", PromptID: "p", Node: "7", Value: 1, Max: 4}},
		{`{"type":"custom.thing","data":"just a string"}`, true, Event{Type: "custom.thing"}},
		{`{"type":"crystools.monitor","data":[1,2,3]}`, true, Event{Type: "crystools.monitor"}},
		{`not json`, false, Event{}},
		{`{"data":{}}`, false, Event{}},
	} {
		got, ok := parseText([]byte(tc.in))
		got.Data = nil
		if ok != tc.ok || got.Type != tc.want.Type || got.PromptID != tc.want.PromptID || got.Node != tc.want.Node ||
			got.Value != tc.want.Value || got.Max != tc.want.Max {
			t.Errorf("parseText(%s) = %+v, %v; want %+v, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

func TestConnectRefused(t *testing.T) {
	rp := newReplay(t)
	rp.script([]wsStep{{reject: 403}})
	c := newTestClient(t, rp)
	_, err := c.Connect(testContext(t))
	if !isHTTPStatus(err, 403) || !IsPermanent(err) {
		t.Fatalf("Connect = %v, want a permanent HTTP 403", err)
	}
}

func TestSocketCloseWhileOpen(t *testing.T) {
	rp := newReplay(t)
	rp.script([]wsStep{{text: connectStatus}})
	c := newTestClient(t, rp)
	s, err := c.Connect(testContext(t))
	if err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-s.Events():
		if ev.Type != "status" {
			t.Errorf("first event %+v", ev)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no status on connect")
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, open := <-s.Events(); open {
		t.Error("Events still open after Close")
	}
	if s.Err() != nil {
		t.Errorf("Err after Close = %v", s.Err())
	}
	if len(rp.recorded("GET", "/ws")[0].Header.Values("Origin")) != 0 {
		t.Error("websocket handshake sent an Origin header")
	}
}

// parseTextByDecoding is how parseText read frames before it picked members out of
// them: the frame decoded, then its data.
func parseTextByDecoding(b []byte) (Event, bool) {
	var m struct {
		Type string          `json:"type"`
		Data json.RawMessage `json:"data"`
	}
	if json.Unmarshal(b, &m) != nil || m.Type == "" {
		return Event{}, false
	}
	ev := Event{Type: m.Type, Data: m.Data}
	var d struct {
		PromptID json.RawMessage `json:"prompt_id"`
		Node     json.RawMessage `json:"node"`
		NodeID   json.RawMessage `json:"node_id"`
		Value    json.RawMessage `json:"value"`
		Max      json.RawMessage `json:"max"`
	}
	if json.Unmarshal(m.Data, &d) == nil {
		ev.PromptID = jsonString(d.PromptID)
		ev.Node = jsonString(d.Node)
		if ev.Node == "" {
			ev.Node = jsonString(d.NodeID)
		}
		ev.Value = jsonInt(d.Value)
		ev.Max = jsonInt(d.Max)
	}
	return ev, true
}

// sameKeysAsWritten reports whether the members parseText looks for are written in
// b, if at all, as plain lower-case keys: encoding/json also matches keys in another
// case or with escaped letters, which ComfyUI never sends.
func sameKeysAsWritten(b []byte) bool {
	names := []string{"type", "data", "prompt_id", "node", "node_id", "value", "max"}
	plain := func(obj json.RawMessage) bool {
		var m map[string]json.RawMessage
		if json.Unmarshal(obj, &m) != nil {
			return true
		}
		for k := range m {
			for _, name := range names {
				if strings.EqualFold(k, name) && (k != name || !bytes.Contains(b, []byte(`"`+name+`"`))) {
					return false
				}
			}
		}
		return true
	}
	var top map[string]json.RawMessage
	if json.Unmarshal(b, &top) != nil {
		return true
	}
	if !plain(b) {
		return false
	}
	for k, v := range top {
		if strings.EqualFold(k, "data") && !plain(v) {
			return false
		}
	}
	return true
}

func FuzzParseTextAsDecoding(f *testing.F) {
	files, _ := filepath.Glob(filepath.Join(transcripts, "ws_*.jsonl"))
	for _, path := range files {
		for _, r := range loadWS(f, filepath.Base(path)) {
			if r.Kind == "text" {
				f.Add([]byte(r.Raw))
			}
		}
	}
	for _, s := range []string{
		`{"type":"executing","data":{"node":null,"prompt_id":"p"}}`,
		`{ "type" : "progress" , "data" : { "value" : 1.0 , "max" : 4e0 , "node" : 7 } }`,
		`{"data":{"node":"a\"}{[","prompt_id":"x\\"},"type":"executed"}`,
		`{"type":"t","data":{"nodes":{"1":{"value":[1,{"a":"}"}],"node_id":"1"}},"node_id":"2"}}`,
		`{"type":"t","type":"u","data":{"max":1},"data":{"max":2}}`,
		`{"type":"executing","data":{"node":"","node_id":"9"}}`,
		`{"type":1,"data":{}}`,
		`{"type":"","data":{}}`,
		`[{"type":"t"}]`,
		`{"type":"t","data":"s"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		got, ok := parseText(b)
		if !json.Valid(b) {
			if ok {
				t.Fatalf("parseText(%q) accepted invalid JSON", b)
			}
			return
		}
		if !sameKeysAsWritten(b) {
			return
		}
		want, wantOK := parseTextByDecoding(b)
		if ok != wantOK || got.Type != want.Type || got.PromptID != want.PromptID || got.Node != want.Node ||
			got.Value != want.Value || got.Max != want.Max || !bytes.Equal(got.Data, want.Data) {
			t.Fatalf("parseText(%q) = %+v, %v;\ndecoding gives %+v, %v", b, got, ok, want, wantOK)
		}
	})
}

// BenchmarkParseText reads every text frame of the transcripts, with parseText and
// by decoding as it did before.
func BenchmarkParseText(b *testing.B) {
	var frames [][]byte
	files, _ := filepath.Glob(filepath.Join(transcripts, "ws_*.jsonl"))
	for _, path := range files {
		for _, r := range loadWS(b, filepath.Base(path)) {
			if r.Kind == "text" {
				frames = append(frames, []byte(r.Raw))
			}
		}
	}
	for name, parse := range map[string]func([]byte) (Event, bool){"members": parseText, "decoding": parseTextByDecoding} {
		b.Run(name, func(b *testing.B) {
			for b.Loop() {
				for _, f := range frames {
					parse(f)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*len(frames)), "ns/frame")
		})
	}
}
