package comfy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// Graph is an API-format prompt: node id -> {"class_type", "inputs", "_meta"?}.
type Graph = map[string]any

// FileRef names a file the way ComfyUI does in outputs, /view and uploads.
// Type is "output", "temp" or "input"; Format is set by video nodes
// (e.g. "video/h264-mp4").
type FileRef struct {
	Filename  string `json:"filename"`
	Subfolder string `json:"subfolder"`
	Type      string `json:"type"`
	Format    string `json:"format,omitempty"`
}

// Output is one entry of a prompt's outputs. Kind is the output key: "images",
// "gifs", "animated", "audio", "video", "text", ... File outputs carry File;
// string outputs (usually Kind "text") carry Text and a zero File.
type Output struct {
	NodeID string
	Kind   string
	File   FileRef
	Text   string
}

// SubmitResult is the server's answer to an accepted POST /prompt. Number is
// the server's queue counter (negative for prompts queued in front).
// NodeErrors lists output branches that failed validation while the others
// were queued.
type SubmitResult struct {
	PromptID   string
	Number     int
	NodeErrors map[string]NodeError
}

// HistoryEntry is the server's record of a finished prompt (GET /history/{id}).
type HistoryEntry struct {
	PromptID string
	// Number is the queue number the prompt ran with.
	Number int
	// ClientID is the client_id the prompt was submitted with.
	ClientID string
	// OutputNodes are the output nodes the server executed for the prompt.
	OutputNodes []string
	Status      HistoryStatus
	// Outputs are sorted by node id (numerically where possible), kind, index.
	Outputs []Output
}

// HistoryStatus is the status block of a history entry. StatusStr is
// "success" or "error"; servers older than the status block leave it empty.
type HistoryStatus struct {
	StatusStr string
	Completed bool
	Messages  []StatusMessage
}

// StatusMessage is one [type, data] pair of HistoryStatus.Messages, e.g.
// execution_start, execution_cached, execution_success, execution_error.
type StatusMessage struct {
	Type string
	Data json.RawMessage
}

// UnmarshalJSON reads the [type, data] pair.
func (m *StatusMessage) UnmarshalJSON(b []byte) error {
	var pair []json.RawMessage
	if err := json.Unmarshal(b, &pair); err != nil {
		return err
	}
	if len(pair) > 0 {
		if err := json.Unmarshal(pair[0], &m.Type); err != nil {
			return err
		}
	}
	if len(pair) > 1 {
		m.Data = pair[1]
	}
	return nil
}

// Err returns the outcome recorded in Status.Messages: an *ExecutionError for
// execution_error, an *InterruptedError for execution_interrupted, a generic
// error when the status is "error" without either message, and nil otherwise.
func (h *HistoryEntry) Err() error {
	for _, m := range h.Status.Messages {
		switch m.Type {
		case "execution_error":
			e := &ExecutionError{}
			if err := json.Unmarshal(m.Data, e); err != nil {
				return fmt.Errorf("comfy: prompt %s failed: unreadable execution_error: %w", h.PromptID, err)
			}
			if e.PromptID == "" {
				e.PromptID = h.PromptID
			}
			return e
		case "execution_interrupted":
			e := &InterruptedError{}
			_ = json.Unmarshal(m.Data, e)
			if e.PromptID == "" {
				e.PromptID = h.PromptID
			}
			return e
		}
	}
	if h.Status.StatusStr == "error" {
		return fmt.Errorf("comfy: prompt %s ended with status %q", h.PromptID, h.Status.StatusStr)
	}
	return nil
}

// CachedNodes returns the node ids the server served from its cache
// (the execution_cached message), or nil if none were.
func (h *HistoryEntry) CachedNodes() []string {
	for _, m := range h.Status.Messages {
		if m.Type != "execution_cached" {
			continue
		}
		var d struct {
			Nodes []string `json:"nodes"`
		}
		if json.Unmarshal(m.Data, &d) == nil {
			return d.Nodes
		}
	}
	return nil
}

// AllCached reports whether every output node of the prompt came from the
// server's cache, so that its output files are those of an earlier run.
func (h *HistoryEntry) AllCached() bool {
	if len(h.OutputNodes) == 0 {
		return false
	}
	cached := h.CachedNodes()
	for _, id := range h.OutputNodes {
		if !slices.Contains(cached, id) {
			return false
		}
	}
	return true
}

type historyWire struct {
	Prompt  []json.RawMessage                     `json:"prompt"`
	Outputs map[string]map[string]json.RawMessage `json:"outputs"`
	Status  *struct {
		StatusStr string          `json:"status_str"`
		Completed bool            `json:"completed"`
		Messages  []StatusMessage `json:"messages"`
	} `json:"status"`
}

func parseHistoryEntry(id string, raw json.RawMessage) (*HistoryEntry, error) {
	var w historyWire
	if err := json.Unmarshal(raw, &w); err != nil {
		return nil, err
	}
	h := &HistoryEntry{PromptID: id}
	if len(w.Prompt) > 0 {
		h.Number = jsonInt(w.Prompt[0])
	}
	if len(w.Prompt) > 3 {
		var extra struct {
			ClientID string `json:"client_id"`
		}
		_ = json.Unmarshal(w.Prompt[3], &extra)
		h.ClientID = extra.ClientID
	}
	if len(w.Prompt) > 4 {
		_ = json.Unmarshal(w.Prompt[4], &h.OutputNodes)
	}
	if w.Status != nil {
		h.Status = HistoryStatus{StatusStr: w.Status.StatusStr, Completed: w.Status.Completed, Messages: w.Status.Messages}
	}
	h.Outputs = flattenOutputs(w.Outputs)
	return h, nil
}

// flattenOutputs turns {node: {kind: [item...]}} into a sorted []Output,
// keeping file items and strings and skipping anything else (e.g. the
// booleans of "animated").
func flattenOutputs(outputs map[string]map[string]json.RawMessage) []Output {
	var out []Output
	nodes := make([]string, 0, len(outputs))
	for id := range outputs {
		nodes = append(nodes, id)
	}
	sort.Slice(nodes, func(i, j int) bool { return lessNodeID(nodes[i], nodes[j]) })
	for _, node := range nodes {
		kinds := make([]string, 0, len(outputs[node]))
		for k := range outputs[node] {
			kinds = append(kinds, k)
		}
		sort.Strings(kinds)
		for _, kind := range kinds {
			raw := bytes.TrimSpace(outputs[node][kind])
			var items []json.RawMessage
			if len(raw) > 0 && raw[0] == '[' {
				if json.Unmarshal(raw, &items) != nil {
					continue
				}
			} else {
				items = []json.RawMessage{raw}
			}
			for _, item := range items {
				if o, ok := parseOutputItem(node, kind, item); ok {
					out = append(out, o)
				}
			}
		}
	}
	return out
}

func parseOutputItem(node, kind string, item json.RawMessage) (Output, bool) {
	item = bytes.TrimSpace(item)
	if len(item) == 0 {
		return Output{}, false
	}
	switch item[0] {
	case '{':
		var f FileRef
		if json.Unmarshal(item, &f) != nil || f.Filename == "" {
			return Output{}, false
		}
		return Output{NodeID: node, Kind: kind, File: f}, true
	case '"':
		var s string
		if json.Unmarshal(item, &s) != nil {
			return Output{}, false
		}
		return Output{NodeID: node, Kind: kind, Text: s}, true
	}
	return Output{}, false
}

// lessNodeID orders node ids naturally: "2" < "10", and subgraph ids such as
// "5:12" segment by segment.
func lessNodeID(a, b string) bool {
	as, bs := strings.Split(a, ":"), strings.Split(b, ":")
	for i := 0; i < len(as) && i < len(bs); i++ {
		if as[i] == bs[i] {
			continue
		}
		an, aerr := strconv.Atoi(as[i])
		bn, berr := strconv.Atoi(bs[i])
		switch {
		case aerr == nil && berr == nil && an != bn:
			return an < bn
		case aerr == nil && berr != nil:
			return true
		case aerr != nil && berr == nil:
			return false
		}
		return as[i] < bs[i]
	}
	return len(as) < len(bs)
}

// jsonInt reads a JSON number (integer or float) as an int, 0 if it is not one.
func jsonInt(raw json.RawMessage) int {
	if n, err := strconv.Atoi(string(raw)); err == nil {
		return n
	}
	var f float64
	if json.Unmarshal(raw, &f) != nil {
		return 0
	}
	return int(f)
}

// Queue is GET /queue: the running prompt(s) and the pending ones.
type Queue struct {
	Running []QueueItem
	// Pending is sorted by Number, the order the server runs them in.
	Pending []QueueItem
}

// QueueItem is one queued prompt, from the server's
// [number, prompt_id, prompt, extra_data, outputs_to_execute] tuple.
type QueueItem struct {
	Number      int
	PromptID    string
	ClientID    string
	OutputNodes []string
}

// UnmarshalJSON reads the server's tuple form.
func (q *QueueItem) UnmarshalJSON(b []byte) error {
	var t []json.RawMessage
	if err := json.Unmarshal(b, &t); err != nil {
		return err
	}
	if len(t) < 2 {
		return fmt.Errorf("queue item has %d fields, want at least 2", len(t))
	}
	q.Number = jsonInt(t[0])
	if err := json.Unmarshal(t[1], &q.PromptID); err != nil {
		return fmt.Errorf("queue item prompt id: %w", err)
	}
	if len(t) > 3 {
		var extra struct {
			ClientID string `json:"client_id"`
		}
		_ = json.Unmarshal(t[3], &extra)
		q.ClientID = extra.ClientID
	}
	if len(t) > 4 {
		_ = json.Unmarshal(t[4], &q.OutputNodes)
	}
	return nil
}

// Contains reports whether the prompt is running or pending.
func (q Queue) Contains(id string) bool {
	_, ok := q.Find(id)
	return ok
}

// Find returns the running or pending item of the prompt.
func (q Queue) Find(id string) (QueueItem, bool) {
	for _, list := range [][]QueueItem{q.Running, q.Pending} {
		for _, it := range list {
			if it.PromptID == id {
				return it, true
			}
		}
	}
	return QueueItem{}, false
}

// IsRunning reports whether the prompt is the one being executed.
func (q Queue) IsRunning(id string) bool {
	for _, it := range q.Running {
		if it.PromptID == id {
			return true
		}
	}
	return false
}

// SystemStats is GET /system_stats.
type SystemStats struct {
	System  SystemInfo `json:"system"`
	Devices []Device   `json:"devices"`
}

// SystemInfo is the "system" block of SystemStats.
type SystemInfo struct {
	OS                      string   `json:"os"`
	RAMTotal                int64    `json:"ram_total"`
	RAMFree                 int64    `json:"ram_free"`
	ComfyUIVersion          string   `json:"comfyui_version"`
	RequiredFrontendVersion string   `json:"required_frontend_version"`
	PythonVersion           string   `json:"python_version"`
	PytorchVersion          string   `json:"pytorch_version"`
	EmbeddedPython          bool     `json:"embedded_python"`
	Argv                    []string `json:"argv"`
}

// Device is one torch device of SystemStats; Type is "cuda", "cpu", "mps", ...
type Device struct {
	Name           string `json:"name"`
	Type           string `json:"type"`
	Index          *int   `json:"index"`
	VRAMTotal      int64  `json:"vram_total"`
	VRAMFree       int64  `json:"vram_free"`
	TorchVRAMTotal int64  `json:"torch_vram_total"`
	TorchVRAMFree  int64  `json:"torch_vram_free"`
}

// Features is GET /features: what the server supports.
type Features struct {
	SupportsPreviewMetadata bool  `json:"supports_preview_metadata"`
	MaxUploadSize           int64 `json:"max_upload_size"`
}

// Progress is reported by Run: a progress message (Value of Max steps) or,
// with Value and Max zero, the prompt moving on to Node.
type Progress struct {
	PromptID string
	Node     string
	Value    int
	Max      int
}

// Result is a prompt that ran to success. Cached is true when every output
// node was served from the server's cache, so that Outputs name files of an
// earlier run.
type Result struct {
	PromptID string
	Outputs  []Output
	Cached   bool
}
