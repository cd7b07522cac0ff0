package inventory

import (
	"fmt"
	"slices"
	"strings"
)

// UnrunnableError says that no node of a pool can run a graph.
type UnrunnableError struct {
	Pool     string
	Problems []Problem
}

// Problem is one reason why no node of a pool can run a graph, with its message.
type Problem struct {
	Missing
	// Message says it to a client: "no node in pool image has checkpoint
	// x.safetensors".
	Message string
}

// Error lists the problems' messages.
func (e *UnrunnableError) Error() string {
	msgs := make([]string, len(e.Problems))
	for i, p := range e.Problems {
		msgs[i] = p.Message
	}
	return strings.Join(msgs, "; ")
}

// CheckPool decides whether some node of pool can run req, on the last known
// inventories of the pool's registered nodes, online or not. A nil inventory (a node
// not read yet) could run anything, and so could a pool without nodes: both accept.
// Otherwise it returns an *UnrunnableError naming, when every node lacks the same
// things, those things ("no node in pool image has checkpoint x.safetensors"); when each
// need is met somewhere but never all on one node, what the closest node lacks
// ("… has checkpoint x.safetensors together with everything else the graph needs").
func CheckPool(pool string, invs []*Inventory, req *Requirements) error {
	return check(pool, "node", invs, req)
}

// CheckOnline is CheckPool over the inventories of the pool's nodes that take scenes
// now, for telling why a scene waits: its messages say "no online node in pool image
// has checkpoint x.safetensors".
func CheckOnline(pool string, invs []*Inventory, req *Requirements) error {
	return check(pool, "online node", invs, req)
}

// check is CheckPool, the nodes named noun in messages.
func check(pool, noun string, invs []*Inventory, req *Requirements) error {
	if len(invs) == 0 || req == nil {
		return nil
	}
	var closest, common []Missing
	for i, inv := range invs {
		if inv == nil {
			return nil
		}
		lacks := inv.Lacks(req)
		if len(lacks) == 0 {
			return nil
		}
		if i == 0 || len(lacks) < len(closest) {
			closest = lacks
		}
		if i == 0 {
			common = lacks
			continue
		}
		common = slices.DeleteFunc(slices.Clone(common), func(m Missing) bool {
			return !slices.ContainsFunc(lacks, m.same)
		})
	}
	e := &UnrunnableError{Pool: pool}
	if len(common) > 0 {
		for _, m := range common {
			e.Problems = append(e.Problems, Problem{Missing: m, Message: fmt.Sprintf("no %s in pool %s has %s", noun, pool, m)})
		}
		return e
	}
	for _, m := range closest {
		e.Problems = append(e.Problems, Problem{Missing: m, Message: fmt.Sprintf("no %s in pool %s has %s together with everything else the graph needs", noun, pool, m)})
	}
	return e
}

// Params maps a graph input back to the template parameter bound to it;
// *workflow.Template is one.
type Params interface {
	ParamAt(node, input string) (string, bool)
}

// TemplateField is where a scene of a template sets what m names, relative to the
// scene: the parameter bound to the model's input ("params.checkpoint"), else
// "workflow". The intake puts "body.scenes[i]." before it.
func TemplateField(m Missing, tpl Params) string {
	if m.File != "" {
		for _, node := range m.Nodes {
			if p, ok := tpl.ParamAt(node, m.Input); ok {
				return "params." + p
			}
		}
	}
	return "workflow"
}

// GraphField is where a scene with a raw graph names what m names, relative to the
// scene: "graph.<node>.inputs.<input>", or "graph.<node>.class_type" for a class.
func GraphField(m Missing) string {
	node := ""
	if len(m.Nodes) > 0 {
		node = m.Nodes[0]
	}
	if m.File == "" {
		return "graph." + node + ".class_type"
	}
	return "graph." + node + ".inputs." + m.Input
}

// Classes tells the output classes of a fleet from the inventories of its nodes: a
// class is an output if some node says so, and known if some node has it. It is the
// workflow.NodeClasses for graph checks once inventories are known.
type Classes []*Inventory

// Output reports whether class is an output node on some node, and whether some node
// has it.
func (c Classes) Output(class string) (output, known bool) {
	for _, inv := range c {
		if inv == nil {
			continue
		}
		o, k := inv.Output(class)
		if o {
			return true, true
		}
		known = known || k
	}
	return false, known
}
