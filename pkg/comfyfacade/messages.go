// Package comfyfacade speaks ComfyUI's own API on behalf of the fleet: it turns the
// events of a prompt's scene (every /comfy/ prompt is a one-scene job) into the
// websocket messages a ComfyUI server sends, byte for byte in ComfyUI's format.
package comfyfacade

import (
	"cmp"
	"maps"
	"slices"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
)

// Message is one websocket text message: {"type": …, "data": …}.
type Message struct {
	Type string `json:"type"`
	Data any    `json:"data"`
}

// Frame is the message as ComfyUI writes it (Python's json.dumps).
func (m Message) Frame() ([]byte, error) { return pyjson.Marshal(m) }

type execInfo struct {
	QueueRemaining int `json:"queue_remaining"`
}

type statusBody struct {
	ExecInfo execInfo `json:"exec_info"`
}

type statusData struct {
	Status statusBody `json:"status"`
}

type statusHello struct {
	Status statusBody `json:"status"`
	SID    string     `json:"sid"`
}

// Status is the message ComfyUI broadcasts to every socket when its queue changes:
// queueRemaining counts the prompts running and waiting.
func Status(queueRemaining int) Message {
	return Message{Type: "status", Data: statusData{statusBody{execInfo{queueRemaining}}}}
}

// Hello is the first message on a new socket, naming its client id.
func Hello(queueRemaining int, sid string) Message {
	return Message{Type: "status", Data: statusHello{statusBody{execInfo{queueRemaining}}, sid}}
}

type stamped struct {
	PromptID  string `json:"prompt_id"`
	Timestamp int64  `json:"timestamp"`
}

type cached struct {
	Nodes     []string `json:"nodes"`
	PromptID  string   `json:"prompt_id"`
	Timestamp int64    `json:"timestamp"`
}

type executing struct {
	Node        string `json:"node"`
	DisplayNode string `json:"display_node"`
	PromptID    string `json:"prompt_id"`
}

type finished struct {
	Node     *string `json:"node"`
	PromptID string  `json:"prompt_id"`
}

type progress struct {
	Value    int    `json:"value"`
	Max      int    `json:"max"`
	PromptID string `json:"prompt_id"`
	Node     string `json:"node"`
}

// File is an output file as ComfyUI's messages and history name it; /view takes the
// same three fields back.
type File struct {
	Filename  string `json:"filename"`
	Subfolder string `json:"subfolder"`
	Type      string `json:"type"`
}

type executed struct {
	Node        string            `json:"node"`
	DisplayNode string            `json:"display_node"`
	Output      map[string][]File `json:"output"`
	PromptID    string            `json:"prompt_id"`
}

type executionError struct {
	PromptID         string         `json:"prompt_id"`
	NodeID           string         `json:"node_id"`
	NodeType         string         `json:"node_type"`
	Executed         []string       `json:"executed"`
	ExceptionMessage string         `json:"exception_message"`
	ExceptionType    string         `json:"exception_type"`
	Traceback        []string       `json:"traceback"`
	CurrentInputs    map[string]any `json:"current_inputs"`
	CurrentOutputs   map[string]any `json:"current_outputs"`
	Timestamp        int64          `json:"timestamp"`
}

type interrupted struct {
	PromptID  string   `json:"prompt_id"`
	NodeID    string   `json:"node_id"`
	NodeType  string   `json:"node_type"`
	Executed  []string `json:"executed"`
	Timestamp int64    `json:"timestamp"`
}

// Prompt follows one prompt of a client and turns its scene's events into the
// messages ComfyUI would send on that client's socket. It is a pure fold: Apply does
// no I/O, so the same events always give the same messages. It is not safe for
// concurrent use.
type Prompt struct {
	// ID is the prompt's prompt_id.
	ID string
	// Classes are the graph's class types by node id, to name the failing node's.
	Classes map[string]string
	// Subfolder is what output files name as their subfolder, so that /view finds
	// them: the facade gives the job id.
	Subfolder string

	started bool
	ended   bool
	node    string
	ran     []string
}

// ExceptionType is the exception_type of a scene the fleet failed: a ComfyUI client
// prints the message, which holds the node's own error.
const ExceptionType = "comfyfleet.SceneFailed"

// Apply returns the messages that ev makes ComfyUI send, with queueRemaining the
// prompts of the facade still running or waiting after it. Events of a retried
// attempt continue the same prompt: only the first start is announced.
func (p *Prompt) Apply(ev fleet.SceneEvent, queueRemaining int) []Message {
	if p.ended {
		return nil
	}
	at := ev.Time.UnixMilli()
	switch ev.Type {
	case fleet.EventQueued:
		return []Message{Status(queueRemaining)}
	case fleet.EventStarted:
		if p.started {
			return nil
		}
		p.started = true
		return []Message{
			Status(queueRemaining),
			{Type: "execution_start", Data: stamped{p.ID, at}},
			{Type: "execution_cached", Data: cached{[]string{}, p.ID, at}},
		}
	case fleet.EventProgress:
		if ev.Progress == nil || ev.Progress.Max <= 0 {
			return nil
		}
		var out []Message
		if n := ev.Progress.Node; n != "" && n != p.node {
			if p.node != "" {
				p.ran = append(p.ran, p.node)
			}
			p.node = n
			out = append(out, Message{Type: "executing", Data: executing{n, n, p.ID}})
		}
		return append(out, Message{Type: "progress", Data: progress{ev.Progress.Value - 1, ev.Progress.Max, p.ID, ev.Progress.Node}})
	case fleet.EventCompleted:
		p.ended = true
		out := p.executed(ev.Outputs)
		out = append(out, Message{Type: "execution_success", Data: stamped{p.ID, at}})
		return append(out, p.end(queueRemaining)...)
	case fleet.EventFailed:
		p.ended = true
		out := []Message{{Type: "execution_error", Data: executionError{
			PromptID: p.ID, NodeID: p.node, NodeType: p.Classes[p.node], Executed: p.executedNodes(),
			ExceptionMessage: ev.Error, ExceptionType: ExceptionType, Traceback: []string{},
			CurrentInputs: map[string]any{}, CurrentOutputs: map[string]any{}, Timestamp: at,
		}}}
		return append(out, p.end(queueRemaining)...)
	case fleet.EventCancelled:
		p.ended = true
		out := []Message{{Type: "execution_interrupted", Data: interrupted{p.ID, p.node, p.Classes[p.node], p.executedNodes(), at}}}
		return append(out, p.end(queueRemaining)...)
	}
	return nil
}

func (p *Prompt) executedNodes() []string {
	return append([]string{}, p.ran...)
}

// end is what closes every prompt: the queue, then the end marker.
func (p *Prompt) end(queueRemaining int) []Message {
	return []Message{Status(queueRemaining), {Type: "executing", Data: finished{nil, p.ID}}}
}

// executed announces each output node's files, in node order.
func (p *Prompt) executed(outs []fleet.Output) []Message {
	nodes, byNode := Outputs(outs, p.Subfolder)
	var out []Message
	for _, node := range nodes {
		out = append(out, Message{Type: "executed", Data: executed{node, node, byNode[node], p.ID}})
	}
	return out
}

// Outputs groups a scene's output files as ComfyUI's executed messages and history
// show them: by graph node, then by output key ("images", "gifs", …), each file in
// subfolder with type "output". nodes lists the nodes in order.
func Outputs(outs []fleet.Output, subfolder string) (nodes []string, byNode map[string]map[string][]File) {
	byNode = map[string]map[string][]File{}
	for _, o := range outs {
		kind := cmp.Or(o.Kind, "images")
		if byNode[o.NodeID] == nil {
			byNode[o.NodeID] = map[string][]File{}
		}
		byNode[o.NodeID][kind] = append(byNode[o.NodeID][kind], File{Filename: o.Name, Subfolder: subfolder, Type: "output"})
	}
	return slices.Sorted(maps.Keys(byNode)), byNode
}
