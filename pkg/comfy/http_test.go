package comfy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"mime"
	"mime/multipart"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// httpCase exercises the client method matching one NN_*.json transcript.
type httpCase func(t *testing.T, ctx context.Context, c *Client, rp *replay, e *exchange)

func submitOK(wantNumber int) httpCase {
	return func(t *testing.T, ctx context.Context, c *Client, rp *replay, e *exchange) {
		var sent struct {
			Prompt   Graph  `json:"prompt"`
			ClientID string `json:"client_id"`
			PromptID string `json:"prompt_id"`
		}
		if err := json.Unmarshal(e.Request.Body, &sent); err != nil {
			t.Fatal(err)
		}
		c = New(c.BaseURL(), WithClientID(sent.ClientID), WithLogger(testLogger(t)))
		res, err := c.Submit(ctx, sent.Prompt, sent.PromptID)
		if err != nil {
			t.Fatal(err)
		}
		if res.PromptID != promptIDOf(t, e) || res.Number != wantNumber {
			t.Errorf("Submit = %+v, want %s number %d", res, promptIDOf(t, e), wantNumber)
		}
		reqs := rp.recorded("POST", "/prompt")
		if len(reqs) != 1 {
			t.Fatalf("%d POST /prompt", len(reqs))
		}
		want := requestJSON(t, e.Request.Body).(map[string]any)
		delete(want, "front") // queue priority and extra_data are not Submit's business
		delete(want, "extra_data")
		if got := requestJSON(t, reqs[0].Body); !reflect.DeepEqual(got, want) {
			t.Errorf("request body\n got %v\nwant %v", got, want)
		}
		if ct := reqs[0].Header.Get("Content-Type"); ct != "application/json" {
			t.Errorf("Content-Type %q", ct)
		}
	}
}

// rejected checks that a 400 becomes a permanent *RejectedError with the
// recorded type, message and node errors.
func rejected(typ, message string, nodeErrors map[string][2]string) httpCase {
	return func(t *testing.T, ctx context.Context, c *Client, rp *replay, e *exchange) {
		_, err := c.Submit(ctx, Graph{"1": map[string]any{"class_type": "X", "inputs": map[string]any{}}}, "")
		rej, ok := errors.AsType[*RejectedError](err)
		if !ok {
			t.Fatalf("Submit error %v, want *RejectedError", err)
		}
		if rej.Type != typ || rej.Message != message {
			t.Errorf("rejection %q %q, want %q %q", rej.Type, rej.Message, typ, message)
		}
		if len(rej.NodeErrors) != len(nodeErrors) {
			t.Errorf("node errors %+v, want %v", rej.NodeErrors, nodeErrors)
		}
		for id, want := range nodeErrors {
			ne := rej.NodeErrors[id]
			if ne.ClassType != want[0] || len(ne.Errors) == 0 || ne.Errors[0].Type != want[1] || ne.Errors[0].Message == "" {
				t.Errorf("node %s: %+v, want %s %s", id, ne, want[0], want[1])
			}
		}
		if !IsPermanent(err) {
			t.Error("rejection not permanent")
		}
		if !strings.HasPrefix(err.Error(), "comfy: submit prompt: prompt rejected: "+typ) {
			t.Errorf("error text %q", err)
		}
	}
}

func submitHTTPError(status int, permanent bool) httpCase {
	return func(t *testing.T, ctx context.Context, c *Client, rp *replay, e *exchange) {
		_, err := c.Submit(ctx, Graph{}, "")
		if !isHTTPStatus(err, status) || IsPermanent(err) != permanent {
			t.Fatalf("Submit error %v, want HTTP %d permanent=%v", err, status, permanent)
		}
		if _, ok := errors.AsType[*RejectedError](err); ok {
			t.Error("HTTP error reported as a rejection")
		}
	}
}

func history(check func(t *testing.T, h *HistoryEntry)) httpCase {
	return func(t *testing.T, ctx context.Context, c *Client, rp *replay, e *exchange) {
		id := strings.TrimPrefix(e.Request.Path, "/history/")
		h, err := c.History(ctx, id)
		if err != nil {
			t.Fatal(err)
		}
		check(t, h)
	}
}

func historyNil(t *testing.T, h *HistoryEntry) {
	if h != nil {
		t.Errorf("History = %+v, want nil for an unknown prompt", h)
	}
}

func historySuccess(number int, outputs ...Output) func(t *testing.T, h *HistoryEntry) {
	return func(t *testing.T, h *HistoryEntry) {
		if h == nil {
			t.Fatal("History = nil")
		}
		if h.Err() != nil || h.Status.StatusStr != "success" || !h.Status.Completed || h.Number != number || h.ClientID != testClientID {
			t.Errorf("entry %+v, err %v", h, h.Err())
		}
		if len(outputs) == 0 && len(h.Outputs) != 0 || len(outputs) > 0 && !reflect.DeepEqual(h.Outputs, outputs) {
			t.Errorf("outputs %+v, want %+v", h.Outputs, outputs)
		}
		if h.AllCached() {
			t.Error("a fresh run reported as cached")
		}
	}
}

func historyInterrupted(node, nodeType string) func(t *testing.T, h *HistoryEntry) {
	return func(t *testing.T, h *HistoryEntry) {
		err := h.Err()
		ie, ok := errors.AsType[*InterruptedError](err)
		if !ok || !errors.Is(err, ErrInterrupted) || ie.NodeID != node || ie.NodeType != nodeType || ie.PromptID != h.PromptID {
			t.Fatalf("Err() = %v, want interrupted in %s", err, node)
		}
		if IsPermanent(err) || len(h.Outputs) != 0 || h.Status.Completed {
			t.Errorf("entry %+v", h)
		}
	}
}

func image(node, name, typ string) Output {
	return Output{NodeID: node, Kind: "images", File: FileRef{Filename: name, Type: typ}}
}

func queue(running []string, pending ...string) httpCase {
	return func(t *testing.T, ctx context.Context, c *Client, rp *replay, e *exchange) {
		q, err := c.Queue(ctx)
		if err != nil {
			t.Fatal(err)
		}
		ids := func(items []QueueItem) []string {
			var out []string
			for _, it := range items {
				out = append(out, it.PromptID)
				if it.ClientID != testClientID || len(it.OutputNodes) != 1 {
					t.Errorf("item %+v", it)
				}
			}
			return out
		}
		if got := ids(q.Running); !reflect.DeepEqual(got, running) {
			t.Errorf("running %v, want %v", got, running)
		}
		if got := ids(q.Pending); !reflect.DeepEqual(got, pending) {
			t.Errorf("pending %v, want %v", got, pending)
		}
		for _, id := range append(running, pending...) {
			if !q.Contains(id) {
				t.Errorf("Contains(%s) = false", id)
			}
		}
		if q.Contains("nope") {
			t.Error("Contains(nope)")
		}
	}
}

func queueRemaining(want int) httpCase {
	return func(t *testing.T, ctx context.Context, c *Client, rp *replay, e *exchange) {
		if n, err := c.QueueRemaining(ctx); err != nil || n != want {
			t.Fatalf("QueueRemaining = %d, %v; want %d", n, err, want)
		}
	}
}

func objectInfo(class string, want ...string) httpCase {
	return func(t *testing.T, ctx context.Context, c *Client, rp *replay, e *exchange) {
		info, err := c.ObjectInfo(ctx, class)
		if err != nil {
			t.Fatal(err)
		}
		if len(info) != len(want) {
			t.Errorf("%d classes, want %v", len(info), want)
		}
		for _, k := range want {
			var def struct {
				Name       string `json:"name"`
				OutputNode bool   `json:"output_node"`
			}
			if err := json.Unmarshal(info[k], &def); err != nil || def.Name != k {
				t.Errorf("class %s: %s", k, info[k])
			}
		}
	}
}

// postedJSON checks the JSON body of the one recorded request to path.
func postedJSON(t *testing.T, rp *replay, path, want string) {
	t.Helper()
	reqs := rp.recorded("POST", path)
	if len(reqs) != 1 {
		t.Fatalf("%d POST %s", len(reqs), path)
	}
	if want == "" {
		if len(reqs[0].Body) != 0 {
			t.Errorf("POST %s body %q, want none", path, reqs[0].Body)
		}
		return
	}
	if got := requestJSON(t, reqs[0].Body); !reflect.DeepEqual(got, requestJSON(t, []byte(want))) {
		t.Errorf("POST %s body %s, want %s", path, reqs[0].Body, want)
	}
}

func recordedBody(e *exchange) string {
	var s string
	if json.Unmarshal(e.Request.Body, &s) == nil {
		return s
	}
	return string(e.Request.Body)
}

func interrupt(t *testing.T, ctx context.Context, c *Client, rp *replay, e *exchange) {
	var body struct {
		PromptID string `json:"prompt_id"`
	}
	_ = json.Unmarshal(e.Request.Body, &body)
	if err := c.Interrupt(ctx, body.PromptID); err != nil {
		t.Fatal(err)
	}
	if body.PromptID == "" {
		postedJSON(t, rp, "/interrupt", "")
	} else {
		postedJSON(t, rp, "/interrupt", string(e.Request.Body))
	}
}

func view(preview string, status int, contentType string) httpCase {
	return func(t *testing.T, ctx context.Context, c *Client, rp *replay, e *exchange) {
		vals, err := url.ParseQuery(strings.ReplaceAll(strings.SplitN(e.Request.Path, "?", 2)[1], ";", "%3B"))
		if err != nil {
			t.Fatal(err)
		}
		f := FileRef{Filename: vals.Get("filename"), Subfolder: vals.Get("subfolder"), Type: vals.Get("type")}
		d, err := c.ViewPreview(ctx, f, preview)
		if status != 200 {
			if !isHTTPStatus(err, status) || !IsPermanent(err) || d.Body != nil {
				t.Fatalf("View error %v, want permanent HTTP %d", err, status)
			}
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		defer d.Body.Close()
		b, _ := io.ReadAll(d.Body)
		if d.ContentType != contentType || len(b) != e.Response.BodyLen || !bytes.Equal(b, e.responseBody(t)) {
			t.Errorf("View: %s, %d bytes; want %s, %d bytes", d.ContentType, len(b), contentType, e.Response.BodyLen)
		}
		if d.Size >= 0 && d.Size != int64(len(b)) {
			t.Errorf("View: size %d, read %d bytes", d.Size, len(b))
		}
	}
}

var httpCases = map[string]httpCase{
	"01": func(t *testing.T, ctx context.Context, c *Client, rp *replay, e *exchange) {
		s, err := c.SystemStats(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if s.System.ComfyUIVersion != "0.3.65" || s.System.OS != "posix" || s.System.RAMTotal != 25276510208 ||
			len(s.System.Argv) != 8 || len(s.Devices) != 1 || s.Devices[0].Name != "cpu" || s.Devices[0].Type != "cpu" ||
			s.Devices[0].Index != nil || s.Devices[0].VRAMTotal != 25276510208 || s.Devices[0].VRAMFree != 24593420288 {
			t.Errorf("SystemStats = %+v", s)
		}
	},
	"02": func(t *testing.T, ctx context.Context, c *Client, rp *replay, e *exchange) {
		f, err := c.Features(ctx)
		if err != nil || !f.SupportsPreviewMetadata || f.MaxUploadSize != 104857600 {
			t.Fatalf("Features = %+v, %v", f, err)
		}
	},
	"03": queueRemaining(0),
	"04": queue(nil),
	"05": func(t *testing.T, ctx context.Context, c *Client, rp *replay, e *exchange) {
		if h, err := c.RecentHistory(ctx, 5); err != nil || len(h) != 0 {
			t.Fatalf("RecentHistory = %v, %v", h, err)
		}
	},
	"06": objectInfo("", "EmptyImage", "ImageInvert", "ImageScale", "SaveImage", "PreviewImage", "SaveImageWebsocket", "ImageToMask", "MaskToImage"),
	"07": objectInfo("EmptyImage", "EmptyImage"),
	"08": objectInfo("NoSuchNode"),
	"09": func(t *testing.T, ctx context.Context, c *Client, rp *replay, e *exchange) {
		c = New(c.BaseURL()+"/api/", WithLogger(testLogger(t)))
		if q, err := c.Queue(ctx); err != nil || len(q.Running)+len(q.Pending) != 0 {
			t.Fatalf("Queue = %+v, %v", q, err)
		}
		if reqs := rp.recorded("GET", "/queue"); len(reqs) != 1 || reqs[0].Path != "/api/queue" {
			t.Errorf("requests %+v", reqs)
		}
	},
	"10": submitOK(0),
	"11": queue([]string{"61b8ded9-2c66-4167-b4bb-021628f05a63"}),
	"12": history(historySuccess(0, image("4", "acceptance_00001_.png", "output"))),
	"13": queue(nil),
	"14": queueRemaining(0),
	"15": view("", 200, "image/png"),
	"16": view("", 404, ""),
	"17": view("", 400, ""),
	"18": view("webp;50", 200, "image/webp"),
	"19": submitOK(1),
	"20": history(func(t *testing.T, h *HistoryEntry) {
		if h == nil || h.Err() != nil || !h.AllCached() || !reflect.DeepEqual(h.CachedNodes(), []string{"1", "2", "3", "4"}) ||
			!reflect.DeepEqual(h.Outputs, []Output{image("4", "acceptance_00001_.png", "output")}) {
			t.Errorf("cached entry %+v", h)
		}
	}),
	"21": submitOK(2),
	"22": history(historySuccess(2, image("4", "acceptance_b_00001_.png", "output"))),
	"23": rejected("invalid_prompt", "Cannot execute because node NoSuchNode does not exist.", nil),
	"24": rejected("prompt_outputs_failed_validation", "Prompt outputs failed validation", map[string][2]string{
		"2": {"ImageInvert", "required_input_missing"}, "3": {"ImageScale", "value_not_in_list"}}),
	"25": rejected("prompt_outputs_failed_validation", "Prompt outputs failed validation", map[string][2]string{
		"1": {"EmptyImage", "invalid_input_type"}}),
	"26": rejected("prompt_outputs_failed_validation", "Prompt outputs failed validation", map[string][2]string{
		"2": {"ImageInvert", "exception_during_inner_validation"}}),
	"27": rejected("prompt_outputs_failed_validation", "Prompt outputs failed validation", map[string][2]string{
		"1": {"EmptyImage", "value_bigger_than_max"}}),
	"28": submitHTTPError(500, false),
	"29": rejected("prompt_no_outputs", "Prompt has no outputs", nil),
	"30": rejected("no_prompt", "No prompt provided", nil),
	"31": submitHTTPError(500, false),
	"32": rejected("invalid_prompt", "Cannot execute because a node is missing the class_type property.", nil),
	"33": submitHTTPError(403, true),
	"34": submitOK(12),
	"35": history(func(t *testing.T, h *HistoryEntry) {
		err := h.Err()
		ee, ok := errors.AsType[*ExecutionError](err)
		if !ok || ee.ExceptionType != "IndexError" || ee.NodeID != "2" || ee.NodeType != "ImageToMask" ||
			ee.PromptID != "907e62f8-52bc-4276-a5c3-968187ef9697" || len(ee.Traceback) != 5 ||
			!strings.HasPrefix(ee.ExceptionMessage, "index 3 is out of bounds") || ee.OutOfMemory() {
			t.Fatalf("Err() = %#v", err)
		}
		if !IsPermanent(err) || h.Status.StatusStr != "error" || h.Status.Completed || len(h.Outputs) != 0 {
			t.Errorf("entry %+v", h)
		}
	}),
	"36": submitOK(13),
	"37": history(historySuccess(13)),
	"38": submitOK(14),
	"39": submitOK(15),
	"40": submitOK(16),
	"41": submitOK(17),
	"42": submitOK(-18),
	"43": queue([]string{"e3ca8ceb-c54d-4396-946d-59cc16682a31"},
		"498ad163-5ff1-4637-9cd3-6b3a1889d15b", "d8a8df6b-d207-4f43-8729-c46e6527f7e6", "9df0cac8-27a4-4732-a476-f283397d2d34"),
	"44": queueRemaining(4),
	"45": func(t *testing.T, ctx context.Context, c *Client, rp *replay, e *exchange) {
		if err := c.DeleteQueued(ctx, "9df0cac8-27a4-4732-a476-f283397d2d34"); err != nil {
			t.Fatal(err)
		}
		postedJSON(t, rp, "/queue", recordedBody(e))
	},
	"46": queue([]string{"e3ca8ceb-c54d-4396-946d-59cc16682a31"},
		"498ad163-5ff1-4637-9cd3-6b3a1889d15b", "d8a8df6b-d207-4f43-8729-c46e6527f7e6"),
	"47": interrupt,
	"48": interrupt,
	"49": history(historyInterrupted("2", "SaveImageWebsocket")),
	"50": history(historyNil),
	"51": submitOK(19),
	"52": history(historySuccess(19, image("99", "ComfyUI_temp_kyhev_00001_.png", "temp"))),
	"53": submitOK(20),
	"54": interrupt,
	"55": history(historyInterrupted("11", "ImageScale")),
	"56": func(t *testing.T, ctx context.Context, c *Client, rp *replay, e *exchange) {
		png, err := os.ReadFile(filepath.Join(transcripts, "15_get_view_output.bin"))
		if err != nil {
			t.Fatal(err)
		}
		f, err := c.UploadImage(ctx, "acceptance_upload.png", png, true)
		if err != nil || f != (FileRef{Filename: "acceptance_upload.png", Type: "input"}) {
			t.Fatalf("UploadImage = %+v, %v", f, err)
		}
		reqs := rp.recorded("POST", "/upload/image")
		_, params, err := mime.ParseMediaType(reqs[0].Header.Get("Content-Type"))
		if err != nil {
			t.Fatal(err)
		}
		form, err := multipart.NewReader(bytes.NewReader(reqs[0].Body), params["boundary"]).ReadForm(10 << 20)
		if err != nil {
			t.Fatal(err)
		}
		if form.Value["type"][0] != "input" || form.Value["overwrite"][0] != "true" || len(form.File["image"]) != 1 {
			t.Fatalf("form %+v", form)
		}
		fh := form.File["image"][0]
		if fh.Filename != "acceptance_upload.png" || fh.Size != 1199 || fh.Header.Get("Content-Type") != "image/png" {
			t.Errorf("file part %s %d %s", fh.Filename, fh.Size, fh.Header.Get("Content-Type"))
		}
	},
	"57": objectInfo("LoadImage", "LoadImage"),
	"58": submitOK(21),
	"59": history(historySuccess(21, image("3", "acceptance_loaded_00001_.png", "output"))),
	"60": rejected("prompt_outputs_failed_validation", "Prompt outputs failed validation", map[string][2]string{
		"1": {"LoadImage", "custom_validation_failed"}}),
	"61": func(t *testing.T, ctx context.Context, c *Client, rp *replay, e *exchange) {
		h, err := c.RecentHistory(ctx, 2)
		if err != nil || len(h) != 2 {
			t.Fatalf("RecentHistory = %v, %v", h, err)
		}
		if h[0].Number != 20 || !errors.Is(h[0].Err(), ErrInterrupted) || h[1].Number != 21 || h[1].Err() != nil ||
			!reflect.DeepEqual(h[1].Outputs, []Output{image("3", "acceptance_loaded_00001_.png", "output")}) {
			t.Errorf("entries %+v %+v", h[0], h[1])
		}
	},
	"62": func(t *testing.T, ctx context.Context, c *Client, rp *replay, e *exchange) {
		if err := c.DeleteHistory(ctx, "64b3c111-b84b-4bdf-bc3c-413c8557e059"); err != nil {
			t.Fatal(err)
		}
		postedJSON(t, rp, "/history", recordedBody(e))
	},
	"63": history(historyNil),
	"64": history(historyNil),
	"65": func(t *testing.T, ctx context.Context, c *Client, rp *replay, e *exchange) {
		if err := c.Free(ctx); err != nil {
			t.Fatal(err)
		}
		postedJSON(t, rp, "/free", recordedBody(e))
	},
}

// TestHTTPTranscripts runs the client method matching every HTTP transcript
// against a replay of its recorded response.
func TestHTTPTranscripts(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join(transcripts, "[0-9][0-9]_*.json"))
	if len(files) != 65 || len(httpCases) != 65 {
		t.Fatalf("%d transcripts, %d cases; want 65", len(files), len(httpCases))
	}
	for _, path := range files {
		name := strings.TrimSuffix(filepath.Base(path), ".json")
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			check := httpCases[name[:2]]
			if check == nil {
				t.Fatal("no test case")
			}
			e := loadExchange(t, name)
			rp := newReplay(t)
			rp.serve(e)
			check(t, testContext(t), newTestClient(t, rp), rp, e)
			for _, r := range rp.allRequests() {
				if o := r.Header.Get("Origin"); o != "" {
					t.Errorf("%s %s sent Origin %q", r.Method, r.Path, o)
				}
			}
		})
	}
}
