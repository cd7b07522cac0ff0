package comfy

import (
	"encoding/json"
	"reflect"
	"sort"
	"strings"
	"testing"

	"github.com/google/uuid"
)

func TestFlattenOutputsKindsAndOrder(t *testing.T) {
	raw := `{"outputs": {
		"10": {"gifs": [{"filename": "clip_00001.mp4", "subfolder": "vid", "type": "output", "format": "video/h264-mp4", "frame_rate": 8}], "text": ["a caption"]},
		"9": {"images": [{"filename": "a.webp", "subfolder": "", "type": "output"}, {"filename": "b.webp", "subfolder": "", "type": "output"}], "animated": [true]},
		"2": {"audio": [{"filename": "s.flac", "subfolder": "", "type": "temp"}], "video": {"filename": "v.mp4", "subfolder": "", "type": "output"}},
		"5:3": {"weird": [42, null, {"no": "filename"}]}
	}}`
	h, err := parseHistoryEntry("p", json.RawMessage(raw))
	if err != nil {
		t.Fatal(err)
	}
	want := []Output{
		{NodeID: "2", Kind: "audio", File: FileRef{Filename: "s.flac", Type: "temp"}},
		{NodeID: "2", Kind: "video", File: FileRef{Filename: "v.mp4", Type: "output"}},
		{NodeID: "9", Kind: "images", File: FileRef{Filename: "a.webp", Type: "output"}},
		{NodeID: "9", Kind: "images", File: FileRef{Filename: "b.webp", Type: "output"}},
		{NodeID: "10", Kind: "gifs", File: FileRef{Filename: "clip_00001.mp4", Subfolder: "vid", Type: "output", Format: "video/h264-mp4"}},
		{NodeID: "10", Kind: "text", Text: "a caption"},
	}
	if !reflect.DeepEqual(h.Outputs, want) {
		t.Errorf("outputs\n got %+v\nwant %+v", h.Outputs, want)
	}
	if h.Err() != nil || h.AllCached() {
		t.Errorf("entry without status: err %v, cached %v", h.Err(), h.AllCached())
	}
}

func TestHistoryStatusErrorWithoutMessage(t *testing.T) {
	h, err := parseHistoryEntry("p", json.RawMessage(`{"outputs": {}, "status": {"status_str": "error", "completed": false, "messages": []}}`))
	if err != nil {
		t.Fatal(err)
	}
	if err := h.Err(); err == nil || IsPermanent(err) {
		t.Errorf("Err() = %v, want a transient error", err)
	}
}

func TestLessNodeID(t *testing.T) {
	ids := []string{"10", "a", "9", "5:12", "2", "5", "5:3", "1", "b"}
	sort.Slice(ids, func(i, j int) bool { return lessNodeID(ids[i], ids[j]) })
	if want := []string{"1", "2", "5", "5:3", "5:12", "9", "10", "a", "b"}; !reflect.DeepEqual(ids, want) {
		t.Errorf("sorted %v, want %v", ids, want)
	}
}

func TestPromptID(t *testing.T) {
	a := PromptID("scene-42", "attempt-1")
	if a != PromptID("scene-42", "attempt-1") {
		t.Error("PromptID is not deterministic")
	}
	if a == PromptID("scene-42", "attempt-2") || a == PromptID("scene-42/attempt-1x") {
		t.Error("PromptID collides")
	}
	if a != PromptID("scene-42/attempt-1") {
		t.Error("parts are not joined by /")
	}
	u, err := uuid.Parse(a)
	if err != nil || u.Version() != 5 {
		t.Errorf("PromptID %q is not a v5 uuid (%v)", a, err)
	}
	// Changing the namespace would remap every attempt to a new prompt id.
	if a != "2c6b2a3a-b7d0-53bc-8c72-97b8fc697423" {
		t.Errorf("PromptID(scene-42, attempt-1) = %s, changed", a)
	}
}

func TestNewDefaults(t *testing.T) {
	a, b := New("http://h:8188/"), New("http://h:8188")
	if a.BaseURL() != "http://h:8188" || !strings.HasPrefix(a.ClientID(), "comfyfleet-") || a.ClientID() == b.ClientID() {
		t.Errorf("defaults: %q %q %q", a.BaseURL(), a.ClientID(), b.ClientID())
	}
	if _, err := uuid.Parse(strings.TrimPrefix(a.ClientID(), "comfyfleet-")); err != nil {
		t.Errorf("client id %q: %v", a.ClientID(), err)
	}
	if c := New("http://h", WithClientID("x"), WithClientID("")); c.ClientID() != "x" {
		t.Errorf("WithClientID: %q", c.ClientID())
	}
}
