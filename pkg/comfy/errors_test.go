package comfy

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"syscall"
	"testing"
)

func TestIsPermanent(t *testing.T) {
	wrap := func(err error) error { return fmt.Errorf("comfy: something: %w", err) }
	for name, tc := range map[string]struct {
		err  error
		want bool
	}{
		"nil":                {nil, false},
		"canceled":           {context.Canceled, false},
		"deadline wrapped":   {wrap(context.DeadlineExceeded), false},
		"interrupted":        {ErrInterrupted, false},
		"interrupted error":  {wrap(&InterruptedError{PromptID: "p", NodeID: "2"}), false},
		"prompt exists":      {fmt.Errorf("x: %w (%w)", ErrPromptExists, &HTTPError{StatusCode: 409}), false},
		"prompt lost":        {wrap(ErrPromptLost), false},
		"rejected":           {wrap(&RejectedError{Type: "invalid_prompt"}), true},
		"execution error":    {&ExecutionError{ExceptionType: "IndexError"}, true},
		"oom torch":          {&ExecutionError{ExceptionType: "torch.OutOfMemoryError"}, false},
		"oom cuda":           {wrap(&ExecutionError{ExceptionType: "torch.cuda.OutOfMemoryError"}), false},
		"oom message":        {&ExecutionError{ExceptionType: "RuntimeError", ExceptionMessage: "CUDA Out Of Memory. Tried to allocate 20 MiB"}, false},
		"http 400":           {wrap(&HTTPError{StatusCode: 400}), true},
		"http 403":           {&HTTPError{StatusCode: 403}, true},
		"http 404":           {&HTTPError{StatusCode: 404}, true},
		"http 408":           {&HTTPError{StatusCode: 408}, false},
		"http 409":           {&HTTPError{StatusCode: 409}, false},
		"http 429":           {&HTTPError{StatusCode: 429}, false},
		"http 500":           {wrap(&HTTPError{StatusCode: 500}), false},
		"http 503":           {&HTTPError{StatusCode: 503}, false},
		"refused":            {wrap(&net.OpError{Op: "dial", Err: syscall.ECONNREFUSED}), false},
		"reset":              {wrap(syscall.ECONNRESET), false},
		"eof":                {wrap(io.EOF), false},
		"unexpected eof":     {io.ErrUnexpectedEOF, false},
		"plain":              {errors.New("boom"), false},
		"rejected and other": {errors.Join(errors.New("x"), &RejectedError{}), true},
	} {
		if got := IsPermanent(tc.err); got != tc.want {
			t.Errorf("%s: IsPermanent(%v) = %v, want %v", name, tc.err, got, tc.want)
		}
	}
}

func TestTransportErrorsAreTransient(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	c := New("http://"+addr, WithLogger(testLogger(t)))
	ctx := testContext(t)
	if _, err := c.Queue(ctx); err == nil || IsPermanent(err) {
		t.Errorf("Queue on a closed port: %v", err)
	}
	if _, err := c.Run(ctx, Graph{}, "", nil); err == nil || IsPermanent(err) {
		t.Errorf("Run on a closed port: %v", err)
	}
	checkStopped(t, c)
}

func TestContextHonoured(t *testing.T) {
	rp := newReplay(t)
	c := newTestClient(t, rp)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := c.SystemStats(ctx); !errors.Is(err, context.Canceled) {
		t.Errorf("SystemStats: %v", err)
	}
	if _, err := c.Run(ctx, Graph{}, "", nil); !errors.Is(err, context.Canceled) {
		t.Errorf("Run: %v", err)
	}
	if n := len(rp.recorded(http.MethodPost, "/prompt")); n != 0 {
		t.Errorf("prompt posted with a cancelled context")
	}
	checkStopped(t, c)
}

func TestErrorMessages(t *testing.T) {
	rej := &RejectedError{Type: "prompt_outputs_failed_validation", Message: "Prompt outputs failed validation",
		NodeErrors: map[string]NodeError{
			"10": {ClassType: "ImageScale", Errors: []ValidationError{{Message: "Value not in list", Details: "upscale_method: 'sinc'"}}},
			"2":  {ClassType: "ImageInvert", Errors: []ValidationError{{Message: "Required input is missing", Details: "image"}}},
		}}
	want := "prompt rejected: prompt_outputs_failed_validation: Prompt outputs failed validation" +
		"; node 2 (ImageInvert): Required input is missing: image; node 10 (ImageScale): Value not in list: upscale_method: 'sinc'"
	if got := rej.Error(); got != want {
		t.Errorf("RejectedError:\n got %s\nwant %s", got, want)
	}
	ee := &ExecutionError{PromptID: "p", NodeID: "2", NodeType: "ImageToMask", ExceptionType: "IndexError", ExceptionMessage: "index 3 is out of bounds\n"}
	if got := ee.Error(); got != "comfy: prompt p failed in node 2 (ImageToMask): IndexError: index 3 is out of bounds" {
		t.Errorf("ExecutionError: %s", got)
	}
	he := fmt.Errorf("comfy: submit prompt: %w", &HTTPError{Op: "submit prompt", StatusCode: 500, Body: "500 Internal Server Error\n\nServer got itself in trouble"})
	if got := he.Error(); got != "comfy: submit prompt: unexpected HTTP status 500 Internal Server Error: 500 Internal Server Error\n\nServer got itself in trouble" {
		t.Errorf("HTTPError: %q", got)
	}
}

func TestParseRejectionShapes(t *testing.T) {
	if r := parseRejection([]byte(`{"error": "no prompt", "node_errors": []}`)); r == nil || r.Message != "no prompt" || r.NodeErrors != nil {
		t.Errorf("old string error: %+v", r)
	}
	for _, body := range []string{``, `not json`, `{"node_errors": {}}`, `{"error": null}`, `{"error": 42}`} {
		if r := parseRejection([]byte(body)); r != nil {
			t.Errorf("parseRejection(%q) = %+v, want nil", body, r)
		}
	}
}
