// Package pyjson writes JSON as a Python server does (ComfyUI's aiohttp and
// json.dumps): separators ", " and ": ", every non-ASCII character escaped, floats
// with a fractional part. With it, bodies and websocket frames are byte for byte what
// ComfyUI sends.
package pyjson

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
)

// Float is a float64 that marshals as Python's repr does (1.0, not 1).
type Float float64

// MarshalJSON formats the value like Python's float repr.
func (f Float) MarshalJSON() ([]byte, error) {
	return []byte(FormatFloat(float64(f))), nil
}

// FormatFloat formats f as Python's repr(float) (and json.dumps) would.
func FormatFloat(f float64) string {
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

// Marshal encodes v as json.dumps would.
func Marshal(v any) ([]byte, error) {
	return Append(nil, v)
}

// Appender is a value that appends itself to out in json.dumps style, as an
// ordered object does.
type Appender interface {
	AppendPyJSON(out []byte) ([]byte, error)
}

// Append appends v to out as json.dumps writes it: directly for nil, booleans,
// strings, ints, Float, []any, []string, Appenders and json.RawMessage (as it came,
// "<" and all), which is several times
// cheaper, and for anything else through encoding/json (struct fields keep their
// order) reformatted by Format. Both ways give the same bytes.
func Append(out []byte, v any) ([]byte, error) {
	var err error
	switch v := v.(type) {
	case nil:
		return append(out, "null"...), nil
	case bool:
		return strconv.AppendBool(out, v), nil
	case string:
		return AppendString(out, v), nil
	case int:
		return strconv.AppendInt(out, int64(v), 10), nil
	case int64:
		return strconv.AppendInt(out, v, 10), nil
	case Float:
		return append(out, FormatFloat(float64(v))...), nil
	case Appender:
		return v.AppendPyJSON(out)
	case json.RawMessage:
		var compact bytes.Buffer
		if err := json.Compact(&compact, v); err != nil {
			return nil, fmt.Errorf("encode json: %w", err)
		}
		formatted, err := Format(compact.Bytes())
		if err != nil {
			return nil, err
		}
		return append(out, formatted...), nil
	case []any:
		if v == nil {
			return append(out, "null"...), nil
		}
		out = append(out, '[')
		for i, e := range v {
			if i > 0 {
				out = append(out, ", "...)
			}
			if out, err = Append(out, e); err != nil {
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
			out = AppendString(out, e)
		}
		return append(out, ']'), nil
	}
	raw, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode json: %w", err)
	}
	formatted, err := Format(raw)
	if err != nil {
		return nil, err
	}
	return append(out, formatted...), nil
}

// Format rewrites compact JSON in json.dumps style: ", " and ": "
// separators, ASCII-only strings, and floats with a fractional part.
func Format(src []byte) ([]byte, error) {
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
				out = AppendString(out, s)
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
				out = append(out, FormatFloat(f)...)
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

// AppendString appends s quoted as json.dumps(ensure_ascii=True) does.
func AppendString(out []byte, s string) []byte {
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
