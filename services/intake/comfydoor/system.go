package comfydoor

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"runtime"
	"slices"
	"strings"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// ComfyUIVersion is the ComfyUI release whose API the door follows; /system_stats
// reports it as comfyui_version.
const ComfyUIVersion = "0.3.65"

// getObjectInfo answers GET /object_info and GET /object_info/{class}: what the
// fleet's nodes can run.
func (d *Door) getObjectInfo(w http.ResponseWriter, r *http.Request, _ Caller) {
	fi, err := d.catalog.get(r.Context())
	if err != nil {
		d.unavailable(w, "read what the nodes can run", err)
		return
	}
	class := r.PathValue("class")
	if class == "" {
		w.Header().Set("Content-Type", "application/json; charset=utf-8")
		_, _ = w.Write(fi.body)
		return
	}
	out := object{}
	if def, ok := fi.classes[class]; ok {
		out = append(out, field{class, json.RawMessage(def)})
	}
	writeJSON(w, http.StatusOK, out)
}

// getSystemStats answers GET /system_stats: the door's system, and one device per
// node of the fleet, from the nodes' heartbeats.
func (d *Door) getSystemStats(w http.ResponseWriter, r *http.Request, _ Caller) {
	nodes, err := d.nodeStatuses(r.Context())
	if err != nil {
		d.unavailable(w, "read the nodes", err)
		return
	}
	devices := make([]any, 0, len(nodes))
	for i, n := range nodes {
		name := n.ID
		if n.Device != "" {
			name += ": " + n.Device
		}
		devices = append(devices, object{
			{"name", name}, {"type", deviceType(n.Device)}, {"index", i},
			{"vram_total", n.VRAMTotal}, {"vram_free", n.VRAMFree},
			{"torch_vram_total", int64(0)}, {"torch_vram_free", int64(0)},
		})
	}
	osName := "posix"
	if runtime.GOOS == "windows" {
		osName = "nt"
	}
	writeJSON(w, http.StatusOK, object{
		{"system", object{
			{"os", osName}, {"ram_total", int64(0)}, {"ram_free", int64(0)},
			{"comfyui_version", ComfyUIVersion}, {"required_frontend_version", ""},
			{"installed_templates_version", nil}, {"required_templates_version", ""},
			{"python_version", ""}, {"pytorch_version", ""}, {"embedded_python", false},
			{"argv", []string{"comfyfleet"}},
		}},
		{"devices", devices},
	})
}

// deviceType is the torch device type a ComfyUI device name starts with, such as
// "cuda" in "cuda:0 NVIDIA GeForce RTX 3060 : cudaMallocAsync".
func deviceType(name string) string {
	t, _, _ := strings.Cut(name, ":")
	t, _, _ = strings.Cut(t, " ")
	return cmp.Or(t, "cuda")
}

// nodeStatuses returns the nodes' last heartbeats, by node id.
func (d *Door) nodeStatuses(ctx context.Context) ([]fleet.NodeStatus, error) {
	wt, err := d.cfg.Nodes.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", fleet.BucketNodes, err)
	}
	defer func() { _ = wt.Stop() }()
	var out []fleet.NodeStatus
	for {
		select {
		case e, ok := <-wt.Updates():
			if !ok {
				return nil, fmt.Errorf("read %s: the watch ended", fleet.BucketNodes)
			}
			if e == nil {
				slices.SortFunc(out, func(a, b fleet.NodeStatus) int { return cmp.Compare(a.ID, b.ID) })
				return out, nil
			}
			var st fleet.NodeStatus
			if err := json.Unmarshal(e.Value(), &st); err == nil {
				out = append(out, st)
			}
		case <-ctx.Done():
			return nil, fmt.Errorf("read %s: %w", fleet.BucketNodes, ctx.Err())
		}
	}
}

// getFeatures answers GET /features: no previews are sent, the largest upload is the
// largest input image.
func (d *Door) getFeatures(w http.ResponseWriter, _ *http.Request, _ Caller) {
	writeJSON(w, http.StatusOK, features())
}

func features() object {
	return object{{"supports_preview_metadata", true}, {"max_upload_size", int64(fleet.MaxInputBytes)}}
}
