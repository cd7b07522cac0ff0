package comfy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime/multipart"
	"net/http"
	"net/textproto"
	"net/url"
	"sort"
	"strconv"

	"github.com/comfyfleet/comfyfleet/pkg/jsontree"
)

const (
	maxErrorBody  = 4 << 10
	maxRejectBody = 4 << 20
)

func (c *Client) url(path string, q url.Values) string {
	u := c.base + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	return u
}

// send performs one request. It never sets an Origin header: the server
// answers 403 to an Origin that does not match its Host.
func (c *Client) send(ctx context.Context, op, method, path string, q url.Values, body []byte, contentType string) (*http.Response, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, method, c.url(path, q), rd)
	if err != nil {
		return nil, fmt.Errorf("comfy: %s: %w", op, err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	resp, err := c.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("comfy: %s: %w", op, err)
	}
	c.hear()
	return resp, nil
}

func closeBody(resp *http.Response) {
	_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	_ = resp.Body.Close()
}

func statusError(op string, resp *http.Response) error {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
	return fmt.Errorf("comfy: %s: %w", op, &HTTPError{Op: op, StatusCode: resp.StatusCode, Body: string(b)})
}

func ok(resp *http.Response) bool { return resp.StatusCode >= 200 && resp.StatusCode < 300 }

// call sends in as JSON (no body if nil), expects a 2xx and decodes the
// response into out unless out is nil.
func (c *Client) call(ctx context.Context, op, method, path string, q url.Values, in, out any) error {
	var body []byte
	var ct string
	if in != nil {
		var err error
		if body, err = json.Marshal(in); err != nil {
			return fmt.Errorf("comfy: %s: encode request: %w", op, err)
		}
		ct = "application/json"
	}
	resp, err := c.send(ctx, op, method, path, q, body, ct)
	if err != nil {
		return err
	}
	defer closeBody(resp)
	if !ok(resp) {
		return statusError(op, resp)
	}
	if out == nil {
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("comfy: %s: decode response: %w", op, err)
	}
	return nil
}

// Submit queues g with POST /prompt under the client's id and, if non-empty,
// promptID (never with an Origin header, which the server checks against its
// Host). A validation failure (400) is a *RejectedError; a 409 for a promptID
// the server already knows matches ErrPromptExists; other statuses are
// *HTTPError. Submit does not follow the prompt: see Run.
func (c *Client) Submit(ctx context.Context, g Graph, promptID string) (SubmitResult, error) {
	const op = "submit prompt"
	body, err := jsontree.Append(append(make([]byte, 0, 1024), `{"prompt":`...), g)
	if err != nil {
		return SubmitResult{}, fmt.Errorf("comfy: %s: encode graph: %w", op, err)
	}
	body = jsontree.AppendString(append(body, `,"client_id":`...), c.clientID)
	if promptID != "" {
		body = jsontree.AppendString(append(body, `,"prompt_id":`...), promptID)
	}
	body = append(body, '}')
	resp, err := c.send(ctx, op, http.MethodPost, "/prompt", nil, body, "application/json")
	if err != nil {
		return SubmitResult{}, err
	}
	defer closeBody(resp)
	switch {
	case ok(resp):
		var r struct {
			PromptID   string          `json:"prompt_id"`
			Number     json.RawMessage `json:"number"`
			NodeErrors json.RawMessage `json:"node_errors"`
		}
		if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
			return SubmitResult{}, fmt.Errorf("comfy: %s: decode response: %w", op, err)
		}
		if r.PromptID == "" {
			return SubmitResult{}, fmt.Errorf("comfy: %s: response has no prompt_id", op)
		}
		res := SubmitResult{PromptID: r.PromptID, Number: jsonInt(r.Number), NodeErrors: parseNodeErrors(r.NodeErrors)}
		if len(res.NodeErrors) > 0 {
			c.log.Warn("prompt queued with failing outputs", "prompt_id", res.PromptID,
				"error", (&RejectedError{NodeErrors: res.NodeErrors}).Error())
		}
		return res, nil
	case resp.StatusCode == http.StatusBadRequest:
		b, _ := io.ReadAll(io.LimitReader(resp.Body, maxRejectBody))
		if rej := parseRejection(b); rej != nil {
			return SubmitResult{}, fmt.Errorf("comfy: %s: %w", op, rej)
		}
		return SubmitResult{}, fmt.Errorf("comfy: %s: %w", op, &HTTPError{Op: op, StatusCode: resp.StatusCode, Body: truncate(b)})
	case resp.StatusCode == http.StatusConflict && promptID != "":
		b, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
		he := &HTTPError{Op: op, StatusCode: resp.StatusCode, Body: string(b)}
		return SubmitResult{}, fmt.Errorf("comfy: %s %s: %w (%w)", op, promptID, ErrPromptExists, he)
	default:
		return SubmitResult{}, statusError(op, resp)
	}
}

func truncate(b []byte) string {
	if len(b) > maxErrorBody {
		b = b[:maxErrorBody]
	}
	return string(b)
}

// parseRejection reads a 400 body of POST /prompt: {"error": {...} | "text",
// "node_errors": {...} | []}. It returns nil if the body is not of that shape.
func parseRejection(b []byte) *RejectedError {
	var w struct {
		Error      json.RawMessage `json:"error"`
		NodeErrors json.RawMessage `json:"node_errors"`
	}
	if json.Unmarshal(b, &w) != nil || len(w.Error) == 0 || string(w.Error) == "null" {
		return nil
	}
	rej := &RejectedError{NodeErrors: parseNodeErrors(w.NodeErrors)}
	var e struct {
		Type    string `json:"type"`
		Message string `json:"message"`
		Details string `json:"details"`
	}
	if json.Unmarshal(w.Error, &e) == nil {
		rej.Type, rej.Message, rej.Details = e.Type, e.Message, e.Details
	} else if json.Unmarshal(w.Error, &rej.Message) != nil {
		return nil
	}
	return rej
}

// parseNodeErrors reads node_errors leniently: an object of NodeError, or
// anything else (older servers sent a list) as none.
func parseNodeErrors(raw json.RawMessage) map[string]NodeError {
	var m map[string]json.RawMessage
	if json.Unmarshal(raw, &m) != nil || len(m) == 0 {
		return nil
	}
	out := make(map[string]NodeError, len(m))
	for id, v := range m {
		var ne NodeError
		if json.Unmarshal(v, &ne) == nil {
			out[id] = ne
		}
	}
	return out
}

// History returns the record of a finished prompt, or nil, nil if the server
// has none (unknown, deleted, or still queued or running).
func (c *Client) History(ctx context.Context, promptID string) (*HistoryEntry, error) {
	const op = "get history"
	if promptID == "" {
		return nil, fmt.Errorf("comfy: %s: empty prompt id", op)
	}
	var m map[string]json.RawMessage
	if err := c.call(ctx, op, http.MethodGet, "/history/"+url.PathEscape(promptID), nil, nil, &m); err != nil {
		return nil, err
	}
	raw, found := m[promptID]
	if !found {
		return nil, nil
	}
	h, err := parseHistoryEntry(promptID, raw)
	if err != nil {
		return nil, fmt.Errorf("comfy: %s %s: %w", op, promptID, err)
	}
	return h, nil
}

// RecentHistory returns up to maxItems of the latest history entries (all of
// them if maxItems <= 0), sorted by queue number.
func (c *Client) RecentHistory(ctx context.Context, maxItems int) ([]*HistoryEntry, error) {
	const op = "list history"
	var q url.Values
	if maxItems > 0 {
		q = url.Values{"max_items": {strconv.Itoa(maxItems)}}
	}
	var m map[string]json.RawMessage
	if err := c.call(ctx, op, http.MethodGet, "/history", q, nil, &m); err != nil {
		return nil, err
	}
	out := make([]*HistoryEntry, 0, len(m))
	for id, raw := range m {
		h, err := parseHistoryEntry(id, raw)
		if err != nil {
			return nil, fmt.Errorf("comfy: %s: entry %s: %w", op, id, err)
		}
		out = append(out, h)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Number < out[j].Number })
	return out, nil
}

// DeleteHistory removes prompts from the server's history (POST /history).
func (c *Client) DeleteHistory(ctx context.Context, promptIDs ...string) error {
	if len(promptIDs) == 0 {
		return nil
	}
	return c.call(ctx, "delete history", http.MethodPost, "/history", nil, map[string][]string{"delete": promptIDs}, nil)
}

// Queue returns the running and pending prompts (GET /queue).
func (c *Client) Queue(ctx context.Context) (Queue, error) {
	var w struct {
		Running []QueueItem `json:"queue_running"`
		Pending []QueueItem `json:"queue_pending"`
	}
	if err := c.call(ctx, "get queue", http.MethodGet, "/queue", nil, nil, &w); err != nil {
		return Queue{}, err
	}
	sort.SliceStable(w.Pending, func(i, j int) bool { return w.Pending[i].Number < w.Pending[j].Number })
	return Queue{Running: w.Running, Pending: w.Pending}, nil
}

// QueueRemaining returns how many prompts are running or pending (GET /prompt).
func (c *Client) QueueRemaining(ctx context.Context) (int, error) {
	var w struct {
		ExecInfo struct {
			QueueRemaining int `json:"queue_remaining"`
		} `json:"exec_info"`
	}
	if err := c.call(ctx, "get queue remaining", http.MethodGet, "/prompt", nil, nil, &w); err != nil {
		return 0, err
	}
	return w.ExecInfo.QueueRemaining, nil
}

// DeleteQueued removes pending prompts from the queue (POST /queue delete).
// Unknown or already running ids are ignored by the server.
func (c *Client) DeleteQueued(ctx context.Context, promptIDs ...string) error {
	if len(promptIDs) == 0 {
		return nil
	}
	return c.call(ctx, "delete queued", http.MethodPost, "/queue", nil, map[string][]string{"delete": promptIDs}, nil)
}

// Interrupt stops the running prompt (POST /interrupt). With a promptID the
// server interrupts only that prompt, if it is the one running; with an empty
// one it interrupts whatever runs.
func (c *Client) Interrupt(ctx context.Context, promptID string) error {
	var in any
	if promptID != "" {
		in = map[string]string{"prompt_id": promptID}
	}
	return c.call(ctx, "interrupt", http.MethodPost, "/interrupt", nil, in, nil)
}

// Free asks the server to unload models and free memory (POST /free).
func (c *Client) Free(ctx context.Context) error {
	return c.call(ctx, "free memory", http.MethodPost, "/free", nil, map[string]bool{"unload_models": true, "free_memory": true}, nil)
}

// Download is a file the server sends.
type Download struct {
	// Body is the file's content; the caller closes it.
	Body io.ReadCloser
	// ContentType is the server's Content-Type, if it gave one.
	ContentType string
	// Size is the file's length in bytes, or -1 when the server did not say.
	Size int64
}

// View downloads a file (GET /view). A missing file is an *HTTPError with status
// 404, a bad type one with status 400.
func (c *Client) View(ctx context.Context, f FileRef) (Download, error) {
	return c.view(ctx, f, "")
}

// ViewPreview downloads a re-encoded preview of an image, preview being the
// server's "format;quality" parameter, e.g. "webp;50".
func (c *Client) ViewPreview(ctx context.Context, f FileRef, preview string) (Download, error) {
	return c.view(ctx, f, preview)
}

func (c *Client) view(ctx context.Context, f FileRef, preview string) (Download, error) {
	const op = "view"
	q := url.Values{"filename": {f.Filename}, "subfolder": {f.Subfolder}, "type": {f.Type}}
	if preview != "" {
		q.Set("preview", preview)
	}
	resp, err := c.send(ctx, op, http.MethodGet, "/view", q, nil, "")
	if err != nil {
		return Download{}, err
	}
	if !ok(resp) {
		defer closeBody(resp)
		return Download{}, statusError(op+" "+f.Filename, resp)
	}
	return Download{Body: resp.Body, ContentType: resp.Header.Get("Content-Type"), Size: resp.ContentLength}, nil
}

// SystemStats returns the server's version, memory and devices.
func (c *Client) SystemStats(ctx context.Context) (SystemStats, error) {
	var s SystemStats
	err := c.call(ctx, "get system stats", http.MethodGet, "/system_stats", nil, nil, &s)
	return s, err
}

// Features returns the server's feature flags (GET /features).
func (c *Client) Features(ctx context.Context) (Features, error) {
	var f Features
	err := c.call(ctx, "get features", http.MethodGet, "/features", nil, nil, &f)
	return f, err
}

// ObjectInfo returns the node class definitions by class name: all of them if
// class is empty, else that class only (an empty map if the server lacks it).
func (c *Client) ObjectInfo(ctx context.Context, class string) (map[string]json.RawMessage, error) {
	path := "/object_info"
	if class != "" {
		path += "/" + url.PathEscape(class)
	}
	var m map[string]json.RawMessage
	if err := c.call(ctx, "get object info", http.MethodGet, path, nil, nil, &m); err != nil {
		return nil, err
	}
	if m == nil {
		m = map[string]json.RawMessage{}
	}
	return m, nil
}

// UploadImage stores data as name in the server's input directory
// (POST /upload/image) and returns the name the server chose.
func (c *Client) UploadImage(ctx context.Context, name string, data []byte, overwrite bool) (FileRef, error) {
	const op = "upload image"
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	h := make(textproto.MIMEHeader)
	h.Set("Content-Disposition", multipart.FileContentDisposition("image", name))
	h.Set("Content-Type", http.DetectContentType(data))
	part, err := mw.CreatePart(h)
	if err == nil {
		_, err = part.Write(data)
	}
	if err == nil {
		err = mw.WriteField("type", "input")
	}
	if err == nil {
		err = mw.WriteField("overwrite", strconv.FormatBool(overwrite))
	}
	if err == nil {
		err = mw.Close()
	}
	if err != nil {
		return FileRef{}, fmt.Errorf("comfy: %s: encode form: %w", op, err)
	}
	resp, err := c.send(ctx, op, http.MethodPost, "/upload/image", nil, buf.Bytes(), mw.FormDataContentType())
	if err != nil {
		return FileRef{}, err
	}
	defer closeBody(resp)
	if !ok(resp) {
		return FileRef{}, statusError(op, resp)
	}
	var r struct {
		Name      string `json:"name"`
		Subfolder string `json:"subfolder"`
		Type      string `json:"type"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		return FileRef{}, fmt.Errorf("comfy: %s: decode response: %w", op, err)
	}
	if r.Name == "" {
		return FileRef{}, errors.New("comfy: " + op + ": response has no name")
	}
	return FileRef{Filename: r.Name, Subfolder: r.Subfolder, Type: r.Type}, nil
}
