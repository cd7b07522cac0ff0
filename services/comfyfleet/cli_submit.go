package main

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"net/url"
	"os"
	"strconv"
	"strings"

	"github.com/comfyfleet/comfyfleet/pkg/api"
	"github.com/comfyfleet/comfyfleet/pkg/workflow"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

// runSubmit submits a job: from a job file, or one template's scene --count times.
func runSubmit(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := commandFlags("submit", "(-f JOB.json | --workflow NAME [--param NAME=VALUE]… [--count N]) [--wait] [--out DIR] [flags]", stderr)
	var (
		cf       clientFlags
		params   listFlag
		file     = fs.String("f", "", "a job file: the JSON body of POST /v1/jobs ({\"priority\", \"scenes\": […]}); - reads it from standard input")
		template = fs.String("workflow", "", "a workflow template (GET /v1/workflows) whose scene to submit, instead of -f")
		count    = fs.Int("count", 1, "scenes of --workflow to submit in the job; with a seed parameter, scene i gets seed+i")
		priority = fs.Int("priority", 0, "priority 1 (lowest) to 10 (default: the job file's, else 5)")
		pool     = fs.String("pool", "", "pool of nodes every scene runs on (default: each template's)")
		callback = fs.String("callback", "", "URL that receives the finished job as a POST")
		region   = fs.String("region", "", "the only region whose nodes may run the job's scenes, such as shenzhen (default: the job file's, else any)")
		prefer   = fs.String("prefer-region", "", "a region whose nodes the job's scenes go to unless others finish them markedly sooner (default: the job file's, else none)")
		wait     = fs.Bool("wait", false, "follow the job to its end with a progress bar per scene; exit 1 if a scene failed or the job was cancelled")
		out      = fs.String("out", "", "download every output file into this directory once the job is done (implies --wait)")
	)
	fs.Var(&params, "param", "a template parameter, name=value (repeatable); an image parameter takes @FILE or an http(s) URL")
	cf.register(fs)
	positional, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(positional) > 0 {
		return fmt.Errorf("submit: unexpected argument %q; name the job with -f or --workflow", positional[0])
	}
	c, err := cf.client()
	if err != nil {
		return err
	}
	var body intake.JobInput
	switch {
	case (*file == "") == (*template == ""):
		return fmt.Errorf("submit: give a job file (-f job.json) or a template (--workflow txt2img --param prompt=…)")
	case *file != "":
		if len(params) > 0 || *count != 1 {
			return fmt.Errorf("submit: --param and --count go with --workflow; a job file sets its scenes itself")
		}
		if body, err = readJobFile(*file); err != nil {
			return err
		}
	default:
		if *count < 1 {
			return fmt.Errorf("submit: --count %d: submit at least one scene", *count)
		}
		var t workflow.Template
		if err := c.call(ctx, "GET", "/v1/workflows/"+url.PathEscape(*template), nil, &t); err != nil {
			return err
		}
		scene, err := templateScene(t, params)
		if err != nil {
			return err
		}
		body.Scenes = repeatScene(t, scene, *count)
	}
	if *priority != 0 {
		body.Priority = *priority
	}
	if *pool != "" {
		for i := range body.Scenes {
			body.Scenes[i].Pool = *pool
		}
	}
	if *callback != "" {
		body.CallbackURL = *callback
	}
	if *region != "" {
		body.Region = *region
	}
	if *prefer != "" {
		body.PreferRegion = *prefer
	}
	var job api.Job
	if err := c.call(ctx, "POST", "/v1/jobs", body, &job); err != nil {
		return err
	}
	fmt.Fprintln(stdout, job.ID)
	if !*wait && *out == "" {
		fmt.Fprintf(stderr, "job %s: %d scenes queued; follow it with: comfyfleet jobs watch %s\n", job.ID, len(job.Scenes), job.ID)
		return nil
	}
	return watchJob(ctx, c, job.ID, *out, stdout, stderr)
}

// readJobFile reads a job request from path, or standard input for "-". Numbers
// stay as written (a 64-bit seed keeps every digit).
func readJobFile(path string) (intake.JobInput, error) {
	var body intake.JobInput
	var raw []byte
	var err error
	if path == "-" {
		raw, err = io.ReadAll(os.Stdin)
	} else {
		raw, err = os.ReadFile(path)
	}
	if err != nil {
		return body, fmt.Errorf("read the job file: %w", err)
	}
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	dec.DisallowUnknownFields()
	if err := dec.Decode(&body); err != nil {
		return body, fmt.Errorf("job file %s: %w", path, err)
	}
	return body, nil
}

// templateScene is a scene of template t with the parameters given as name=value,
// each converted to the type the template declares. A name the template does not
// declare goes as a string, for the API to refuse with its reasons.
func templateScene(t workflow.Template, params []string) (intake.SceneInput, error) {
	scene := intake.SceneInput{Workflow: t.Name, Params: map[string]any{}}
	for _, kv := range params {
		name, raw, ok := strings.Cut(kv, "=")
		if !ok || name == "" {
			return scene, fmt.Errorf("--param %q: write name=value", kv)
		}
		p, known := t.Params[name]
		if !known {
			scene.Params[name] = raw
			continue
		}
		if p.Type == "image" {
			in, isInput, err := imageInput(raw)
			if err != nil {
				return scene, fmt.Errorf("--param %s: %w", name, err)
			}
			if isInput {
				if scene.Inputs == nil {
					scene.Inputs = map[string]intake.ImageInput{}
				}
				scene.Inputs[name] = in
				continue
			}
		}
		v, err := paramValue(p.Type, raw)
		if err != nil {
			return scene, fmt.Errorf("--param %s=%s: %w", name, raw, err)
		}
		scene.Params[name] = v
	}
	return scene, nil
}

// paramValue converts raw to a template parameter's type. Numbers stay as written.
func paramValue(typ, raw string) (any, error) {
	switch typ {
	case "integer":
		if _, err := strconv.ParseInt(raw, 10, 64); err != nil {
			if _, err := strconv.ParseUint(raw, 10, 64); err != nil {
				return nil, fmt.Errorf("the template wants an integer")
			}
		}
		return json.Number(raw), nil
	case "number":
		if _, err := strconv.ParseFloat(raw, 64); err != nil {
			return nil, fmt.Errorf("the template wants a number")
		}
		return json.Number(raw), nil
	case "boolean":
		b, err := strconv.ParseBool(raw)
		if err != nil {
			return nil, fmt.Errorf("the template wants true or false")
		}
		return b, nil
	}
	return raw, nil
}

// imageInput reads an image parameter: @FILE sends the file in base64, an http(s)
// URL is fetched by the executor; anything else names a file on the node (isInput
// false).
func imageInput(raw string) (in intake.ImageInput, isInput bool, err error) {
	if path, ok := strings.CutPrefix(raw, "@"); ok {
		b, err := os.ReadFile(path)
		if err != nil {
			return in, false, fmt.Errorf("read the image: %w", err)
		}
		return intake.ImageInput{Base64: base64.StdEncoding.EncodeToString(b)}, true, nil
	}
	if u, err := url.Parse(raw); err == nil && (u.Scheme == "http" || u.Scheme == "https") {
		return intake.ImageInput{URL: raw}, true, nil
	}
	return in, false, nil
}

// repeatScene returns count copies of scene. When the template has an integer seed,
// scene i gets the given seed (else the template's default, else 0) plus i, so that
// the copies differ.
func repeatScene(t workflow.Template, scene intake.SceneInput, count int) []intake.SceneInput {
	out := make([]intake.SceneInput, count)
	seed, hasSeed := t.Params["seed"]
	vary := hasSeed && seed.Type == "integer" && count > 1
	var base uint64
	if vary {
		given, ok := scene.Params["seed"]
		if !ok {
			given = seed.Default
		}
		switch v := given.(type) {
		case json.Number:
			base, _ = strconv.ParseUint(v.String(), 10, 64)
		case float64:
			base = uint64(max(0, v))
		}
	}
	for i := range out {
		s := scene
		s.Params = maps.Clone(scene.Params)
		if vary {
			s.Params["seed"] = json.Number(strconv.FormatUint(base+uint64(i), 10))
		}
		out[i] = s
	}
	return out
}
