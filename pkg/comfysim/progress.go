package comfysim

// nodeProgress is one node of the progress_state map. Values are floats
// when the node starts (0.0 of 1.0) and ints once a progress bar reports.
type nodeProgress struct {
	value, max any
	state      string
}

// progressRegistry mirrors ComfyUI's ProgressRegistry for one prompt.
type progressRegistry struct {
	order []string
	nodes map[string]*nodeProgress
}

func (p *progressRegistry) ensure(id string) *nodeProgress {
	if np, ok := p.nodes[id]; ok {
		return np
	}
	np := &nodeProgress{value: 0, max: 1, state: "pending"}
	p.nodes[id] = np
	p.order = append(p.order, id)
	return np
}

func (p *progressRegistry) start(id string) {
	np := p.ensure(id)
	np.state, np.value, np.max = "running", pyFloat(0), pyFloat(1)
}

func (p *progressRegistry) update(id string, value, max int) {
	np := p.ensure(id)
	np.state, np.value, np.max = "running", value, max
}

func (p *progressRegistry) finish(id string) {
	np := p.ensure(id)
	np.state, np.value = "finished", np.max
}

func (p *progressRegistry) message(promptID string) obj {
	nodes := obj{}
	for _, id := range p.order {
		np := p.nodes[id]
		if np.state == "pending" {
			continue
		}
		nodes = append(nodes, kv{id, obj{
			{"value", np.value},
			{"max", np.max},
			{"state", np.state},
			{"node_id", id},
			{"prompt_id", promptID},
			{"display_node_id", id},
			{"parent_node_id", nil},
			{"real_node_id", id},
		}})
	}
	return obj{{"prompt_id", promptID}, {"nodes", nodes}}
}
