// Package workflow turns ComfyUI workflow templates and a scene's named parameters
// into an API-format graph, and checks that a raw graph is one.
package workflow

import (
	"encoding/json"
	"fmt"
	"io/fs"
	"math"
	"path"
	"slices"
	"sort"
	"strings"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// Binding names one node input that a parameter sets: Node is the node's id or its
// `_meta.title`.
type Binding struct {
	Node  string `json:"node"`
	Input string `json:"input"`
}

// Param declares one named parameter of a template.
type Param struct {
	// Type is "string", "integer", "number" or "boolean".
	Type        string    `json:"type"`
	Description string    `json:"description,omitempty"`
	Default     any       `json:"default,omitempty"`
	Minimum     *float64  `json:"minimum,omitempty"`
	Maximum     *float64  `json:"maximum,omitempty"`
	MultipleOf  int       `json:"multiple_of,omitempty"`
	MaxLength   int       `json:"max_length,omitempty"`
	Enum        []any     `json:"enum,omitempty"`
	Bind        []Binding `json:"bind"`
}

// Template is a workflow with named parameters.
type Template struct {
	Name        string `json:"name"`
	Description string `json:"description,omitempty"`
	// Pool is the pool its scenes run in unless a scene names another.
	Pool   string           `json:"pool"`
	Params map[string]Param `json:"params"`
	Graph  fleet.Graph      `json:"graph"`
}

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

// Catalog is the set of templates a fleet offers, by name.
type Catalog struct {
	templates map[string]*Template
}

// Load reads every *.json template in the root of fsys and checks each one.
func Load(fsys fs.FS) (*Catalog, error) {
	names, err := fs.Glob(fsys, "*.json")
	if err != nil {
		return nil, fmt.Errorf("list templates: %w", err)
	}
	c := &Catalog{templates: map[string]*Template{}}
	for _, name := range names {
		b, err := fs.ReadFile(fsys, name)
		if err != nil {
			return nil, fmt.Errorf("read template %s: %w", name, err)
		}
		t, err := Parse(b)
		if err != nil {
			return nil, fmt.Errorf("template %s: %w", name, err)
		}
		if want := strings.TrimSuffix(path.Base(name), ".json"); t.Name != want {
			return nil, fmt.Errorf("template %s: name %q does not match its file name", name, t.Name)
		}
		c.templates[t.Name] = t
	}
	return c, nil
}

// Parse decodes and checks one template.
func Parse(b []byte) (*Template, error) {
	var t Template
	if err := json.Unmarshal(b, &t); err != nil {
		return nil, fmt.Errorf("decode template: %w", err)
	}
	if !fleet.ValidToken(t.Name) {
		return nil, fmt.Errorf("name %q: use letters, digits, '-' and '_'", t.Name)
	}
	if t.Pool == "" {
		t.Pool = DefaultPool
	}
	if err := ValidateGraph(t.Graph); err != nil {
		return nil, err
	}
	for name, p := range t.Params {
		if len(p.Bind) == 0 {
			return nil, fmt.Errorf("parameter %q binds to no node input", name)
		}
		for _, b := range p.Bind {
			if _, ok := t.node(b.Node); !ok {
				return nil, fmt.Errorf("parameter %q binds to node %q, which is neither a node id nor a title", name, b.Node)
			}
		}
		if p.Default != nil {
			if _, err := p.check(name, p.Default); err != nil {
				return nil, fmt.Errorf("default: %w", err)
			}
		}
	}
	return &t, nil
}

// DefaultPool is the pool of scenes that name none.
const DefaultPool = "image"

// Get returns the template called name.
func (c *Catalog) Get(name string) (*Template, bool) {
	t, ok := c.templates[name]
	return t, ok
}

// List returns the templates ordered by name.
func (c *Catalog) List() []*Template {
	out := make([]*Template, 0, len(c.templates))
	for _, t := range c.templates {
		out = append(out, t)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// Names returns the template names in order.
func (c *Catalog) Names() []string {
	names := make([]string, 0, len(c.templates))
	for n := range c.templates {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// Render returns a copy of the template's graph with params bound. Unknown
// parameters and values of the wrong type or out of bounds are *ParamError.
func (t *Template) Render(params map[string]any) (fleet.Graph, error) {
	g := deepCopy(t.Graph).(map[string]any)
	names := make([]string, 0, len(params))
	for name := range params {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		p, ok := t.Params[name]
		if !ok {
			return nil, &ParamError{Param: name, Value: params[name], Message: fmt.Sprintf("unknown; %s takes %s", t.Name, strings.Join(t.ParamNames(), ", "))}
		}
		v, err := p.check(name, params[name])
		if err != nil {
			return nil, err
		}
		for _, b := range p.Bind {
			id, _ := t.node(b.Node)
			node := g[id].(map[string]any)
			inputs, _ := node["inputs"].(map[string]any)
			if inputs == nil {
				inputs = map[string]any{}
				node["inputs"] = inputs
			}
			inputs[b.Input] = v
		}
	}
	return g, nil
}

// ParamNames returns the template's parameter names in order.
func (t *Template) ParamNames() []string {
	names := make([]string, 0, len(t.Params))
	for n := range t.Params {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
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

// check validates v against the parameter and returns it in the form ComfyUI wants
// (integers as int64 when they fit, so they marshal without an exponent).
func (p Param) check(name string, v any) (any, error) {
	fail := func(format string, args ...any) error {
		return &ParamError{Param: name, Value: v, Message: fmt.Sprintf(format, args...)}
	}
	switch p.Type {
	case "string":
		s, ok := v.(string)
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
	case "boolean":
		if _, ok := v.(bool); !ok {
			return nil, fail("must be true or false")
		}
		return v, nil
	case "integer", "number":
		f, ok := toFloat(v)
		if !ok {
			return nil, fail("must be a number")
		}
		if p.Type == "integer" && f != math.Trunc(f) {
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
		if p.Type == "integer" {
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

func deepCopy(v any) any {
	switch x := v.(type) {
	case map[string]any:
		m := make(map[string]any, len(x))
		for k, e := range x {
			m[k] = deepCopy(e)
		}
		return m
	case []any:
		s := make([]any, len(x))
		for i, e := range x {
			s[i] = deepCopy(e)
		}
		return s
	}
	return v
}

// ValidateGraph checks that g has the shape of a ComfyUI API-format prompt: at least
// one node, each an object with a string class_type and an inputs object, and every
// link [node_id, output_index] pointing at a node of the graph.
func ValidateGraph(g fleet.Graph) error {
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
