package jsontree

import (
	"bytes"
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"testing"
)

// samples are JSON documents whose decoded trees must encode as encoding/json
// encodes them: every shipped workflow, and values that encoding/json writes in a
// way of its own (escapes, exponents, big and negative numbers).
func samples(t testing.TB) [][]byte {
	docs := [][]byte{
		[]byte(`{"b":1,"a":[1,2.5,-0.000001,1e-7,1e21,123456789012345678901234,-0,0.1,1e308],"c":null,"d":true,"e":false}`),
		[]byte(`{"html":"<a href=\"x\">&</a>","ctl":"tab\tnl\nret\rbs\bff\f\u0001\u001f","uni":"é ☃ 😀 \u2028\u2029","slash":"a\\b/c"}`),
		[]byte(`{"":{"":[]},"z":{},"y":[[],{},[null]],"<key>":"v","k\u00e9y":1}`),
		[]byte(`[1,"two",{"3":[4]}]`),
		[]byte(`"just a string"`),
		[]byte(`1.5e-300`),
	}
	files, err := filepath.Glob("../../workflows/*.json")
	if err != nil || len(files) == 0 {
		t.Fatalf("no shipped workflows: %v", err)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		docs = append(docs, b)
	}
	return docs
}

func sameAsMarshal(t testing.TB, v any) {
	t.Helper()
	want, werr := json.Marshal(v)
	got, gerr := Append([]byte("prefix"), v)
	if (werr != nil) != (gerr != nil) {
		t.Fatalf("json.Marshal's error %v, Append's %v", werr, gerr)
	}
	if werr == nil && !bytes.Equal(got, append([]byte("prefix"), want...)) {
		t.Fatalf("Append wrote\n%s\njson.Marshal\n%s", got[len("prefix"):], want)
	}
}

func TestAppendWritesWhatJSONMarshalWrites(t *testing.T) {
	for _, doc := range samples(t) {
		var v any
		if err := json.Unmarshal(doc, &v); err != nil {
			t.Fatalf("%s: %v", doc, err)
		}
		sameAsMarshal(t, v)
	}
	// Values a rendered graph holds besides decoded ones: template parameters as
	// Go numbers, invalid UTF-8, and what json.Marshal refuses.
	sameAsMarshal(t, map[string]any{"seed": 42, "big": int64(math.MaxInt64), "f": float32(0.1), "n": json.Number("7"), "bad": "\xff\xfe"})
	sameAsMarshal(t, map[string]any{"nan": math.NaN()})
	sameAsMarshal(t, []any{math.Inf(-1)})
	sameAsMarshal(t, map[string]any(nil))
	sameAsMarshal(t, []any(nil))
}

func FuzzAppend(f *testing.F) {
	for _, doc := range samples(f) {
		f.Add(doc)
	}
	f.Fuzz(func(t *testing.T, doc []byte) {
		var v any
		if json.Unmarshal(doc, &v) != nil {
			return
		}
		sameAsMarshal(t, v)
	})
}

func BenchmarkAppend(b *testing.B) {
	doc, err := os.ReadFile("../../workflows/txt2img.json")
	if err != nil {
		b.Fatal(err)
	}
	var v map[string]any
	if err := json.Unmarshal(doc, &v); err != nil {
		b.Fatal(err)
	}
	graph := v["graph"]
	b.Run("jsontree", func(b *testing.B) {
		var buf []byte
		for b.Loop() {
			buf, _ = Append(buf[:0], graph)
		}
	})
	b.Run("encoding-json", func(b *testing.B) {
		for b.Loop() {
			_, _ = json.Marshal(graph)
		}
	})
}
