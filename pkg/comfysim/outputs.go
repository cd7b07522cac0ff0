package comfysim

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"image"
	"image/color"
	"image/gif"
	"image/jpeg"
	"image/png"
	"slices"
	"sync"
)

// maxOutputSide caps the side of every image the simulator encodes, so
// that a 4096×4096 request still costs microseconds.
const maxOutputSide = 256

// maxPreviewSide caps sampler previews, which real servers send at
// latent size.
const maxPreviewSide = 64

// fitSize scales w×h down to fit limit×limit, keeping the aspect ratio.
func fitSize(w, h, limit int) (int, int) {
	if w <= 0 {
		w = 64
	}
	if h <= 0 {
		h = 64
	}
	if w <= limit && h <= limit {
		return w, h
	}
	if w >= h {
		return limit, max(1, h*limit/w)
	}
	return max(1, w*limit/h), limit
}

// solidImage is an opaque w×h image of one colour.
func solidImage(w, h int, c color.NRGBA) *image.NRGBA {
	img := image.NewNRGBA(image.Rect(0, 0, w, h))
	row := img.Pix[:w*4]
	for x := 0; x < w; x++ {
		row[4*x], row[4*x+1], row[4*x+2], row[4*x+3] = c.R, c.G, c.B, 255
	}
	for y := 1; y < h; y++ {
		copy(img.Pix[y*img.Stride:], row)
	}
	return img
}

// textChunk is a PNG tEXt entry, as ComfyUI writes "prompt" and
// "workflow" into its images.
type textChunk struct {
	key, value string
}

// pngBuffers lets the simulators of a process reuse PNG encoder state:
// allocating a compressor (over a megabyte) cost more than the encoding
// of a solid image.
var pngBuffers encoderBufferPool

// encoderBufferPool is a png.EncoderBufferPool.
type encoderBufferPool struct{ pool sync.Pool }

func (p *encoderBufferPool) Get() *png.EncoderBuffer {
	b, _ := p.pool.Get().(*png.EncoderBuffer)
	return b
}

func (p *encoderBufferPool) Put(b *png.EncoderBuffer) { p.pool.Put(b) }

// solidPNGs keeps the last solid-colour PNGs encoded in the process: scenes
// repeat sizes and colours, and encoding was the largest part of what a
// scene cost the simulator.
var solidPNGs = pngCache{entries: map[pngKey][]byte{}}

// pngCacheSize bounds solidPNGs; an image of at most 256×256 pixels of one
// colour takes about a kilobyte.
const pngCacheSize = 512

type pngKey struct {
	w, h int
	c    color.NRGBA
}

type pngCache struct {
	mu      sync.Mutex
	entries map[pngKey][]byte
}

func (p *pngCache) get(k pngKey) ([]byte, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	b, ok := p.entries[k]
	return b, ok
}

func (p *pngCache) put(k pngKey, b []byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if len(p.entries) >= pngCacheSize {
		for old := range p.entries {
			delete(p.entries, old)
			break
		}
	}
	p.entries[k] = b
}

// encodePNG encodes a solid-colour RGB PNG with tEXt chunks after IHDR.
// Without texts the result may be shared: callers must not modify it.
func encodePNG(w, h int, c color.NRGBA, texts []textChunk) ([]byte, error) {
	key := pngKey{w, h, c}
	raw, ok := solidPNGs.get(key)
	if !ok {
		var b bytes.Buffer
		enc := png.Encoder{CompressionLevel: png.BestSpeed, BufferPool: &pngBuffers}
		if err := enc.Encode(&b, solidImage(w, h, c)); err != nil {
			return nil, fmt.Errorf("encode png: %w", err)
		}
		raw = slices.Clip(b.Bytes())
		solidPNGs.put(key, raw)
	}
	if len(texts) == 0 {
		return raw, nil
	}
	const ihdrEnd = 8 + 4 + 4 + 13 + 4
	var out bytes.Buffer
	out.Write(raw[:ihdrEnd])
	for _, t := range texts {
		writeChunk(&out, "tEXt", []byte(t.key+"\x00"+t.value))
	}
	out.Write(raw[ihdrEnd:])
	return out.Bytes(), nil
}

func writeChunk(b *bytes.Buffer, typ string, data []byte) {
	var n [4]byte
	binary.BigEndian.PutUint32(n[:], uint32(len(data)))
	b.Write(n[:])
	crc := crc32.NewIEEE()
	crc.Write([]byte(typ))
	crc.Write(data)
	b.WriteString(typ)
	b.Write(data)
	binary.BigEndian.PutUint32(n[:], crc.Sum32())
	b.Write(n[:])
}

// encodeJPEG encodes a solid-colour JPEG, for /view?preview=jpeg.
func encodeJPEG(w, h int, c color.NRGBA, quality int) ([]byte, error) {
	var b bytes.Buffer
	if err := jpeg.Encode(&b, solidImage(w, h, c), &jpeg.Options{Quality: quality}); err != nil {
		return nil, fmt.Errorf("encode jpeg: %w", err)
	}
	return b.Bytes(), nil
}

// encodeGIF encodes an animation of a few frames that alternate between
// the colour and a darker shade.
func encodeGIF(w, h, frames int, fps float64, c color.NRGBA) ([]byte, error) {
	frames = min(max(frames, 1), 8)
	dark := color.NRGBA{c.R / 2, c.G / 2, c.B / 2, 255}
	palette := color.Palette{color.NRGBA{c.R, c.G, c.B, 255}, dark}
	delay := 10
	if fps > 0 {
		delay = max(1, int(100/fps))
	}
	anim := &gif.GIF{}
	for i := 0; i < frames; i++ {
		img := image.NewPaletted(image.Rect(0, 0, w, h), palette)
		for y := 0; y < h; y++ {
			for x := 0; x < w; x++ {
				if (x+y+i*4)/8%2 == 1 {
					img.SetColorIndex(x, y, 1)
				}
			}
		}
		anim.Image = append(anim.Image, img)
		anim.Delay = append(anim.Delay, delay)
	}
	var b bytes.Buffer
	if err := gif.EncodeAll(&b, anim); err != nil {
		return nil, fmt.Errorf("encode gif: %w", err)
	}
	return b.Bytes(), nil
}

// encodeMP4 returns a file that starts with a valid ftyp box, which is
// what players and clients sniff; the rest is an opaque mdat payload of
// frameBytes a frame.
func encodeMP4(frames, frameBytes int, brand string) []byte {
	var b bytes.Buffer
	box := func(typ string, payload []byte) {
		var n [4]byte
		binary.BigEndian.PutUint32(n[:], uint32(8+len(payload)))
		b.Write(n[:])
		b.WriteString(typ)
		b.Write(payload)
	}
	var ftyp bytes.Buffer
	ftyp.WriteString(brand)
	ftyp.Write([]byte{0, 0, 2, 0})
	for _, compatible := range []string{"isom", "iso2", "avc1", "mp41"} {
		ftyp.WriteString(compatible)
	}
	box("ftyp", ftyp.Bytes())
	box("free", nil)
	payload := make([]byte, 64+frameBytes*max(frames, 1))
	for i := range payload {
		payload[i] = byte(i * 31)
	}
	box("mdat", payload)
	return b.Bytes()
}

// vp8lPixel is the bitstream of a 1×1 lossless WebP image.
var vp8lPixel = []byte{0x2f, 0x00, 0x00, 0x00, 0x10, 0x07, 0x10, 0x11, 0x11, 0x88, 0x88, 0xfe, 0x07}

func riffChunk(typ string, payload []byte) []byte {
	out := make([]byte, 0, 8+len(payload)+1)
	out = append(out, typ...)
	out = binary.LittleEndian.AppendUint32(out, uint32(len(payload)))
	out = append(out, payload...)
	if len(payload)%2 == 1 {
		out = append(out, 0)
	}
	return out
}

func riffWebP(chunks ...[]byte) []byte {
	body := []byte("WEBP")
	for _, c := range chunks {
		body = append(body, c...)
	}
	return append(append([]byte("RIFF"), binary.LittleEndian.AppendUint32(nil, uint32(len(body)))...), body...)
}

func uint24(v int) []byte {
	return []byte{byte(v), byte(v >> 8), byte(v >> 16)}
}

// encodeWebP returns a valid 1×1 lossless WebP; with frames > 1 it is an
// animated WebP (VP8X, ANIM and one ANMF per frame).
func encodeWebP(frames int, fps float64) []byte {
	if frames <= 1 {
		return riffWebP(riffChunk("VP8L", vp8lPixel))
	}
	frames = min(frames, 64)
	vp8x := append([]byte{0x02, 0, 0, 0}, append(uint24(0), uint24(0)...)...)
	anim := []byte{0, 0, 0, 0, 0, 0}
	duration := 100
	if fps > 0 {
		duration = max(1, int(1000/fps))
	}
	chunks := [][]byte{riffChunk("VP8X", vp8x), riffChunk("ANIM", anim)}
	for i := 0; i < frames; i++ {
		frame := append(append(append(append(uint24(0), uint24(0)...), uint24(0)...), uint24(0)...), uint24(duration)...)
		frame = append(frame, 0)
		frame = append(frame, riffChunk("VP8L", vp8lPixel)...)
		chunks = append(chunks, riffChunk("ANMF", frame))
	}
	return riffWebP(chunks...)
}
