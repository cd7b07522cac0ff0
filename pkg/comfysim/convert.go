package comfysim

import (
	"bytes"
	"encoding/json"
	"math"
	"math/big"
	"regexp"
	"strconv"
	"strings"

	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
)

// widgetValue is a literal input after Python's int()/float() conversion.
type widgetValue struct {
	numeric bool
	isInt   bool
	i       *big.Int
	f       float64
}

func (w widgetValue) json() any {
	if w.isInt {
		return json.Number(w.i.String())
	}
	return pyFloat(w.f)
}

func (w widgetValue) str() string {
	if w.isInt {
		return w.i.String()
	}
	return pyjson.FormatFloat(w.f)
}

func (w widgetValue) big() *big.Float {
	const prec = 256
	if w.isInt {
		return new(big.Float).SetPrec(prec).SetInt(w.i)
	}
	if math.IsInf(w.f, 0) || math.IsNaN(w.f) {
		return nil
	}
	return new(big.Float).SetPrec(prec).SetFloat64(w.f)
}

// cmp compares w with an option literal; NaN compares as neither smaller
// nor bigger, as in Python.
func (w widgetValue) cmp(limit json.RawMessage) int {
	lim, err := numberValue(limit)
	if err != nil {
		return 0
	}
	if !w.isInt && (math.IsNaN(w.f) || math.IsInf(w.f, 0)) {
		switch {
		case math.IsNaN(w.f):
			return 0
		case math.IsInf(w.f, 1):
			return 1
		default:
			return -1
		}
	}
	lb := lim.big()
	if lb == nil {
		return 0
	}
	return w.big().Cmp(lb)
}

// numberValue reads a JSON number as Python's json.loads would: ints
// exactly, anything with a fraction or exponent as a float.
func numberValue(raw json.RawMessage) (widgetValue, error) {
	s := string(bytes.TrimSpace(raw))
	if !strings.ContainsAny(s, ".eE") {
		i, ok := new(big.Int).SetString(s, 10)
		if ok {
			return widgetValue{numeric: true, isInt: true, i: i}, nil
		}
	}
	f, err := strconv.ParseFloat(s, 64)
	if err != nil && !isRangeErr(err) {
		return widgetValue{}, err
	}
	return widgetValue{numeric: true, f: f}, nil
}

func isRangeErr(err error) bool {
	ne, ok := err.(*strconv.NumError)
	return ok && ne.Err == strconv.ErrRange
}

var pyIntLiteral = regexp.MustCompile(`^[+-]?[0-9]+(_[0-9]+)*$`)
var pyFloatLiteral = regexp.MustCompile(`^[+-]?(([0-9]+(_[0-9]+)*)?\.?[0-9]+(_[0-9]+)*|[0-9]+(_[0-9]+)*\.)([eE][+-]?[0-9]+(_[0-9]+)*)?$`)
var pyFloatSpecial = regexp.MustCompile(`(?i)^[+-]?(inf|infinity|nan)$`)

// convertWidget applies int(), float(), str() or bool() as validate_inputs
// does for the declared type, returning Python's exception message when
// the conversion fails.
func convertWidget(typ string, raw json.RawMessage) (widgetValue, string) {
	kind := pyjson.Kind(raw)
	switch typ {
	case "INT":
		switch kind {
		case 't':
			return widgetValue{numeric: true, isInt: true, i: big.NewInt(1)}, ""
		case 'f':
			return widgetValue{numeric: true, isInt: true, i: big.NewInt(0)}, ""
		case '0':
			n, err := numberValue(raw)
			if err != nil {
				return widgetValue{}, err.Error()
			}
			if n.isInt {
				return n, ""
			}
			if math.IsInf(n.f, 0) {
				return widgetValue{}, "cannot convert float infinity to integer"
			}
			i, _ := new(big.Float).SetFloat64(n.f).Int(nil)
			return widgetValue{numeric: true, isInt: true, i: i}, ""
		case '"':
			s, _ := jsonString(raw)
			t := strings.TrimSpace(s)
			if pyIntLiteral.MatchString(t) {
				i, ok := new(big.Int).SetString(strings.ReplaceAll(t, "_", ""), 10)
				if ok {
					return widgetValue{numeric: true, isInt: true, i: i}, ""
				}
			}
			return widgetValue{}, "invalid literal for int() with base 10: " + pyRepr(s)
		default:
			return widgetValue{}, "int() argument must be a string, a bytes-like object or a real number, not '" + pyTypeName(raw) + "'"
		}
	case "FLOAT":
		switch kind {
		case 't':
			return widgetValue{numeric: true, f: 1}, ""
		case 'f':
			return widgetValue{numeric: true, f: 0}, ""
		case '0':
			n, err := numberValue(raw)
			if err != nil {
				return widgetValue{}, err.Error()
			}
			if n.isInt {
				f, _ := new(big.Float).SetInt(n.i).Float64()
				return widgetValue{numeric: true, f: f}, ""
			}
			return n, ""
		case '"':
			s, _ := jsonString(raw)
			t := strings.TrimSpace(s)
			if pyFloatSpecial.MatchString(t) || pyFloatLiteral.MatchString(t) {
				f, err := strconv.ParseFloat(strings.ReplaceAll(t, "_", ""), 64)
				if err == nil || isRangeErr(err) {
					return widgetValue{numeric: true, f: f}, ""
				}
			}
			return widgetValue{}, "could not convert string to float: " + pyRepr(s)
		default:
			return widgetValue{}, "float() argument must be a string or a real number, not '" + pyTypeName(raw) + "'"
		}
	}
	return widgetValue{}, ""
}
