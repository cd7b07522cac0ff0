// Package jsontree writes the trees encoding/json decodes JSON into (maps with
// string keys, slices, strings, float64s, booleans, nil) as json.Marshal writes
// them, byte for byte, several times faster: a ComfyUI graph is such a tree, and
// encoding one was the largest part of accepting a scene. json.Marshal's map
// encoder reflects on every value and allocates for every key; Append switches on
// the types a decoded tree holds and sorts each map's keys in one slice.
//
// A faster general encoder was tried first: github.com/goccy/go-json writes the
// same bytes but can crash the process with a fault (SIGSEGV, goccy/go-json#546,
// open), which no recover stops; github.com/segmentio/encoding writes a
// time.Duration as text; encoding/json/v2 needs GOEXPERIMENT=jsonv2 in every build.
package jsontree

import (
	"encoding/json"
	"fmt"
	"math"
	"slices"
	"strconv"
	"unicode/utf8"
)

// Append appends v to dst as json.Marshal writes it. Maps with string keys,
// []any, strings, float64s, ints, booleans and nil are written here; anything
// else, and a string that needs escaping, through json.Marshal.
func Append(dst []byte, v any) ([]byte, error) {
	var err error
	switch v := v.(type) {
	case nil:
		return append(dst, "null"...), nil
	case bool:
		return strconv.AppendBool(dst, v), nil
	case string:
		return AppendString(dst, v), nil
	case float64:
		return appendFloat(dst, v)
	case int:
		return strconv.AppendInt(dst, int64(v), 10), nil
	case int64:
		return strconv.AppendInt(dst, v, 10), nil
	case map[string]any:
		if v == nil {
			return append(dst, "null"...), nil
		}
		keys := make([]string, 0, len(v))
		for k := range v {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		dst = append(dst, '{')
		for i, k := range keys {
			if i > 0 {
				dst = append(dst, ',')
			}
			dst = AppendString(dst, k)
			dst = append(dst, ':')
			if dst, err = Append(dst, v[k]); err != nil {
				return nil, err
			}
		}
		return append(dst, '}'), nil
	case []any:
		if v == nil {
			return append(dst, "null"...), nil
		}
		dst = append(dst, '[')
		for i, e := range v {
			if i > 0 {
				dst = append(dst, ',')
			}
			if dst, err = Append(dst, e); err != nil {
				return nil, err
			}
		}
		return append(dst, ']'), nil
	}
	return appendMarshaled(dst, v)
}

// AppendString appends s as a JSON string, as json.Marshal writes it.
func AppendString(dst []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= utf8.RuneSelf || c == '"' || c == '\\' || c == '<' || c == '>' || c == '&' {
			out, _ := appendMarshaled(dst, s) // a string always encodes
			return out
		}
	}
	dst = append(dst, '"')
	dst = append(dst, s...)
	return append(dst, '"')
}

// appendFloat writes f as encoding/json's float encoder does: the shortest
// representation, in exponent form below 1e-6 and from 1e21.
func appendFloat(dst []byte, f float64) ([]byte, error) {
	if math.IsInf(f, 0) || math.IsNaN(f) {
		return appendMarshaled(dst, f)
	}
	abs := math.Abs(f)
	format := byte('f')
	if abs != 0 && (abs < 1e-6 || abs >= 1e21) {
		format = 'e'
	}
	start := len(dst)
	dst = strconv.AppendFloat(dst, f, format, -1, 64)
	if format == 'e' {
		// e-09 becomes e-9, as encoding/json writes it.
		if n := len(dst) - start; n >= 4 && dst[len(dst)-4] == 'e' && dst[len(dst)-3] == '-' && dst[len(dst)-2] == '0' {
			dst[len(dst)-2] = dst[len(dst)-1]
			dst = dst[:len(dst)-1]
		}
	}
	return dst, nil
}

func appendMarshaled(dst []byte, v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("encode json: %w", err)
	}
	return append(dst, b...), nil
}
