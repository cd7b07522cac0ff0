package comfyfacade_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"regexp"
	"slices"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/comfyfacade"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// frame is one text frame of a transcript.
type frame struct {
	raw  string
	typ  string
	data map[string]any
}

// transcript reads the text frames of a websocket transcript.
func transcript(t *testing.T, name string) []frame {
	t.Helper()
	f, err := os.Open("../comfy/testdata/transcripts/" + name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []frame
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<24)
	for sc.Scan() {
		var line struct {
			Raw any `json:"raw"`
		}
		if err := json.Unmarshal(sc.Bytes(), &line); err != nil {
			t.Fatal(err)
		}
		raw, ok := line.Raw.(string)
		if !ok {
			continue
		}
		var m struct {
			Type string         `json:"type"`
			Data map[string]any `json:"data"`
		}
		if err := json.Unmarshal([]byte(raw), &m); err != nil {
			t.Fatal(err)
		}
		out = append(out, frame{raw, m.Type, m.Data})
	}
	return out
}

// keep selects the frames the fleet can reproduce: it sees no progress_state, and
// sees a node start only when it reports progress.
func keep(frames []frame, progressNodes ...string) []string {
	var out []string
	for _, f := range frames {
		switch f.typ {
		case "progress_state":
			continue
		case "executing":
			if n, ok := f.data["node"].(string); ok && !slices.Contains(progressNodes, n) {
				continue
			}
		}
		out = append(out, f.raw)
	}
	return out
}

var timestamps = regexp.MustCompile(`"timestamp": \d+`)

func frames(t *testing.T, p *comfyfacade.Prompt, events []fleet.SceneEvent, queue []int) []string {
	t.Helper()
	var out []string
	for i, ev := range events {
		for _, m := range p.Apply(ev, queue[i]) {
			b, err := m.Frame()
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, string(b))
		}
	}
	return out
}

func compare(t *testing.T, got, want []string) {
	t.Helper()
	norm := func(s []string) []string {
		out := make([]string, len(s))
		for i, f := range s {
			out[i] = timestamps.ReplaceAllString(f, `"timestamp": 0`)
		}
		return out
	}
	g, w := norm(got), norm(want)
	for i := range max(len(g), len(w)) {
		var gi, wi string
		if i < len(g) {
			gi = g[i]
		}
		if i < len(w) {
			wi = w[i]
		}
		if gi != wi {
			t.Errorf("frame %d\n got %s\nwant %s", i, gi, wi)
		}
	}
}

var at = time.UnixMilli(1795397001596)

func TestSuccessAsTranscriptWS1(t *testing.T) {
	t.Parallel()
	want := keep(transcript(t, "ws_1_good.jsonl"))
	p := &comfyfacade.Prompt{ID: "61b8ded9-2c66-4167-b4bb-021628f05a63"}
	events := []fleet.SceneEvent{
		{Type: fleet.EventQueued, Time: at},
		{Type: fleet.EventStarted, Attempt: 1, Time: at},
		{Type: fleet.EventCompleted, Time: at, Outputs: []fleet.Output{
			{Name: "acceptance_00001_.png", ContentType: "image/png", Kind: "images", NodeID: "4"}}},
	}
	got := frames(t, p, events, []int{1, 1, 0})
	// ComfyUI announces the queue twice, when the prompt is queued and taken.
	compare(t, got, want)
}

func TestProgressAsTranscriptWS6(t *testing.T) {
	t.Parallel()
	want := keep(transcript(t, "ws_6_progress_binary_plain_client.jsonl"), "2")
	p := &comfyfacade.Prompt{ID: "9d9714c0-67f7-4a52-a13f-81e7849fcb3d"}
	events := []fleet.SceneEvent{{Type: fleet.EventQueued, Time: at}, {Type: fleet.EventStarted, Attempt: 1, Time: at}}
	for v := 1; v <= 4; v++ {
		events = append(events, fleet.SceneEvent{Type: fleet.EventProgress, Attempt: 1, Progress: &fleet.Progress{Value: v, Max: 4, Node: "2"}, Time: at})
	}
	events = append(events, fleet.SceneEvent{Type: fleet.EventCompleted, Time: at})
	got := frames(t, p, events, []int{1, 1, 1, 1, 1, 1, 0})
	compare(t, got, want)
}

// dataKeys returns the keys of a frame's data object, in order.
func dataKeys(t *testing.T, raw string) []string {
	t.Helper()
	var m struct {
		Data json.RawMessage `json:"data"`
	}
	if err := json.Unmarshal([]byte(raw), &m); err != nil {
		t.Fatal(err)
	}
	dec := json.NewDecoder(bytes.NewReader(m.Data))
	var out []string
	depth := 0
	for {
		tok, err := dec.Token()
		if err != nil {
			break
		}
		switch v := tok.(type) {
		case json.Delim:
			if v == '{' || v == '[' {
				depth++
			} else {
				depth--
			}
		case string:
			if depth == 1 && dec.More() {
				out = append(out, v)
				var skip json.RawMessage
				if err := dec.Decode(&skip); err != nil {
					t.Fatal(err)
				}
			}
		}
	}
	return out
}

func lastOf(frames []frame, typ string) frame {
	for i := len(frames) - 1; i >= 0; i-- {
		if frames[i].typ == typ {
			return frames[i]
		}
	}
	return frame{}
}

func TestFailureAndInterruptionAsTranscripts(t *testing.T) {
	t.Parallel()
	classes := map[string]string{"1": "EmptyImage", "2": "ImageToMask", "3": "SaveImage"}
	for _, tc := range []struct {
		name, transcript, typ string
		end                   fleet.SceneEvent
		want                  map[string]any
	}{
		{"failed", "ws_5_runtime_error.jsonl", "execution_error",
			fleet.SceneEvent{Type: fleet.EventFailed, Error: "node 2 (ImageToMask): IndexError: index 3 is out of bounds", Time: at},
			map[string]any{"node_id": "2", "node_type": "ImageToMask", "exception_message": "node 2 (ImageToMask): IndexError: index 3 is out of bounds"}},
		{"cancelled", "ws_8_slow_queue_interrupt.jsonl", "execution_interrupted",
			fleet.SceneEvent{Type: fleet.EventCancelled, Time: at}, map[string]any{"node_id": "2", "node_type": "ImageToMask"}},
	} {
		p := &comfyfacade.Prompt{ID: "p1", Classes: classes}
		events := []fleet.SceneEvent{
			{Type: fleet.EventStarted, Attempt: 1, Time: at},
			{Type: fleet.EventProgress, Attempt: 1, Progress: &fleet.Progress{Value: 1, Max: 1, Node: "1"}, Time: at},
			{Type: fleet.EventProgress, Attempt: 1, Progress: &fleet.Progress{Value: 1, Max: 3, Node: "2"}, Time: at},
			{Type: fleet.EventRetrying, Attempt: 1, Time: at},
			{Type: fleet.EventStarted, Attempt: 2, Time: at},
			tc.end,
			{Type: fleet.EventCompleted, Time: at},
		}
		got := frames(t, p, events, []int{1, 1, 1, 1, 1, 0, 0})
		var types []string
		for _, f := range got {
			var m comfyfacade.Message
			json.Unmarshal([]byte(f), &m)
			types = append(types, m.Type)
		}
		wantTypes := []string{"status", "execution_start", "execution_cached", "executing", "progress", "executing", "progress", tc.typ, "status", "executing"}
		if !slices.Equal(types, wantTypes) {
			t.Errorf("%s: frames %v, want %v: a retry is not a new start, and nothing follows the end", tc.name, types, wantTypes)
			continue
		}
		end := got[7]
		ref := lastOf(transcript(t, tc.transcript), tc.typ)
		if g, w := dataKeys(t, end), dataKeys(t, ref.raw); !slices.Equal(g, w) {
			t.Errorf("%s: %s keys %v, want ComfyUI's %v", tc.name, tc.typ, g, w)
		}
		var data map[string]any
		var m struct {
			Data map[string]any `json:"data"`
		}
		json.Unmarshal([]byte(end), &m)
		data = m.Data
		for k, v := range tc.want {
			if data[k] != v {
				t.Errorf("%s: %s = %v, want %v", tc.name, k, data[k], v)
			}
		}
		if ex, _ := data["executed"].([]any); len(ex) != 1 || ex[0] != "1" {
			t.Errorf("%s: executed %v, want [1]", tc.name, data["executed"])
		}
	}
}

func TestHelloAsTranscriptWSA(t *testing.T) {
	t.Parallel()
	want := transcript(t, "ws_A.jsonl")[0].raw
	b, err := comfyfacade.Hello(0, "acceptance-8e35a1d2").Frame()
	if err != nil || string(b) != want {
		t.Errorf("Hello = %s, %v; want %s", b, err, want)
	}
}
