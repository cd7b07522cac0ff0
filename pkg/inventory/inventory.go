// Package inventory tells what a ComfyUI node can run and what a graph needs of one:
// an Inventory is read from a node's /object_info (its node classes and the option
// lists of its model-file inputs), Requirements are computed from an API-format graph
// (the classes and model files it names), and Lacks and CheckPool compare the two.
package inventory

import (
	"bytes"
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"maps"
	"path"
	"slices"
	"strings"
	"sync"
)

// Inventory is what one ComfyUI node can run. It is immutable once built: FromObjectInfo
// makes one, and so does decoding its JSON form (the one published for the fleet).
// Use it through a pointer.
type Inventory struct {
	// Version identifies the content: equal inventories have equal versions, so a
	// refresh that finds the same version has nothing to publish.
	Version string `json:"version"`
	// Classes are the node classes, sorted.
	Classes []string `json:"classes"`
	// Outputs are the classes that are output nodes (object_info's output_node), sorted.
	Outputs []string `json:"outputs,omitempty"`
	// Models are the option lists of the model-file inputs, each distinct list once.
	Models []Models `json:"models,omitempty"`

	once  sync.Once
	index *index
	// runs memoises Runs by Requirements.Key.
	runs sync.Map
}

// Models is one option list of model files and the inputs that offer it: ComfyUI gives
// every loader of one model folder the same list (CheckpointLoaderSimple and
// ImageOnlyCheckpointLoader both list the checkpoints), so the list is kept once.
type Models struct {
	// Kind is the input name most of Inputs share, such as "ckpt_name" or "lora_name".
	Kind string `json:"kind"`
	// Inputs are the inputs that offer Files, by class.
	Inputs map[string][]string `json:"inputs"`
	// Files are the options, sorted.
	Files []string `json:"files"`
}

type index struct {
	classes map[string]bool
	outputs map[string]bool
	// lists maps class and input (joined by a NUL) to an index in files.
	lists map[string]int
	files []map[string]bool
}

func inputKey(class, input string) string { return class + "\x00" + input }

func (inv *Inventory) idx() *index {
	inv.once.Do(func() {
		x := &index{classes: map[string]bool{}, outputs: map[string]bool{}, lists: map[string]int{}}
		for _, c := range inv.Classes {
			x.classes[c] = true
		}
		for _, c := range inv.Outputs {
			x.outputs[c] = true
		}
		for i, m := range inv.Models {
			set := make(map[string]bool, len(m.Files))
			for _, f := range m.Files {
				set[f] = true
			}
			x.files = append(x.files, set)
			for class, inputs := range m.Inputs {
				for _, in := range inputs {
					x.lists[inputKey(class, in)] = i
				}
			}
		}
		inv.index = x
	})
	return inv.index
}

// classInfo is the part of an object_info entry that an inventory keeps.
type classInfo struct {
	Input      map[string]json.RawMessage `json:"input"`
	OutputNode bool                       `json:"output_node"`
}

// FromObjectInfo builds the inventory of a node from its /object_info answer, class
// name to definition. A model-file input is a combo (a list of strings, or ComfyUI's
// newer ["COMBO", {"options": [...]}]) whose options include a model file
// (IsModelFile), or an empty combo whose name ends in "_name", as a loader's is on a
// node without files of its kind.
func FromObjectInfo(info map[string]json.RawMessage) (*Inventory, error) {
	inv := &Inventory{Classes: make([]string, 0, len(info))}
	type input struct{ class, name string }
	byList := map[string]int{}
	var lists [][]string
	var users [][]input
	for _, class := range slices.Sorted(maps.Keys(info)) {
		inv.Classes = append(inv.Classes, class)
		var ci classInfo
		if err := json.Unmarshal(info[class], &ci); err != nil {
			return nil, fmt.Errorf("object_info class %s: %w", class, err)
		}
		if ci.OutputNode {
			inv.Outputs = append(inv.Outputs, class)
		}
		for _, category := range []string{"required", "optional"} {
			raw, ok := ci.Input[category]
			if !ok {
				continue
			}
			var specs map[string]json.RawMessage
			if err := json.Unmarshal(raw, &specs); err != nil {
				return nil, fmt.Errorf("object_info class %s: input.%s: %w", class, category, err)
			}
			for _, name := range slices.Sorted(maps.Keys(specs)) {
				files, ok := comboOptions(specs[name])
				if !ok || !isModelInput(name, files) {
					continue
				}
				files = slices.Clone(files)
				slices.Sort(files)
				files = slices.Compact(files)
				key := strings.Join(files, "\x00")
				i, seen := byList[key]
				if !seen {
					i = len(lists)
					byList[key] = i
					lists = append(lists, files)
					users = append(users, nil)
				}
				users[i] = append(users[i], input{class, name})
			}
		}
	}
	for i, files := range lists {
		m := Models{Inputs: map[string][]string{}, Files: files}
		count := map[string]int{}
		for _, u := range users[i] {
			m.Inputs[u.class] = append(m.Inputs[u.class], u.name)
			count[u.name]++
		}
		for name, n := range count {
			if n > count[m.Kind] || n == count[m.Kind] && (m.Kind == "" || name < m.Kind) {
				m.Kind = name
			}
		}
		inv.Models = append(inv.Models, m)
	}
	slices.SortStableFunc(inv.Models, func(a, b Models) int {
		return cmp.Or(cmp.Compare(a.Kind, b.Kind), slices.Compare(a.Files, b.Files))
	})
	inv.Version = inv.contentHash()
	return inv, nil
}

// contentHash is a hash of everything but the version.
func (inv *Inventory) contentHash() string {
	b, err := json.Marshal(struct {
		Classes []string `json:"classes"`
		Outputs []string `json:"outputs"`
		Models  []Models `json:"models"`
	}{inv.Classes, inv.Outputs, inv.Models})
	if err != nil {
		panic(fmt.Sprintf("inventory: marshal content: %v", err))
	}
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:16])
}

// comboOptions returns the options of a combo input spec: [[options...], {...}] or
// ["COMBO", {"options": [...]}]. Options that are not all strings are no combo of
// files.
func comboOptions(spec json.RawMessage) ([]string, bool) {
	var parts []json.RawMessage
	if err := json.Unmarshal(spec, &parts); err != nil || len(parts) == 0 {
		return nil, false
	}
	var options []string
	first := bytes.TrimSpace(parts[0])
	switch {
	case len(first) > 0 && first[0] == '[':
		if err := json.Unmarshal(first, &options); err != nil {
			return nil, false
		}
	case string(first) == `"COMBO"` && len(parts) > 1:
		var o struct {
			Options []string `json:"options"`
		}
		if err := json.Unmarshal(parts[1], &o); err != nil {
			return nil, false
		}
		options = o.Options
	default:
		return nil, false
	}
	if options == nil {
		options = []string{}
	}
	return options, true
}

func isModelInput(name string, options []string) bool {
	if len(options) == 0 {
		return strings.HasSuffix(name, "_name")
	}
	return slices.ContainsFunc(options, IsModelFile)
}

// modelExtensions are the file types ComfyUI loads models from (folder_paths'
// supported_pt_extensions, and the GGUF and ONNX files of common custom loaders).
var modelExtensions = map[string]bool{
	".safetensors": true, ".ckpt": true, ".pt": true, ".pt2": true, ".pth": true, ".bin": true,
	".pkl": true, ".sft": true, ".gguf": true, ".onnx": true,
}

// IsModelFile reports whether s names a model file: one line ending in a model file
// extension, such as "sd_xl_base_1.0.safetensors" or "SDXL/add_detail.safetensors".
func IsModelFile(s string) bool {
	if len(s) > 1024 || strings.ContainsAny(s, "\n\r") {
		return false
	}
	return modelExtensions[strings.ToLower(path.Ext(s))]
}

// Has reports whether the node has class.
func (inv *Inventory) Has(class string) bool { return inv.idx().classes[class] }

// Files returns the model files that input of class offers, and whether it is a
// model-file input of a class the node has.
func (inv *Inventory) Files(class, input string) ([]string, bool) {
	i, ok := inv.idx().lists[inputKey(class, input)]
	if !ok {
		return nil, false
	}
	return inv.Models[i].Files, true
}

// Output reports whether class is an output node, and whether the node knows the class
// at all; an Inventory thus tells a graph's outputs (see workflow.NodeClasses).
func (inv *Inventory) Output(class string) (output, known bool) {
	x := inv.idx()
	return x.outputs[class], x.classes[class]
}

// Lacks lists what req needs that the node does not have: each missing class, and
// each model file missing from the option list of its input. A model named at an
// input that the node does not list as a model-file input (a prompt text that happens
// to end in ".pt") is not checked.
func (inv *Inventory) Lacks(req *Requirements) []Missing {
	x := inv.idx()
	var out []Missing
	for _, class := range slices.Sorted(maps.Keys(req.Classes)) {
		if !x.classes[class] {
			out = append(out, Missing{Class: class, Nodes: req.Classes[class]})
		}
	}
	for _, m := range req.Models {
		if !x.classes[m.Class] {
			continue
		}
		i, ok := x.lists[inputKey(m.Class, m.Input)]
		if ok && !x.files[i][m.File] {
			out = append(out, Missing{Class: m.Class, Input: m.Input, File: m.File, Nodes: m.Nodes})
		}
	}
	return out
}

// Runs reports whether the node has everything req needs. A nil inventory (a node
// not read yet) runs everything: nothing is known against it. Results are memoised
// by req.Key.
func (inv *Inventory) Runs(req *Requirements) bool {
	if inv == nil || req == nil {
		return true
	}
	key := req.Key
	if key == "" {
		return len(inv.Lacks(req)) == 0
	}
	if v, ok := inv.runs.Load(key); ok {
		return v.(bool)
	}
	ok := len(inv.Lacks(req)) == 0
	inv.runs.Store(key, ok)
	return ok
}
