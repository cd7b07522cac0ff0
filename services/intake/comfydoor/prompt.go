package comfydoor

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"path"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/google/uuid"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
	"github.com/comfyfleet/comfyfleet/pkg/workflow"
)

// maxPromptBytes bounds a POST /prompt body, as the intake bounds a job.
const maxPromptBytes = 64 << 20

// Priorities of prompts: ComfyUI runs a prompt sent with "front" before the ones
// waiting; the fleet, which runs by priority, gives it the highest.
const (
	defaultPriority = 5
	frontPriority   = 10
)

// sensitiveExtraData are the extra_data keys ComfyUI keeps out of its queue and
// history.
var sensitiveExtraData = []string{"auth_token_comfy_org", "api_key_comfy_org"}

// imageLoaders are the classes whose input names a file of the input folder, which
// an upload may provide, by the name of that input.
var imageLoaders = map[string]string{"LoadImage": "image", "LoadImageMask": "image"}

// promptRequest is a POST /prompt body, read as ComfyUI reads it.
type promptRequest struct {
	prompt   json.RawMessage
	clientID string
	promptID string
	front    bool
	number   *float64
	extra    []pyjson.Member
}

// postPrompt runs a prompt on the fleet: POST /prompt.
func (d *Door) postPrompt(w http.ResponseWriter, r *http.Request, c Caller) {
	body, err := readBody(w, r, maxPromptBytes)
	if err != nil {
		return
	}
	req, status, refusal := readPromptRequest(body)
	if status != 0 {
		if refusal == nil {
			writeServerError(w)
		} else {
			writeJSON(w, status, refusal)
		}
		return
	}
	ctx := r.Context()
	fi, err := d.catalog.get(ctx)
	if err != nil {
		d.unavailable(w, "read what the nodes can run", err)
		return
	}
	files := &uploads{d: d, tenant: c.Tenant, fleet: fi.inputFiles}
	nodeErrors := json.RawMessage("{}")
	var outputs []string
	if fi.validator != nil {
		verdict, err := fi.validator.Validate(req.prompt, func(name string) bool { return files.exists(ctx, name) })
		if errors.Is(err, comfysim.ErrMalformedPrompt) {
			writeServerError(w)
			return
		}
		if err != nil {
			d.unavailable(w, "validate the prompt", err)
			return
		}
		if files.err != nil {
			d.unavailable(w, "read the uploaded images", files.err)
			return
		}
		if !verdict.OK {
			writeJSON(w, http.StatusBadRequest, object{{"error", json.RawMessage(verdict.Error)}, {"node_errors", json.RawMessage(verdict.NodeErrors)}})
			return
		}
		nodeErrors, outputs = verdict.NodeErrors, verdict.Outputs
	}
	g, err := decodeGraph(req.prompt)
	if err != nil {
		writeServerError(w)
		return
	}
	if outputs == nil {
		outputs = stockOutputs(g)
	}
	inputs := files.bind(ctx, g)
	if files.err != nil {
		d.unavailable(w, "read the uploaded images", files.err)
		return
	}
	priority := defaultPriority
	if req.front {
		priority = frontPriority
	}
	job, err := d.cfg.Submit(ctx, c, Submission{Graph: g, Pool: poolOf(g), Priority: priority, Inputs: inputs, Key: "comfy/" + req.promptID})
	if err != nil {
		d.refuse(w, err, req.promptID, g, outputs)
		return
	}
	rec := &record{
		PromptID: req.promptID, Job: job.ID, ClientID: req.clientID, Number: req.number, Front: req.front,
		Extra: extraData(req), Outputs: outputs, Classes: classesOf(g), Created: time.Now().UTC(),
	}
	rec, created, err := d.prompts.create(ctx, c.Tenant, rec)
	if err != nil {
		d.unavailable(w, "record the prompt", err)
		return
	}
	if created || !job.Status.Terminal() {
		if err := d.prompts.mark(ctx, c.Tenant, rec); err != nil {
			d.unavailable(w, "record the prompt", err)
			return
		}
	}
	d.log.Debug("prompt queued", "prompt_id", rec.PromptID, "job", job.ID, "client_id", rec.ClientID, "replayed", !created)
	writeJSON(w, http.StatusOK, object{{"prompt_id", rec.PromptID}, {"number", rec.number()}, {"node_errors", nodeErrors}})
}

// readBody reads a request body of at most limit bytes; it has answered the
// request when it returns an error.
func readBody(w http.ResponseWriter, r *http.Request, limit int64) ([]byte, error) {
	var b bytes.Buffer
	_, err := b.ReadFrom(http.MaxBytesReader(w, r.Body, limit))
	if err == nil {
		return b.Bytes(), nil
	}
	if _, tooBig := errors.AsType[*http.MaxBytesError](err); tooBig {
		writeText(w, http.StatusRequestEntityTooLarge, "413: Request Entity Too Large")
	} else {
		writeServerError(w)
	}
	return nil, err
}

// readPromptRequest reads a POST /prompt body as ComfyUI does. A refusal has a status:
// 400 with its body, or 500 (nil body) where ComfyUI's handler raises.
func readPromptRequest(body []byte) (req promptRequest, status int, refusal any) {
	noPrompt := object{{"error", promptError("no_prompt", "No prompt provided", "No prompt provided")}, {"node_errors", object{}}}
	if !json.Valid(body) {
		return req, http.StatusInternalServerError, nil
	}
	switch pyjson.Kind(body) {
	case '{':
	case '[', '"':
		return req, http.StatusBadRequest, noPrompt
	default:
		return req, http.StatusInternalServerError, nil
	}
	ms, err := pyjson.ParseObject(body)
	if err != nil {
		return req, http.StatusInternalServerError, nil
	}
	if raw, ok := pyjson.Lookup(ms, "number"); ok {
		var n float64
		if json.Unmarshal(raw, &n) != nil {
			return req, http.StatusInternalServerError, nil
		}
		req.number = &n
	}
	if raw, ok := pyjson.Lookup(ms, "front"); ok {
		req.front = pyjson.Truthy(raw)
	}
	prompt, ok := pyjson.Lookup(ms, "prompt")
	if !ok {
		return req, http.StatusBadRequest, noPrompt
	}
	req.prompt = prompt
	if raw, ok := pyjson.Lookup(ms, "prompt_id"); ok && pyjson.Kind(raw) != 'n' {
		req.promptID = pyStr(raw)
	}
	if req.promptID == "" {
		req.promptID = uuid.NewString()
	}
	if raw, ok := pyjson.Lookup(ms, "extra_data"); ok {
		if req.extra, err = pyjson.ParseObject(raw); err != nil {
			return req, http.StatusInternalServerError, nil
		}
	}
	if raw, ok := pyjson.Lookup(ms, "client_id"); ok {
		_ = json.Unmarshal(raw, &req.clientID)
	} else if raw, ok := pyjson.Lookup(req.extra, "client_id"); ok {
		// ComfyUI sends a prompt's messages to extra_data's client_id.
		_ = json.Unmarshal(raw, &req.clientID)
	}
	return req, 0, nil
}

// pyStr is Python's str() of a JSON value: a string as it is, anything else as JSON.
func pyStr(raw json.RawMessage) string {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s
	}
	var b bytes.Buffer
	if json.Compact(&b, raw) != nil {
		return string(raw)
	}
	return b.String()
}

// promptError is the "error" member of a refused prompt.
func promptError(typ, message, details string) object {
	return object{{"type", typ}, {"message", message}, {"details", details}, {"extra_info", object{}}}
}

// extraData is the prompt's extra_data as ComfyUI stores it: the client's, without
// secrets, with client_id set as a Python dict assignment sets it.
func extraData(req promptRequest) json.RawMessage {
	out := object{}
	set := req.clientID == ""
	for _, m := range req.extra {
		switch {
		case slices.Contains(sensitiveExtraData, m.Key):
		case m.Key == "client_id" && !set:
			out, set = append(out, field{m.Key, req.clientID}), true
		default:
			out = append(out, field{m.Key, m.Raw})
		}
	}
	if !set {
		out = append(out, field{"client_id", req.clientID})
	}
	b, err := json.Marshal(out)
	if err != nil {
		return json.RawMessage("{}")
	}
	return b
}

// decodeGraph reads a prompt as the fleet keeps graphs, numbers exact; anything but
// an object of objects is an error, as it is to ComfyUI.
func decodeGraph(raw json.RawMessage) (fleet.Graph, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	var g map[string]any
	if err := dec.Decode(&g); err != nil {
		return nil, fmt.Errorf("decode prompt: %w", err)
	}
	for id, n := range g {
		if _, ok := n.(map[string]any); !ok {
			return nil, fmt.Errorf("node %s is not an object", id)
		}
	}
	return g, nil
}

// classOf returns the class type of node id of g.
func classOf(g fleet.Graph, id string) string {
	n, _ := g[id].(map[string]any)
	class, _ := n["class_type"].(string)
	return class
}

// classesOf maps every node of g to its class type.
func classesOf(g fleet.Graph) map[string]string {
	out := make(map[string]string, len(g))
	for id := range g {
		out[id] = classOf(g, id)
	}
	return out
}

// stockOutputs are the output nodes of g among the classes of a stock ComfyUI, for
// when no node has published its object_info yet.
func stockOutputs(g fleet.Graph) []string {
	out := []string{}
	for id := range g {
		if output, _ := workflow.StockClasses.Output(classOf(g, id)); output {
			out = append(out, id)
		}
	}
	slices.SortFunc(out, compareNodeIDs)
	return out
}

// videoClass matches the class types that make a graph a video: video nodes,
// animated image savers, Stable Video Diffusion.
var videoClass = regexp.MustCompile(`(?i)video|animated|img2vid|webm`)

// poolOf is the pool that runs g: "video" when a class of g makes video, else
// "image".
func poolOf(g fleet.Graph) string {
	for id := range g {
		if videoClass.MatchString(classOf(g, id)) {
			return "video"
		}
	}
	return "image"
}

// compareNodeIDs orders node ids as numbers where they are, "2" before "10".
func compareNodeIDs(a, b string) int {
	if len(a) != len(b) && strings.Trim(a, "0123456789") == "" && strings.Trim(b, "0123456789") == "" {
		return len(a) - len(b)
	}
	return strings.Compare(a, b)
}

// uploads resolves the files that prompts name against the tenant's uploads.
type uploads struct {
	d      *Door
	tenant string
	// fleet are the input files the nodes list themselves.
	fleet map[string]bool
	known map[string]bool
	err   error
}

// uploadKey is where an upload of the tenant is kept in the inputs store: under
// comfy/<tenant>/, at its subfolder and name.
func uploadKey(tenant, subfolder, name string) string {
	return "comfy/" + tenant + "/" + path.Join(subfolder, name)
}

// uploadOf returns the key of the upload a file name of a prompt names, as ComfyUI
// resolves it: "name.png", "sub/name.png", or either with " [input]" after it.
func uploadOf(tenant, name string) (string, bool) {
	name = strings.TrimSuffix(name, " [input]")
	clean := path.Clean("/" + name)[1:]
	if name == "" || clean != name || strings.HasPrefix(name, "../") {
		return "", false
	}
	return uploadKey(tenant, path.Dir(clean), path.Base(clean)), true
}

// uploaded reports whether the tenant uploaded the file name names. A failure to
// read the store counts as no, and is kept in err.
func (u *uploads) uploaded(ctx context.Context, name string) bool {
	if ok, seen := u.known[name]; seen {
		return ok
	}
	key, ok := uploadOf(u.tenant, name)
	if ok {
		_, err := u.d.cfg.Inputs.GetInfo(ctx, key)
		if err != nil && !errors.Is(err, jetstream.ErrObjectNotFound) {
			u.err = fmt.Errorf("look up upload %s: %w", key, err)
		}
		ok = err == nil
	}
	if u.known == nil {
		u.known = map[string]bool{}
	}
	u.known[name] = ok
	return ok
}

// exists reports whether LoadImage can load name: an upload, or a file a node lists.
func (u *uploads) exists(ctx context.Context, name string) bool {
	return u.uploaded(ctx, name) || u.fleet[strings.TrimSuffix(name, " [input]")]
}

// bind returns the inputs that place the uploads g names on the node that runs it.
func (u *uploads) bind(ctx context.Context, g fleet.Graph) []fleet.Input {
	var out []fleet.Input
	ids := make([]string, 0, len(g))
	for id := range g {
		ids = append(ids, id)
	}
	slices.SortFunc(ids, compareNodeIDs)
	for _, id := range ids {
		input, ok := imageLoaders[classOf(g, id)]
		if !ok {
			continue
		}
		inputs, _ := g[id].(map[string]any)["inputs"].(map[string]any)
		name, ok := inputs[input].(string)
		if !ok || !u.uploaded(ctx, name) {
			continue
		}
		key, _ := uploadOf(u.tenant, name)
		out = append(out, fleet.Input{Param: "node" + paramSafe.ReplaceAllString(id, "_"), Object: key,
			Bind: []fleet.Binding{{Node: id, Input: input}}})
	}
	return out
}

// paramSafe matches what may not stand in an input's name, which becomes part of
// the file name uploaded to the node.
var paramSafe = regexp.MustCompile(`[^A-Za-z0-9_-]`)
