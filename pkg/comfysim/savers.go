package comfysim

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"path"
	"strconv"
	"strings"

	"github.com/comfyfleet/comfyfleet/pkg/pyjson"
)

// maxImagesPerNode caps how many files one save node writes for a batch.
const maxImagesPerNode = 64

// pngTexts is the metadata ComfyUI embeds in saved images: the prompt
// and every extra_pnginfo entry (the UI's workflow).
func (r *nodeRun) pngTexts() []textChunk {
	prompt, err := pyjson.Format(r.e.j.g.raw)
	if err != nil {
		return nil
	}
	texts := []textChunk{{"prompt", string(prompt)}}
	if raw, ok := r.e.j.extra.get("extra_pnginfo"); ok {
		if b, ok := raw.(json.RawMessage); ok {
			ms, _ := pyjson.ParseObject(b)
			for _, m := range ms {
				if v, err := pyjson.Format(m.Raw); err == nil {
					texts = append(texts, textChunk{m.Key, string(v)})
				}
			}
		}
	}
	return texts
}

// splitPrefix splits a filename_prefix such as "videos/clip" into a
// subfolder and a file prefix, refusing to leave the folder.
func splitPrefix(prefix string) (sub, base string, err error) {
	clean := path.Clean(prefix)
	if strings.HasPrefix(prefix, "/") || clean == ".." || strings.HasPrefix(clean, "../") {
		return "", "", &nodeFailure{excType: "Exception",
			message:   "**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: " + path.Join("/opt/ComfyUI/output", path.Dir(prefix)) + "\n         output_dir: /opt/ComfyUI/output\n\n",
			traceback: executionFrames}
	}
	sub, base = path.Split(clean)
	return strings.TrimSuffix(sub, "/"), base, nil
}

// saveImages writes the images of a batch as ComfyUI's SaveImage does.
func (r *nodeRun) saveImages(dir, prefix string) (nodeResult, error) {
	imgs, _ := r.linked("images")
	sub, base, err := splitPrefix(prefix)
	if err != nil {
		return nodeResult{}, err
	}
	count := min(max(imgs.batch, 1), maxImagesPerNode)
	w, h := fitSize(imgs.w, imgs.h, maxOutputSide)
	data, err := encodePNG(w, h, imgs.rgb, r.pngTexts())
	if err != nil {
		return nodeResult{}, err
	}
	files := r.e.in.s.files
	first := files.reserve(comfyCounter, dir, sub, base, count)
	entries := make([]obj, 0, count)
	for i := 0; i < count; i++ {
		name := fmt.Sprintf("%s_%05d_.png", strings.ReplaceAll(base, "%batch_num%", strconv.Itoa(i)), first+i)
		files.put(dir, sub, name, data)
		entries = append(entries, obj{{"filename", name}, {"subfolder", sub}, {"type", dir}})
	}
	return nodeResult{ui: obj{{"images", entries}}}, nil
}

func saveImage(r *nodeRun) (nodeResult, error) {
	return r.saveImages(dirOutput, r.str("filename_prefix"))
}

// tempAlphabet is the one ComfyUI's PreviewImage draws from, typo included.
const tempAlphabet = "abcdefghijklmnopqrstupvxyz"

func previewImage(r *nodeRun) (nodeResult, error) {
	var suffix [5]byte
	r.e.in.s.random(func(rng *rand.Rand) {
		for i := range suffix {
			suffix[i] = tempAlphabet[rng.IntN(len(tempAlphabet))]
		}
	})
	return r.saveImages(dirTemp, "ComfyUI_temp_"+string(suffix[:]))
}

// saveImageWebsocket sends each image of the batch as a preview frame,
// one progress step per image, and saves nothing.
func saveImageWebsocket(r *nodeRun) (nodeResult, error) {
	imgs, _ := r.linked("images")
	count := max(imgs.batch, 1)
	var png []byte
	if r.e.j.hasClient {
		w, h := fitSize(imgs.w, imgs.h, maxOutputSide)
		var err error
		if png, err = encodePNG(w, h, imgs.rgb, nil); err != nil {
			return nodeResult{}, err
		}
	}
	for i := 0; i < count; i++ {
		if err := r.pause(r.e.in.s.cfg.NodeDuration, true); err != nil {
			return nodeResult{}, err
		}
		r.step(i, count, png)
	}
	return nodeResult{}, nil
}

func saveAnimatedWEBP(r *nodeRun) (nodeResult, error) {
	imgs, _ := r.linked("images")
	sub, base, err := splitPrefix(r.str("filename_prefix"))
	if err != nil {
		return nodeResult{}, err
	}
	frames := max(imgs.batch, 1)
	files := r.e.in.s.files
	name := fmt.Sprintf("%s_%05d_.webp", base, files.reserve(comfyCounter, dirOutput, sub, base, 1))
	files.put(dirOutput, sub, name, encodeWebP(frames, r.float("fps")))
	return nodeResult{ui: obj{
		{"images", []obj{{{"filename", name}, {"subfolder", sub}, {"type", dirOutput}}}},
		{"animated", []bool{frames != 1}},
	}}, nil
}

// videoFormats maps VideoHelperSuite formats to file extensions.
var videoFormats = map[string]string{
	"image/gif":            "gif",
	"image/webp":           "webp",
	"video/av1-webm":       "webm",
	"video/ffmpeg-gif":     "gif",
	"video/h264-mp4":       "mp4",
	"video/h265-mp4":       "mp4",
	"video/nvenc_h264-mp4": "mp4",
	"video/ProRes":         "mov",
	"video/webm":           "webm",
}

// webmHeader starts an EBML document with the webm doctype.
var webmHeader = []byte{0x1a, 0x45, 0xdf, 0xa3, 0x9f, 0x42, 0x86, 0x81, 0x01, 0x42, 0xf7, 0x81, 0x01,
	0x42, 0xf2, 0x81, 0x04, 0x42, 0xf3, 0x81, 0x08, 0x42, 0x82, 0x84, 'w', 'e', 'b', 'm', 0x42, 0x87, 0x81, 0x04, 0x42, 0x85, 0x81, 0x02}

// videoCombine is VideoHelperSuite's Video Combine: a PNG of the first
// frame carrying the workflow, and the video itself.
func videoCombine(r *nodeRun) (nodeResult, error) {
	imgs, _ := r.linked("images")
	sub, base, err := splitPrefix(r.str("filename_prefix"))
	if err != nil {
		return nodeResult{}, err
	}
	dir := dirTemp
	if r.bool("save_output") {
		dir = dirOutput
	}
	format := r.str("format")
	ext, ok := videoFormats[format]
	if !ok {
		ext = "mp4"
	}
	frames := max(imgs.batch, 1)
	if r.bool("pingpong") {
		frames = max(1, 2*frames-2)
	}
	fps := r.float("frame_rate")
	w, h := fitSize(imgs.w, imgs.h, maxOutputSide)
	frameBytes := r.e.in.s.cfg.VideoFrameBytes

	var video []byte
	switch ext {
	case "gif":
		video, err = encodeGIF(min(w, 128), min(h, 128), frames, fps, imgs.rgb)
	case "webp":
		video = encodeWebP(frames, fps)
	case "webm":
		video = append(append([]byte(nil), webmHeader...), encodeMP4(frames, frameBytes, "isom")[32:]...)
	case "mov":
		video = encodeMP4(frames, frameBytes, "qt  ")
	default:
		video = encodeMP4(frames, frameBytes, "isom")
	}
	if err != nil {
		return nodeResult{}, err
	}
	first, err := encodePNG(w, h, imgs.rgb, r.pngTexts())
	if err != nil {
		return nodeResult{}, err
	}
	files := r.e.in.s.files
	n := files.reserve(vhsCounter, dir, sub, base, 1)
	pngName := fmt.Sprintf("%s_%05d.png", base, n)
	videoName := fmt.Sprintf("%s_%05d.%s", base, n, ext)
	files.put(dir, sub, pngName, first)
	files.put(dir, sub, videoName, video)
	full := path.Join("/opt/ComfyUI", dir, sub, videoName)
	preview := obj{
		{"filename", videoName},
		{"subfolder", sub},
		{"type", dir},
		{"format", format},
		{"frame_rate", pyFloat(fps)},
		{"workflow", pngName},
		{"fullpath", full},
	}
	return nodeResult{
		values: []value{{kind: "VHS_FILENAMES", model: full}},
		ui:     obj{{"gifs", []obj{preview}}},
	}, nil
}
