package comfysim

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
)

func TestOrderedObjectsInPythonsFormat(t *testing.T) {
	b, err := pyjson.Marshal(obj{{"z", 1}, {"a", obj{}}, {"m", pyFloat(1)}, {"n", nil}})
	if err != nil || string(b) != `{"z": 1, "a": {}, "m": 1.0, "n": null}` {
		t.Errorf("pyjson.Marshal: %s %v", b, err)
	}
}

// TestPyJSONFastPathMatchesReformat: the direct encoding of the simulator's
// message types gives the same bytes as encoding/json reformatted.
func TestPyJSONFastPathMatchesReformat(t *testing.T) {
	values := []any{
		nil, true, false, "", "plain", "é<>&\n\"\\\t\x01\x7f🎥", "bad \xff utf-8", 0, -7, int64(1) << 62, pyFloat(2), pyFloat(1e-7),
		obj(nil), obj{}, []any(nil), []any{}, []string(nil), []string{}, []string{"a", "ü"},
		obj{{"k:,", obj{{"n", nil}, {"l", []any{1, "x", pyFloat(0.5), obj{{"deep", []string{"y"}}}, 2.5, 3.0}}}}, {"é", map[string]any{"b": 1, "a": 1.5}}},
		json.RawMessage(`{"raw": [1.0, 2]}`), qnum{v: -3},
	}
	for _, v := range values {
		raw, err := json.Marshal(v)
		if err != nil {
			t.Fatal(err)
		}
		want, err := pyjson.Format(raw)
		if err != nil {
			t.Fatal(err)
		}
		got, err := pyjson.Marshal(v)
		if err != nil || string(got) != string(want) {
			t.Errorf("pyjson.Marshal(%#v) = %s, %v; want %s", v, got, err, want)
		}
	}
}

func TestPyRepr(t *testing.T) {
	for in, want := range map[string]string{
		"sinc": `'sinc'`, "it's": `"it's"`, `a'b"c`: `'a\'b"c'`, "tab\there": `'tab\there'`, "é": `'é'`, "\x01": `'\x01'`,
	} {
		if got := pyRepr(in); got != want {
			t.Errorf("pyRepr(%q) = %s, want %s", in, got, want)
		}
	}
	if got := pyReprJSON([]byte(`{"1": {"x": [1, true, null, "s"]}}`)); got != `{'1': {'x': [1, True, None, 's']}}` {
		t.Errorf("pyReprJSON: %s", got)
	}
}

func TestParseObjectKeepsOrder(t *testing.T) {
	ms, err := pyjson.ParseObject([]byte(`{"b": 1, "a": {"y": 2, "x": 3}, "b": 4}`))
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, m := range ms {
		keys = append(keys, m.Key+"="+string(m.Raw))
	}
	if got := strings.Join(keys, " "); got != `b=4 a={"y": 2, "x": 3}` {
		t.Errorf("members %s", got)
	}
	if _, err := pyjson.ParseObject([]byte(`[1]`)); err == nil {
		t.Errorf("a list parsed as an object")
	}
}

// TestHeapMatchesPython checks the pending order against what Python's
// heapq gives for the same pushes, pops and deletions.
func TestHeapMatchesPython(t *testing.T) {
	newJob := func(n float64) *job { return &job{number: qnum{v: n}, id: "p"} }
	var h []*job
	for _, n := range []float64{16, 17, -18} {
		heapPush(&h, newJob(n))
	}
	if got := numbers(h); got != "-18 17 16" {
		t.Errorf("heap %s, want the recorded -18 17 16", got)
	}
	// heapq.heappush for 5, 3, 8, 1, 9, 2, 7 then heappop twice:
	// [1, 3, 2, 5, 9, 8, 7] -> pop 1 -> [2, 3, 7, 5, 9, 8] -> pop 2 -> [3, 5, 7, 8, 9].
	h = nil
	for _, n := range []float64{5, 3, 8, 1, 9, 2, 7} {
		heapPush(&h, newJob(n))
	}
	if got := numbers(h); got != "1 3 2 5 9 8 7" {
		t.Errorf("after pushes %s", got)
	}
	heapPop(&h)
	if got := numbers(h); got != "2 3 7 5 9 8" {
		t.Errorf("after a pop %s", got)
	}
	heapPop(&h)
	if got := numbers(h); got != "3 5 7 8 9" {
		t.Errorf("after two pops %s", got)
	}
}

func numbers(h []*job) string {
	var parts []string
	for _, j := range h {
		b, _ := json.Marshal(j.number)
		parts = append(parts, string(b))
	}
	return strings.Join(parts, " ")
}

func TestTorchRepr(t *testing.T) {
	small := torchRepr([]int{1, 2, 2, 3}, []float64{1, 128.0 / 255, 0})
	want := "tensor([[[[1.0000, 0.5020, 0.0000],\n          [1.0000, 0.5020, 0.0000]],\n\n         [[1.0000, 0.5020, 0.0000],\n          [1.0000, 0.5020, 0.0000]]]])"
	if small != want {
		t.Errorf("torchRepr:\n%s\nwant\n%s", small, want)
	}
}

func TestObjectInfoTable(t *testing.T) {
	for _, name := range classes.order {
		c := classes.byName[name]
		if _, err := pyjson.Marshal(c.render(nil)); err != nil {
			t.Errorf("%s: %v", name, err)
		}
		for _, in := range c.Inputs {
			if in.Type == "" && len(in.Choices) == 0 && name != "LoadImage" {
				t.Errorf("%s.%s: empty combo", name, in.Name)
			}
		}
	}
	for _, sampler := range []string{"KSampler", "KSamplerAdvanced"} {
		if !isSampler(classes.byName[sampler]) {
			t.Errorf("%s is not a sampler", sampler)
		}
	}
}
