package intake

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/danielgtaylor/huma/v2"
	"github.com/nats-io/nats.go/jetstream"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
)

// Bounds of a node's labels; NodeInput's schema bounds their number.
const (
	maxLabelNameLen    = 63
	maxLabelValueChars = 256
)

func (in *intake) addNodeRoutes(a huma.API) {
	huma.Register(a, secured(tenancy.RoleRead, huma.Operation{
		OperationID: "list-nodes",
		Method:      http.MethodGet,
		Path:        "/v1/nodes",
		Summary:     "List the ComfyUI nodes and their health",
		Description: "Every node of the fleet, ordered by id: its configuration (URL, pools, weight, labels, region, drained) and what its executor last reported (health). " +
			"A node that an executor still reports but that is no longer in the registry is listed too, with registered false.",
		Tags: []string{"nodes"},
	}), in.listNodes)
	huma.Register(a, secured(tenancy.RoleRead, huma.Operation{
		OperationID: "get-node",
		Method:      http.MethodGet,
		Path:        "/v1/nodes/{id}",
		Summary:     "Get a ComfyUI node and its health",
		Description: "The node's configuration, what its executor last reported (status, scenes held, VRAM, measured speed) and what it can run (its inventory: node classes and model files). 404 for a node the fleet does not know.",
		Tags:        []string{"nodes"},
		Errors:      []int{http.StatusNotFound},
	}), in.getNode)
	huma.Register(a, secured(tenancy.RoleAdmin, huma.Operation{
		OperationID: "put-node",
		Method:      http.MethodPut,
		Path:        "/v1/nodes/{id}",
		Summary:     "Add or replace a ComfyUI node (admin)",
		Description: "Admin operation. Adds the node to the fleet, or replaces its URL, pools, weight, labels and region; no service needs a restart. " +
			"A new node gets scenes once an executor drives it and reports it online. " +
			"A replaced node stays drained if it was, and keeps the executor that drives it. " +
			"Answers 201 for a new node, 200 for a replaced one.",
		Tags:         []string{"nodes", AdminTag},
		MaxBodyBytes: 64 << 10,
		Errors:       []int{http.StatusUnprocessableEntity},
		Responses: map[string]*huma.Response{
			"201": {
				Description: "The node is new: added.",
				Headers:     map[string]*huma.Param{"Location": {Description: "URL of the node.", Schema: &huma.Schema{Type: huma.TypeString}}},
				Content: map[string]*huma.MediaType{
					"application/json": {Schema: &huma.Schema{Ref: "#/components/schemas/Node"}}},
			},
		},
	}), in.putNode)
	huma.Register(a, secured(tenancy.RoleAdmin, huma.Operation{
		OperationID: "delete-node",
		Method:      http.MethodDelete,
		Path:        "/v1/nodes/{id}",
		Summary:     "Remove a ComfyUI node (admin)",
		Description: "Admin operation. Removes the node from the fleet without a restart: the dispatcher places nothing more on it and its executor lets it go. " +
			"To let it finish the scenes it holds first, drain it and wait until its health shows holding 0. 404 for an unknown node.",
		Tags:          []string{"nodes", AdminTag},
		DefaultStatus: http.StatusNoContent,
		Errors:        []int{http.StatusNotFound},
	}), in.deleteNode)
	huma.Register(a, secured(tenancy.RoleAdmin, huma.Operation{
		OperationID: "drain-node",
		Method:      http.MethodPost,
		Path:        "/v1/nodes/{id}/drain",
		Summary:     "Drain a ComfyUI node (admin)",
		Description: "Admin operation. The node finishes the scenes it holds and takes nothing new, without a restart: for maintenance, or before removing it. " +
			"Its health status shows draining until it is undrained; holding falls to 0 once it has finished. Draining a drained node changes nothing. 404 for an unknown node.",
		Tags:   []string{"nodes", AdminTag},
		Errors: []int{http.StatusNotFound},
	}), in.drainNode(true))
	huma.Register(a, secured(tenancy.RoleAdmin, huma.Operation{
		OperationID: "undrain-node",
		Method:      http.MethodPost,
		Path:        "/v1/nodes/{id}/undrain",
		Summary:     "Undrain a ComfyUI node (admin)",
		Description: "Admin operation. A drained node takes scenes again, without a restart. Undraining a node that is not drained changes nothing. 404 for an unknown node.",
		Tags:        []string{"nodes", AdminTag},
		Errors:      []int{http.StatusNotFound},
	}), in.drainNode(false))
	huma.Register(a, secured(tenancy.RoleAdmin, huma.Operation{
		OperationID: "refresh-node",
		Method:      http.MethodPost,
		Path:        "/v1/nodes/{id}/refresh",
		Summary:     "Read a node's inventory again (admin)",
		Description: "Admin operation. The executor driving the node reads the node's /object_info again (its node classes and model files) and publishes it if it changed, " +
			"so that scenes needing a checkpoint or custom node just installed there go to it at once rather than after the next scheduled read (every 5 minutes by default). " +
			"Answers the node as GET /v1/nodes/{id} shows it, with the inventory read. 404 for an unknown node, 502 when the node's ComfyUI does not answer, " +
			"503 when no executor drives the node now.",
		Tags:   []string{"nodes", AdminTag},
		Errors: []int{http.StatusNotFound, http.StatusBadGateway, http.StatusServiceUnavailable},
	}), in.refreshNode)
}

// Node is a ComfyUI node as the API shows it: its configuration in the registry and
// what its executor last reported.
type Node struct {
	ID     string            `json:"id" doc:"Node id."`
	URL    string            `json:"url" doc:"Base URL of the node's ComfyUI."`
	Pools  []string          `json:"pools" doc:"The pools whose scenes the node runs (a scene's pool is image unless it or its template says otherwise)."`
	Weight float64           `json:"weight" doc:"Relative speed of the node: 4 for a GPU about four times as fast as one of weight 1. 0 for a node that is not registered."`
	Labels map[string]string `json:"labels" doc:"Free-form labels, such as gpu."`
	Region string            `json:"region,omitempty" doc:"Where the node is, e.g. shanghai: scenes that require a region run only on its nodes, and placement counts the distance (see health.setup_seconds). Absent for a node of no region."`
	// Executor is the registry's, or else the heartbeat's.
	Executor   string     `json:"executor,omitempty" doc:"The executor that drives the node; absent for a node added through the API until an executor takes it on."`
	Drained    bool       `json:"drained" doc:"true when the node is drained: it finishes the scenes it holds and takes nothing new."`
	Registered bool       `json:"registered" doc:"false for a node known only from its executor's heartbeats, not from the registry (for instance just removed, while its executor lets it go); such a node cannot be drained or removed."`
	Health     NodeReport `json:"health" doc:"What the node's executor last reported."`
	// Inventory is filled for one node (GET /v1/nodes/{id} and the calls that change
	// one), not in lists.
	Inventory *NodeInventory `json:"inventory,omitempty" doc:"What the node can run, as its executor last read it from the node's /object_info; absent until it has, and in lists (GET /v1/nodes)."`
}

// NodeInventory is what a node can run, in short: the whole of it is the node's
// /object_info.
type NodeInventory struct {
	Version   string       `json:"version" doc:"Identifies the content: it changes when a node class or a model file comes or goes."`
	Classes   int          `json:"classes" doc:"How many node classes the node has."`
	Models    []ModelFiles `json:"models" doc:"The model files the node has, by the loader input that lists them."`
	ChangedAt time.Time    `json:"changed_at" doc:"When the executor last found the inventory changed (RFC 3339)."`
}

// ModelFiles are the files that one kind of loader input lists.
type ModelFiles struct {
	Input string   `json:"input" doc:"The loader input that lists them, e.g. ckpt_name, lora_name, vae_name."`
	Kind  string   `json:"kind" doc:"What they are: checkpoint, LoRA, VAE, …"`
	Files []string `json:"files"`
}

// NodeReport is what a node's executor last reported about it.
type NodeReport struct {
	Status          string             `json:"status" enum:"online,busy,draining,offline" doc:"online: idle, takes scenes. busy: running scenes. draining: drained; finishes what it holds and takes nothing new (right after an undrain it may show draining until its next heartbeat). offline: no heartbeat within the node TTL, or its executor cannot reach its ComfyUI (see error)."`
	Holding         int                `json:"holding" doc:"Scenes the node holds: running, and queued inside its ComfyUI behind the running one."`
	QueueRemaining  int                `json:"queue_remaining" doc:"Prompts running or pending in the node's ComfyUI queue, as ComfyUI counts them."`
	Scene           string             `json:"scene,omitempty" doc:"The running scene, as job_id.index."`
	VRAMTotal       int64              `json:"vram_total,omitempty" doc:"GPU memory in bytes, as ComfyUI reports it."`
	VRAMFree        int64              `json:"vram_free,omitempty" doc:"Free GPU memory in bytes, as ComfyUI reports it."`
	Device          string             `json:"device,omitempty" doc:"The GPU, as ComfyUI names it."`
	ScenesDone      int                `json:"scenes_done" doc:"Scenes the node finished since its executor started."`
	SecondsPerScene float64            `json:"seconds_per_scene,omitempty" doc:"Moving average of the node's scene durations, in seconds; absent until it has finished one."`
	SecondsPerStep  float64            `json:"seconds_per_step,omitempty" doc:"Moving average of one sampler step on the node, in seconds."`
	Workflows       map[string]float64 `json:"workflows,omitempty" doc:"Moving average of the node's scene durations by workflow template, in seconds, without the time spent loading a model."`
	Model           string             `json:"model,omitempty" doc:"The checkpoint the node loaded last: scenes using it run there without loading it again."`
	SetupSeconds    float64            `json:"setup_seconds,omitempty" doc:"Moving average of the time from a scene's delivery to its prompt being on the node (reading its payload and input images, uploading them), in seconds, in whole 20 ms: for a node in another region than the NATS hub, the cost of the distance; 0 beside the hub. Placement adds it to the node's estimates."`
	LastHeartbeat   *time.Time         `json:"last_heartbeat,omitempty" doc:"When the node's executor last reported it (RFC 3339); absent if it never did, or its report expired."`
	Error           string             `json:"error,omitempty" doc:"Why the executor last failed to reach the node's ComfyUI."`
}

// NodeInput is the body of PUT /v1/nodes/{id}.
type NodeInput struct {
	URL    string            `json:"url" minLength:"1" maxLength:"2048" doc:"Base URL of the node's ComfyUI: an absolute http or https URL, such as http://10.0.0.5:8188."`
	Pools  []string          `json:"pools,omitempty" minItems:"1" maxItems:"32" uniqueItems:"true" pattern:"^[A-Za-z0-9_-]+$" maxLength:"64" default:"image" doc:"The pools whose scenes the node runs, e.g. image, video: letters, digits, '-' and '_'."`
	Weight float64           `json:"weight,omitempty" exclusiveMinimum:"0" maximum:"1000" default:"1" doc:"Relative speed of the node: 4 for a GPU about four times as fast as one of weight 1."`
	Labels map[string]string `json:"labels,omitempty" maxProperties:"32" doc:"Free-form labels, such as gpu: at most 32; names of letters, digits, '-' and '_', at most 63 long; values at most 256 characters."`
	Region string            `json:"region,omitempty" pattern:"^[A-Za-z0-9_-]+$" maxLength:"64" doc:"Where the node is, e.g. shenzhen: letters, digits, '-' and '_'. Scenes that require a region run only on its nodes. Absent: no region, unless the executor that adopts the node sets its own."`
}

type nodeIDInput struct {
	ID string `path:"id" doc:"Node id."`
}

type putNodeInput struct {
	ID   string `path:"id" pattern:"^[A-Za-z0-9_-]+$" maxLength:"128" doc:"Node id: letters, digits, '-' and '_'."`
	Body NodeInput
}

type nodeOutput struct {
	Body Node
}

type putNodeOutput struct {
	Status   int
	Location string `header:"Location" doc:"URL of the node."`
	Body     Node
}

type nodesOutput struct {
	Body struct {
		Nodes []Node `json:"nodes"`
	}
}

func (in *intake) listNodes(ctx context.Context, _ *struct{}) (*nodesOutput, error) {
	nodes, err := in.readNodes(ctx)
	if err != nil {
		return nil, err
	}
	out := &nodesOutput{}
	out.Body.Nodes = nodes
	return out, nil
}

func (in *intake) getNode(ctx context.Context, input *nodeIDInput) (*nodeOutput, error) {
	n, err := in.readNode(ctx, input.ID)
	if err != nil {
		return nil, err
	}
	return &nodeOutput{Body: n}, nil
}

func (in *intake) putNode(ctx context.Context, input *putNodeInput) (*putNodeOutput, error) {
	if !fleet.ValidToken(input.ID) {
		return nil, huma.Error422UnprocessableEntity("validation failed", &huma.ErrorDetail{
			Location: "path.id", Message: "use letters, digits, '-' and '_' only, at most 128", Value: input.ID})
	}
	body := input.Body
	if errs := checkNodeInput(&body); len(errs) > 0 {
		return nil, huma.Error422UnprocessableEntity("validation failed", errs...)
	}
	cfg, created, err := in.changeNode(ctx, input.ID, func(cur *fleet.NodeConfig) (*fleet.NodeConfig, error) {
		next := &fleet.NodeConfig{ID: input.ID, URL: body.URL, Pools: body.Pools, Weight: body.Weight, Labels: body.Labels, Region: body.Region}
		if cur != nil {
			next.Drained, next.Executor = cur.Drained, cur.Executor
		}
		return next, nil
	})
	if err != nil {
		return nil, err
	}
	in.log.Info("node stored", "node", cfg.ID, "url", cfg.URL, "pools", cfg.Pools, "weight", cfg.Weight, "region", cfg.Region, "created", created)
	n, err := in.viewOf(ctx, cfg)
	if err != nil {
		return nil, err
	}
	out := &putNodeOutput{Status: http.StatusOK, Location: in.cfg.PublicURL + "/v1/nodes/" + cfg.ID, Body: n}
	if created {
		out.Status = http.StatusCreated
	}
	return out, nil
}

// checkNodeInput fills the defaults a client left out and returns an error naming
// each field the schema cannot check.
func checkNodeInput(body *NodeInput) []error {
	var errs []error
	u, err := url.Parse(body.URL)
	switch {
	case err != nil:
		errs = append(errs, &huma.ErrorDetail{Location: "body.url", Message: "is not a URL: " + err.Error(), Value: body.URL})
	case u.Scheme != "http" && u.Scheme != "https" || u.Host == "" || u.Opaque != "":
		errs = append(errs, &huma.ErrorDetail{Location: "body.url", Message: "must be an absolute http or https URL, such as http://10.0.0.5:8188", Value: body.URL})
	}
	body.URL = strings.TrimSuffix(body.URL, "/")
	names := make([]string, 0, len(body.Labels))
	for name := range body.Labels {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		at := "body.labels." + name
		if !fleet.ValidToken(name) || len(name) > maxLabelNameLen {
			errs = append(errs, &huma.ErrorDetail{Location: at, Message: fmt.Sprintf("label names use letters, digits, '-' and '_' only, at most %d", maxLabelNameLen), Value: name})
		}
		if v := body.Labels[name]; utf8.RuneCountInString(v) > maxLabelValueChars {
			errs = append(errs, &huma.ErrorDetail{Location: at, Message: fmt.Sprintf("label values are at most %d characters", maxLabelValueChars)})
		}
	}
	if len(body.Pools) == 0 {
		body.Pools = []string{"image"}
	}
	if body.Weight == 0 {
		body.Weight = 1
	}
	return errs
}

func (in *intake) deleteNode(ctx context.Context, input *nodeIDInput) (*struct{}, error) {
	err := in.registry.Delete(ctx, input.ID)
	if errors.Is(err, fleet.ErrNodeNotFound) {
		return nil, huma.Error404NotFound("no node " + input.ID)
	}
	if err != nil {
		return nil, huma.Error503ServiceUnavailable("cannot remove the node now; retry", err)
	}
	in.log.Info("node removed", "node", input.ID)
	return nil, nil
}

// drainNode returns the handler that sets a node's Drained to drained.
func (in *intake) drainNode(drained bool) func(context.Context, *nodeIDInput) (*nodeOutput, error) {
	return func(ctx context.Context, input *nodeIDInput) (*nodeOutput, error) {
		if !fleet.ValidToken(input.ID) {
			return nil, huma.Error404NotFound("no node " + input.ID)
		}
		cfg, _, err := in.changeNode(ctx, input.ID, func(cur *fleet.NodeConfig) (*fleet.NodeConfig, error) {
			if cur == nil {
				return nil, huma.Error404NotFound("no node " + input.ID)
			}
			if cur.Drained == drained {
				return cur, fleet.ErrNoChange
			}
			next := *cur
			next.Drained = drained
			return &next, nil
		})
		if err != nil {
			return nil, err
		}
		in.log.Info("node drain set", "node", cfg.ID, "drained", cfg.Drained)
		n, err := in.viewOf(ctx, cfg)
		if err != nil {
			return nil, err
		}
		return &nodeOutput{Body: n}, nil
	}
}

// changeNode writes the registry entry of id as change makes it from the current one
// (see fleet.Registry.Change). Its errors are huma errors.
func (in *intake) changeNode(ctx context.Context, id string, change func(cur *fleet.NodeConfig) (*fleet.NodeConfig, error)) (fleet.NodeConfig, bool, error) {
	cfg, created, err := in.registry.Change(ctx, id, change)
	var status huma.StatusError
	switch {
	case err == nil, errors.As(err, &status):
		return cfg, created, err
	}
	return cfg, created, huma.Error503ServiceUnavailable("cannot store the node now; retry", err)
}

// registered returns the registry entry of id and its revision; an unknown node is a
// 404. Its errors are huma errors.
func (in *intake) registered(ctx context.Context, id string) (*fleet.NodeConfig, uint64, error) {
	cfg, rev, err := in.registry.Get(ctx, id)
	if errors.Is(err, fleet.ErrNodeNotFound) {
		return nil, 0, huma.Error404NotFound("no node " + id)
	}
	if err != nil {
		return nil, 0, huma.Error503ServiceUnavailable("cannot read the node registry now; retry", err)
	}
	return cfg, rev, nil
}

// readNodes returns every node, registered or only seen through its heartbeats, with
// what it was last seen doing, ordered by id. Its errors are huma errors.
func (in *intake) readNodes(ctx context.Context) ([]Node, error) {
	configs, err := in.registry.All(ctx)
	if err != nil {
		return nil, huma.Error503ServiceUnavailable("cannot read the node registry now; retry", err)
	}
	observed, err := readAll[fleet.NodeStatus](ctx, in.nodes)
	if err != nil {
		return nil, huma.Error503ServiceUnavailable("cannot read node state now; retry", err)
	}
	nodes := make([]Node, 0, len(configs))
	for id, cfg := range configs {
		var st *fleet.NodeStatus
		if s, ok := observed[id]; ok {
			st = &s
		}
		nodes = append(nodes, nodeView(&cfg, st))
	}
	for id, st := range observed {
		if _, ok := configs[id]; !ok {
			nodes = append(nodes, nodeView(nil, &st))
		}
	}
	slices.SortFunc(nodes, func(a, b Node) int { return cmp.Compare(a.ID, b.ID) })
	return nodes, nil
}

// readNode returns one node, registered or only seen through its heartbeats, with
// what it was last seen doing; an unknown node is a 404. Its errors are huma errors.
func (in *intake) readNode(ctx context.Context, id string) (Node, error) {
	cfg, _, err := in.registered(ctx, id)
	var model *huma.ErrorModel
	if errors.As(err, &model) && model.Status == http.StatusNotFound {
		if !fleet.ValidToken(id) {
			return Node{}, err
		}
		st, stErr := in.observed(ctx, id)
		if stErr != nil {
			return Node{}, stErr
		}
		if st == nil {
			return Node{}, err
		}
		return nodeView(nil, st), nil
	}
	if err != nil {
		return Node{}, err
	}
	return in.viewOf(ctx, *cfg)
}

// viewOf joins a registered node's configuration with what it was last seen doing.
// Its errors are huma errors.
func (in *intake) viewOf(ctx context.Context, cfg fleet.NodeConfig) (Node, error) {
	st, err := in.observed(ctx, cfg.ID)
	if err != nil {
		return Node{}, err
	}
	n := nodeView(&cfg, st)
	if n.Inventory, err = in.inventoryOf(ctx, cfg.ID); err != nil {
		return Node{}, err
	}
	return n, nil
}

// observed returns the node's last reported state, nil if there is none. Its errors
// are huma errors.
func (in *intake) observed(ctx context.Context, id string) (*fleet.NodeStatus, error) {
	st, err := getJSON[fleet.NodeStatus](ctx, in.nodes, id)
	if errors.Is(err, jetstream.ErrKeyNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, huma.Error503ServiceUnavailable("cannot read node state now; retry", err)
	}
	return &st, nil
}

// nodeView joins a node's configuration, nil for a node only seen through its
// heartbeats, and its observed state, nil for a node never seen or whose state
// expired.
func nodeView(cfg *fleet.NodeConfig, st *fleet.NodeStatus) Node {
	var n Node
	switch {
	case cfg != nil:
		n = Node{ID: cfg.ID, URL: cfg.URL, Pools: cfg.Pools, Weight: cfg.Weight, Labels: cfg.Labels, Region: cfg.Region,
			Executor: cfg.Executor, Drained: cfg.Drained, Registered: true}
	case st != nil:
		n = Node{ID: st.ID, URL: st.URL, Pools: st.Pools, Region: st.Region}
	}
	if n.Pools == nil {
		n.Pools = []string{}
	}
	if n.Labels == nil {
		n.Labels = map[string]string{}
	}
	n.Health.Status = string(fleet.NodeOffline)
	if st == nil {
		return n
	}
	if n.Executor == "" {
		n.Executor = st.Executor
	}
	hb := st.Heartbeat
	n.Health = NodeReport{
		Status:          healthStatus(n.Drained, st),
		Holding:         st.Holding,
		QueueRemaining:  st.QueueRemaining,
		Scene:           st.Scene,
		VRAMTotal:       st.VRAMTotal,
		VRAMFree:        st.VRAMFree,
		Device:          st.Device,
		ScenesDone:      st.ScenesDone,
		SecondsPerScene: st.SecondsPerScene,
		SecondsPerStep:  st.SecondsPerStep,
		Workflows:       st.Workflows,
		Model:           st.Model,
		SetupSeconds:    st.SetupSeconds,
		LastHeartbeat:   &hb,
		Error:           st.Error,
	}
	return n
}

// healthStatus is a reported node's status: offline as its executor reports it,
// else draining while it is drained (or its executor still reports it so), else
// busy or online.
func healthStatus(drained bool, st *fleet.NodeStatus) string {
	switch {
	case st.State == fleet.NodeOffline:
		return string(fleet.NodeOffline)
	case drained || st.State == fleet.NodeDraining:
		return string(fleet.NodeDraining)
	case st.State == fleet.NodeBusy:
		return string(fleet.NodeBusy)
	default:
		return string(fleet.NodeOnline)
	}
}
