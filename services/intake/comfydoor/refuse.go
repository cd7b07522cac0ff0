package comfydoor

import (
	"errors"
	"net/http"
	"slices"
	"strings"

	"github.com/danielgtaylor/huma/v2"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// graphLocation is where the intake's errors about a prompt's graph point.
const graphLocation = "body.scenes[0].graph"

// refuse answers a prompt the fleet did not take, in ComfyUI's terms: the intake's
// validation errors (422) as a 400 {"error", "node_errors"}, a prompt_id sent before
// with another graph as ComfyUI's 409, anything else as its status.
func (d *Door) refuse(w http.ResponseWriter, err error, promptID string, g fleet.Graph, outputs []string) {
	var model *huma.ErrorModel
	if !errors.As(err, &model) {
		d.log.Error("submit prompt", "prompt_id", promptID, "err", err)
		writeServerError(w)
		return
	}
	switch model.Status {
	case http.StatusUnprocessableEntity:
		writeJSON(w, http.StatusBadRequest, rejection(model.Errors, g, outputs))
	case http.StatusConflict:
		writeJSON(w, http.StatusConflict, object{
			{"error", promptError("duplicate_prompt_id", "Prompt ID already exists", "Prompt "+promptID+" was sent before with another prompt")},
			{"node_errors", object{}},
		})
	default:
		if model.Status >= 500 {
			d.log.Warn("submit prompt", "prompt_id", promptID, "err", err)
		}
		writeText(w, model.Status, model.Detail)
	}
}

// rejection turns the intake's errors about a prompt into ComfyUI's 400 body: errors
// at a node of the graph become that node's node_errors, like the custom validations
// of ComfyUI's nodes; the others the top error.
func rejection(details []*huma.ErrorDetail, g fleet.Graph, outputs []string) object {
	ids := make([]string, 0, len(g))
	for id := range g {
		ids = append(ids, id)
	}
	// The longest id first, so that "1.5" is not taken for node "1".
	slices.SortFunc(ids, func(a, b string) int { return len(b) - len(a) })
	nodeErrors := object{}
	var top object
	for _, dt := range details {
		rest, inGraph := strings.CutPrefix(dt.Location, graphLocation+".")
		node := ""
		if inGraph {
			for _, id := range ids {
				if rest == id || strings.HasPrefix(rest, id+".") {
					node, rest = id, strings.TrimPrefix(strings.TrimPrefix(rest, id), ".")
					break
				}
			}
		}
		msg := strings.TrimPrefix(dt.Message, "is not a ComfyUI API-format graph: ")
		switch {
		case node != "" && strings.Contains(msg, "has no class_type"):
			top = promptError("invalid_prompt", "Cannot execute because a node is missing the class_type property.", "Node ID '#"+node+"'")
		case node != "":
			nodeErrors = addNodeError(nodeErrors, node, classOf(g, node), outputs, nodeError(rest, msg))
		case strings.Contains(msg, "Prompt has no outputs"):
			top = promptError("prompt_no_outputs", "Prompt has no outputs", "")
		case top == nil:
			top = promptError("invalid_prompt", msg, strings.TrimPrefix(dt.Location, "body."))
		}
	}
	if top == nil || len(nodeErrors) > 0 {
		top = promptError("prompt_outputs_failed_validation", "Prompt outputs failed validation", "")
	}
	if top[0].V == "invalid_prompt" || top[0].V == "prompt_no_outputs" {
		nodeErrors = object{}
	}
	return object{{"error", top}, {"node_errors", nodeErrors}}
}

// nodeError is one error of a node, at its input (rest is "inputs.<name>") or the
// node as a whole, in the shape of ComfyUI's custom validation errors.
func nodeError(rest, msg string) object {
	input, atInput := strings.CutPrefix(rest, "inputs.")
	details, extra := msg, object{}
	if atInput {
		details = input + " - " + msg
		extra = object{{"input_name", input}}
	}
	return object{{"type", "custom_validation_failed"}, {"message", "Custom validation failed for node"}, {"details", details}, {"extra_info", extra}}
}

// addNodeError adds an error to node's entry of node_errors.
func addNodeError(nodeErrors object, node, class string, outputs []string, e object) object {
	for i := range nodeErrors {
		if nodeErrors[i].K == node {
			entry := nodeErrors[i].V.(object)
			entry[0].V = append(entry[0].V.([]object), e)
			return nodeErrors
		}
	}
	dependent := slices.Clone(outputs)
	if dependent == nil {
		dependent = []string{}
	}
	return append(nodeErrors, field{node, object{{"errors", []object{e}}, {"dependent_outputs", dependent}, {"class_type", class}}})
}
