package comfysim

import (
	"strings"
	"sync"
)

const (
	mib = int64(1) << 20
	gib = int64(1) << 30
	// cudaContext is what the driver and PyTorch hold before any model.
	cudaContext = 400 * mib
	// torchSlack is memory the caching allocator keeps reserved but free.
	torchSlack = 128 * mib
	ramTotal   = 64 * gib
)

// gpuState tracks simulated VRAM: models stay loaded after a prompt, as
// ComfyUI keeps them, until /free or an out-of-memory error unloads them;
// activations are held only while a prompt runs.
type gpuState struct {
	mu     sync.Mutex
	total  int64
	loaded map[string]int64
	active int64
	// ckpt is the checkpoint loaded last and not unloaded since, "" when
	// none. With Config.ModelLoadDuration > 0 it is the only checkpoint
	// loaded.
	ckpt string
}

func newGPU(total int64) *gpuState {
	return &gpuState{total: total, loaded: map[string]int64{}}
}

// modelSize estimates the VRAM a model file takes once loaded.
func modelSize(name string) int64 {
	n := strings.ToLower(name)
	switch {
	case strings.Contains(n, "svd_xt"):
		return 9_560 * mib
	case strings.Contains(n, "svd"):
		return 9_060 * mib
	case strings.Contains(n, "xl"):
		return 6_940 * mib
	case strings.Contains(n, "v1-5"), strings.Contains(n, "sd15"):
		return 2_130 * mib
	case strings.Contains(n, "vae"):
		return 335 * mib
	case strings.Contains(n, "lora"), strings.Contains(n, "detail"):
		return 145 * mib
	}
	return 4 * gib
}

func (g *gpuState) load(name string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.loaded[name] = modelSize(name)
}

func (g *gpuState) unloadAll() {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.loaded = map[string]int64{}
	g.ckpt = ""
}

// resident returns the checkpoint loaded last and not unloaded since.
func (g *gpuState) resident() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.ckpt
}

// loadCheckpoint loads a checkpoint alongside the models already loaded,
// as ComfyUI keeps them when loads are free.
func (g *gpuState) loadCheckpoint(name string) {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.loaded[name] = modelSize(name)
	g.ckpt = name
}

// evictFor prepares the single checkpoint slot for name: it reports false
// when name is already resident, and otherwise unloads the resident
// checkpoint and reports true; the caller then spends the load time and
// calls loadCheckpoint.
func (g *gpuState) evictFor(name string) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.ckpt != "" && g.ckpt == name {
		return false
	}
	if g.ckpt != "" {
		delete(g.loaded, g.ckpt)
		g.ckpt = ""
	}
	return true
}

// setActive sets the activation memory of the running prompt, capped to
// what is left.
func (g *gpuState) setActive(bytes int64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	left := g.total - cudaContext - g.sumLocked()
	g.active = max(0, min(bytes, left*6/10))
}

func (g *gpuState) sumLocked() int64 {
	var sum int64
	for _, b := range g.loaded {
		sum += b
	}
	return sum
}

// memory returns vram_free, torch_vram_total and torch_vram_free.
func (g *gpuState) memory() (free, torchTotal, torchFree int64) {
	g.mu.Lock()
	defer g.mu.Unlock()
	used := g.sumLocked() + g.active
	free = max(0, g.total-cudaContext-used-torchSlack)
	return free, used + torchSlack, torchSlack
}

// activationBytes estimates the working memory of a prompt from the
// largest latent or image it makes.
func activationBytes(g *graph) int64 {
	var pixels int64
	for _, n := range g.nodes {
		w, h, b := int64(0), int64(0), int64(1)
		num := func(name string) int64 {
			raw, ok := n.input(name)
			if !ok {
				return 0
			}
			v, err := numberValue(raw)
			if err != nil || !v.isInt || !v.i.IsInt64() {
				return 0
			}
			return v.i.Int64()
		}
		switch n.ClassType {
		case "EmptyLatentImage", "EmptyImage":
			w, h, b = num("width"), num("height"), max(1, num("batch_size"))
		case "SVD_img2vid_Conditioning":
			w, h, b = num("width"), num("height"), max(1, num("video_frames"))
		}
		pixels = max(pixels, w*h*b)
	}
	return max(256*mib, pixels*2048)
}

// systemStats is the /system_stats answer of a CUDA machine.
func (in *instance) systemStats() obj {
	free, torchTotal, torchFree := in.gpu.memory()
	port := ""
	if i := strings.LastIndexByte(in.addr, ':'); i >= 0 {
		port = in.addr[i+1:]
	}
	return obj{
		{"system", obj{
			{"os", "posix"},
			{"ram_total", ramTotal},
			{"ram_free", ramTotal - 9*gib},
			{"comfyui_version", "0.3.65"},
			{"required_frontend_version", "1.27.10"},
			{"installed_templates_version", nil},
			{"required_templates_version", "0.1.95"},
			{"python_version", "3.11.2 (main, Apr 28 2025, 14:11:48) [GCC 12.2.0]"},
			{"pytorch_version", "2.8.0+cu128"},
			{"embedded_python", false},
			{"argv", []string{"main.py", "--listen", "127.0.0.1", "--port", port}},
		}},
		{"devices", []obj{{
			{"name", "cuda:0 " + in.s.cfg.Name},
			{"type", "cuda"},
			{"index", 0},
			{"vram_total", in.gpu.total},
			{"vram_free", free},
			{"torch_vram_total", torchTotal},
			{"torch_vram_free", torchFree},
		}}},
	}
}
