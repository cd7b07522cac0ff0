package comfysim

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"

	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
)

// The real server is Python: its JSON keeps dict insertion order, which obj
// keeps here; pkg/pyjson writes it with Python's separators, escapes and
// floats, so that bodies and frames are byte-for-byte what aiohttp and
// json.dumps produce.

// kv is one member of an ordered JSON object.
type kv struct {
	K string
	V any
}

// obj is a JSON object that keeps its members in insertion order.
type obj []kv

// MarshalJSON writes the members in order; a nil obj is "{}".
func (o obj) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, m := range o {
		if i > 0 {
			b.WriteByte(',')
		}
		k, err := json.Marshal(m.K)
		if err != nil {
			return nil, fmt.Errorf("marshal key %q: %w", m.K, err)
		}
		b.Write(k)
		b.WriteByte(':')
		v, err := json.Marshal(m.V)
		if err != nil {
			return nil, fmt.Errorf("marshal value of %q: %w", m.K, err)
		}
		b.Write(v)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// get returns the value stored under key.
func (o obj) get(key string) (any, bool) {
	for _, m := range o {
		if m.K == key {
			return m.V, true
		}
	}
	return nil, false
}

// set replaces the value under key in place, or appends it, as a Python
// dict assignment does.
func (o obj) set(key string, v any) obj {
	for i := range o {
		if o[i].K == key {
			o[i].V = v
			return o
		}
	}
	return append(o, kv{key, v})
}

// without returns a copy of o lacking key.
func (o obj) without(key string) obj {
	out := make(obj, 0, len(o))
	for _, m := range o {
		if m.K != key {
			out = append(out, m)
		}
	}
	return out
}

// pyFloat is a float64 that marshals as Python's repr does (1.0, not 1).
type pyFloat = pyjson.Float

// pyRepr quotes s as Python's repr(str) does.
func pyRepr(s string) string {
	quote := '\''
	if strings.ContainsRune(s, '\'') && !strings.ContainsRune(s, '"') {
		quote = '"'
	}
	var b strings.Builder
	b.WriteRune(quote)
	for _, r := range s {
		switch {
		case r == quote || r == '\\':
			b.WriteRune('\\')
			b.WriteRune(r)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\r':
			b.WriteString(`\r`)
		case r == '\t':
			b.WriteString(`\t`)
		case r == utf8.RuneError || !unicode.IsPrint(r) && r != ' ':
			switch {
			case r < 0x100:
				fmt.Fprintf(&b, `\x%02x`, r)
			case r < 0x10000:
				fmt.Fprintf(&b, `\u%04x`, r)
			default:
				fmt.Fprintf(&b, `\U%08x`, r)
			}
		default:
			b.WriteRune(r)
		}
	}
	b.WriteRune(quote)
	return b.String()
}

// member is one key of a JSON object in the order the client sent it.
type member struct {
	Key string
	Raw json.RawMessage
}

// errNotObject reports JSON that is valid but not an object.
var errNotObject = errors.New("not a JSON object")

// parseObject splits a JSON object into its members, keeping their order.
// A repeated key keeps its first position and its last value, as
// Python's json.loads does.
func parseObject(raw []byte) ([]member, error) {
	if jsonKind(raw) != '{' {
		return nil, errNotObject
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	if _, err := dec.Token(); err != nil {
		return nil, fmt.Errorf("read object: %w", err)
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
		if i, dup := index[key]; dup {
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

// parseArray splits a JSON array into its elements.
func parseArray(raw []byte) ([]json.RawMessage, bool) {
	if jsonKind(raw) != '[' {
		return nil, false
	}
	var out []json.RawMessage
	if err := json.Unmarshal(raw, &out); err != nil {
		return nil, false
	}
	return out, true
}

// lookup returns the raw value of key among members.
func lookup(ms []member, key string) (json.RawMessage, bool) {
	for _, m := range ms {
		if m.Key == key {
			return m.Raw, true
		}
	}
	return nil, false
}

// membersObj turns members into an obj that marshals them unchanged.
func membersObj(ms []member) obj {
	o := make(obj, 0, len(ms))
	for _, m := range ms {
		o = append(o, kv{m.Key, m.Raw})
	}
	return o
}

// jsonKind classifies raw JSON by its first byte: '{', '[', '"', 't'/'f'
// for booleans, 'n' for null, '0' for numbers, 0 for nothing.
func jsonKind(raw []byte) byte {
	raw = bytes.TrimLeft(raw, " \t\r\n")
	if len(raw) == 0 {
		return 0
	}
	switch c := raw[0]; c {
	case '{', '[', '"', 't', 'f', 'n':
		return c
	default:
		return '0'
	}
}

// jsonString decodes raw as a string.
func jsonString(raw []byte) (string, bool) {
	if jsonKind(raw) != '"' {
		return "", false
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", false
	}
	return s, true
}

// pyTruthy reports whether raw is true in Python's sense.
func pyTruthy(raw []byte) bool {
	raw = bytes.TrimSpace(raw)
	switch jsonKind(raw) {
	case 't':
		return true
	case '0':
		f, err := strconv.ParseFloat(string(raw), 64)
		return err != nil || f != 0
	case '"':
		return string(raw) != `""`
	case '[':
		a, _ := parseArray(raw)
		return len(a) > 0
	case '{':
		ms, _ := parseObject(raw)
		return len(ms) > 0
	}
	return false
}

// pyStr renders raw JSON as Python's str() of the decoded value would.
func pyStr(raw []byte) string {
	raw = bytes.TrimSpace(raw)
	switch jsonKind(raw) {
	case '"':
		s, _ := jsonString(raw)
		return s
	case 't':
		return "True"
	case 'f':
		return "False"
	case 'n':
		return "None"
	case '0':
		if bytes.ContainsAny(raw, ".eE") {
			f, _ := strconv.ParseFloat(string(raw), 64)
			return pyjson.FormatFloat(f)
		}
		return string(raw)
	}
	var b bytes.Buffer
	if err := json.Compact(&b, raw); err != nil {
		return string(raw)
	}
	return b.String()
}

// pyTypeName names the Python type json.loads gives raw.
func pyTypeName(raw []byte) string {
	switch jsonKind(raw) {
	case '{':
		return "dict"
	case '[':
		return "list"
	case '"':
		return "str"
	case 't', 'f':
		return "bool"
	case 'n':
		return "NoneType"
	}
	if bytes.ContainsAny(raw, ".eE") {
		return "float"
	}
	return "int"
}
