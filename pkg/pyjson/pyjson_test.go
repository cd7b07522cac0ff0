package pyjson

import (
	"encoding/json"
	"errors"
	"testing"
)

func TestFormatFloat(t *testing.T) {
	for f, want := range map[float64]string{
		0: "0.0", 1: "1.0", -2.5: "-2.5", 0.1: "0.1", 100: "100.0", 1e16: "1e+16", 1.5e-7: "1.5e-07",
		0.0001: "0.0001", 123456789012345678: "1.2345678901234568e+17", 8: "8.0",
	} {
		if got := FormatFloat(f); got != want {
			t.Errorf("FormatFloat(%v) = %s, want %s", f, got, want)
		}
	}
}

func TestFormat(t *testing.T) {
	cases := map[string]string{
		`{"a":1,"b":[1.50,2e3,"x"]}`:                `{"a": 1, "b": [1.5, 2000.0, "x"]}`,
		`{"s":"é\u003c\n\"\\","e":"🎥"}`:             `{"s": "\u00e9<\n\"\\", "e": "\ud83c\udfa5"}`,
		`[true,false,null,-0,18446744073709551615]`: `[true, false, null, -0, 18446744073709551615]`,
		`{"k:,":"v, w: x"}`:                         `{"k:,": "v, w: x"}`,
	}
	for in, want := range cases {
		got, err := Format([]byte(in))
		if err != nil || string(got) != want {
			t.Errorf("Format(%s) = %s, %v; want %s", in, got, err, want)
		}
	}
}

func TestMarshalKeepsStructOrder(t *testing.T) {
	type data struct {
		Prompt string  `json:"prompt_id"`
		Value  Float   `json:"value"`
		Node   *string `json:"node"`
	}
	b, err := Marshal(struct {
		Type string `json:"type"`
		Data data   `json:"data"`
	}{"progress", data{"p", 3, nil}})
	if err != nil || string(b) != `{"type": "progress", "data": {"prompt_id": "p", "value": 3.0, "node": null}}` {
		t.Errorf("Marshal = %s, %v", b, err)
	}
}

func TestOrderedObjectsReadAndWriteAsPython(t *testing.T) {
	ms, err := ParseObject([]byte(`{"b": 1, "a": {"x": "<&>"}, "b": [1.5, true]}`))
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 2 || ms[0].Key != "b" || string(ms[0].Raw) != "[1.5, true]" {
		t.Fatalf("members %+v; want b (its first place, its last value), then a", ms)
	}
	if raw, ok := Lookup(ms, "a"); !ok || Kind(raw) != '{' || !Truthy(raw) {
		t.Errorf("a: %s", raw)
	}
	o := Object{{K: "z", V: json.RawMessage(`{"x":"<&>"}`)}, {K: "é", V: Float(2)}}
	got, err := Marshal(o)
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"z": {"x": "<&>"}, "\u00e9": 2.0}`; string(got) != want {
		t.Errorf("json.dumps style: %s, want %s", got, want)
	}
	if _, err := ParseObject([]byte(`[1]`)); !errors.Is(err, ErrNotObject) {
		t.Errorf("an array parsed as an object: %v", err)
	}
	for raw, want := range map[string]bool{`0`: false, `0.0`: false, `""`: false, `[]`: false, `{}`: false, `null`: false, `false`: false, `1`: true, `"x"`: true, `[0]`: true} {
		if Truthy([]byte(raw)) != want {
			t.Errorf("Truthy(%s) = %v", raw, !want)
		}
	}
}
