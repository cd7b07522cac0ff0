package comfysim

import (
	"encoding/json"
	"fmt"
	"hash/fnv"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"

	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
)

// failurePlan is a simulated failure chosen when a prompt starts.
type failurePlan struct {
	node string
	oom  bool
	// step is the sampler step that fails.
	step int
}

// planFailure decides whether this prompt fails, and where: an
// out-of-memory error hits a sampler or VAE node when there is one.
func (in *instance) planFailure(g *graph, candidates []string) *failurePlan {
	cfg := in.s.cfg
	if len(candidates) == 0 || (cfg.FailureRate <= 0 && cfg.OOMRate <= 0) {
		return nil
	}
	var plan *failurePlan
	in.s.random(func(r *rand.Rand) {
		u := r.Float64()
		switch {
		case u < cfg.OOMRate:
			pool := filterNodes(g, candidates, isSampler)
			if len(pool) == 0 {
				pool = filterNodes(g, candidates, func(c *nodeClass) bool {
					return c.Name == "VAEDecode" || c.Name == "VAEEncode"
				})
			}
			if len(pool) == 0 {
				pool = candidates
			}
			plan = &failurePlan{node: pool[r.IntN(len(pool))], oom: true}
		case u < cfg.OOMRate+cfg.FailureRate:
			plan = &failurePlan{node: candidates[r.IntN(len(candidates))]}
		default:
			return
		}
		if n := g.byID[plan.node]; isSampler(n.class) {
			plan.step = r.IntN(max(1, samplerSteps(n)))
		}
	})
	return plan
}

func filterNodes(g *graph, ids []string, keep func(*nodeClass) bool) []string {
	var out []string
	for _, id := range ids {
		if keep(g.byID[id].class) {
			out = append(out, id)
		}
	}
	return out
}

// traceFrame formats one traceback entry as Python 3.11 prints it, with
// the line of code and, when marks is not empty, the line under it.
func traceFrame(file string, line int, function, code, marks string) string {
	s := "  File \"/opt/ComfyUI/" + file + "\", line " + strconv.Itoa(line) + ", in " + function + "\n    " + code + "\n"
	if marks != "" {
		s += marks + "\n"
	}
	return s
}

// under returns the line that marks expr inside code: "^" under all of
// it, or the given pattern (such as "~~~~~^^^^") when not empty.
func under(code, expr, pattern string) string {
	i := strings.Index(code, expr)
	if i < 0 {
		i = 0
	}
	if pattern == "" {
		pattern = strings.Repeat("^", len(expr))
	}
	return strings.Repeat(" ", 4+i) + pattern
}

func markedFrame(file string, line int, function, code, expr, pattern string) string {
	return traceFrame(file, line, function, code, under(code, expr, pattern))
}

// executionFrames are the frames of execution.py above a node's function.
var executionFrames = func() []string {
	getOutput := "output_data, output_ui, has_subgraph, has_pending_tasks = await get_output_data(prompt_id, unique_id, obj, input_data_all, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)"
	mapNode := "return_values = await _async_map_node_over_list(prompt_id, unique_id, obj, input_data_all, obj.FUNCTION, allow_interrupt=True, execution_block_cb=execution_block_cb, pre_execute_cb=pre_execute_cb, hidden_inputs=hidden_inputs)"
	return []string{
		markedFrame("execution.py", 496, "execute", getOutput, getOutput[strings.Index(getOutput, "await"):], ""),
		markedFrame("execution.py", 315, "get_output_data", mapNode, mapNode[strings.Index(mapNode, "await"):], ""),
		traceFrame("execution.py", 289, "_async_map_node_over_list", "await process_inputs(input_dict, i)", ""),
		markedFrame("execution.py", 277, "process_inputs", "result = f(**inputs)", "f(**inputs)", ""),
	}
}()

var imageToMaskFrame = markedFrame("comfy_extras/nodes_mask.py", 137, "image_to_mask",
	"mask = image[:, :, :, channels.index(channel)]", "image[:, :, :, channels.index(channel)]",
	"~~~~~"+strings.Repeat("^", len("[:, :, :, channels.index(channel)]")))

// samplerFrames lead from a sampler node into the model, where GPU
// errors surface.
var samplerFrames = []string{
	traceFrame("nodes.py", 1525, "sample", "return common_ksampler(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise=denoise)", ""),
	traceFrame("nodes.py", 1492, "common_ksampler", "samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,", ""),
	traceFrame("comfy/sample.py", 45, "sample", "samples = sampler.sample(noise, positive, negative, cfg=cfg, latent_image=latent_image, start_step=start_step, last_step=last_step, force_full_denoise=force_full_denoise, denoise_mask=noise_mask, sigmas=sigmas, callback=callback, disable_pbar=disable_pbar, seed=seed)", ""),
	traceFrame("comfy/samplers.py", 1161, "sample", "return sample(self.model, noise, positive, negative, cfg, self.device, sampler, sigmas, self.model_options, latent_image=latent_image, denoise_mask=denoise_mask, callback=callback, disable_pbar=disable_pbar, seed=seed)", ""),
	traceFrame("comfy/ldm/modules/attention.py", 470, "attention_pytorch", "out = comfy.ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)", ""),
}

var decodeFrames = []string{
	traceFrame("nodes.py", 296, "decode", "images = vae.decode(samples[\"samples\"])", ""),
	traceFrame("comfy/sd.py", 706, "decode", "out = self.process_output(self.first_stage_model.decode(samples).to(self.output_device).float())", ""),
}

// oomTips is what ComfyUI appends to an out-of-memory message.
const oomTips = "This error means you ran out of memory on your GPU.\n\nTIPS: If the workflow worked before you might have accidentally set the batch_size to a large number."

// simulatedFailure builds the exception a planned failure raises.
func (in *instance) simulatedFailure(n *promptNode, plan *failurePlan) *nodeFailure {
	frames := append([]string(nil), executionFrames...)
	switch {
	case isSampler(n.class):
		frames = append(frames, samplerFrames...)
	case n.ClassType == "VAEDecode" || n.ClassType == "VAEEncode":
		frames = append(frames, decodeFrames...)
	}
	in.log.Debug("comfysim: simulated failure", "node", n.ID, "class_type", n.ClassType, "oom", plan.oom)
	if plan.oom {
		total := float64(in.s.cfg.VRAMTotal) / float64(gib)
		msg := fmt.Sprintf("CUDA out of memory. Tried to allocate %.2f GiB. GPU 0 has a total capacity of %.2f GiB of which %.2f MiB is free. "+
			"Of the allocated memory %.2f GiB is allocated by PyTorch, and %.2f MiB is reserved by PyTorch but unallocated. "+
			"If reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  "+
			"See documentation for Memory Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)",
			total/7, total, 312.5, total*0.86, 407.2)
		return &nodeFailure{excType: "torch.OutOfMemoryError", message: msg + "\n" + oomTips, traceback: frames, oom: true}
	}
	msg := "CUDA error: an illegal memory access was encountered\n" +
		"CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.\n" +
		"For debugging consider passing CUDA_LAUNCH_BLOCKING=1\n" +
		"Compile with `TORCH_USE_CUDA_DSA` to enable device-side assertions.\n"
	return &nodeFailure{excType: "RuntimeError", message: msg + "\n", traceback: frames}
}

// currentInputs is the "current_inputs" of an execution_error: each input
// as a list of str() of its values, links first resolved, then the
// hidden inputs.
func (e *execution) currentInputs(n *promptNode) obj {
	out := obj{}
	for _, in := range n.Inputs {
		if l, ok := linkOf(in.Raw); ok {
			vals, ran := e.values[l.From]
			if !ran || l.Slot < 0 || l.Slot >= len(vals) {
				out = append(out, kv{in.Key, []any{nil}})
				continue
			}
			out = append(out, kv{in.Key, []any{describeValue(vals[l.Slot])}})
			continue
		}
		if _, declared := n.class.input(in.Key); declared {
			out = append(out, kv{in.Key, []any{formatValue(in.Raw)}})
		}
	}
	for _, h := range n.class.hidden() {
		switch pyStr(h.Raw) {
		case "PROMPT":
			out = append(out, kv{h.Key, []any{pyReprJSON(e.j.g.raw)}})
		case "EXTRA_PNGINFO":
			v, _ := e.j.extra.get("extra_pnginfo")
			raw, _ := v.(json.RawMessage)
			if raw == nil {
				out = append(out, kv{h.Key, []any{nil}})
			} else {
				out = append(out, kv{h.Key, []any{formatValue(raw)}})
			}
		case "UNIQUE_ID":
			out = append(out, kv{h.Key, []any{n.ID}})
		}
	}
	return out
}

// formatValue is execution.format_value: scalars as they are, anything
// else as str().
func formatValue(raw json.RawMessage) any {
	switch pyjson.Kind(raw) {
	case '{', '[':
		return pyReprJSON(raw)
	}
	return raw
}

// pyReprJSON renders JSON as Python's str() of the decoded value.
func pyReprJSON(raw []byte) string {
	switch pyjson.Kind(raw) {
	case '{':
		ms, _ := pyjson.ParseObject(raw)
		parts := make([]string, len(ms))
		for i, m := range ms {
			parts[i] = pyRepr(m.Key) + ": " + pyReprJSON(m.Raw)
		}
		return "{" + strings.Join(parts, ", ") + "}"
	case '[':
		items, _ := pyjson.ParseArray(raw)
		parts := make([]string, len(items))
		for i, it := range items {
			parts[i] = pyReprJSON(it)
		}
		return "[" + strings.Join(parts, ", ") + "]"
	case '"':
		s, _ := jsonString(raw)
		return pyRepr(s)
	}
	return pyStr(raw)
}

// pythonClasses are the objects behind model-like link types.
var pythonClasses = map[string]string{
	"MODEL":       "comfy.model_patcher.ModelPatcher",
	"CLIP":        "comfy.sd.CLIP",
	"VAE":         "comfy.sd.VAE",
	"CLIP_VISION": "comfy.clip_vision.ClipVisionModel",
}

// describeValue is str() of what a link carries: tensors print like
// torch, model objects like Python objects.
func describeValue(v value) string {
	ch := func(c uint8) float64 { return float64(c) / 255 }
	switch v.kind {
	case "IMAGE":
		return torchRepr([]int{max(v.batch, 1), v.h, v.w, 3}, []float64{ch(v.rgb.R), ch(v.rgb.G), ch(v.rgb.B)})
	case "MASK":
		return torchRepr([]int{max(v.batch, 1), v.h, v.w}, []float64{ch(v.rgb.R)})
	case "LATENT":
		return "{'samples': " + torchRepr([]int{max(v.batch, 1), 4, max(1, v.h/8), max(1, v.w/8)}, []float64{0}) + "}"
	case "CONDITIONING":
		return "[[" + torchRepr([]int{1, 77, 768}, []float64{0}) + ", {'pooled_output': None}]]"
	}
	if c, ok := pythonClasses[v.kind]; ok {
		h := fnv.New32a()
		fmt.Fprint(h, v.kind, v.model)
		return fmt.Sprintf("<%s object at 0x7f%010x>", c, uint64(h.Sum32())<<8)
	}
	if v.model != "" {
		return v.model
	}
	return "None"
}

// torchRepr prints a tensor of the given shape whose last dimension
// repeats vals (one value per channel), the way torch's repr does:
// summarised beyond 1000 elements, 4 decimals unless all are integral.
func torchRepr(shape []int, vals []float64) string {
	numel := 1
	for _, d := range shape {
		numel *= max(d, 0)
	}
	if numel == 0 {
		return "tensor([], size=(" + joinInts(shape) + "))"
	}
	intMode := true
	for _, v := range vals {
		if v != math.Trunc(v) {
			intMode = false
		}
	}
	format := func(v float64) string {
		if intMode {
			return strconv.FormatFloat(v, 'f', 0, 64) + "."
		}
		return strconv.FormatFloat(v, 'f', 4, 64)
	}
	width := 0
	for _, v := range vals {
		width = max(width, len(format(v)))
	}
	pad := func(s string) string { return strings.Repeat(" ", width-len(s)) + s }
	const indent = len("tensor(")
	return "tensor(" + tensorStr(shape, vals, indent, numel > 1000, pad, format, width) + ")"
}

func tensorStr(shape []int, vals []float64, indent int, summarize bool, pad func(string) string, format func(float64) string, width int) string {
	const edge = 3
	if len(shape) == 1 {
		var items []string
		item := func(i int) string { return pad(format(vals[i%len(vals)])) }
		if summarize && shape[0] > 2*edge {
			for i := 0; i < edge; i++ {
				items = append(items, item(i))
			}
			items = append(items, " ...")
			for i := shape[0] - edge; i < shape[0]; i++ {
				items = append(items, item(i))
			}
		} else {
			for i := 0; i < shape[0]; i++ {
				items = append(items, item(i))
			}
		}
		perLine := max(1, (80-indent)/(width+2))
		var lines []string
		for i := 0; i < len(items); i += perLine {
			lines = append(lines, strings.Join(items[i:min(i+perLine, len(items))], ", "))
		}
		return "[" + strings.Join(lines, ",\n"+strings.Repeat(" ", indent+1)) + "]"
	}
	sub := tensorStr(shape[1:], vals, indent+1, summarize, pad, format, width)
	var slices []string
	if summarize && shape[0] > 2*edge {
		slices = []string{sub, sub, sub, "...", sub, sub, sub}
	} else {
		slices = make([]string, shape[0])
		for i := range slices {
			slices[i] = sub
		}
	}
	sep := "," + strings.Repeat("\n", len(shape)-1) + strings.Repeat(" ", indent+1)
	return "[" + strings.Join(slices, sep) + "]"
}

func joinInts(xs []int) string {
	parts := make([]string, len(xs))
	for i, x := range xs {
		parts[i] = strconv.Itoa(x)
	}
	return strings.Join(parts, ", ")
}
