package comfydoor

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"mime"
	"mime/multipart"
	"net/http"
	"path"
	"strconv"
	"strings"

	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// File types of /view and /upload/image.
const (
	typeOutput = "output"
	typeInput  = "input"
	typeTemp   = "temp"
)

// contentTypeKey is the object metadata entry that holds a stored file's content
// type, as the intake and the executor write it.
const contentTypeKey = "content-type"

// getView answers GET /view?filename=&subfolder=&type=: an output of one of the
// tenant's jobs (type output, the job's id as subfolder) or one of its uploads
// (type input). The fleet keeps no temp files.
func (d *Door) getView(w http.ResponseWriter, r *http.Request, c Caller) {
	q := r.URL.Query()
	if !q.Has("filename") {
		writeBare(w, http.StatusNotFound)
		return
	}
	name, sub, typ := q.Get("filename"), q.Get("subfolder"), q.Get("type")
	if name == "" {
		writeServerError(w)
		return
	}
	if typ == "" {
		typ = typeOutput
	}
	if typ != typeOutput && typ != typeInput && typ != typeTemp {
		writeBare(w, http.StatusBadRequest)
		return
	}
	if strings.HasPrefix(name, "/") || strings.Contains(name, "..") {
		writeBare(w, http.StatusBadRequest)
		return
	}
	ctx := r.Context()
	switch typ {
	case typeOutput:
		job, err := d.cfg.Jobs.Get(ctx, sub)
		if errors.Is(err, fleet.ErrJobNotFound) || err == nil && job.Tenant != c.Tenant {
			writeBare(w, http.StatusNotFound)
			return
		}
		if err != nil {
			d.unavailable(w, "read the job", err)
			return
		}
		for _, s := range job.Scenes {
			for _, o := range s.Outputs {
				if o.Name != name {
					continue
				}
				body, err := d.cfg.OpenOutput(ctx, fleet.OutputKey(job.ID, s.Index, o.Name))
				if errors.Is(err, fs.ErrNotExist) {
					writeBare(w, http.StatusNotFound)
					return
				}
				if err != nil {
					d.unavailable(w, "read the output", err)
					return
				}
				defer body.Close()
				d.serveFile(w, name, o.ContentType, o.Size, body)
				return
			}
		}
	case typeInput:
		if clean, err := cleanSubfolder(sub); err == nil {
			obj, info, err := fleet.OpenObject(ctx, d.cfg.Inputs, uploadKey(c.Tenant, clean, path.Base(name)))
			if err == nil {
				defer obj.Close()
				d.serveFile(w, name, info.Metadata[contentTypeKey], int64(info.Size), obj)
				return
			}
			if !errors.Is(err, jetstream.ErrObjectNotFound) {
				d.unavailable(w, "read the upload", err)
				return
			}
		}
	}
	writeBare(w, http.StatusNotFound)
}

// serveFile writes a file as ComfyUI's /view does.
func (d *Door) serveFile(w http.ResponseWriter, name, contentType string, size int64, body io.Reader) {
	if contentType == "" {
		contentType = "application/octet-stream"
	}
	w.Header().Set("Content-Type", contentType)
	w.Header().Set("Content-Disposition", fmt.Sprintf("filename=%q", path.Base(name)))
	w.Header().Set("Content-Length", strconv.FormatInt(size, 10))
	if _, err := io.Copy(w, body); err != nil {
		d.log.Debug("send a file", "name", name, "err", err)
	}
}

// cleanSubfolder returns a subfolder that stays inside its folder, or an error.
func cleanSubfolder(sub string) (string, error) {
	if sub == "" {
		return "", nil
	}
	clean := path.Clean("/" + sub)[1:]
	if strings.Contains(sub, "..") || strings.HasPrefix(sub, "/") {
		return "", fmt.Errorf("subfolder %q leaves its folder", sub)
	}
	return clean, nil
}

// maxUploadBytes bounds an upload: the largest input image, and room for the form.
const maxUploadBytes = fleet.MaxInputBytes + 1<<20

// postUpload answers POST /upload/image: a PNG, JPEG or WEBP image (multipart field
// "image") kept among the tenant's uploads, at "subfolder" and the file's name;
// unless "overwrite" is true, another file of that name makes the new one "name
// (1).png" and so on, and the same image keeps its name, as ComfyUI does. A prompt
// that names it in a LoadImage input gets it on the node that runs it.
func (d *Door) postUpload(w http.ResponseWriter, r *http.Request, c Caller) {
	form, err := readUpload(w, r)
	if err != nil {
		return
	}
	if form.data == nil || form.typ != typeInput && form.typ != "" {
		writeBare(w, http.StatusBadRequest)
		return
	}
	contentType, _, ok := fleet.InputImageType(form.data)
	if !ok {
		writeText(w, http.StatusBadRequest, "400: the fleet takes PNG, JPEG and WEBP images")
		return
	}
	sub, err := cleanSubfolder(form.subfolder)
	name := path.Base(form.name)
	if err != nil || name == "." || name == "/" {
		writeBare(w, http.StatusBadRequest)
		return
	}
	ctx := r.Context()
	sum := sha256.Sum256(form.data)
	digest := "SHA-256=" + base64.URLEncoding.EncodeToString(sum[:])
	ext := path.Ext(name)
	stem := strings.TrimSuffix(name, ext)
	store := !form.overwrite
	for i := 1; store; i++ {
		info, err := d.cfg.Inputs.GetInfo(ctx, uploadKey(c.Tenant, sub, name))
		if errors.Is(err, jetstream.ErrObjectNotFound) {
			break
		}
		if err != nil {
			d.unavailable(w, "read the uploads", err)
			return
		}
		if info.Digest == digest {
			store = false
			break
		}
		if i > 10000 {
			writeBare(w, http.StatusConflict)
			return
		}
		name = fmt.Sprintf("%s (%d)%s", stem, i, ext)
	}
	if store || form.overwrite {
		meta := jetstream.ObjectMeta{Name: uploadKey(c.Tenant, sub, name), Metadata: map[string]string{contentTypeKey: contentType}}
		if _, err := d.cfg.Inputs.Put(ctx, meta, bytes.NewReader(form.data)); err != nil {
			d.unavailable(w, "store the upload", err)
			return
		}
	}
	writeJSON(w, http.StatusOK, object{{"name", name}, {"subfolder", sub}, {"type", typeInput}})
}

// upload is the form of an upload.
type upload struct {
	data      []byte
	name      string
	typ       string
	subfolder string
	overwrite bool
}

// readUpload reads the multipart form of an upload; it has answered the request when
// it returns an error.
func readUpload(w http.ResponseWriter, r *http.Request) (upload, error) {
	u := upload{typ: typeInput}
	mediaType, params, err := mime.ParseMediaType(r.Header.Get("Content-Type"))
	if err != nil || mediaType != "multipart/form-data" || params["boundary"] == "" {
		writeBare(w, http.StatusBadRequest)
		return u, errors.New("not a multipart form")
	}
	mr := multipart.NewReader(http.MaxBytesReader(w, r.Body, maxUploadBytes), params["boundary"])
	for {
		part, err := mr.NextPart()
		if errors.Is(err, io.EOF) {
			return u, nil
		}
		if err == nil {
			var b []byte
			b, err = io.ReadAll(part)
			switch part.FormName() {
			case "image":
				u.data, u.name = b, part.FileName()
			case "type":
				u.typ = string(b)
			case "subfolder":
				u.subfolder = string(b)
			case "overwrite":
				u.overwrite = string(b) == "true" || string(b) == "1"
			}
		}
		if err != nil {
			if _, tooBig := errors.AsType[*http.MaxBytesError](err); tooBig {
				writeText(w, http.StatusRequestEntityTooLarge, "413: Request Entity Too Large")
			} else {
				writeBare(w, http.StatusBadRequest)
			}
			return u, err
		}
	}
}
