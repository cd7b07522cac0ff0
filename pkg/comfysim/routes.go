package comfysim

import (
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
)

// maxUploadSize is the server's --max-upload-size (100 MB), which aiohttp
// applies to every request body.
const maxUploadSize = 100 << 20

// sensitiveExtraData are the extra_data keys the real server keeps out of
// the queue and the history.
var sensitiveExtraData = []string{"auth_token_comfy_org", "api_key_comfy_org"}

func writeJSON(w http.ResponseWriter, status int, v any) {
	body, err := pyjson.Marshal(v)
	if err != nil {
		writeServerError(w)
		return
	}
	w.Header().Set("Content-Type", "application/json; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(status)
	_, _ = w.Write(body)
}

// writeBare answers with a status and an empty body, as aiohttp's
// web.Response(status=...) does.
func writeBare(w http.ResponseWriter, status int) {
	w.Header().Set("Content-Type", "application/octet-stream")
	w.Header().Set("Content-Length", "0")
	w.WriteHeader(status)
}

func writeText(w http.ResponseWriter, status int, text string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Content-Length", strconv.Itoa(len(text)))
	w.WriteHeader(status)
	_, _ = io.WriteString(w, text)
}

// writeServerError is aiohttp's answer to an exception in a handler.
func writeServerError(w http.ResponseWriter) {
	w.Header().Set("Connection", "close")
	writeText(w, http.StatusInternalServerError, "500 Internal Server Error\n\nServer got itself in trouble")
}

// originAllowed is ComfyUI's origin_only_middleware: a request to a
// loopback host whose Origin names another host is refused.
func originAllowed(r *http.Request) bool {
	origin := r.Header.Get("Origin")
	if r.Host == "" || origin == "" {
		return true
	}
	o, err := url.Parse(origin)
	if err != nil {
		return true
	}
	host, err := url.Parse("//" + strings.ToLower(r.Host))
	if err != nil {
		return true
	}
	hostDomain, originDomain := strings.ToLower(r.Host), strings.ToLower(o.Host)
	if o.Port() == "" {
		hostDomain = host.Hostname()
	}
	if host.Port() == "" {
		originDomain = strings.ToLower(o.Hostname())
	}
	if !isLoopback(host.Hostname()) || hostDomain == "" || originDomain == "" {
		return true
	}
	return hostDomain == originDomain
}

func isLoopback(host string) bool {
	if ip := net.ParseIP(host); ip != nil {
		return ip.IsLoopback()
	}
	return host == "localhost" || strings.HasSuffix(host, ".localhost")
}

// query parses a query string as aiohttp does: unlike url.ParseQuery it
// keeps values that contain ";", such as preview=webp;50.
func query(r *http.Request) url.Values {
	out := url.Values{}
	for _, part := range strings.Split(r.URL.RawQuery, "&") {
		if part == "" {
			continue
		}
		k, v, _ := strings.Cut(part, "=")
		key, err := url.QueryUnescape(k)
		if err != nil {
			continue
		}
		val, err := url.QueryUnescape(v)
		if err != nil {
			continue
		}
		out[key] = append(out[key], val)
	}
	return out
}

type handler func(w http.ResponseWriter, r *http.Request, arg string)

// routes returns the handlers of a path, by method, and the path
// parameter. Every route also answers under /api.
func (in *instance) routes(p string) (map[string]handler, string) {
	if rest, ok := strings.CutPrefix(p, "/api/"); ok {
		p = "/" + rest
	}
	if id, ok := strings.CutPrefix(p, "/history/"); ok && id != "" && !strings.Contains(id, "/") {
		return map[string]handler{http.MethodGet: in.getHistoryItem}, id
	}
	if class, ok := strings.CutPrefix(p, "/object_info/"); ok && class != "" && !strings.Contains(class, "/") {
		return map[string]handler{http.MethodGet: in.getObjectInfoClass}, class
	}
	switch p {
	case "/ws":
		return map[string]handler{http.MethodGet: func(w http.ResponseWriter, r *http.Request, _ string) { in.serveWS(w, r) }}, ""
	case "/prompt":
		return map[string]handler{http.MethodGet: in.getPrompt, http.MethodPost: in.postPrompt}, ""
	case "/queue":
		return map[string]handler{http.MethodGet: in.getQueue, http.MethodPost: in.postQueue}, ""
	case "/history":
		return map[string]handler{http.MethodGet: in.getHistory, http.MethodPost: in.postHistory}, ""
	case "/interrupt":
		return map[string]handler{http.MethodPost: in.postInterrupt}, ""
	case "/free":
		return map[string]handler{http.MethodPost: in.postFree}, ""
	case "/system_stats":
		return map[string]handler{http.MethodGet: in.getSystemStats}, ""
	case "/features":
		return map[string]handler{http.MethodGet: in.getFeatures}, ""
	case "/object_info":
		return map[string]handler{http.MethodGet: in.getObjectInfo}, ""
	case "/view":
		return map[string]handler{http.MethodGet: in.getView}, ""
	case "/upload/image":
		return map[string]handler{http.MethodPost: in.postUploadImage}, ""
	}
	return nil, ""
}

func (in *instance) serveHTTP(w http.ResponseWriter, r *http.Request) {
	if !originAllowed(r) {
		in.log.Warn("comfysim: request with non matching host and origin, returning 403", "host", r.Host, "origin", r.Header.Get("Origin"))
		writeBare(w, http.StatusForbidden)
		return
	}
	if r.Method == http.MethodOptions {
		writeBare(w, http.StatusOK)
		return
	}
	handlers, arg := in.routes(r.URL.Path)
	if handlers == nil {
		writeText(w, http.StatusNotFound, "404: Not Found")
		return
	}
	method := r.Method
	if method == http.MethodHead {
		method = http.MethodGet
	}
	h, ok := handlers[method]
	if !ok {
		allowed := make([]string, 0, len(handlers))
		for m := range handlers {
			allowed = append(allowed, m)
		}
		w.Header().Set("Allow", strings.Join(allowed, ","))
		writeText(w, http.StatusMethodNotAllowed, "405: Method Not Allowed")
		return
	}
	h(w, r, arg)
}

// readBody reads a request body within the upload limit; it has already
// answered when it fails.
func readBody(w http.ResponseWriter, r *http.Request) ([]byte, bool) {
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxUploadSize))
	if err != nil {
		var tooBig *http.MaxBytesError
		if errors.As(err, &tooBig) {
			writeText(w, http.StatusRequestEntityTooLarge, "413: Request Entity Too Large")
		} else {
			writeServerError(w)
		}
		return nil, false
	}
	return body, true
}

// readJSONObject reads a JSON body that must be an object; anything else
// is a 500, as the real handlers fail on it.
func readJSONObject(w http.ResponseWriter, r *http.Request) ([]pyjson.Member, bool) {
	body, ok := readBody(w, r)
	if !ok {
		return nil, false
	}
	ms, err := pyjson.ParseObject(body)
	if err != nil || !json.Valid(body) {
		writeServerError(w)
		return nil, false
	}
	return ms, true
}

func (in *instance) postPrompt(w http.ResponseWriter, r *http.Request, _ string) {
	body, ok := readBody(w, r)
	if !ok {
		return
	}
	noPrompt := obj{{"error", promptError("no_prompt", "No prompt provided", "No prompt provided")}, {"node_errors", obj{}}}
	if !json.Valid(body) {
		writeServerError(w)
		return
	}
	switch pyjson.Kind(body) {
	case '{':
	case '[', '"':
		in.q.bumpNumber()
		writeJSON(w, http.StatusBadRequest, noPrompt)
		return
	default:
		writeServerError(w)
		return
	}
	req, err := pyjson.ParseObject(body)
	if err != nil {
		writeServerError(w)
		return
	}

	var number qnum
	if raw, ok := pyjson.Lookup(req, "number"); ok {
		v, convErr := convertWidget("FLOAT", raw)
		if convErr != "" {
			writeServerError(w)
			return
		}
		number = qnum{v: v.f, isFloat: true}
	} else {
		front, _ := pyjson.Lookup(req, "front")
		number = in.q.nextNumber(pyjson.Truthy(front))
	}

	promptRaw, ok := pyjson.Lookup(req, "prompt")
	if !ok {
		writeJSON(w, http.StatusBadRequest, noPrompt)
		return
	}
	g, err := parseGraph(promptRaw, in.s.classes())
	if err != nil {
		in.log.Debug("comfysim: malformed prompt", "err", err)
		writeServerError(w)
		return
	}
	id := ""
	if raw, ok := pyjson.Lookup(req, "prompt_id"); ok {
		id = pyStr(raw)
	} else {
		id = in.s.newPromptID()
	}
	var targets []string
	if raw, ok := pyjson.Lookup(req, "partial_execution_targets"); ok {
		_ = json.Unmarshal(raw, &targets)
	}
	v := validatePrompt(g, targets, in.s.files.exists)

	extra := obj{}
	if raw, ok := pyjson.Lookup(req, "extra_data"); ok {
		ms, err := pyjson.ParseObject(raw)
		if err != nil {
			writeServerError(w)
			return
		}
		extra = membersObj(ms)
	}
	j := &job{number: number, id: id, g: g, outputs: v.outputs}
	if raw, ok := pyjson.Lookup(req, "client_id"); ok {
		extra = extra.set("client_id", raw)
		j.hasClient = pyjson.Kind(raw) != 'n'
		j.clientID, _ = jsonString(raw)
	}
	if !v.ok {
		in.log.Debug("comfysim: invalid prompt", "type", v.err[0].V)
		writeJSON(w, http.StatusBadRequest, obj{{"error", v.err}, {"node_errors", v.nodeErrors}})
		return
	}
	if in.q.known(id) {
		writeJSON(w, http.StatusConflict, obj{
			{"error", promptError("duplicate_prompt_id", "Prompt ID already exists", "Prompt "+id+" is already queued or in the history")},
			{"node_errors", obj{}},
		})
		return
	}
	for _, k := range sensitiveExtraData {
		extra = extra.without(k)
	}
	j.extra = extra
	in.s.countStats(func(st *Stats) { st.Prompts++ })
	in.q.put(j)
	writeJSON(w, http.StatusOK, obj{{"prompt_id", id}, {"number", number}, {"node_errors", v.nodeErrors}})
}

func (in *instance) getPrompt(w http.ResponseWriter, _ *http.Request, _ string) {
	writeJSON(w, http.StatusOK, obj{{"exec_info", obj{{"queue_remaining", in.q.remaining.Load()}}}})
}

func (in *instance) getQueue(w http.ResponseWriter, _ *http.Request, _ string) {
	run, pending := in.q.snapshot()
	writeJSON(w, http.StatusOK, obj{{"queue_running", run}, {"queue_pending", pending}})
}

// stringList reads a JSON list of ids; other values are skipped.
func stringList(raw json.RawMessage) []string {
	items, _ := pyjson.ParseArray(raw)
	var out []string
	for _, it := range items {
		if s, ok := jsonString(it); ok {
			out = append(out, s)
		}
	}
	return out
}

func (in *instance) postQueue(w http.ResponseWriter, r *http.Request, _ string) {
	req, ok := readJSONObject(w, r)
	if !ok {
		return
	}
	if raw, ok := pyjson.Lookup(req, "clear"); ok && pyjson.Truthy(raw) {
		in.q.clearPending()
	}
	if raw, ok := pyjson.Lookup(req, "delete"); ok {
		for _, id := range stringList(raw) {
			in.q.deletePending(id)
		}
	}
	writeBare(w, http.StatusOK)
}

// pyInt parses a query parameter as Python's int() does.
func pyInt(s string) (int, bool) {
	v, err := convertWidget("INT", json.RawMessage(strconv.Quote(s)))
	if err != "" || !v.i.IsInt64() {
		return 0, false
	}
	return int(v.i.Int64()), true
}

func (in *instance) getHistory(w http.ResponseWriter, r *http.Request, _ string) {
	q := query(r)
	var maxItems *int
	if s, ok := q["max_items"]; ok {
		n, ok := pyInt(s[0])
		if !ok {
			writeServerError(w)
			return
		}
		maxItems = &n
	}
	offset := -1
	if s, ok := q["offset"]; ok {
		n, ok := pyInt(s[0])
		if !ok {
			writeServerError(w)
			return
		}
		offset = n
	}
	writeJSON(w, http.StatusOK, in.q.historyPage(maxItems, offset))
}

func (in *instance) getHistoryItem(w http.ResponseWriter, _ *http.Request, id string) {
	writeJSON(w, http.StatusOK, in.q.historyOf(id))
}

func (in *instance) postHistory(w http.ResponseWriter, r *http.Request, _ string) {
	req, ok := readJSONObject(w, r)
	if !ok {
		return
	}
	if raw, ok := pyjson.Lookup(req, "clear"); ok && pyjson.Truthy(raw) {
		in.q.clearHistory()
	}
	if raw, ok := pyjson.Lookup(req, "delete"); ok {
		for _, id := range stringList(raw) {
			in.q.deleteHistory(id)
		}
	}
	writeBare(w, http.StatusOK)
}

// postInterrupt interrupts the running prompt; with {"prompt_id": X} only
// if X is the one running. An unreadable body counts as no body.
func (in *instance) postInterrupt(w http.ResponseWriter, r *http.Request, _ string) {
	body, ok := readBody(w, r)
	if !ok {
		return
	}
	target := ""
	if ms, err := pyjson.ParseObject(body); err == nil {
		if raw, ok := pyjson.Lookup(ms, "prompt_id"); ok && pyjson.Truthy(raw) {
			target = pyStr(raw)
		}
	}
	if !in.q.interrupt(target) && target != "" {
		in.log.Debug("comfysim: prompt is not currently running, skipping interrupt", "prompt_id", target)
	}
	writeBare(w, http.StatusOK)
}

func (in *instance) postFree(w http.ResponseWriter, r *http.Request, _ string) {
	req, ok := readJSONObject(w, r)
	if !ok {
		return
	}
	unload, _ := pyjson.Lookup(req, "unload_models")
	free, _ := pyjson.Lookup(req, "free_memory")
	if pyjson.Truthy(unload) || pyjson.Truthy(free) {
		in.gpu.unloadAll()
	}
	writeBare(w, http.StatusOK)
}

func (in *instance) getSystemStats(w http.ResponseWriter, _ *http.Request, _ string) {
	writeJSON(w, http.StatusOK, in.systemStats())
}

func (in *instance) getFeatures(w http.ResponseWriter, _ *http.Request, _ string) {
	writeJSON(w, http.StatusOK, serverFeatures())
}

func (in *instance) getObjectInfo(w http.ResponseWriter, _ *http.Request, _ string) {
	writeJSON(w, http.StatusOK, in.s.objectInfo(""))
}

func (in *instance) getObjectInfoClass(w http.ResponseWriter, _ *http.Request, class string) {
	writeJSON(w, http.StatusOK, in.s.objectInfo(class))
}
