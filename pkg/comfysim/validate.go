package comfysim

import (
	"bytes"
	"encoding/json"
	"strconv"
	"strings"

	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
)

// This file mirrors ComfyUI's validate_prompt and validate_inputs,
// including the shapes, wording and ordering of their errors, and the
// way an exception inside one node's validation is reported on that node
// with the input details of the node that linked to it.

// promptError is the "error" member of a 400 answer to POST /prompt.
func promptError(typ, message, details string) obj {
	return obj{{"type", typ}, {"message", message}, {"details", details}, {"extra_info", obj{}}}
}

// nodeError is one entry of "node_errors".
type nodeError struct {
	errors    []obj
	dependent []string
	classType string
}

// MarshalJSON writes the entry as the real server orders it.
func (e *nodeError) MarshalJSON() ([]byte, error) {
	return obj{{"errors", e.errors}, {"dependent_outputs", e.dependent}, {"class_type", e.classType}}.MarshalJSON()
}

// validation is the outcome of validating a prompt.
type validation struct {
	ok bool
	// err is the top-level error when !ok.
	err        obj
	outputs    []string
	nodeErrors obj
}

// pyException is a Python exception escaping validate_inputs.
type pyException struct {
	Type    string
	Message string
	// frame is where it was raised; the catcher adds its own frame.
	frame string
}

var (
	frameKeyError = markedFrame("execution.py", 788, "validate_inputs",
		"o_class_type = prompt[o_id]['class_type']", "prompt[o_id]", "~~~~~~^^^^^^")
	frameIndexError = markedFrame("execution.py", 790, "validate_inputs",
		"received_type = r[val[1]]", "r[val[1]]", "~^^^^^^^^")
	frameInner = markedFrame("execution.py", 808, "validate_inputs",
		"r = await validate_inputs(prompt_id, prompt, o_id, validated)", "await validate_inputs(prompt_id, prompt, o_id, validated)", "")
	frameOuter = markedFrame("execution.py", 1012, "validate_prompt",
		"m = await validate_inputs(prompt_id, prompt, o, validated)", "await validate_inputs(prompt_id, prompt, o, validated)", "")
)

type vresult struct {
	ok     bool
	errors []obj
}

type validator struct {
	g       *graph
	exists  func(annotated string) bool
	order   []string
	results map[string]vresult
	active  map[string]bool
}

func (v *validator) record(id string, r vresult) {
	if _, seen := v.results[id]; !seen {
		v.order = append(v.order, id)
	}
	v.results[id] = r
}

// validatePrompt checks a parsed prompt. exists reports whether an input
// file (LoadImage's "image") is present.
func validatePrompt(g *graph, targets []string, exists func(string) bool) validation {
	for _, n := range g.nodes {
		if !n.HasClass {
			return validation{err: promptError("invalid_prompt",
				"Cannot execute because a node is missing the class_type property.", "Node ID '#"+n.ID+"'")}
		}
		if n.class == nil {
			return validation{err: promptError("invalid_prompt",
				"Cannot execute because node "+n.ClassType+" does not exist.", "Node ID '#"+n.ID+"'")}
		}
	}
	var outputs []string
	if len(targets) > 0 {
		for _, t := range targets {
			if _, ok := g.byID[t]; ok && !contains(outputs, t) {
				outputs = append(outputs, t)
			}
		}
	} else {
		for _, n := range g.nodes {
			if n.class.OutputNode {
				outputs = append(outputs, n.ID)
			}
		}
	}
	if len(outputs) == 0 {
		return validation{err: promptError("prompt_no_outputs", "Prompt has no outputs", "")}
	}

	v := &validator{g: g, exists: exists, results: map[string]vresult{}, active: map[string]bool{}}
	nodeErrors := obj{}
	var good []string
	for _, o := range outputs {
		r, exc := v.validate(o)
		if exc != nil {
			r = vresult{errors: []obj{{
				{"type", "exception_during_validation"},
				{"message", "Exception when validating node"},
				{"details", exc.Message},
				{"extra_info", obj{{"exception_type", exc.Type}, {"traceback", []string{frameOuter, exc.frame}}}},
			}}}
			v.record(o, r)
		}
		if r.ok {
			good = append(good, o)
			continue
		}
		// Like the real server, every failed node seen so far is charged
		// to this output, whichever output reached it first.
		for _, id := range v.order {
			res := v.results[id]
			if res.ok || len(res.errors) == 0 {
				continue
			}
			e, seen := nodeErrors.get(id)
			if !seen {
				e = &nodeError{errors: res.errors, dependent: []string{}, classType: g.byID[id].ClassType}
				nodeErrors = nodeErrors.set(id, e)
			}
			ne := e.(*nodeError)
			ne.dependent = append(ne.dependent, o)
		}
	}
	if len(good) == 0 {
		return validation{
			err:        promptError("prompt_outputs_failed_validation", "Prompt outputs failed validation", ""),
			nodeErrors: nodeErrors,
		}
	}
	return validation{ok: true, outputs: good, nodeErrors: nodeErrors}
}

// validate is validate_inputs for one node. An exception it raises is
// returned, not recorded: the caller records it.
func (v *validator) validate(id string) (vresult, *pyException) {
	if r, ok := v.results[id]; ok {
		return r, nil
	}
	n := v.g.byID[id]
	c := n.class
	v.active[id] = true
	defer delete(v.active, id)

	var errs []obj
	valid := true
	for i := range c.Inputs {
		in := &c.Inputs[i]
		raw, present := n.input(in.Name)
		if !present {
			if in.Required {
				errs = append(errs, obj{
					{"type", "required_input_missing"},
					{"message", "Required input is missing"},
					{"details", in.Name},
					{"extra_info", obj{{"input_name", in.Name}}},
				})
			}
			continue
		}
		if parts, isList := pyjson.ParseArray(raw); isList {
			e, exc, ok := v.validateLink(n, in, raw, parts)
			if exc != nil {
				return vresult{}, exc
			}
			if e != nil {
				errs = append(errs, e)
			}
			if !ok {
				valid = false
			}
			continue
		}
		if e := validateWidget(c, in, raw); e != nil {
			errs = append(errs, e)
		}
	}
	if c.Name == "LoadImage" {
		if raw, ok := n.input("image"); ok && pyjson.Kind(raw) != '[' {
			image := pyStr(raw)
			if !v.exists(image) {
				errs = append(errs, obj{
					{"type", "custom_validation_failed"},
					{"message", "Custom validation failed for node"},
					{"details", "image - Invalid image file: " + image},
					{"extra_info", obj{{"input_name", "image"}}},
				})
			}
		}
	}
	r := vresult{ok: valid && len(errs) == 0, errors: errs}
	v.record(id, r)
	return r, nil
}

// validateLink checks a linked input and validates the node it links to.
// It returns an error entry for this node, an exception raised here, and
// whether the upstream node is valid.
func (v *validator) validateLink(n *promptNode, in *inputSpec, raw json.RawMessage, parts []json.RawMessage) (obj, *pyException, bool) {
	if len(parts) != 2 {
		return obj{
			{"type", "bad_linked_input"},
			{"message", "Bad linked input, must be a length-2 list of [node_id, slot_index]"},
			{"details", in.Name},
			{"extra_info", obj{{"input_name", in.Name}, {"input_config", in.config()}, {"received_value", raw}}},
		}, nil, true
	}
	srcID, isStr := jsonString(parts[0])
	src, found := v.g.byID[srcID]
	if !isStr || !found {
		msg := pyStr(parts[0])
		if isStr {
			msg = pyRepr(srcID)
		}
		return nil, &pyException{Type: "KeyError", Message: msg, frame: frameKeyError}, true
	}
	received, exc := outputType(src.class, parts[1])
	if exc != nil {
		return nil, exc, true
	}
	if !in.isCombo() && !typesMatch(received, in.Type) {
		return obj{
			{"type", "return_type_mismatch"},
			{"message", "Return type mismatch between linked nodes"},
			{"details", in.Name + ", received_type(" + received + ") mismatch input_type(" + in.Type + ")"},
			{"extra_info", obj{{"input_name", in.Name}, {"input_config", in.config()}, {"received_type", received}, {"linked_node", raw}}},
		}, nil, true
	}
	if v.active[src.ID] {
		return obj{
			{"type", "dependency_cycle"},
			{"message", "Dependency cycle detected"},
			{"details", "Node " + n.ID + " and node " + src.ID + " depend on each other"},
			{"extra_info", obj{{"input_name", in.Name}, {"linked_node", raw}}},
		}, nil, true
	}
	r, exc := v.validate(src.ID)
	if exc != nil {
		v.record(src.ID, vresult{errors: []obj{{
			{"type", "exception_during_inner_validation"},
			{"message", "Exception when validating inner node"},
			{"details", exc.Message},
			{"extra_info", obj{
				{"input_name", in.Name},
				{"input_config", in.config()},
				{"exception_message", exc.Message},
				{"exception_type", exc.Type},
				{"traceback", []string{frameInner, exc.frame}},
				{"linked_node", raw},
			}},
		}}})
		return nil, nil, false
	}
	return nil, nil, r.ok
}

// outputType indexes RETURN_TYPES with a link's slot, as Python would.
func outputType(c *nodeClass, slotRaw json.RawMessage) (string, *pyException) {
	var slot int
	switch pyjson.Kind(slotRaw) {
	case 't':
		slot = 1
	case 'f':
		slot = 0
	case '0':
		s := string(bytes.TrimSpace(slotRaw))
		i, err := strconv.Atoi(s)
		if err != nil {
			return "", &pyException{Type: "TypeError", Message: "tuple indices must be integers or slices, not " + pyTypeName(slotRaw), frame: frameIndexError}
		}
		slot = i
	default:
		return "", &pyException{Type: "TypeError", Message: "tuple indices must be integers or slices, not " + pyTypeName(slotRaw), frame: frameIndexError}
	}
	if slot < 0 {
		slot += len(c.Outputs)
	}
	if slot < 0 || slot >= len(c.Outputs) {
		return "", &pyException{Type: "IndexError", Message: "tuple index out of range", frame: frameIndexError}
	}
	return c.Outputs[slot], nil
}

// typesMatch is validate_node_input: equal, a wildcard, or sharing one
// of their comma-separated alternatives.
func typesMatch(received, want string) bool {
	if received == want || received == "*" || want == "*" {
		return true
	}
	have := map[string]bool{}
	for _, t := range strings.Split(received, ",") {
		have[strings.TrimSpace(t)] = true
	}
	for _, t := range strings.Split(want, ",") {
		if have[strings.TrimSpace(t)] {
			return true
		}
	}
	return false
}

// validateWidget checks a literal input value: conversion, bounds, and
// membership of a combo.
func validateWidget(c *nodeClass, in *inputSpec, raw json.RawMessage) obj {
	val, convErr := convertWidget(in.Type, raw)
	if convErr != "" {
		return obj{
			{"type", "invalid_input_type"},
			{"message", "Failed to convert an input value to a " + in.Type + " value"},
			{"details", in.Name + ", " + pyStr(raw) + ", " + convErr},
			{"extra_info", obj{{"input_name", in.Name}, {"input_config", in.config()}, {"received_value", raw}, {"exception_message", convErr}}},
		}
	}
	if val.numeric {
		if lim, ok := in.option("min"); ok && val.cmp(lim) < 0 {
			return boundError("value_smaller_than_min", "Value "+val.str()+" smaller than min of "+pyStr(lim), in, val)
		}
		if lim, ok := in.option("max"); ok && val.cmp(lim) > 0 {
			return boundError("value_bigger_than_max", "Value "+val.str()+" bigger than max of "+pyStr(lim), in, val)
		}
	}
	if in.isCombo() && !(c.Name == "LoadImage" && in.Name == "image") {
		s, isStr := jsonString(raw)
		if !isStr || !contains(in.Choices, s) {
			listInfo := pyListRepr(in.Choices)
			var config any = in.config()
			if len(in.Choices) > 20 {
				listInfo = "(list of length " + strconv.Itoa(len(in.Choices)) + ")"
				config = nil
			}
			return obj{
				{"type", "value_not_in_list"},
				{"message", "Value not in list"},
				{"details", in.Name + ": '" + pyStr(raw) + "' not in " + listInfo},
				{"extra_info", obj{{"input_name", in.Name}, {"input_config", config}, {"received_value", raw}}},
			}
		}
	}
	return nil
}

func boundError(typ, msg string, in *inputSpec, val widgetValue) obj {
	return obj{
		{"type", typ},
		{"message", msg},
		{"details", in.Name},
		{"extra_info", obj{{"input_name", in.Name}, {"input_config", in.config()}, {"received_value", val.json()}}},
	}
}

func pyListRepr(items []string) string {
	quoted := make([]string, len(items))
	for i, s := range items {
		quoted[i] = pyRepr(s)
	}
	return "[" + strings.Join(quoted, ", ") + "]"
}
