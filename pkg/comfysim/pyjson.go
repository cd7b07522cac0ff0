package comfysim

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"unicode"
	"unicode/utf8"
)

// The real server is Python: its JSON keeps dict insertion order, separates
// with ", " and ": ", escapes every non-ASCII character and prints floats
// with a fractional part. This file reproduces that, so that bodies and
// frames are byte-for-byte what aiohttp and json.dumps produce.

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
type pyFloat float64

// MarshalJSON formats the value like Python's float repr.
func (f pyFloat) MarshalJSON() ([]byte, error) {
	return []byte(formatPyFloat(float64(f))), nil
}

// formatPyFloat formats f as Python's repr(float) (and json.dumps) would.
func formatPyFloat(f float64) string {
	switch {
	case math.IsNaN(f):
		return "NaN"
	case math.IsInf(f, 1):
		return "Infinity"
	case math.IsInf(f, -1):
		return "-Infinity"
	}
	e := strconv.FormatFloat(f, 'e', -1, 64)
	exp, err := strconv.Atoi(e[strings.IndexByte(e, 'e')+1:])
	if err == nil && (exp < -4 || exp >= 16) {
		return e
	}
	s := strconv.FormatFloat(f, 'f', -1, 64)
	if !strings.ContainsRune(s, '.') {
		s += ".0"
	}
	return s
}

// pyJSON marshals v as json.dumps would.
func pyJSON(v any) ([]byte, error) {
	return appendPyJSON(nil, v)
}

// appendPyJSON appends v as json.dumps writes it: directly for the types the
// simulator builds its messages from, which is several times cheaper, and
// through encoding/json and pyFormat for the others. Both ways give the same
// bytes.
func appendPyJSON(out []byte, v any) ([]byte, error) {
	var err error
	switch v := v.(type) {
	case nil:
		return append(out, "null"...), nil
	case bool:
		return strconv.AppendBool(out, v), nil
	case string:
		return appendPyString(out, v), nil
	case int:
		return strconv.AppendInt(out, int64(v), 10), nil
	case int64:
		return strconv.AppendInt(out, v, 10), nil
	case pyFloat:
		return append(out, formatPyFloat(float64(v))...), nil
	case obj:
		out = append(out, '{')
		for i, m := range v {
			if i > 0 {
				out = append(out, ", "...)
			}
			out = append(appendPyString(out, m.K), ": "...)
			if out, err = appendPyJSON(out, m.V); err != nil {
				return nil, err
			}
		}
		return append(out, '}'), nil
	case []any:
		if v == nil {
			return append(out, "null"...), nil
		}
		out = append(out, '[')
		for i, e := range v {
			if i > 0 {
				out = append(out, ", "...)
			}
			if out, err = appendPyJSON(out, e); err != nil {
				return nil, err
			}
		}
		return append(out, ']'), nil
	case []string:
		if v == nil {
			return append(out, "null"...), nil
		}
		out = append(out, '[')
		for i, e := range v {
			if i > 0 {
				out = append(out, ", "...)
			}
			out = appendPyString(out, e)
		}
		return append(out, ']'), nil
	}
	raw, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode json: %w", err)
	}
	formatted, err := pyFormat(raw)
	if err != nil {
		return nil, err
	}
	return append(out, formatted...), nil
}

// pyFormat rewrites compact JSON in json.dumps style: ", " and ": "
// separators, ASCII-only strings, and floats with a fractional part.
func pyFormat(src []byte) ([]byte, error) {
	out := make([]byte, 0, len(src)+len(src)/6)
	for i := 0; i < len(src); {
		c := src[i]
		switch {
		case c == '"':
			end, plain, err := scanString(src, i)
			if err != nil {
				return nil, err
			}
			if plain {
				out = append(out, src[i:end]...)
			} else {
				var s string
				if err := json.Unmarshal(src[i:end], &s); err != nil {
					return nil, fmt.Errorf("reformat json string: %w", err)
				}
				out = appendPyString(out, s)
			}
			i = end
		case c == ',' || c == ':':
			out = append(out, c, ' ')
			i++
		case c == '-' || (c >= '0' && c <= '9'):
			j := i + 1
			for j < len(src) && strings.IndexByte("0123456789.eE+-", src[j]) >= 0 {
				j++
			}
			num := src[i:j]
			if bytes.ContainsAny(num, ".eE") {
				f, err := strconv.ParseFloat(string(num), 64)
				if err != nil && !errors.Is(err, strconv.ErrRange) {
					return nil, fmt.Errorf("reformat json number %q: %w", num, err)
				}
				out = append(out, formatPyFloat(f)...)
			} else {
				out = append(out, num...)
			}
			i = j
		case c == ' ' || c == '\n' || c == '\t' || c == '\r':
			i++
		default:
			out = append(out, c)
			i++
		}
	}
	return out, nil
}

// scanString finds the end (exclusive) of the JSON string starting at
// src[start], and reports whether it holds only printable ASCII and no
// escapes, in which case it can be copied as it is.
func scanString(src []byte, start int) (end int, plain bool, err error) {
	plain = true
	for i := start + 1; i < len(src); i++ {
		switch c := src[i]; {
		case c == '\\':
			plain = false
			i++
		case c == '"':
			return i + 1, plain, nil
		case c < 0x20 || c >= 0x7f:
			plain = false
		}
	}
	return 0, false, errors.New("reformat json: unterminated string")
}

// appendPyString appends s quoted as json.dumps(ensure_ascii=True) does.
func appendPyString(out []byte, s string) []byte {
	const hex = "0123456789abcdef"
	u4 := func(out []byte, r rune) []byte {
		return append(out, '\\', 'u', hex[r>>12&0xf], hex[r>>8&0xf], hex[r>>4&0xf], hex[r&0xf])
	}
	out = append(out, '"')
	for _, r := range s {
		switch {
		case r == '"':
			out = append(out, '\\', '"')
		case r == '\\':
			out = append(out, '\\', '\\')
		case r == '\n':
			out = append(out, '\\', 'n')
		case r == '\r':
			out = append(out, '\\', 'r')
		case r == '\t':
			out = append(out, '\\', 't')
		case r == '\b':
			out = append(out, '\\', 'b')
		case r == '\f':
			out = append(out, '\\', 'f')
		case r >= 0x20 && r < 0x7f:
			out = append(out, byte(r))
		case r > 0xffff:
			r -= 0x10000
			out = u4(out, 0xd800|(r>>10)&0x3ff)
			out = u4(out, 0xdc00|r&0x3ff)
		default:
			out = u4(out, r)
		}
	}
	return append(out, '"')
}

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
			return formatPyFloat(f)
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
