package comfysim

import (
	"bytes"
	"fmt"
	"hash/crc32"
	"hash/fnv"
	"image"
	"image/color"
	"path"
)

// value is what flows along a link: enough to size the images a save
// node writes and to describe the value in an error report.
type value struct {
	kind  string
	w, h  int
	batch int
	rgb   color.NRGBA
	model string
}

func colorOf(rgb int64) color.NRGBA {
	return color.NRGBA{uint8(rgb >> 16), uint8(rgb >> 8), uint8(rgb), 255}
}

// seedColor picks a colour that depends on the seed, so that different
// seeds render different images.
func seedColor(seed uint64) color.NRGBA {
	h := fnv.New64a()
	fmt.Fprint(h, seed)
	v := h.Sum64()
	return color.NRGBA{uint8(v), uint8(v >> 8), uint8(v >> 16), 255}
}

func defaultValue(kind string) value {
	return value{kind: kind, w: 64, h: 64, batch: 1, rgb: colorOf(0x808080)}
}

// nodeResult is what a node produced: its outputs and its UI output.
type nodeResult struct {
	values []value
	ui     obj
}

// behaviour simulates one node class.
type behaviour func(r *nodeRun) (nodeResult, error)

// behaviours holds the classes that do more than pass their inputs on.
var behaviours = map[string]behaviour{
	"EmptyImage":                emptyImage,
	"LoadImage":                 loadImage,
	"ImageInvert":               imageInvert,
	"ImageScale":                imageScale,
	"ImageToMask":               imageToMask,
	"MaskToImage":               maskToImage,
	"SaveImage":                 saveImage,
	"PreviewImage":              previewImage,
	"SaveImageWebsocket":        saveImageWebsocket,
	"SaveAnimatedWEBP":          saveAnimatedWEBP,
	"VHS_VideoCombine":          videoCombine,
	"CheckpointLoaderSimple":    loadCheckpoint,
	"ImageOnlyCheckpointLoader": loadCheckpoint,
	"VAELoader":                 loadModel("vae_name"),
	"LoraLoader":                loadModel("lora_name"),
	"EmptyLatentImage":          emptyLatent,
	"KSampler":                  samplerResult,
	"KSamplerAdvanced":          samplerResult,
	"VAEDecode":                 retype("samples", "IMAGE"),
	"VAEEncode":                 retype("pixels", "LATENT"),
	"SVD_img2vid_Conditioning":  svdConditioning,
}

// passThrough gives each output the first linked input of the same
// type, or a default.
func passThrough(r *nodeRun) (nodeResult, error) {
	out := make([]value, len(r.c.Outputs))
	for i, kind := range r.c.Outputs {
		out[i] = defaultValue(kind)
		for _, in := range r.c.Inputs {
			if in.Type != kind {
				continue
			}
			if v, ok := r.linked(in.Name); ok {
				out[i] = v
				break
			}
		}
	}
	return nodeResult{values: out}, nil
}

func emptyImage(r *nodeRun) (nodeResult, error) {
	v := value{w: int(r.int("width")), h: int(r.int("height")), batch: int(r.int("batch_size")), rgb: colorOf(r.int("color"))}
	return nodeResult{values: r.outputs(v)}, nil
}

func emptyLatent(r *nodeRun) (nodeResult, error) {
	v := value{w: int(r.int("width")), h: int(r.int("height")), batch: int(r.int("batch_size")), rgb: colorOf(0)}
	return nodeResult{values: r.outputs(v)}, nil
}

func loadImage(r *nodeRun) (nodeResult, error) {
	name := r.str("image")
	dir, sub, base := annotatedPath(name)
	f, ok := r.e.in.s.files.get(dir, sub, base)
	if !ok {
		return nodeResult{}, &nodeFailure{excType: "FileNotFoundError",
			message:   fmt.Sprintf("[Errno 2] No such file or directory: '/opt/ComfyUI/%s/%s'\n", dir, path.Join(sub, base)),
			traceback: executionFrames}
	}
	v := value{w: 512, h: 512, batch: 1}
	cfg, _, err := image.DecodeConfig(bytes.NewReader(f.data))
	switch {
	case err == nil:
		v.w, v.h = cfg.Width, cfg.Height
	case extOf(base) != ".webp":
		return nodeResult{}, &nodeFailure{excType: "PIL.UnidentifiedImageError",
			message:   fmt.Sprintf("cannot identify image file '/opt/ComfyUI/%s/%s'\n", dir, path.Join(sub, base)),
			traceback: executionFrames}
	}
	sum := crc32.ChecksumIEEE(f.data)
	v.rgb = colorOf(int64(sum))
	mask := v
	mask.rgb = colorOf(0)
	v.kind, mask.kind = "IMAGE", "MASK"
	return nodeResult{values: []value{v, mask}}, nil
}

func imageInvert(r *nodeRun) (nodeResult, error) {
	v, _ := r.linked("image")
	v.rgb = color.NRGBA{255 - v.rgb.R, 255 - v.rgb.G, 255 - v.rgb.B, 255}
	return nodeResult{values: r.outputs(v)}, nil
}

func imageScale(r *nodeRun) (nodeResult, error) {
	v, _ := r.linked("image")
	w, h := int(r.int("width")), int(r.int("height"))
	switch {
	case w == 0 && h == 0:
	case w == 0:
		v.w, v.h = max(1, v.w*h/max(1, v.h)), h
	case h == 0:
		v.w, v.h = w, max(1, v.h*w/max(1, v.w))
	default:
		v.w, v.h = w, h
	}
	return nodeResult{values: r.outputs(v)}, nil
}

func imageToMask(r *nodeRun) (nodeResult, error) {
	v, _ := r.linked("image")
	if r.str("channel") == "alpha" {
		return nodeResult{}, &nodeFailure{
			excType:   "IndexError",
			message:   "index 3 is out of bounds for dimension 3 with size 3\n",
			traceback: append(append([]string(nil), executionFrames...), imageToMaskFrame),
		}
	}
	return nodeResult{values: r.outputs(v)}, nil
}

func maskToImage(r *nodeRun) (nodeResult, error) {
	v, _ := r.linked("mask")
	v.rgb = colorOf(0)
	return nodeResult{values: r.outputs(v)}, nil
}

// checkpointLoaders are the classes whose checkpoint takes
// Config.ModelLoadDuration to load when it is not resident.
var checkpointLoaders = map[string]bool{"CheckpointLoaderSimple": true, "ImageOnlyCheckpointLoader": true}

// loadCheckpoint makes the checkpoint resident. With a load cost, the GPU
// holds one checkpoint: another one is evicted and the load takes
// ModelLoadDuration, unscaled by Speed, interrupted like sampler steps.
func loadCheckpoint(r *nodeRun) (nodeResult, error) {
	name := r.str("ckpt_name")
	gpu := r.e.in.gpu
	if d := r.e.in.s.cfg.ModelLoadDuration; d > 0 && gpu.evictFor(name) {
		r.e.modelLoaded = true
		r.e.in.log.Debug("comfysim: loading checkpoint", "prompt_id", r.e.pid, "ckpt_name", name)
		if err := r.sleep(d, true); err != nil {
			return nodeResult{}, err
		}
	}
	gpu.loadCheckpoint(name)
	return nodeResult{values: r.outputs(value{model: name})}, nil
}

func loadModel(input string) behaviour {
	return func(r *nodeRun) (nodeResult, error) {
		name := r.str(input)
		r.e.in.gpu.load(name)
		res, err := passThrough(r)
		for i := range res.values {
			if res.values[i].model == "" {
				res.values[i].model = name
			}
		}
		return res, err
	}
}

// samplerResult is the latent a sampler returns; its steps were spent in runSteps.
func samplerResult(r *nodeRun) (nodeResult, error) {
	v, _ := r.linked("latent_image")
	v.rgb = seedColor(r.seed())
	return nodeResult{values: r.outputs(v)}, nil
}

// retype passes an input on as another type, as VAE nodes turn latents
// into images and back.
func retype(input, kind string) behaviour {
	return func(r *nodeRun) (nodeResult, error) {
		v, _ := r.linked(input)
		v.kind = kind
		return nodeResult{values: r.outputs(v)}, nil
	}
}

func svdConditioning(r *nodeRun) (nodeResult, error) {
	img, _ := r.linked("init_image")
	latent := value{kind: "LATENT", w: int(r.int("width")), h: int(r.int("height")), batch: int(r.int("video_frames")), rgb: img.rgb}
	return nodeResult{values: []value{{kind: "CONDITIONING"}, {kind: "CONDITIONING"}, latent}}, nil
}
