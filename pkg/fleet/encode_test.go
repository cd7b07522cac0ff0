package fleet

import (
	"bytes"
	"encoding/json"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestScenePayloadEncodesAsJSONMarshalDoes(t *testing.T) {
	graph := Graph{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 512, "height": 512.0, "color": float64(16744448)}, "_meta": map[string]any{"title": "<Empty> & \"image\""}},
		"2": map[string]any{"class_type": "ImageInvert", "inputs": map[string]any{"image": []any{"1", 0.0}}},
	}
	inputs := []Input{{Param: "image", Object: "j/0/image", Bind: []Binding{{Node: "1", Input: "image"}}}, {Param: "mask", URL: "https://example.com/m.png"}}
	full := ScenePayload{JobID: "abc", Index: 999, Graph: graph, Timeout: 90 * time.Second, Inputs: inputs}
	// Every field set, so that one Encode does not write fails the comparison.
	for i, v := 0, reflect.ValueOf(full); i < v.NumField(); i++ {
		if v.Field(i).IsZero() {
			t.Fatalf("the test's full payload leaves %s unset", v.Type().Field(i).Name)
		}
	}
	for _, p := range []ScenePayload{
		{JobID: "abc", Index: 0, Graph: graph},
		full,
		{JobID: "", Index: -1, Graph: nil, Timeout: -time.Nanosecond, Inputs: []Input{}},
	} {
		got := encodesAsJSONMarshal(t, p, p.Encode)
		var back ScenePayload
		if err := json.Unmarshal(got, &back); err != nil || back.Index != p.Index || back.Timeout != p.Timeout || len(back.Inputs) != len(p.Inputs) {
			t.Errorf("decoded %+v, %v; want %+v", back, err, p)
		}
	}
	if _, err := (ScenePayload{JobID: "abc", Graph: Graph{"1": math.NaN()}}).Encode(); err == nil || !strings.Contains(err.Error(), "abc.0") {
		t.Errorf("a graph json.Marshal refuses: error %v, want one naming the scene", err)
	}
}

func TestEventEncodesAsJSONMarshalDoes(t *testing.T) {
	at := time.Date(2026, 12, 5, 17, 4, 5, 123456789, time.FixedZone("x", 3600))
	scene := SceneEvent{JobID: "abc", Index: 7, Type: EventCompleted, Attempt: 2, Node: "gpu-<1>", Duration: time.Second, Workflow: "demo", Time: at,
		Outputs: []Output{{Name: "s7_a&b.png", ContentType: "image/png", Size: 12, Kind: "images", NodeID: "9"}}}
	job := JobEvent{Type: EventFailed, Job: Job{ID: "abc", CreatedAt: at}}
	var events []Event
	for _, mk := range []func() (Event, error){
		func() (Event, error) { return scene.Envelope("comfyfleet/executor") },
		func() (Event, error) { return job.Envelope("comfyfleet/notifier") },
	} {
		ev, err := mk()
		if err != nil {
			t.Fatal(err)
		}
		events = append(events, ev)
	}
	events = append(events, Event{ID: "no data", Time: at.UTC()})
	for _, ev := range events {
		encodesAsJSONMarshal(t, ev, ev.Encode)
	}
	if _, err := (Event{ID: "far", Time: time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)}).Encode(); err == nil {
		t.Error("a time json.Marshal refuses encoded without error")
	}
}

// encodesAsJSONMarshal reports an error unless encode writes what json.Marshal writes
// of v, and returns what encode wrote.
func encodesAsJSONMarshal(t *testing.T, v any, encode func() ([]byte, error)) []byte {
	t.Helper()
	want, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	got, err := encode()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("Encode wrote\n%s\njson.Marshal\n%s", got, want)
	}
	return got
}
