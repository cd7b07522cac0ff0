package comfysim

import (
	_ "embed"
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"sort"

	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
)

// objectInfoJSON is the /object_info table: the model-free classes are
// copied from a real server's answer, the model classes follow ComfyUI's
// nodes.py and the VideoHelperSuite custom node.
//
//go:embed objectinfo.json
var objectInfoJSON []byte

// inputSpec is one declared input of a node class.
type inputSpec struct {
	Name     string
	Required bool
	// Raw is the spec as object_info shows it: [type] or [type, options].
	Raw json.RawMessage
	// Type is "INT", "IMAGE", ...; empty for a combo.
	Type string
	// Choices lists a combo's options.
	Choices []string
	Options []pyjson.Member
}

// isCombo reports whether the input takes one of a list of values.
func (in *inputSpec) isCombo() bool { return in.Type == "" }

// option returns the raw value of an option such as "min" or "default".
func (in *inputSpec) option(name string) (json.RawMessage, bool) {
	return pyjson.Lookup(in.Options, name)
}

// config is the spec as validation errors quote it: [type, options],
// with {} when the class declares no options.
func (in *inputSpec) config() []any {
	parts, _ := pyjson.ParseArray(in.Raw)
	if len(parts) >= 2 {
		return []any{parts[0], parts[1]}
	}
	return []any{parts[0], obj{}}
}

// nodeClass is one entry of the object_info table.
type nodeClass struct {
	Name       string
	info       []pyjson.Member
	Inputs     []inputSpec
	Outputs    []string
	OutputNode bool
	// models replaces the option lists of model-file inputs in info, by input name
	// (Config.Models).
	models map[string][]string
}

// input returns the declared input called name.
func (c *nodeClass) input(name string) (*inputSpec, bool) {
	for i := range c.Inputs {
		if c.Inputs[i].Name == name {
			return &c.Inputs[i], true
		}
	}
	return nil, false
}

// hidden returns the hidden inputs the class declares, such as
// {"prompt": "PROMPT"}.
func (c *nodeClass) hidden() []pyjson.Member {
	inputRaw, _ := pyjson.Lookup(c.info, "input")
	cats, _ := pyjson.ParseObject(inputRaw)
	raw, ok := pyjson.Lookup(cats, "hidden")
	if !ok {
		return nil
	}
	ms, _ := pyjson.ParseObject(raw)
	return ms
}

// render builds the object_info entry, replacing the option lists of
// inputs named in choices (LoadImage lists the files in the input folder)
// and of the model inputs the server configures.
func (c *nodeClass) render(choices map[string][]string) obj {
	if len(c.models) > 0 {
		merged := maps.Clone(c.models)
		maps.Copy(merged, choices)
		choices = merged
	}
	out := membersObj(c.info)
	if len(choices) == 0 {
		return out
	}
	inputRaw, _ := pyjson.Lookup(c.info, "input")
	cats, _ := pyjson.ParseObject(inputRaw)
	catObj := make(obj, 0, len(cats))
	for _, cat := range cats {
		inputs, _ := pyjson.ParseObject(cat.Raw)
		inObj := membersObj(inputs)
		for i, m := range inObj {
			list, ok := choices[m.K]
			if !ok {
				continue
			}
			parts, _ := pyjson.ParseArray(m.V.(json.RawMessage))
			spec := []any{list}
			for _, p := range parts[1:] {
				spec = append(spec, p)
			}
			inObj[i].V = spec
		}
		catObj = append(catObj, kv{cat.Key, inObj})
	}
	return out.set("input", catObj)
}

// classTable holds the known node classes in object_info order.
type classTable struct {
	order  []string
	byName map[string]*nodeClass
}

// withModels returns a copy of t whose model inputs offer the files given
// by input name, and that lacks the classes in without. A name that no
// class declares as a combo input, or no class of t, is an error.
func (t *classTable) withModels(models map[string][]string, without []string) (*classTable, error) {
	for _, name := range without {
		if _, ok := t.byName[name]; !ok {
			return nil, fmt.Errorf("no class %q to leave out", name)
		}
	}
	used := map[string]bool{}
	out := &classTable{byName: make(map[string]*nodeClass, len(t.byName))}
	for _, name := range t.order {
		if slices.Contains(without, name) {
			continue
		}
		c := t.byName[name]
		var copied *nodeClass
		for i, in := range c.Inputs {
			files, ok := models[in.Name]
			if !ok || !in.isCombo() {
				continue
			}
			used[in.Name] = true
			if copied == nil {
				cc := *c
				cc.Inputs = slices.Clone(c.Inputs)
				cc.models = maps.Clone(c.models)
				if cc.models == nil {
					cc.models = map[string][]string{}
				}
				copied = &cc
			}
			spec, err := in.offering(files)
			if err != nil {
				return nil, fmt.Errorf("class %s input %s: %w", name, in.Name, err)
			}
			copied.Inputs[i] = spec
			copied.models[in.Name] = spec.Choices
		}
		if copied != nil {
			c = copied
		}
		out.order = append(out.order, name)
		out.byName[name] = c
	}
	for name := range models {
		if !used[name] {
			return nil, fmt.Errorf("no class has a combo input %q", name)
		}
	}
	return out, nil
}

// offering returns the combo input with files as its options, sorted as
// ComfyUI sorts a model folder's listing.
func (in inputSpec) offering(files []string) (inputSpec, error) {
	files = slices.Clone(files)
	slices.Sort(files)
	files = slices.Compact(files)
	if files == nil {
		files = []string{}
	}
	parts, _ := pyjson.ParseArray(in.Raw)
	spec := []any{files}
	for _, p := range parts[1:] {
		spec = append(spec, p)
	}
	raw, err := json.Marshal(spec)
	if err != nil {
		return in, err
	}
	in.Raw, in.Choices = raw, files
	return in, nil
}

// classes is parsed once from the embedded table; a malformed table is a
// build defect, caught by the package tests.
var classes = mustLoadClasses(objectInfoJSON)

func mustLoadClasses(raw []byte) *classTable {
	t, err := loadClasses(raw)
	if err != nil {
		panic(fmt.Sprintf("comfysim: embedded objectinfo.json: %v", err))
	}
	return t
}

func loadClasses(raw []byte) (*classTable, error) {
	entries, err := pyjson.ParseObject(raw)
	if err != nil {
		return nil, fmt.Errorf("parse table: %w", err)
	}
	t := &classTable{byName: map[string]*nodeClass{}}
	for _, e := range entries {
		c, err := loadClass(e.Key, e.Raw)
		if err != nil {
			return nil, fmt.Errorf("class %s: %w", e.Key, err)
		}
		t.order = append(t.order, e.Key)
		t.byName[e.Key] = c
	}
	return t, nil
}

func loadClass(name string, raw json.RawMessage) (*nodeClass, error) {
	info, err := pyjson.ParseObject(raw)
	if err != nil {
		return nil, err
	}
	c := &nodeClass{Name: name, info: info}
	if v, ok := pyjson.Lookup(info, "output"); ok {
		if err := json.Unmarshal(v, &c.Outputs); err != nil {
			return nil, fmt.Errorf("output: %w", err)
		}
	}
	if v, ok := pyjson.Lookup(info, "output_node"); ok {
		c.OutputNode = pyjson.Truthy(v)
	}
	inputRaw, _ := pyjson.Lookup(info, "input")
	cats, err := pyjson.ParseObject(inputRaw)
	if err != nil {
		return nil, fmt.Errorf("input: %w", err)
	}
	for _, cat := range []string{"required", "optional"} {
		catRaw, ok := pyjson.Lookup(cats, cat)
		if !ok {
			continue
		}
		inputs, err := pyjson.ParseObject(catRaw)
		if err != nil {
			return nil, fmt.Errorf("input.%s: %w", cat, err)
		}
		for _, in := range inputs {
			spec, err := loadInput(in, cat == "required")
			if err != nil {
				return nil, fmt.Errorf("input %s: %w", in.Key, err)
			}
			c.Inputs = append(c.Inputs, spec)
		}
	}
	return c, nil
}

func loadInput(m pyjson.Member, required bool) (inputSpec, error) {
	spec := inputSpec{Name: m.Key, Required: required, Raw: m.Raw}
	parts, ok := pyjson.ParseArray(m.Raw)
	if !ok || len(parts) == 0 {
		return spec, fmt.Errorf("spec is not a non-empty list")
	}
	if t, ok := jsonString(parts[0]); ok {
		spec.Type = t
	} else if err := json.Unmarshal(parts[0], &spec.Choices); err != nil {
		return spec, fmt.Errorf("type: %w", err)
	}
	if len(parts) > 1 {
		opts, err := pyjson.ParseObject(parts[1])
		if err != nil {
			return spec, fmt.Errorf("options: %w", err)
		}
		spec.Options = opts
	}
	return spec, nil
}

// imageExtensions are the files LoadImage offers, as ComfyUI filters its
// input folder by content type.
var imageExtensions = map[string]bool{
	".png": true, ".jpg": true, ".jpeg": true, ".webp": true, ".gif": true, ".bmp": true, ".tif": true, ".tiff": true,
}

// objectInfo returns the object_info entry of one class, or of all when
// name is empty.
func (s *Server) objectInfo(name string) obj {
	inputs := s.files.list(dirInput, "")
	images := make([]string, 0, len(inputs))
	for _, f := range inputs {
		if imageExtensions[extOf(f)] {
			images = append(images, f)
		}
	}
	sort.Strings(images)
	dynamic := map[string]map[string][]string{"LoadImage": {"image": images}}
	classes := s.classes()
	if name != "" {
		c, ok := classes.byName[name]
		if !ok {
			return obj{}
		}
		return obj{{name, c.render(dynamic[name])}}
	}
	out := make(obj, 0, len(classes.order))
	for _, n := range classes.order {
		out = append(out, kv{n, classes.byName[n].render(dynamic[n])})
	}
	return out
}
