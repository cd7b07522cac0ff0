package comfy

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sort"
	"strings"
)

// ErrInterrupted reports that a prompt was interrupted on the server
// (execution_interrupted). Errors returned for interrupted prompts are
// *InterruptedError values that match it with errors.Is. It is transient: the
// prompt did not fail on its own.
var ErrInterrupted = errors.New("comfy: prompt interrupted")

// ErrPromptExists reports that the server refused a client-supplied prompt_id
// because a prompt with that id already exists (HTTP 409 from newer servers).
// The prompt was not queued again; look it up with History, Queue or Await.
var ErrPromptExists = errors.New("comfy: prompt id already exists")

// ErrPromptLost reports that a submitted prompt is neither queued nor recorded
// in history, typically because the server restarted (both live in memory) or
// someone deleted it from the queue. It is transient.
var ErrPromptLost = errors.New("comfy: prompt not found in queue or history")

// ErrClientClosed reports a Run or Await on a Client after Close.
var ErrClientClosed = errors.New("comfy: client closed")

// RejectedError is the server's validation failure for POST /prompt (HTTP 400).
// Type is error.type: "invalid_prompt", "prompt_outputs_failed_validation",
// "prompt_no_outputs", "no_prompt", ... It is permanent: the same graph will
// be rejected again.
type RejectedError struct {
	Type       string
	Message    string
	Details    string
	NodeErrors map[string]NodeError
}

// NodeError lists the validation errors of one node of a rejected prompt.
type NodeError struct {
	ClassType        string            `json:"class_type"`
	Errors           []ValidationError `json:"errors"`
	DependentOutputs []string          `json:"dependent_outputs"`
}

// ValidationError is one entry of NodeError.Errors, e.g. Type
// "value_bigger_than_max", Message "Value 999999 bigger than max of 16384",
// Details "width". ExtraInfo holds input_name, input_config, received_value,
// and for exception_during_inner_validation a traceback.
type ValidationError struct {
	Type      string         `json:"type"`
	Message   string         `json:"message"`
	Details   string         `json:"details"`
	ExtraInfo map[string]any `json:"extra_info,omitempty"`
}

// Error summarises the rejection and every node error, ordered by node id.
func (e *RejectedError) Error() string {
	var b strings.Builder
	b.WriteString("prompt rejected")
	if e.Type != "" {
		b.WriteString(": " + e.Type)
	}
	if e.Message != "" {
		b.WriteString(": " + e.Message)
	}
	if e.Details != "" {
		b.WriteString(" (" + e.Details + ")")
	}
	ids := make([]string, 0, len(e.NodeErrors))
	for id := range e.NodeErrors {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return lessNodeID(ids[i], ids[j]) })
	for _, id := range ids {
		ne := e.NodeErrors[id]
		for _, ve := range ne.Errors {
			fmt.Fprintf(&b, "; node %s (%s): %s", id, ne.ClassType, ve.Message)
			if ve.Details != "" {
				b.WriteString(": " + ve.Details)
			}
		}
	}
	return b.String()
}

// ExecutionError is a node failure while the prompt ran (execution_error on the
// websocket or in history). It is permanent unless OutOfMemory reports true.
type ExecutionError struct {
	PromptID         string   `json:"prompt_id"`
	NodeID           string   `json:"node_id"`
	NodeType         string   `json:"node_type"`
	ExceptionType    string   `json:"exception_type"`
	ExceptionMessage string   `json:"exception_message"`
	Traceback        []string `json:"traceback"`
	Executed         []string `json:"executed"`
}

// Error names the prompt, the failing node and the exception.
func (e *ExecutionError) Error() string {
	return fmt.Sprintf("comfy: prompt %s failed in node %s (%s): %s: %s",
		e.PromptID, e.NodeID, e.NodeType, e.ExceptionType, strings.TrimSpace(e.ExceptionMessage))
}

// OutOfMemory reports whether the failure was the device running out of
// memory (torch.OutOfMemoryError, torch.cuda.OutOfMemoryError, "out of
// memory"), which usually succeeds on a retry after POST /free.
func (e *ExecutionError) OutOfMemory() bool {
	return strings.Contains(e.ExceptionType, "OutOfMemoryError") ||
		strings.Contains(strings.ToLower(e.ExceptionMessage), "out of memory")
}

// InterruptedError is the error returned for a prompt that was interrupted
// (execution_interrupted). It matches ErrInterrupted with errors.Is.
type InterruptedError struct {
	PromptID string   `json:"prompt_id"`
	NodeID   string   `json:"node_id"`
	NodeType string   `json:"node_type"`
	Executed []string `json:"executed"`
}

// Error names the prompt and the node it was interrupted in.
func (e *InterruptedError) Error() string {
	if e.NodeID == "" {
		return fmt.Sprintf("comfy: prompt %s interrupted", e.PromptID)
	}
	return fmt.Sprintf("comfy: prompt %s interrupted in node %s (%s)", e.PromptID, e.NodeID, e.NodeType)
}

// Is makes errors.Is(err, ErrInterrupted) true.
func (e *InterruptedError) Is(target error) bool { return target == ErrInterrupted }

// HTTPError is an unexpected HTTP status from the server. Op names the call
// ("submit prompt", "view", ...); Body holds the start of the response body.
// 5xx, 408, 409 and 429 are transient, other 4xx permanent.
type HTTPError struct {
	Op         string
	StatusCode int
	Body       string
}

// Error gives the status and the start of the body; the caller's wrapping names the call.
func (e *HTTPError) Error() string {
	msg := fmt.Sprintf("unexpected HTTP status %d %s", e.StatusCode, http.StatusText(e.StatusCode))
	if body := strings.TrimSpace(e.Body); body != "" {
		msg += ": " + body
	}
	return msg
}

// Permanent reports whether retrying the same request cannot succeed.
func (e *HTTPError) Permanent() bool {
	switch e.StatusCode {
	case http.StatusRequestTimeout, http.StatusConflict, http.StatusTooManyRequests:
		return false
	}
	return e.StatusCode >= 400 && e.StatusCode < 500
}

// IsPermanent reports whether err is a failure that retrying the same prompt
// cannot fix: a rejected prompt, a node failure other than out of memory, or a
// 4xx status other than 408/409/429. Transport errors, 5xx, out of memory,
// interruption, lost prompts and context errors are not permanent.
func IsPermanent(err error) bool {
	if err == nil ||
		errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) ||
		errors.Is(err, ErrInterrupted) || errors.Is(err, ErrPromptExists) || errors.Is(err, ErrPromptLost) {
		return false
	}
	if _, ok := errors.AsType[*RejectedError](err); ok {
		return true
	}
	if ee, ok := errors.AsType[*ExecutionError](err); ok {
		return !ee.OutOfMemory()
	}
	if he, ok := errors.AsType[*HTTPError](err); ok {
		return he.Permanent()
	}
	return false
}
