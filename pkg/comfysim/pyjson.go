package comfysim

import (
	"bytes"
	"encoding/json"
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
func (o obj) MarshalJSON() ([]byte, error) { return o.fields().MarshalJSON() }

// AppendPyJSON appends the members in order, as json.dumps writes a dict.
func (o obj) AppendPyJSON(out []byte) ([]byte, error) { return o.fields().AppendPyJSON(out) }

// fields is o as pkg/pyjson's ordered object, which writes it.
func (o obj) fields() pyjson.Object {
	f := make(pyjson.Object, len(o))
	for i, m := range o {
		f[i] = pyjson.Field(m)
	}
	return f
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

// membersObj turns parsed members into an obj that marshals them unchanged.
func membersObj(ms []pyjson.Member) obj {
	o := make(obj, 0, len(ms))
	for _, m := range ms {
		o = append(o, kv{m.Key, m.Raw})
	}
	return o
}

// jsonString decodes raw as a string.
func jsonString(raw []byte) (string, bool) {
	if pyjson.Kind(raw) != '"' {
		return "", false
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", false
	}
	return s, true
}

// pyStr renders raw JSON as Python's str() of the decoded value would.
func pyStr(raw []byte) string {
	raw = bytes.TrimSpace(raw)
	switch pyjson.Kind(raw) {
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
	switch pyjson.Kind(raw) {
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
