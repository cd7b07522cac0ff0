package fleet_test

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

func TestDecodeSceneEventReadsWhatEnvelopeWrote(t *testing.T) {
	at := time.Date(2026, 12, 5, 4, 0, 0, 0, time.UTC)
	want := fleet.SceneEvent{JobID: "job1", Index: 3, Retry: 1, Type: fleet.EventCompleted, Attempt: 2, Node: "gpu-1",
		Outputs:  []fleet.Output{{Name: "s3_fox_00001_.png", ContentType: "image/png", Size: 42, NodeID: "9"}},
		Duration: 1500 * time.Millisecond, Workflow: "demo", Model: "sdxl.safetensors", ModelLoaded: true, Time: at}
	env, err := want.Envelope("test")
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(env)
	if err != nil {
		t.Fatal(err)
	}
	got, err := fleet.DecodeSceneEvent(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("DecodeSceneEvent = %+v, want %+v", got, want)
	}

	for name, bad := range map[string]string{
		"no data":      `{"specversion":"1.0","id":"scene.job1.3.completed","type":"dev.comfyfleet.scene.completed"}`,
		"null data":    `{"id":"scene.job1.3.completed","data":null}`,
		"wrong data":   `{"id":"scene.job1.3.completed","data":{"index":"three"}}`,
		"not json":     `{"id":`,
		"not an event": `[1,2]`,
	} {
		if _, err := fleet.DecodeSceneEvent([]byte(bad)); err == nil {
			t.Errorf("%s: DecodeSceneEvent(%s) = nil error", name, bad)
		} else if name != "not json" && name != "not an event" && !strings.Contains(err.Error(), "scene.job1.3.completed") {
			t.Errorf("%s: error %q does not name the event", name, err)
		}
	}
}
