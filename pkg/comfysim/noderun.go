package comfysim

import (
	"encoding/json"
	"image/color"
	"math/big"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
)

// nodeRun is the execution of one node.
type nodeRun struct {
	e *execution
	n *promptNode
	c *nodeClass
}

// isSampler reports whether a class samples step by step: it has a
// "steps" input.
func isSampler(c *nodeClass) bool {
	_, ok := c.input("steps")
	return ok
}

// samplerSteps is the number of steps a sampler node will report.
func samplerSteps(n *promptNode) int {
	r := &nodeRun{n: n, c: n.class}
	steps := int(r.int("steps"))
	if _, ok := n.class.input("end_at_step"); ok {
		end := min(int(r.int("end_at_step")), steps)
		steps = end - int(r.int("start_at_step"))
	}
	return max(steps, 0)
}

// runBehaviour spends the node's time, then computes its outputs. A
// planned failure strikes after the time is spent, or at its step.
func (e *execution) runBehaviour(n *promptNode) (nodeResult, error) {
	r := &nodeRun{e: e, n: n, c: n.class}
	var plan *failurePlan
	if e.plan != nil && e.plan.node == n.ID {
		plan = e.plan
	}
	switch {
	case isSampler(n.class):
		if err := r.runSteps(samplerSteps(n), plan); err != nil {
			return nodeResult{}, err
		}
	case n.ClassType == "SaveImageWebsocket":
	default:
		if err := r.pause(e.in.s.cfg.NodeDuration, false); err != nil {
			return nodeResult{}, err
		}
		if plan != nil {
			return nodeResult{}, e.in.simulatedFailure(n, plan)
		}
	}
	b := behaviours[n.ClassType]
	if b == nil {
		b = passThrough
	}
	return b(r)
}

// pause waits d at the current speed. Stock nodes notice an interrupt
// only when the next node starts; progress bars notice it at once.
func (r *nodeRun) pause(d time.Duration, interruptible bool) error {
	return r.sleep(r.e.in.s.scaled(d), interruptible)
}

// sleep waits d, whatever the speed, like pause.
func (r *nodeRun) sleep(d time.Duration, interruptible bool) error {
	interrupt := r.e.running.interrupt
	if !interruptible {
		interrupt = nil
	}
	if interruptible && r.e.isInterrupted() {
		return errInterrupted
	}
	if d <= 0 {
		if r.e.in.ctx.Err() != nil {
			return errAborted
		}
		return nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-interrupt:
		return errInterrupted
	case <-r.e.in.ctx.Done():
		return errAborted
	}
}

// runSteps runs the steps of a sampler, reporting each one with a preview.
func (r *nodeRun) runSteps(steps int, plan *failurePlan) error {
	latent, _ := r.linked("latent_image")
	pw, ph := fitSize(latent.w/8, latent.h/8, maxPreviewSide)
	final := seedColor(r.seed())
	for i := 0; i < steps; i++ {
		if plan != nil && plan.step == i {
			return r.e.in.simulatedFailure(r.n, plan)
		}
		if err := r.pause(r.e.in.s.cfg.StepDuration, true); err != nil {
			return err
		}
		var png []byte
		if r.e.j.hasClient {
			f := float64(i+1) / float64(steps)
			c := color.NRGBA{mix(128, final.R, f), mix(128, final.G, f), mix(128, final.B, f), 255}
			var err error
			if png, err = encodePNG(pw, ph, c, nil); err != nil {
				return err
			}
		}
		r.step(i, steps, png)
	}
	return nil
}

func mix(a, b uint8, f float64) uint8 {
	return uint8(float64(a) + (float64(b)-float64(a))*f)
}

// step reports progress value of max, with a preview image.
func (r *nodeRun) step(value, max int, png []byte) {
	e := r.e
	e.progress.update(r.n.ID, value, max)
	if !e.j.hasClient {
		return
	}
	id := r.n.ID
	e.in.hub.step(e.j.clientID,
		message("progress_state", e.progress.message(e.pid)),
		message("progress", obj{{"value", value}, {"max", max}, {"prompt_id", e.pid}, {"node", id}}),
		png,
		obj{{"node_id", id}, {"prompt_id", e.pid}, {"display_node_id", id}, {"parent_node_id", nil}, {"real_node_id", id}, {"image_type", "image/png"}})
}

// widget returns a literal input, or the class default.
func (r *nodeRun) widget(name string) (json.RawMessage, bool) {
	if raw, ok := r.n.input(name); ok && pyjson.Kind(raw) != '[' {
		return raw, true
	}
	if in, ok := r.c.input(name); ok {
		return in.option("default")
	}
	return nil, false
}

func (r *nodeRun) bigInt(name string) *big.Int {
	raw, ok := r.widget(name)
	if !ok {
		return new(big.Int)
	}
	v, _ := convertWidget("INT", raw)
	if v.i == nil {
		return new(big.Int)
	}
	return v.i
}

func (r *nodeRun) int(name string) int64 {
	i := r.bigInt(name)
	if !i.IsInt64() {
		if i.Sign() < 0 {
			return -1 << 62
		}
		return 1 << 62
	}
	return i.Int64()
}

func (r *nodeRun) float(name string) float64 {
	raw, ok := r.widget(name)
	if !ok {
		return 0
	}
	v, _ := convertWidget("FLOAT", raw)
	return v.f
}

func (r *nodeRun) str(name string) string {
	raw, ok := r.widget(name)
	if !ok {
		return ""
	}
	return pyStr(raw)
}

func (r *nodeRun) bool(name string) bool {
	raw, ok := r.widget(name)
	return ok && pyjson.Truthy(raw)
}

// seed is the sampler's seed, folded to 64 bits.
func (r *nodeRun) seed() uint64 {
	name := "seed"
	if _, ok := r.c.input("noise_seed"); ok {
		name = "noise_seed"
	}
	return new(big.Int).And(r.bigInt(name), new(big.Int).SetUint64(^uint64(0))).Uint64()
}

// linked returns the value arriving on a linked input.
func (r *nodeRun) linked(name string) (value, bool) {
	raw, ok := r.n.input(name)
	if !ok {
		return defaultValue(""), false
	}
	l, ok := linkOf(raw)
	if !ok {
		return defaultValue(""), false
	}
	vals := r.e.values[l.From]
	slot := l.Slot
	if slot < 0 {
		slot += len(vals)
	}
	if slot < 0 || slot >= len(vals) {
		return defaultValue(""), false
	}
	return vals[slot], true
}

// outputs builds one value per declared output from a template.
func (r *nodeRun) outputs(tmpl value) []value {
	out := make([]value, len(r.c.Outputs))
	for i, kind := range r.c.Outputs {
		v := tmpl
		v.kind = kind
		out[i] = v
	}
	return out
}
