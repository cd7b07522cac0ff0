package comfysim_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
)

// Workflows in ComfyUI's API format, written as JSON text because the
// order of inputs decides the order in which nodes run.

// txt2img is ComfyUI's default workflow.
func txt2img(steps int, seed uint64, prefix string) string {
	return fmt.Sprintf(`{
  "3": {"class_type": "KSampler", "inputs": {"seed": %d, "steps": %d, "cfg": 8, "sampler_name": "euler", "scheduler": "normal", "denoise": 1, "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0]}},
  "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
  "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}},
  "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "beautiful scenery nature glass bottle landscape, purple galaxy bottle", "clip": ["4", 1]}},
  "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "text, watermark", "clip": ["4", 1]}},
  "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
  "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": %q, "images": ["8", 0]}}
}`, seed, steps, prefix)
}

// svd turns an uploaded image into a video with Stable Video Diffusion.
func svd(image, format string, frames, steps int) string {
	return fmt.Sprintf(`{
  "1": {"class_type": "ImageOnlyCheckpointLoader", "inputs": {"ckpt_name": "svd_xt.safetensors"}},
  "2": {"class_type": "LoadImage", "inputs": {"image": %q}},
  "3": {"class_type": "SVD_img2vid_Conditioning", "inputs": {"clip_vision": ["1", 1], "init_image": ["2", 0], "vae": ["1", 2], "width": 1024, "height": 576, "video_frames": %d, "motion_bucket_id": 127, "fps": 6, "augmentation_level": 0.0}},
  "4": {"class_type": "VideoLinearCFGGuidance", "inputs": {"model": ["1", 0], "min_cfg": 1.0}},
  "5": {"class_type": "KSampler", "inputs": {"seed": 7, "steps": %d, "cfg": 2.5, "sampler_name": "euler", "scheduler": "karras", "denoise": 1.0, "model": ["4", 0], "positive": ["3", 0], "negative": ["3", 1], "latent_image": ["3", 2]}},
  "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
  "7": {"class_type": "VHS_VideoCombine", "inputs": {"images": ["6", 0], "frame_rate": 8, "loop_count": 0, "filename_prefix": "svd/clip", "format": %q, "pingpong": false, "save_output": true, "pix_fmt": "yuv420p", "crf": 19}}
}`, image, frames, steps, format)
}

// animatedWebP saves a batch as an animated WebP.
const animatedWebP = `{
  "1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 4, "color": 255}},
  "2": {"class_type": "SaveAnimatedWEBP", "inputs": {"images": ["1", 0], "filename_prefix": "anim", "fps": 6.0, "lossless": true, "quality": 80, "method": "default"}}
}`

// tiny saves one small image; color makes each prompt distinct.
func tiny(color int, prefix string) string {
	return fmt.Sprintf(`{
  "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 16, "batch_size": 1, "color": %d}},
  "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": %q}}
}`, color, prefix)
}

// submit posts a prompt given as JSON text and returns its id.
func (c *client) submit(prompt, clientID string, extra ...string) string {
	c.t.Helper()
	body := `{"prompt": ` + prompt + `, "client_id": "` + clientID + `"` + strings.Join(extra, "") + `}`
	resp := c.postJSON("/prompt", body)
	if resp.status != http.StatusOK {
		c.t.Fatalf("POST /prompt: %d %s", resp.status, resp.body)
	}
	var out struct {
		PromptID string `json:"prompt_id"`
	}
	if err := json.Unmarshal(resp.body, &out); err != nil {
		c.t.Fatalf("decode %s: %v", resp.body, err)
	}
	return out.PromptID
}

// run submits a prompt and waits for its end, returning its frames.
func run(t *testing.T, c *client, ws *wsRecorder, prompt, clientID string) (string, []wsFrame) {
	t.Helper()
	mark := ws.mark()
	id := c.submit(prompt, clientID)
	end := ws.waitDone(mark, id)
	return id, ws.since(mark)[:end-mark+1]
}

// frameData decodes the data of a text frame.
func frameData(t *testing.T, f wsFrame) map[string]any {
	t.Helper()
	var m struct {
		Data map[string]any `json:"data"`
	}
	if err := json.Unmarshal(f.data, &m); err != nil {
		t.Fatalf("decode frame %s: %v", f.data, err)
	}
	return m.Data
}

// history returns one prompt's history entry, decoded.
func (c *client) history(id string) map[string]any {
	c.t.Helper()
	var out map[string]map[string]any
	resp := c.get("/history/" + id)
	if err := json.Unmarshal(resp.body, &out); err != nil {
		c.t.Fatalf("decode history %s: %v", resp.body, err)
	}
	return out[id]
}

// firstOutput returns the first file entry of a history entry's outputs.
func firstOutput(t *testing.T, entry map[string]any, node, key string) map[string]any {
	t.Helper()
	outputs, _ := entry["outputs"].(map[string]any)
	nodeOut, _ := outputs[node].(map[string]any)
	files, _ := nodeOut[key].([]any)
	if len(files) == 0 {
		t.Fatalf("no %s output from node %s in %v", key, node, entry["outputs"])
	}
	return files[0].(map[string]any)
}
