// Package workflow turns ComfyUI workflow templates and a scene's named parameters
// into an API-format graph, and checks that a raw graph is one. Templates live in the
// fleet_workflows bucket (Store); every intake mirrors it in a Catalog.
package workflow

import (
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strings"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// Binding names one node input that a parameter sets: Node is the node's id or its
// `_meta.title`.
type Binding = fleet.Binding

// Parameter types.
const (
	TypeString  = "string"
	TypeInteger = "integer"
	TypeNumber  = "number"
	TypeBoolean = "boolean"
	// TypeImage is an input image. A scene gives the image itself in its inputs (the
	// executor uploads it to the node and binds the uploaded file's name), or names a
	// file already in the node's input folder in its params.
	TypeImage = "image"
)

var types = []string{TypeString, TypeInteger, TypeNumber, TypeBoolean, TypeImage}

// Param declares one named parameter of a template.
type Param struct {
	Type        string    `json:"type" enum:"string,integer,number,boolean,image" doc:"Value type. An image is given in a scene's inputs (uploaded to the node before the run), or in its params as the name of a file already on the node."`
	Description string    `json:"description,omitempty"`
	Default     any       `json:"default,omitempty" doc:"Value used when a scene does not set the parameter; it must satisfy the parameter's own bounds. An image parameter without a default must be given."`
	Minimum     *float64  `json:"minimum,omitempty"`
	Maximum     *float64  `json:"maximum,omitempty"`
	MultipleOf  int       `json:"multiple_of,omitempty" minimum:"0"`
	MaxLength   int       `json:"max_length,omitempty" minimum:"0" doc:"Longest string, in bytes."`
	Enum        []any     `json:"enum,omitempty"`
	Bind        []Binding `json:"bind" doc:"The node inputs the value is written to."`
}

// Template is a workflow with named parameters.
type Template struct {
	Name        string `json:"name" required:"false" doc:"Letters, digits, '-' and '_'."`
	Description string `json:"description,omitempty"`
	// Pool is the pool its scenes run in unless a scene names another.
	Pool   string           `json:"pool" required:"false" doc:"Pool its scenes run in unless a scene names another. Defaults to image."`
	Params map[string]Param `json:"params" required:"false"`
	Graph  fleet.Graph      `json:"graph" doc:"ComfyUI API-format graph: node id to {class_type, inputs, _meta}."`
}

// DefaultPool is the pool of scenes that name none.
const DefaultPool = "image"

// ParamError says what is wrong with one parameter.
type ParamError struct {
	Param   string
	Value   any
	Message string
}

func (e *ParamError) Error() string { return fmt.Sprintf("parameter %q: %s", e.Param, e.Message) }

// GraphError says what is wrong with a graph, at one node when Node is set.
type GraphError struct {
	Node    string
	Message string
}

func (e *GraphError) Error() string {
	if e.Node == "" {
		return "graph: " + e.Message
	}
	return fmt.Sprintf("graph node %q: %s", e.Node, e.Message)
}

// FieldError says what is wrong with one field of a template. Field is its path,
// e.g. "params.steps.default" or "params.image.bind[0].node".
type FieldError struct {
	Field   string
	Message string
}

// InvalidError lists every problem of a template.
type InvalidError []FieldError

// Error lists the problems, field by field.
func (e InvalidError) Error() string {
	parts := make([]string, len(e))
	for i, f := range e {
		parts[i] = f.Field + ": " + f.Message
	}
	return "invalid template: " + strings.Join(parts, "; ")
}

// Parse decodes and checks one template; a template that decodes but breaks a rule
// gives an InvalidError.
func Parse(b []byte) (*Template, error) {
	var t Template
	if err := json.Unmarshal(b, &t); err != nil {
		return nil, fmt.Errorf("decode template: %w", err)
	}
	if err := t.Validate(); err != nil {
		return nil, err
	}
	return &t, nil
}

// Validate checks the template and fills in its default pool. It returns an
// InvalidError naming every field that breaks a rule: a bad name or pool, a graph that
// is not an API-format prompt, a parameter of unknown type, bound to no node input or
// to a node the graph lacks, with contradictory bounds, or with a default that breaks
// its own bounds.
func (t *Template) Validate() error {
	var errs InvalidError
	add := func(field, format string, args ...any) {
		errs = append(errs, FieldError{Field: field, Message: fmt.Sprintf(format, args...)})
	}
	if !fleet.ValidToken(t.Name) {
		add("name", "%q: use letters, digits, '-' and '_'", t.Name)
	}
	if t.Pool == "" {
		t.Pool = DefaultPool
	} else if !fleet.ValidToken(t.Pool) {
		add("pool", "%q: use letters, digits, '-' and '_'", t.Pool)
	}
	graphOK := true
	if err := ValidateGraph(t.Graph); err != nil {
		graphOK = false
		field := "graph"
		var ge *GraphError
		if errors.As(err, &ge) && ge.Node != "" {
			field += "." + ge.Node
		}
		add(field, "is not a ComfyUI API-format graph: %s", err)
	}
	for _, name := range t.ParamNames() {
		p := t.Params[name]
		at := "params." + name
		if !fleet.ValidToken(name) {
			add(at, "parameter name: use letters, digits, '-' and '_'")
			continue
		}
		if !slices.Contains(types, p.Type) {
			add(at+".type", "%q: use one of %s", p.Type, strings.Join(types, ", "))
			continue
		}
		if len(p.Bind) == 0 {
			add(at+".bind", "binds to no node input")
		}
		for i, b := range p.Bind {
			if _, ok := t.node(b.Node); graphOK && !ok {
				add(fmt.Sprintf("%s.bind[%d].node", at, i), "%q is neither a node id nor a node title of the graph", b.Node)
			}
			if b.Input == "" {
				add(fmt.Sprintf("%s.bind[%d].input", at, i), "names no input")
			}
		}
		if p.Minimum != nil && p.Maximum != nil && *p.Minimum > *p.Maximum {
			add(at+".minimum", "%v is above the maximum %v", *p.Minimum, *p.Maximum)
		}
		if p.Default != nil {
			if _, err := p.check(name, p.Default); err != nil {
				var pe *ParamError
				if errors.As(err, &pe) {
					err = errors.New(pe.Message)
				}
				add(at+".default", "%s", err)
			}
		}
	}
	if len(errs) > 0 {
		return errs
	}
	return nil
}

// Render returns the template's graph with params bound, and the defaults of the
// parameters that params leaves out. Unknown parameters and values of the wrong type
// or out of bounds are *ParamError. The nodes that a parameter sets are copies; the
// others are the template's own, so the graph is to be read, not changed.
func (t *Template) Render(params map[string]any) (fleet.Graph, error) {
	g := maps.Clone(t.Graph)
	copied := map[string]bool{}
	for _, name := range slices.Sorted(maps.Keys(params)) {
		if _, ok := t.Params[name]; !ok {
			return nil, &ParamError{Param: name, Value: params[name], Message: fmt.Sprintf("unknown; %s takes %s", t.Name, strings.Join(t.ParamNames(), ", "))}
		}
	}
	for _, name := range t.ParamNames() {
		p := t.Params[name]
		v, given := params[name]
		if !given {
			v = p.Default
		}
		if v == nil {
			continue
		}
		v, err := p.check(name, v)
		if err != nil {
			return nil, err
		}
		for _, b := range t.Bindings(name) {
			node := g[b.Node].(map[string]any)
			inputs, _ := node["inputs"].(map[string]any)
			if !copied[b.Node] {
				copied[b.Node] = true
				node, inputs = maps.Clone(node), maps.Clone(inputs)
				g[b.Node] = node
			}
			if inputs == nil {
				inputs = map[string]any{}
			}
			node["inputs"] = inputs
			inputs[b.Input] = v
		}
	}
	return g, nil
}

// Bindings returns the node inputs that parameter name sets, each node named by its
// id.
func (t *Template) Bindings(name string) []Binding {
	p := t.Params[name]
	out := make([]Binding, 0, len(p.Bind))
	for _, b := range p.Bind {
		if id, ok := t.node(b.Node); ok {
			out = append(out, Binding{Node: id, Input: b.Input})
		}
	}
	return out
}

// ParamAt returns the parameter bound to input of the node with id node, if one is.
func (t *Template) ParamAt(node, input string) (string, bool) {
	for _, name := range t.ParamNames() {
		for _, b := range t.Bindings(name) {
			if b.Node == node && b.Input == input {
				return name, true
			}
		}
	}
	return "", false
}

// ParamNames returns the template's parameter names in order.
func (t *Template) ParamNames() []string {
	return slices.Sorted(maps.Keys(t.Params))
}

// node finds a node by id, else by its `_meta.title`.
func (t *Template) node(ref string) (string, bool) {
	if _, ok := t.Graph[ref]; ok {
		return ref, true
	}
	for id, n := range t.Graph {
		node, _ := n.(map[string]any)
		meta, _ := node["_meta"].(map[string]any)
		if title, _ := meta["title"].(string); title == ref {
			return id, true
		}
	}
	return "", false
}

// (integers as int64 when they fit, so they marshal without an exponent).
func (p Param) check(name string, v any) (any, error) {
	fail := func(format string, args ...any) error {
		return &ParamError{Param: name, Value: v, Message: fmt.Sprintf(format, args...)}
	}
	switch p.Type {
	case TypeString, TypeImage:
		s, ok := v.(string)
		if !ok && p.Type == TypeImage {
			return nil, fail("must name an image file on the node; give the image itself in the scene's inputs")
		}
		if !ok {
			return nil, fail("must be a string")
		}
		if p.MaxLength > 0 && len(s) > p.MaxLength {
			return nil, fail("is %d bytes long; at most %d", len(s), p.MaxLength)
		}
		if err := p.checkEnum(v, fail); err != nil {
			return nil, err
		}
		return s, nil
	case TypeBoolean:
		if _, ok := v.(bool); !ok {
			return nil, fail("must be true or false")
		}
		return v, nil
	case TypeInteger, TypeNumber:
		f, ok := toFloat(v)
		if !ok {
			return nil, fail("must be a number")
		}
		if p.Type == TypeInteger && f != math.Trunc(f) {
			return nil, fail("must be a whole number")
		}
		if p.Minimum != nil && f < *p.Minimum {
			return nil, fail("%v is below the minimum %v", v, *p.Minimum)
		}
		if p.Maximum != nil && f > *p.Maximum {
			return nil, fail("%v is above the maximum %v", v, *p.Maximum)
		}
		if p.MultipleOf > 0 && math.Mod(f, float64(p.MultipleOf)) != 0 {
			return nil, fail("%v is not a multiple of %d", v, p.MultipleOf)
		}
		if err := p.checkEnum(f, fail); err != nil {
			return nil, err
		}
		if p.Type == TypeInteger {
			if f >= 0 && f < 1<<63 {
				return int64(f), nil
			}
			if f >= 1<<63 && f < 1<<64 {
				return uint64(f), nil
			}
			return int64(f), nil
		}
		return f, nil
	}
	return nil, fail("has unsupported type %q", p.Type)
}

func (p Param) checkEnum(v any, fail func(string, ...any) error) error {
	if len(p.Enum) == 0 {
		return nil
	}
	for _, e := range p.Enum {
		if ef, ok := toFloat(e); ok {
			if vf, ok := toFloat(v); ok && ef == vf {
				return nil
			}
		} else if e == v {
			return nil
		}
	}
	return fail("must be one of %v", p.Enum)
}

func toFloat(v any) (float64, bool) {
	switch n := v.(type) {
	case float64:
		return n, true
	case int:
		return float64(n), true
	case int64:
		return float64(n), true
	case uint64:
		return float64(n), true
	case json.Number:
		f, err := n.Float64()
		return f, err == nil
	}
	return 0, false
}

// ValidateGraph checks g with CheckGraph against StockClasses.
func ValidateGraph(g fleet.Graph) error { return CheckGraph(g, StockClasses) }

// CheckGraph checks that g has the shape of a ComfyUI API-format prompt (at least one
// node, each an object with a string class_type and an inputs object, and every link
// [node_id, output_index] pointing at a node of the graph), and that it has an output
// node as classes tells them, as ComfyUI requires ("Prompt has no outputs"): a graph
// that names a class classes does not know passes, since that class may be its output.
func CheckGraph(g fleet.Graph, classes NodeClasses) error {
	if err := checkShape(g); err != nil {
		return err
	}
	return checkOutputs(g, classes)
}

func checkShape(g fleet.Graph) error {
	if len(g) == 0 {
		return &GraphError{Message: "has no nodes"}
	}
	ids := make([]string, 0, len(g))
	for id := range g {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		node, ok := g[id].(map[string]any)
		if !ok {
			return &GraphError{Node: id, Message: "is not an object with class_type and inputs"}
		}
		ct, ok := node["class_type"].(string)
		if !ok || ct == "" {
			return &GraphError{Node: id, Message: "has no class_type"}
		}
		raw, present := node["inputs"]
		inputs, ok := raw.(map[string]any)
		if present && !ok {
			return &GraphError{Node: id, Message: "inputs is not an object"}
		}
		for name, v := range inputs {
			link, ok := v.([]any)
			if !ok {
				continue
			}
			if len(link) != 2 {
				return &GraphError{Node: id, Message: fmt.Sprintf("input %q is a list but not a link [node_id, output_index]", name)}
			}
			src, ok := link[0].(string)
			idx, isNum := toFloat(link[1])
			if !ok || !isNum || idx < 0 || idx != math.Trunc(idx) {
				return &GraphError{Node: id, Message: fmt.Sprintf("input %q is not a link [node_id, output_index]", name)}
			}
			if _, ok := g[src]; !ok {
				return &GraphError{Node: id, Message: fmt.Sprintf("input %q links to node %q, which is not in the graph", name, src)}
			}
		}
	}
	return nil
}
