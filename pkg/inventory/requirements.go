package inventory

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"maps"
	"slices"
	"strconv"
	"strings"
)

// Requirements is what a graph needs of the node that runs it: its node classes and
// the model files it names. Require computes them once per scene; they are small
// enough to travel with the scene (a few hundred bytes of JSON for the shipped
// templates) and two scenes that need the same things have the same Key.
type Requirements struct {
	// Key identifies the set of classes and model files, whatever node ids name them:
	// equal keys, equal needs. Use it to intern requirements or memoise placement
	// decisions.
	Key string `json:"key"`
	// Classes are the node classes, each with the graph nodes of that class.
	Classes map[string][]string `json:"classes"`
	// Models are the model files, sorted by class, input and file.
	Models []Model `json:"models,omitempty"`
}

// Model is a model file that a graph names at one input of one class.
type Model struct {
	Class string `json:"class"`
	Input string `json:"input"`
	File  string `json:"file"`
	// Nodes are the graph nodes that name it, in order.
	Nodes []string `json:"nodes"`
}

// Require computes what graph g (a fleet.Graph) needs: every class_type, and every literal input value
// that names a model file (IsModelFile). Malformed nodes are skipped: judging them is
// workflow.ValidateGraph's work.
func Require(g map[string]any) *Requirements {
	r := &Requirements{Classes: map[string][]string{}}
	models := map[[3]string][]string{}
	for _, id := range sortedIDs(g) {
		node, _ := g[id].(map[string]any)
		class, _ := node["class_type"].(string)
		if class == "" {
			continue
		}
		r.Classes[class] = append(r.Classes[class], id)
		inputs, _ := node["inputs"].(map[string]any)
		for name, v := range inputs {
			if s, ok := v.(string); ok && IsModelFile(s) {
				k := [3]string{class, name, s}
				models[k] = append(models[k], id)
			}
		}
	}
	for _, k := range slices.SortedFunc(maps.Keys(models), func(a, b [3]string) int {
		return cmp.Or(cmp.Compare(a[0], b[0]), cmp.Compare(a[1], b[1]), cmp.Compare(a[2], b[2]))
	}) {
		r.Models = append(r.Models, Model{Class: k[0], Input: k[1], File: k[2], Nodes: models[k]})
	}
	r.Key = r.key()
	return r
}

// key hashes the sorted classes and models, without node ids.
func (r *Requirements) key() string {
	h := sha256.New()
	for _, c := range slices.Sorted(maps.Keys(r.Classes)) {
		h.Write([]byte("c\x00" + c + "\x00"))
	}
	for _, m := range r.Models {
		h.Write([]byte("m\x00" + m.Class + "\x00" + m.Input + "\x00" + m.File + "\x00"))
	}
	return hex.EncodeToString(h.Sum(nil)[:16])
}

// sortedIDs orders node ids as numbers when both are, else as strings, so that "2"
// comes before "10".
func sortedIDs(g map[string]any) []string {
	return slices.SortedFunc(maps.Keys(g), compareIDs)
}

func compareIDs(a, b string) int {
	na, errA := strconv.ParseUint(a, 10, 64)
	nb, errB := strconv.ParseUint(b, 10, 64)
	switch {
	case errA == nil && errB == nil:
		return cmp.Compare(na, nb)
	case errA == nil:
		return -1
	case errB == nil:
		return 1
	}
	return strings.Compare(a, b)
}

// Missing is one thing a graph needs that a node lacks: a node class (Input and File
// empty) or a model file at an input of a class.
type Missing struct {
	Class string `json:"class"`
	Input string `json:"input,omitempty"`
	File  string `json:"file,omitempty"`
	// Nodes are the graph nodes that need it.
	Nodes []string `json:"nodes"`
}

// String names what is missing: "node class VHS_VideoCombine", "checkpoint
// x.safetensors".
func (m Missing) String() string {
	if m.File == "" {
		return "node class " + m.Class
	}
	return ModelKind(m.Class, m.Input) + " " + m.File
}

func (m Missing) same(o Missing) bool {
	return m.Class == o.Class && m.Input == o.Input && m.File == o.File
}

// modelKinds names the model a loader input takes, for messages.
var modelKinds = map[string]string{
	"ckpt_name":         "checkpoint",
	"lora_name":         "LoRA",
	"vae_name":          "VAE",
	"control_net_name":  "ControlNet model",
	"unet_name":         "diffusion model",
	"style_model_name":  "style model",
	"gligen_name":       "GLIGEN model",
	"hypernetwork_name": "hypernetwork",
}

// ModelKind names the kind of model file that input of class takes: "checkpoint" for
// ckpt_name, "LoRA", "VAE", "CLIP model", "upscale model", …, else "model file".
func ModelKind(class, input string) string {
	if k, ok := modelKinds[input]; ok {
		return k
	}
	switch {
	case strings.HasPrefix(input, "clip_name") && strings.Contains(class, "CLIPVision"):
		return "CLIP vision model"
	case strings.HasPrefix(input, "clip_name"):
		return "CLIP model"
	case strings.Contains(strings.ToLower(class), "upscale"):
		return "upscale model"
	}
	return "model file"
}
