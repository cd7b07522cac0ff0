package intake

import (
	"bytes"
	"context"
	"encoding/base64"
	"fmt"
	"maps"
	"slices"
	"strings"

	"github.com/danielgtaylor/huma/v2"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/workflow"
)

// ImageInput is an input image of a scene: its bytes in base64, or a URL the
// executor downloads it from.
type ImageInput struct {
	Base64 string `json:"base64,omitempty" doc:"The image file (PNG, JPEG or WEBP) in standard base64, optionally as a data: URL. At most 20 MiB decoded."`
	URL    string `json:"url,omitempty" maxLength:"2048" doc:"An http(s) URL of the image, fetched by the executor before the scene runs."`
}

// sceneInput is a checked input image: decoded bytes to store, a URL, or an image
// stored already (object).
type sceneInput struct {
	param       string
	data        []byte
	contentType string
	url         string
	object      string
	bind        []fleet.Binding
}

// checkInputs validates a scene's input images against tpl and reports every
// problem at its field; at is the scene's location, e.g. "body.scenes[0]". An image
// parameter without a default must be given, in params or in inputs.
func (in *intake) checkInputs(ctx context.Context, at string, tpl *workflow.Template, s SceneInput) ([]sceneInput, []error) {
	var out []sceneInput
	var errs []error
	detail := func(loc, msg string) {
		errs = append(errs, &huma.ErrorDetail{Location: loc, Message: msg})
	}
	var images []string
	for _, name := range tpl.ParamNames() {
		if tpl.Params[name].Type == workflow.TypeImage {
			images = append(images, name)
		}
	}
	for _, name := range slices.Sorted(maps.Keys(s.Inputs)) {
		img, loc := s.Inputs[name], at+".inputs."+name
		p, known := tpl.Params[name]
		_, inParams := s.Params[name]
		switch {
		case !known && len(images) == 0:
			detail(loc, fmt.Sprintf("unknown; %s takes no input image", tpl.Name))
		case !known:
			detail(loc, fmt.Sprintf("unknown; %s takes images for: %s", tpl.Name, strings.Join(images, ", ")))
		case p.Type != workflow.TypeImage:
			detail(loc, fmt.Sprintf("%s is a %s parameter: set it in params", name, p.Type))
		case inParams:
			detail(loc, "given in params too: give the image in one place")
		case (img.Base64 == "") == (img.URL == ""):
			detail(loc, "give either base64 or url")
		case img.Base64 != "":
			data, contentType, msg := decodeImage(img.Base64, in.cfg.MaxInputBytes)
			if msg != "" {
				detail(loc+".base64", msg)
				continue
			}
			out = append(out, sceneInput{param: name, data: data, contentType: contentType, bind: tpl.Bindings(name)})
		default:
			if err := in.cfg.CallbackGuard.CheckURL(ctx, img.URL); err != nil {
				detail(loc+".url", err.Error())
				continue
			}
			out = append(out, sceneInput{param: name, url: img.URL, bind: tpl.Bindings(name)})
		}
	}
	for _, name := range images {
		_, inParams := s.Params[name]
		_, inInputs := s.Inputs[name]
		if tpl.Params[name].Default == nil && !inParams && !inInputs {
			detail(at+".inputs."+name, fmt.Sprintf(`required: %s needs an image, as {"base64": "…"} or {"url": "…"}`, tpl.Name))
		}
	}
	return out, errs
}

// decodeImage decodes a base64 input image of at most limit bytes; msg says what is
// wrong with it otherwise.
func decodeImage(s string, limit int) (data []byte, contentType, msg string) {
	if rest, ok := strings.CutPrefix(s, "data:"); ok {
		_, payload, found := strings.Cut(rest, ";base64,")
		if !found {
			return nil, "", "is a data: URL without ;base64,"
		}
		s = payload
	}
	if n := base64.StdEncoding.DecodedLen(len(s)); n > limit+2 {
		return nil, "", fmt.Sprintf("the image is about %d bytes; at most %d", n, limit)
	}
	data, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, "", "is not valid base64: " + err.Error()
	}
	if len(data) > limit {
		return nil, "", fmt.Sprintf("the image is %d bytes; at most %d", len(data), limit)
	}
	contentType, _, ok := fleet.InputImageType(data)
	if !ok {
		return nil, "", "is not a PNG, JPEG or WEBP image"
	}
	return data, contentType, ""
}

// storeInputs puts the scenes' base64 images in the inputs object store and returns
// each scene's input references. On failure it removes what it stored.
func (in *intake) storeInputs(ctx context.Context, job string, scenes []resolved) ([][]fleet.Input, error) {
	refs := inputRefs(job, scenes)
	for i, s := range scenes {
		for _, si := range s.inputs {
			if si.data == nil {
				continue
			}
			key := fleet.InputKey(job, i, si.param)
			_, err := in.inputs.Put(ctx, jetstream.ObjectMeta{Name: key, Metadata: map[string]string{"content-type": si.contentType}},
				bytes.NewReader(si.data))
			if err != nil {
				in.removeInputs(context.WithoutCancel(ctx), job, refs)
				return nil, fmt.Errorf("store input %s of scene %d: %w", si.param, i, err)
			}
		}
	}
	return refs, nil
}

// inputRefs names each scene's input images: the stored ones by their key in the
// inputs store, the others by URL.
func inputRefs(job string, scenes []resolved) [][]fleet.Input {
	refs := make([][]fleet.Input, len(scenes))
	for i, s := range scenes {
		for _, si := range s.inputs {
			ref := fleet.Input{Param: si.param, URL: si.url, Object: si.object, Bind: si.bind}
			if si.data != nil {
				ref.Object = fleet.InputKey(job, i, si.param)
			}
			refs[i] = append(refs[i], ref)
		}
	}
	return refs
}

// removeInputs deletes the images stored for a job that was not accepted after all;
// images stored before it (uploads) stay.
func (in *intake) removeInputs(ctx context.Context, job string, refs [][]fleet.Input) {
	for _, scene := range refs {
		for _, ref := range scene {
			if !strings.HasPrefix(ref.Object, job+"/") {
				continue
			}
			if err := in.inputs.Delete(ctx, ref.Object); err != nil {
				in.log.Warn("remove input image of a refused job", "key", ref.Object, "err", err)
			}
		}
	}
}
