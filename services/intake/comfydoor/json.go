package comfydoor

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"

	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
)

// ComfyUI is a Python server: its JSON objects keep their keys in insertion order and
// json.dumps writes them with ", " and ": ". The door answers the same way: object
// keeps members in order, pyjson writes them.

// field is one member of an ordered JSON object.
type field struct {
	K string
	V any
}

// object is a JSON object that keeps its members in order; a nil object is {}.
type object []field

// MarshalJSON writes the members in order.
func (o object) MarshalJSON() ([]byte, error) {
	b := []byte{'{'}
	for i, f := range o {
		if i > 0 {
			b = append(b, ',')
		}
		k, err := json.Marshal(f.K)
		if err != nil {
			return nil, err
		}
		v, err := json.Marshal(f.V)
		if err != nil {
			return nil, fmt.Errorf("encode %q: %w", f.K, err)
		}
		b = append(append(append(b, k...), ':'), v...)
	}
	return append(b, '}'), nil
}

// AppendPyJSON writes the members in order, as json.dumps writes a dict.
func (o object) AppendPyJSON(out []byte) ([]byte, error) {
	var err error
	out = append(out, '{')
	for i, f := range o {
		if i > 0 {
			out = append(out, ", "...)
		}
		out = append(pyjson.AppendString(out, f.K), ": "...)
		if raw, ok := f.V.(json.RawMessage); ok {
			var formatted []byte
			if formatted, err = pyjson.Format(raw); err != nil {
				return nil, err
			}
			out = append(out, formatted...)
			continue
		}
		if out, err = pyjson.Append(out, f.V); err != nil {
			return nil, err
		}
	}
	return append(out, '}'), nil
}

// member is one member of a parsed JSON object, its value as it came.
type member struct {
	Key string
	Raw json.RawMessage
}

var errNotObject = errors.New("not a JSON object")

// parseObject splits a JSON object into its members, in order; a repeated key keeps
// its first place and its last value, as Python's json.loads does.
func parseObject(raw []byte) ([]member, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil || tok != json.Delim('{') {
		return nil, errNotObject
	}
	var out []member
	index := map[string]int{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, fmt.Errorf("read object key: %w", err)
		}
		key, ok := tok.(string)
		if !ok {
			return nil, fmt.Errorf("read object key: unexpected %v", tok)
		}
		var v json.RawMessage
		if err := dec.Decode(&v); err != nil {
			return nil, fmt.Errorf("read value of %q: %w", key, err)
		}
		if i, seen := index[key]; seen {
			out[i].Raw = v
			continue
		}
		index[key] = len(out)
		out = append(out, member{key, v})
	}
	if _, err := dec.Token(); err != nil {
		return nil, fmt.Errorf("read object end: %w", err)
	}
	return out, nil
}

// lookup returns the value of key among members.
func lookup(ms []member, key string) (json.RawMessage, bool) {
	for _, m := range ms {
		if m.Key == key {
			return m.Raw, true
		}
	}
	return nil, false
}

// members turns parsed members back into an object that writes them unchanged.
func members(ms []member) object {
	o := make(object, len(ms))
	for i, m := range ms {
		o[i] = field{m.Key, m.Raw}
	}
	return o
}

// kind classifies raw JSON by its first byte: '{', '[', '"', 't'/'f', 'n', '0' for a
// number, 0 for nothing.
func kind(raw []byte) byte {
	raw = bytes.TrimLeft(raw, " \t\r\n")
	if len(raw) == 0 {
		return 0
	}
	switch c := raw[0]; c {
	case '{', '[', '"', 't', 'f', 'n':
		return c
	}
	return '0'
}

// truthy reports whether raw is true in Python's sense.
func truthy(raw []byte) bool {
	raw = bytes.TrimSpace(raw)
	switch kind(raw) {
	case 't':
		return true
	case '0':
		var f float64
		return json.Unmarshal(raw, &f) != nil || f != 0
	case '"':
		return string(raw) != `""`
	case '[':
		var a []json.RawMessage
		_ = json.Unmarshal(raw, &a)
		return len(a) > 0
	case '{':
		ms, _ := parseObject(raw)
		return len(ms) > 0
	}
	return false
}

// writeJSON answers v as ComfyUI does: json.dumps, application/json; charset=utf-8.
func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := pyjson.Marshal(v)
	if err != nil {
		writeServerError(w)
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// writeBare answers status with an empty body, as aiohttp's bare web.Response does.
func writeBare(w http.ResponseWriter, status int) {
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(status)
}

// writeServerError answers as aiohttp does when a handler raises.
func writeServerError(w http.ResponseWriter) {
	writeText(w, http.StatusInternalServerError, "500 Internal Server Error\n\nServer got itself in trouble")
}

// writeText answers a plain-text message.
func writeText(w http.ResponseWriter, status int, text string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(status)
	_, _ = w.Write([]byte(text))
}
