package executor

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"path"
	"time"

	"github.com/nats-io/nats.go/jetstream"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"

	"github.com/comfyfleet/comfyfleet/pkg/callback"
	"github.com/comfyfleet/comfyfleet/pkg/comfy"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
)

// runOnNode places the scene's input images on n, then runs its graph there.
func (e *executor) runOnNode(ctx context.Context, n *node, item scene, promptID string, onProgress func(comfy.Progress)) (comfy.Result, error) {
	if err := e.placeInputs(ctx, n, item); err != nil {
		return comfy.Result{}, err
	}
	n.setupTook(time.Since(item.delivered))
	return n.client.Run(ctx, item.Graph, promptID, onProgress)
}

// placeInputs fetches each input image of the scene (from the inputs object store or
// its URL), uploads it to n as comfyfleet_<job>_<index>_<param>.<ext>, and writes the
// uploaded file's name into item.Graph at the input's bindings.
func (e *executor) placeInputs(ctx context.Context, n *node, item scene) error {
	if len(item.Inputs) == 0 {
		return nil
	}
	ctx, span := tracer.Start(ctx, "upload inputs", trace.WithAttributes(attribute.Int("comfyfleet.inputs", len(item.Inputs))))
	defer span.End()
	for _, in := range item.Inputs {
		data, err := e.fetchInput(ctx, in)
		if err != nil {
			return fmt.Errorf("fetch input %s: %w", in.Param, err)
		}
		_, ext, ok := fleet.InputImageType(data)
		if !ok {
			return &fileError{err: fmt.Errorf("input %s is not a PNG, JPEG or WEBP image", in.Param), permanent: true}
		}
		name := fmt.Sprintf("comfyfleet_%s_%d_%s%s", item.JobID, item.Index, in.Param, ext)
		ref, err := n.client.UploadImage(ctx, name, data, true)
		if err != nil {
			return &fileError{err: fmt.Errorf("upload input %s to node %s: %w", name, n.cfg.ID, err)}
		}
		if err := bind(item.Graph, in.Bind, path.Join(ref.Subfolder, ref.Filename)); err != nil {
			return &fileError{err: fmt.Errorf("input %s: %w", in.Param, err), permanent: true}
		}
	}
	return nil
}

// fetchInput returns the bytes of an input image.
func (e *executor) fetchInput(ctx context.Context, in fleet.Input) ([]byte, error) {
	if in.Object != "" {
		// A deadline of its own: without one the object store would cut the read
		// at the JetStream client's default timeout (5 s), too short for a large
		// image over a slow link to a far region.
		read, cancel := context.WithTimeout(ctx, e.cfg.InputTimeout)
		defer cancel()
		data, err := e.inputs.GetBytes(read, in.Object)
		if errors.Is(err, jetstream.ErrObjectNotFound) {
			// A replica behind the leader does not count.
			stored, serr := fleet.ObjectStored(ctx, e.js, fleet.ObjectInputs, in.Object)
			if serr != nil || stored {
				return nil, fmt.Errorf("read %s: not found on one server of the cluster: %w", in.Object, errors.Join(err, serr))
			}
			return nil, &fileError{err: fmt.Errorf("%s is gone from the %s store", in.Object, fleet.ObjectInputs), permanent: true}
		}
		if err != nil {
			return nil, fmt.Errorf("read %s: %w", in.Object, err)
		}
		return data, nil
	}
	ctx, cancel := context.WithTimeout(ctx, e.cfg.InputTimeout)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, in.URL, nil)
	if err != nil {
		return nil, &fileError{err: fmt.Errorf("download %s: %w", in.URL, err), permanent: true}
	}
	resp, err := e.downloads.Do(req)
	if errors.Is(err, callback.ErrForbidden) {
		return nil, &fileError{err: fmt.Errorf("download %s: %w", in.URL, err), permanent: true}
	}
	if err != nil {
		return nil, fmt.Errorf("download %s: %w", in.URL, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		he := &comfy.HTTPError{Op: "download input", StatusCode: resp.StatusCode}
		return nil, &fileError{err: fmt.Errorf("download %s: %w", in.URL, he), permanent: he.Permanent()}
	}
	data, err := io.ReadAll(io.LimitReader(resp.Body, fleet.MaxInputBytes+1))
	if err != nil {
		return nil, fmt.Errorf("download %s: %w", in.URL, err)
	}
	if len(data) > fleet.MaxInputBytes {
		return nil, &fileError{err: fmt.Errorf("download %s: larger than %d bytes", in.URL, fleet.MaxInputBytes), permanent: true}
	}
	return data, nil
}

// bind sets value at every binding of g.
func bind(g fleet.Graph, bindings []fleet.Binding, value string) error {
	for _, b := range bindings {
		node, ok := g[b.Node].(map[string]any)
		if !ok {
			return fmt.Errorf("binds to node %q, which is not in the graph", b.Node)
		}
		inputs, _ := node["inputs"].(map[string]any)
		if inputs == nil {
			inputs = map[string]any{}
			node["inputs"] = inputs
		}
		inputs[b.Input] = value
	}
	return nil
}

// fileError is a failure to move a scene's files to or from its node: an input
// image placed there, an output fetched from it. It is permanent when the input
// itself is at fault (gone, refused by its server, too large, not an image), since
// another node would fare no better; any other failure, an upload to the node or an
// output the node lost (it restarted, say) included, is transient and the scene is
// retried, elsewhere if need be.
type fileError struct {
	err       error
	permanent bool
}

func (e *fileError) Error() string { return e.err.Error() }

func (e *fileError) Unwrap() error { return e.err }

// isPermanent reports whether retrying a failed attempt cannot succeed.
func isPermanent(err error) bool {
	if ie, ok := errors.AsType[*fileError](err); ok {
		return ie.permanent
	}
	return comfy.IsPermanent(err)
}

// openInputs binds to the store of input images.
func (e *executor) openInputs(ctx context.Context, js jetstream.JetStream) error {
	store, err := js.ObjectStore(ctx, fleet.ObjectInputs)
	if err != nil {
		return fmt.Errorf("executor: open inputs: %w", err)
	}
	e.inputs = store
	return nil
}
