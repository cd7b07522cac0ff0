package comfysim

import (
	"bytes"
	"errors"
	"fmt"
	"image"
	"image/color"
	"io"
	"net/http"
	"path"
	"strconv"
	"strings"
)

// getView serves a stored file: GET /view?filename=&subfolder=&type=.
func (in *instance) getView(w http.ResponseWriter, r *http.Request, _ string) {
	q := query(r)
	names, ok := q["filename"]
	if !ok {
		writeBare(w, http.StatusNotFound)
		return
	}
	filename := names[0]
	if filename == "" {
		writeServerError(w)
		return
	}
	dir := ""
	for _, d := range []string{dirOutput, dirInput, dirTemp} {
		if n, ok := strings.CutSuffix(filename, " ["+d+"]"); ok {
			dir, filename = d, n
			break
		}
	}
	if strings.HasPrefix(filename, "/") || strings.Contains(filename, "..") {
		writeBare(w, http.StatusBadRequest)
		return
	}
	if dir == "" {
		dir = dirOutput
		if t, ok := q["type"]; ok {
			dir = t[0]
		}
		if dir != dirOutput && dir != dirInput && dir != dirTemp {
			writeBare(w, http.StatusBadRequest)
			return
		}
	}
	sub, err := cleanSubfolder(q.Get("subfolder"))
	if err != nil {
		writeBare(w, http.StatusForbidden)
		return
	}
	base := path.Base(filename)
	if strings.HasSuffix(filename, "/") {
		base = ""
	}
	f, ok := in.s.files.get(dir, sub, base)
	if !ok {
		writeBare(w, http.StatusNotFound)
		return
	}
	disposition := `filename="` + base + `"`
	if preview, ok := q["preview"]; ok {
		in.servePreview(w, f, disposition, preview[0], q.Get("channel"))
		return
	}
	w.Header().Set("Content-Disposition", disposition)
	w.Header().Set("Content-Type", contentTypeOf(base))
	w.Header().Set("Etag", fmt.Sprintf(`"%x-%x"`, f.modTime.UnixNano(), len(f.data)))
	http.ServeContent(w, r, base, f.modTime, bytes.NewReader(f.data))
}

// servePreview re-encodes an image as ?preview=webp;90 or jpeg;90 asks.
// A WebP preview is a 1×1 image, as the simulator has no WebP encoder.
func (in *instance) servePreview(w http.ResponseWriter, f *storedFile, disposition, preview, channel string) {
	img, _, err := image.Decode(bytes.NewReader(f.data))
	if err != nil {
		writeServerError(w)
		return
	}
	info := strings.Split(preview, ";")
	format := info[0]
	if (format != "webp" && format != "jpeg") || strings.Contains(channel, "a") {
		format = "webp"
	}
	quality := 90
	if n, err := strconv.Atoi(info[len(info)-1]); err == nil && n >= 0 {
		quality = n
	}
	var body []byte
	if format == "jpeg" {
		b := img.Bounds()
		c := color.NRGBAModel.Convert(img.At(b.Min.X, b.Min.Y)).(color.NRGBA)
		body, err = encodeJPEG(b.Dx(), b.Dy(), c, max(1, min(quality, 100)))
		if err != nil {
			writeServerError(w)
			return
		}
	} else {
		body = encodeWebP(1, 0)
	}
	w.Header().Set("Content-Disposition", disposition)
	w.Header().Set("Content-Type", "image/"+format)
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(http.StatusOK)
	_, _ = w.Write(body)
}

// postUploadImage stores a multipart "image" in the input folder (or the
// folder "type" names) and answers {"name", "subfolder", "type"}.
func (in *instance) postUploadImage(w http.ResponseWriter, r *http.Request, _ string) {
	r.Body = http.MaxBytesReader(w, r.Body, maxUploadSize)
	if err := r.ParseMultipartForm(32 << 20); err != nil {
		var tooBig *http.MaxBytesError
		switch {
		case errors.As(err, &tooBig):
			writeText(w, http.StatusRequestEntityTooLarge, "413: Request Entity Too Large")
		case errors.Is(err, http.ErrNotMultipart):
			writeBare(w, http.StatusBadRequest)
		default:
			writeServerError(w)
		}
		return
	}
	defer func() { _ = r.MultipartForm.RemoveAll() }()
	files := r.MultipartForm.File["image"]
	if len(files) == 0 || files[0].Filename == "" {
		writeBare(w, http.StatusBadRequest)
		return
	}
	fh := files[0]
	form := r.MultipartForm.Value
	field := func(name string) (string, bool) {
		if v, ok := form[name]; ok && len(v) > 0 {
			return v[0], true
		}
		return "", false
	}
	typ, ok := field("type")
	if !ok {
		typ = dirInput
	}
	if typ != dirInput && typ != dirOutput && typ != dirTemp {
		writeServerError(w)
		return
	}
	subRaw, _ := field("subfolder")
	sub, err := cleanSubfolder(subRaw)
	if err != nil || strings.Contains(fh.Filename, "/") {
		writeBare(w, http.StatusBadRequest)
		return
	}
	src, err := fh.Open()
	if err != nil {
		writeServerError(w)
		return
	}
	data, err := io.ReadAll(src)
	_ = src.Close()
	if err != nil {
		writeServerError(w)
		return
	}

	name := fh.Filename
	overwrite, _ := field("overwrite")
	duplicate := false
	if overwrite != "true" && overwrite != "1" {
		ext := path.Ext(name)
		stem := strings.TrimSuffix(name, ext)
		for i := 1; ; i++ {
			existing, ok := in.s.files.get(typ, sub, name)
			if !ok {
				break
			}
			if bytes.Equal(existing.data, data) {
				duplicate = true
				break
			}
			name = fmt.Sprintf("%s (%d)%s", stem, i, ext)
		}
	}
	if !duplicate {
		in.s.files.put(typ, sub, name, data)
	}
	writeJSON(w, http.StatusOK, obj{{"name", name}, {"subfolder", subRaw}, {"type", typ}})
}
