package comfysim

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"

	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
)

// promptNode is one node of a submitted prompt.
type promptNode struct {
	ID        string
	HasClass  bool
	ClassType string
	Inputs    []pyjson.Member
	class     *nodeClass
}

// input returns the raw value given for an input.
func (n *promptNode) input(name string) (json.RawMessage, bool) {
	return pyjson.Lookup(n.Inputs, name)
}

// graph is a prompt: nodes in the order the client sent them.
type graph struct {
	raw   json.RawMessage
	nodes []*promptNode
	byID  map[string]*promptNode
}

// errBadPrompt marks a prompt the real server fails on with a 500.
var errBadPrompt = errors.New("malformed prompt")

// parseGraph reads the "prompt" member of POST /prompt against the node
// classes of the server. A prompt that is not an object of objects makes
// the real server raise, hence errBadPrompt.
func parseGraph(raw json.RawMessage, classes *classTable) (*graph, error) {
	members, err := pyjson.ParseObject(raw)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", errBadPrompt, err)
	}
	var compact bytes.Buffer
	if err := json.Compact(&compact, raw); err != nil {
		return nil, fmt.Errorf("%w: %v", errBadPrompt, err)
	}
	g := &graph{raw: compact.Bytes(), byID: map[string]*promptNode{}}
	for _, m := range members {
		fields, err := pyjson.ParseObject(m.Raw)
		if err != nil {
			return nil, fmt.Errorf("%w: node %s: %v", errBadPrompt, m.Key, err)
		}
		n := &promptNode{ID: m.Key}
		if ct, ok := pyjson.Lookup(fields, "class_type"); ok {
			n.HasClass = true
			n.ClassType = pyStr(ct)
			if _, isStr := jsonString(ct); isStr {
				n.class = classes.byName[n.ClassType]
			}
		}
		if in, ok := pyjson.Lookup(fields, "inputs"); ok {
			inputs, err := pyjson.ParseObject(in)
			if err != nil {
				return nil, fmt.Errorf("%w: node %s inputs: %v", errBadPrompt, m.Key, err)
			}
			n.Inputs = inputs
		}
		g.nodes = append(g.nodes, n)
		g.byID[n.ID] = n
	}
	return g, nil
}

// link is an input wired to output Slot of node From.
type link struct {
	From string
	Slot int
}

// linkOf reads a validated link value ["id", slot].
func linkOf(raw json.RawMessage) (link, bool) {
	parts, ok := pyjson.ParseArray(raw)
	if !ok || len(parts) != 2 {
		return link{}, false
	}
	from, ok := jsonString(parts[0])
	if !ok {
		return link{}, false
	}
	slot, err := strconv.Atoi(string(bytes.TrimSpace(parts[1])))
	if err != nil {
		return link{}, false
	}
	return link{from, slot}, true
}

// links returns the node's inputs that are links, in input order.
func (n *promptNode) links() []link {
	var out []link
	for _, in := range n.Inputs {
		if l, ok := linkOf(in.Raw); ok {
			out = append(out, l)
		}
	}
	return out
}

// execList orders execution the way ComfyUI's ExecutionList does, so
// that nodes run, and messages arrive, in the order a real server sends
// them: outputs are added depth-first, and among the runnable nodes an
// output (or a node two steps from one) goes first.
type execList struct {
	g          *graph
	cached     func(id string) bool
	pending    []string
	isPending  map[string]bool
	blockCount map[string]int
	blocking   map[string][]string
}

func newExecList(g *graph, cached func(string) bool) *execList {
	return &execList{
		g:          g,
		cached:     cached,
		isPending:  map[string]bool{},
		blockCount: map[string]int{},
		blocking:   map[string][]string{},
	}
}

// add schedules a node and, unless cached, everything it depends on.
func (l *execList) add(id string) {
	stack := []string{id}
	type edge struct{ from, to string }
	var edges []edge
	for len(stack) > 0 {
		u := stack[len(stack)-1]
		stack = stack[:len(stack)-1]
		if l.isPending[u] {
			continue
		}
		l.pending = append(l.pending, u)
		l.isPending[u] = true
		l.blockCount[u] = 0
		l.blocking[u] = nil
		for _, in := range l.g.byID[u].links() {
			if !l.cached(in.From) {
				stack = append(stack, in.From)
			}
			edges = append(edges, edge{in.From, u})
		}
	}
	for _, e := range edges {
		if l.cached(e.from) {
			continue
		}
		l.add(e.from)
		if !contains(l.blocking[e.from], e.to) {
			l.blocking[e.from] = append(l.blocking[e.from], e.to)
			l.blockCount[e.to]++
		}
	}
}

// errCycle is what a graph whose remaining nodes all wait on each other
// fails with.
var errCycle = errors.New("dependency cycle detected")

// next picks the node to run, or "" when the list is done.
func (l *execList) next() (string, error) {
	if len(l.pending) == 0 {
		return "", nil
	}
	var ready []string
	for _, id := range l.pending {
		if l.blockCount[id] == 0 {
			ready = append(ready, id)
		}
	}
	if len(ready) == 0 {
		return "", errCycle
	}
	isOutput := func(id string) bool {
		c := l.g.byID[id].class
		return c != nil && c.OutputNode
	}
	for _, id := range ready {
		if isOutput(id) {
			return id, nil
		}
	}
	for _, id := range ready {
		for _, b := range l.blocking[id] {
			if isOutput(b) {
				return id, nil
			}
		}
	}
	for _, id := range ready {
		for _, b := range l.blocking[id] {
			for _, b2 := range l.blocking[b] {
				if isOutput(b2) {
					return id, nil
				}
			}
		}
	}
	return ready[0], nil
}

// done marks a node as run, unblocking what waited on it.
func (l *execList) done(id string) {
	for i, p := range l.pending {
		if p == id {
			l.pending = append(l.pending[:i], l.pending[i+1:]...)
			break
		}
	}
	delete(l.isPending, id)
	for _, b := range l.blocking[id] {
		l.blockCount[b]--
	}
	delete(l.blocking, id)
}

// willRun lists the pending nodes that are not served from the cache.
func (l *execList) willRun() []string {
	var out []string
	for _, id := range l.pending {
		if !l.cached(id) {
			out = append(out, id)
		}
	}
	return out
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}
