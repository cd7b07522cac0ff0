package pyjson

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
)

// A Python server's JSON objects keep their keys in insertion order. Object keeps
// them so when written, and ParseObject when read.

// Field is one member of an ordered JSON object.
type Field struct {
	K string
	V any
}

// Object is a JSON object that keeps its members in order, as a Python dict does; a
// nil Object is {}.
type Object []Field

// MarshalJSON writes the members in order.
func (o Object) MarshalJSON() ([]byte, error) {
	b := []byte{'{'}
	for i, f := range o {
		if i > 0 {
			b = append(b, ',')
		}
		k, err := json.Marshal(f.K)
		if err != nil {
			return nil, fmt.Errorf("encode key %q: %w", f.K, err)
		}
		v, err := json.Marshal(f.V)
		if err != nil {
			return nil, fmt.Errorf("encode value of %q: %w", f.K, err)
		}
		b = append(append(append(b, k...), ':'), v...)
	}
	return append(b, '}'), nil
}

// AppendPyJSON appends the members in order, as json.dumps writes a dict.
func (o Object) AppendPyJSON(out []byte) ([]byte, error) {
	var err error
	out = append(out, '{')
	for i, f := range o {
		if i > 0 {
			out = append(out, ", "...)
		}
		out = append(AppendString(out, f.K), ": "...)
		if out, err = Append(out, f.V); err != nil {
			return nil, err
		}
	}
	return append(out, '}'), nil
}

// Member is one member of a parsed JSON object, its value as it came.
type Member struct {
	Key string
	Raw json.RawMessage
}

// ErrNotObject reports JSON that is not an object.
var ErrNotObject = errors.New("not a JSON object")

// ParseObject splits a JSON object into its members, in order; a repeated key keeps
// its first place and its last value, as Python's json.loads does.
func ParseObject(raw []byte) ([]Member, error) {
	if Kind(raw) != '{' {
		return nil, ErrNotObject
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	if _, err := dec.Token(); err != nil {
		return nil, fmt.Errorf("read object: %w", err)
	}
	var out []Member
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
		out = append(out, Member{key, v})
	}
	if _, err := dec.Token(); err != nil {
		return nil, fmt.Errorf("read object end: %w", err)
	}
	return out, nil
}

// ParseArray splits a JSON array into its elements.
func ParseArray(raw []byte) ([]json.RawMessage, bool) {
	if Kind(raw) != '[' {
		return nil, false
	}
	var out []json.RawMessage
	if err := json.Unmarshal(raw, &out); err != nil {
		return nil, false
	}
	return out, true
}

// Lookup returns the value of key among members.
func Lookup(ms []Member, key string) (json.RawMessage, bool) {
	for _, m := range ms {
		if m.Key == key {
			return m.Raw, true
		}
	}
	return nil, false
}

// Kind classifies raw JSON by its first byte: '{', '[', '"', 't'/'f' for booleans,
// 'n' for null, '0' for numbers, 0 for nothing.
func Kind(raw []byte) byte {
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

// Truthy reports whether raw is true in Python's sense.
func Truthy(raw []byte) bool {
	raw = bytes.TrimSpace(raw)
	switch Kind(raw) {
	case 't':
		return true
	case '0':
		f, err := strconv.ParseFloat(string(raw), 64)
		return err != nil || f != 0
	case '"':
		return string(raw) != `""`
	case '[':
		a, _ := ParseArray(raw)
		return len(a) > 0
	case '{':
		ms, _ := ParseObject(raw)
		return len(ms) > 0
	}
	return false
}
