package intake

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"time"

	"github.com/danielgtaylor/huma/v2"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
)

// The seed-compatible endpoints serve clients written against comfyfleet's original
// plan. They map onto the same jobs and nodes as /v1.

// compatTemplates are the templates a dispatch of each type runs. A video needs a
// first frame, which a dispatch cannot carry: txt2video draws one from the prompt
// and animates it, in one graph.
var compatTemplates = map[string]string{"image": "txt2img", "video": "txt2video"}

func (in *intake) addCompatRoutes(a huma.API) {
	huma.Register(a, secured(tenancy.RoleSubmit, huma.Operation{
		OperationID:   "compat-dispatch",
		Method:        http.MethodPost,
		Path:          "/api/comfyui/dispatch",
		Summary:       "Submit one generation (seed-compatible)",
		Description:   "Creates a job of one scene: type image runs the txt2img template with the prompt, type video runs txt2video (a keyframe drawn from the prompt, animated by Stable Video Diffusion). Follow it with GET /v1/jobs/{job_id}. Fields other than type, prompt and priority are ignored.",
		Tags:          []string{"compat"},
		DefaultStatus: http.StatusAccepted,
		MaxBodyBytes:  1 << 20,
	}), in.compatDispatch)
	huma.Register(a, secured(tenancy.RoleRead, huma.Operation{
		OperationID: "compat-list-nodes",
		Method:      http.MethodGet,
		Path:        "/api/nodes",
		Summary:     "List the ComfyUI nodes (seed-compatible)",
		Description: "The nodes of GET /v1/nodes in the seed plan's shape.",
		Tags:        []string{"compat"},
	}), in.compatListNodes)
	huma.Register(a, secured(tenancy.RoleRead, huma.Operation{
		OperationID: "compat-node-health",
		Method:      http.MethodGet,
		Path:        "/api/nodes/{node_id}/health",
		Summary:     "A node's health and load (seed-compatible)",
		Tags:        []string{"compat"},
	}), in.compatNodeHealth)
}

// DispatchRequest is the body of POST /api/comfyui/dispatch.
type DispatchRequest struct {
	_        struct{} `additionalProperties:"true"`
	Type     string   `json:"type" enum:"image,video" doc:"image: txt2img; video: txt2video."`
	Prompt   string   `json:"prompt" minLength:"1" maxLength:"8000" doc:"What to draw."`
	Priority int      `json:"priority,omitempty" minimum:"1" maximum:"10" default:"5" doc:"1 (lowest) to 10."`
}

// Dispatched is the answer to a dispatch.
type Dispatched struct {
	JobID  string `json:"job_id"`
	Node   string `json:"node" doc:"The node running the scene; empty until one takes it."`
	Status string `json:"status" enum:"queued,running,succeeded,failed,cancelled"`
}

type dispatchInput struct {
	Body DispatchRequest
}

type dispatchOutput struct {
	Location string `header:"Location" doc:"URL of the job."`
	Body     Dispatched
}

func (in *intake) compatDispatch(ctx context.Context, input *dispatchInput) (*dispatchOutput, error) {
	body := &JobInput{Priority: input.Body.Priority, Scenes: []SceneInput{{
		Workflow: compatTemplates[input.Body.Type],
		Params:   map[string]any{"prompt": input.Body.Prompt},
	}}}
	job, _, err := in.submit(ctx, body, "")
	if err != nil {
		return nil, compatLocations(err)
	}
	return &dispatchOutput{
		Location: in.cfg.PublicURL + api.JobPath(job.ID),
		Body:     Dispatched{JobID: job.ID, Node: job.Scenes[0].Node, Status: string(job.Status)},
	}, nil
}

// compatLocations rewrites the locations of a job's validation errors to the
// dispatch body's fields.
func compatLocations(err error) error {
	var model *huma.ErrorModel
	if !errors.As(err, &model) {
		return err
	}
	for _, d := range model.Errors {
		switch {
		case strings.HasPrefix(d.Location, "body.scenes[0].params.prompt"):
			d.Location = "body.prompt"
		case strings.HasPrefix(d.Location, "body.scenes[0]"):
			d.Location = "body.type"
		}
	}
	return err
}

// CompatNode is a node in the seed plan's shape.
type CompatNode struct {
	ID            string     `json:"id"`
	URL           string     `json:"url"`
	Status        string     `json:"status" enum:"online,busy,offline" doc:"offline when no heartbeat arrived within the node TTL. A drained node shows busy while it still holds scenes, else online."`
	QueueLength   int        `json:"queue_length" doc:"Prompts running or pending in the node's ComfyUI queue."`
	LastHeartbeat *time.Time `json:"last_heartbeat" nullable:"true" doc:"When the node was last seen; null if it never was, or its state expired."`
}

type compatNodesOutput struct {
	Body struct {
		Nodes []CompatNode `json:"nodes"`
	}
}

func (in *intake) compatListNodes(ctx context.Context, _ *struct{}) (*compatNodesOutput, error) {
	nodes, err := in.readNodes(ctx)
	if err != nil {
		return nil, err
	}
	out := &compatNodesOutput{}
	out.Body.Nodes = make([]CompatNode, len(nodes))
	for i, n := range nodes {
		out.Body.Nodes[i] = CompatNode{ID: n.ID, URL: n.URL, Status: compatStatus(n.Health), QueueLength: n.Health.QueueRemaining, LastHeartbeat: n.Health.LastHeartbeat}
	}
	return out, nil
}

// NodeHealth is a node's health and load in the seed plan's shape.
type NodeHealth struct {
	Status          string  `json:"status" enum:"online,busy,offline" doc:"offline when no heartbeat arrived within the node TTL. A drained node shows busy while it still holds scenes, else online."`
	GPUUsage        float64 `json:"gpu_usage" minimum:"0" maximum:"1" doc:"Share of the GPU taken by comfyfleet: 1 while the node runs a scene, else 0. ComfyUI reports no utilisation figure; it runs one prompt at a time and keeps the GPU busy while it does."`
	MemoryUsage     float64 `json:"memory_usage" minimum:"0" maximum:"1" doc:"Share of the GPU's memory in use, (VRAM total - VRAM free) / VRAM total, as the node's ComfyUI last reported it; 0 when unknown."`
	QueueLength     int     `json:"queue_length" doc:"Prompts running or pending in the node's ComfyUI queue."`
	ProcessingSpeed float64 `json:"processing_speed" minimum:"0" doc:"Measured seconds per scene (per image, for image templates): a moving average over the node's recent scenes; 0 until it has finished one."`
}

type nodeHealthInput struct {
	NodeID string `path:"node_id" doc:"Node id."`
}

type nodeHealthOutput struct {
	Body NodeHealth
}

func (in *intake) compatNodeHealth(ctx context.Context, input *nodeHealthInput) (*nodeHealthOutput, error) {
	n, err := in.readNode(ctx, input.NodeID)
	if err != nil {
		return nil, err
	}
	st := n.Health
	h := NodeHealth{Status: compatStatus(st), QueueLength: st.QueueRemaining, ProcessingSpeed: st.SecondsPerScene}
	if h.Status == string(fleet.NodeBusy) {
		h.GPUUsage = 1
	}
	if st.VRAMTotal > 0 && h.Status != string(fleet.NodeOffline) {
		h.MemoryUsage = float64(st.VRAMTotal-st.VRAMFree) / float64(st.VRAMTotal)
	}
	return &nodeHealthOutput{Body: h}, nil
}

// compatStatus is a node's status in the seed plan, which knows no draining: a
// drained node is busy while it holds scenes, else online.
func compatStatus(h NodeReport) string {
	if h.Status != string(fleet.NodeDraining) {
		return h.Status
	}
	if h.Holding > 0 {
		return string(fleet.NodeBusy)
	}
	return string(fleet.NodeOnline)
}
