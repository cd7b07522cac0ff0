package comfysim

import (
	"encoding/json"
	"errors"
	"fmt"

	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
)

// Validator checks prompts the way a ComfyUI server whose GET /object_info gives a
// certain answer checks POST /prompt: the same rules as the simulator's own, and the
// same errors, in ComfyUI's words and order. A front end that speaks ComfyUI's API
// for other servers uses it to refuse a prompt as they would.
type Validator struct {
	classes *classTable
}

// NewValidator returns the validator of a server whose /object_info answer is
// objectInfo: class name to definition.
func NewValidator(objectInfo []byte) (*Validator, error) {
	t, err := loadClasses(objectInfo)
	if err != nil {
		return nil, fmt.Errorf("comfysim: object_info: %w", err)
	}
	return &Validator{classes: t}, nil
}

// ErrMalformedPrompt is what Validate returns for a prompt that is not an object of
// objects: ComfyUI answers 500 to it.
var ErrMalformedPrompt = errors.New("comfysim: malformed prompt")

// Verdict is the outcome of validating a prompt.
type Verdict struct {
	// OK reports whether the server would queue the prompt.
	OK bool
	// Error is the "error" member of the 400 answer when the prompt is refused,
	// as json.dumps writes it.
	Error []byte
	// NodeErrors is the "node_errors" member, of the 400 answer or of the 200 one
	// (outputs that failed while others passed), as json.dumps writes it.
	NodeErrors []byte
	// Outputs are the output nodes that would run, in ComfyUI's order.
	Outputs []string
}

// Validate checks prompt, the "prompt" member of a POST /prompt body. inputFile
// reports whether LoadImage may load the file its image input names (an uploaded
// file, or one in the server's input folder).
func (v *Validator) Validate(prompt json.RawMessage, inputFile func(name string) bool) (Verdict, error) {
	g, err := parseGraph(prompt, v.classes)
	if err != nil {
		return Verdict{}, fmt.Errorf("%w: %v", ErrMalformedPrompt, err)
	}
	res := validatePrompt(g, nil, inputFile)
	nodeErrors := res.nodeErrors
	if nodeErrors == nil {
		nodeErrors = obj{}
	}
	out := Verdict{OK: res.ok, Outputs: res.outputs}
	if out.NodeErrors, err = pyjson.Marshal(nodeErrors); err != nil {
		return Verdict{}, fmt.Errorf("comfysim: encode node errors: %w", err)
	}
	if !res.ok {
		if out.Error, err = pyjson.Marshal(res.err); err != nil {
			return Verdict{}, fmt.Errorf("comfysim: encode error: %w", err)
		}
	}
	return out, nil
}
