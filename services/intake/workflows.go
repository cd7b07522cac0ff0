package intake

import (
	"context"
	"errors"
	"fmt"
	"net/http"

	"github.com/danielgtaylor/huma/v2"

	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
	"github.com/comfyfleet/comfyfleet/pkg/workflow"
)

// AdminTag marks the operations reserved to administrators; authentication, when it
// comes, guards every operation carrying it.
const AdminTag = "admin"

func (in *intake) addWorkflowRoutes(a huma.API) {
	huma.Register(a, secured(tenancy.RoleRead, huma.Operation{
		OperationID: "get-workflow",
		Method:      http.MethodGet,
		Path:        "/v1/workflows/{name}",
		Summary:     "Get a workflow template",
		Description: "The template as every intake serves it: its parameters (type, default, bounds, bindings) and its ComfyUI API-format graph.",
		Tags:        []string{"workflows"},
	}), in.getWorkflow)
	huma.Register(a, secured(tenancy.RoleAdmin, huma.Operation{
		OperationID: "put-workflow",
		Method:      http.MethodPut,
		Path:        "/v1/workflows/{name}",
		Summary:     "Add or replace a workflow template (admin)",
		Description: "Admin operation. Stores the template in the fleet's templates bucket, where every intake picks it up; scenes submitted afterwards use it. " +
			"The template is checked first: parameters must bind to nodes of the graph (by id or _meta.title) and defaults must satisfy their own bounds. " +
			"The body's name may be left out; if given it must match the path. Answers 201 for a new template, 200 for a replaced one.",
		Tags:         []string{"workflows", AdminTag},
		MaxBodyBytes: 4 << 20,
		Responses: map[string]*huma.Response{
			"201": {Description: "The template is new: stored.", Content: map[string]*huma.MediaType{
				"application/json": {Schema: &huma.Schema{Ref: "#/components/schemas/Template"}}}},
		},
	}), in.putWorkflow)
}

type workflowNameInput struct {
	Name string `path:"name" pattern:"^[A-Za-z0-9_-]+$" maxLength:"128" doc:"Template name."`
}

type workflowOutput struct {
	Body *workflow.Template
}

func (in *intake) getWorkflow(_ context.Context, input *workflowNameInput) (*workflowOutput, error) {
	t, ok := in.catalog.Get(input.Name)
	if !ok {
		return nil, huma.Error404NotFound(fmt.Sprintf("no workflow template %q; known: %v", input.Name, in.catalog.Names()))
	}
	return &workflowOutput{Body: t}, nil
}

type putWorkflowInput struct {
	Name string `path:"name" pattern:"^[A-Za-z0-9_-]+$" maxLength:"128" doc:"Template name."`
	Body workflow.Template
}

type putWorkflowOutput struct {
	Status   int
	Location string `header:"Location" doc:"URL of the template."`
	Body     *workflow.Template
}

func (in *intake) putWorkflow(ctx context.Context, input *putWorkflowInput) (*putWorkflowOutput, error) {
	t := input.Body
	switch t.Name {
	case "":
		t.Name = input.Name
	case input.Name:
	default:
		return nil, huma.Error422UnprocessableEntity("validation failed", &huma.ErrorDetail{
			Location: "body.name", Message: fmt.Sprintf("does not match the name %q in the path", input.Name), Value: t.Name})
	}
	if err := t.Validate(); err != nil {
		var invalid workflow.InvalidError
		if !errors.As(err, &invalid) {
			return nil, huma.Error422UnprocessableEntity("invalid template", err)
		}
		details := make([]error, len(invalid))
		for i, f := range invalid {
			details[i] = &huma.ErrorDetail{Location: "body." + f.Field, Message: f.Message}
		}
		return nil, huma.Error422UnprocessableEntity("invalid template", details...)
	}
	rev, created, err := in.store.Put(ctx, &t)
	if err != nil {
		return nil, huma.Error503ServiceUnavailable("cannot store the template now; retry", err)
	}
	in.catalog.Set(&t, rev)
	in.log.Info("workflow template stored", "template", t.Name, "revision", rev, "created", created)
	out := &putWorkflowOutput{Status: http.StatusOK, Location: in.cfg.PublicURL + "/v1/workflows/" + t.Name, Body: &t}
	if created {
		out.Status = http.StatusCreated
	}
	return out, nil
}
