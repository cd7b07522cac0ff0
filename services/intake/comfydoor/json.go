package comfydoor

import (
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
func (o object) MarshalJSON() ([]byte, error) { return o.fields().MarshalJSON() }

// AppendPyJSON writes the members in order, as json.dumps writes a dict.
func (o object) AppendPyJSON(out []byte) ([]byte, error) { return o.fields().AppendPyJSON(out) }

// fields is o as pkg/pyjson's ordered object, which writes it.
func (o object) fields() pyjson.Object {
	f := make(pyjson.Object, len(o))
	for i, m := range o {
		f[i] = pyjson.Field(m)
	}
	return f
}

// members turns parsed members back into an object that writes them unchanged.
func members(ms []pyjson.Member) object {
	o := make(object, len(ms))
	for i, m := range ms {
		o[i] = field{m.Key, m.Raw}
	}
	return o
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
