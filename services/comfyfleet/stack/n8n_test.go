package stack_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"mime"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
	"github.com/comfyfleet/comfyfleet/pkg/tenancy"
	"github.com/comfyfleet/comfyfleet/services/intake"
)

// n8nWorkflow is the part of an exported n8n workflow that the test reads.
type n8nWorkflow struct {
	Name  string `json:"name"`
	Nodes []struct {
		Name        string         `json:"name"`
		Type        string         `json:"type"`
		TypeVersion float64        `json:"typeVersion"`
		Parameters  map[string]any `json:"parameters"`
		WebhookID   string         `json:"webhookId"`
	} `json:"nodes"`
	Connections map[string]struct {
		Main [][]struct {
			Node string `json:"node"`
		} `json:"main"`
	} `json:"connections"`
}

// expressions matches n8n's {{ … }} expressions.
var expressions = regexp.MustCompile(`\{\{\s*(.*?)\s*\}\}`)

// evaluate resolves the expressions of an n8n parameter ("=" then text with
// {{ … }}) from values; an expression it does not know fails the test.
func evaluate(t *testing.T, param string, values map[string]string) string {
	t.Helper()
	text, ok := strings.CutPrefix(param, "=")
	if !ok {
		return param
	}
	return expressions.ReplaceAllStringFunc(text, func(m string) string {
		expr := expressions.FindStringSubmatch(m)[1]
		v, ok := values[expr]
		if !ok {
			t.Fatalf("the example uses the expression %q, which this test cannot evaluate", expr)
		}
		return v
	})
}

// TestN8nStoryboardExampleRunsAgainstTheAPI plays the example n8n workflow against a
// fleet that needs API keys: it follows the workflow's connections, builds the
// request body of a 100-scene storyboard the way n8n would, posts it, takes the
// callback in place of n8n's Wait node, runs the Code node (when Node.js is
// installed) on the callback, and downloads what it lists as n8n does, a batch of
// items at once, checking that no two files would be saved under one name.
func TestN8nStoryboardExampleRunsAgainstTheAPI(t *testing.T) {
	t.Parallel()
	raw, err := os.ReadFile(filepath.Join("..", "..", "..", "workflows", "n8n", "storyboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	var wf n8nWorkflow
	if err := json.Unmarshal(raw, &wf); err != nil {
		t.Fatalf("the example is not JSON: %v", err)
	}
	byName := map[string]int{}
	for i, n := range wf.Nodes {
		byName[n.Name] = i
	}
	// Walk the single chain from the trigger.
	var chain []int
	for i, n := range wf.Nodes {
		if n.Type == "n8n-nodes-base.manualTrigger" {
			chain = append(chain, i)
		}
	}
	if len(chain) != 1 {
		t.Fatalf("want one manual trigger, found %d", len(chain))
	}
	for {
		next := wf.Connections[wf.Nodes[chain[len(chain)-1]].Name].Main
		if len(next) == 0 || len(next[0]) == 0 {
			break
		}
		i, ok := byName[next[0][0].Node]
		if !ok {
			t.Fatalf("a connection leads to the unknown node %q", next[0][0].Node)
		}
		chain = append(chain, i)
	}
	var types []string
	for _, i := range chain {
		types = append(types, wf.Nodes[i].Type)
	}
	want := []string{"n8n-nodes-base.manualTrigger", "n8n-nodes-base.set", "n8n-nodes-base.httpRequest",
		"n8n-nodes-base.wait", "n8n-nodes-base.code", "n8n-nodes-base.httpRequest"}
	if strings.Join(types, " ") != strings.Join(want, " ") {
		t.Fatalf("the chain is %v, want %v", types, want)
	}
	storyboard, submit, wait, code, download := wf.Nodes[chain[1]], wf.Nodes[chain[2]], wf.Nodes[chain[3]], wf.Nodes[chain[4]], wf.Nodes[chain[5]]

	if wait.Parameters["resume"] != "webhook" || wait.Parameters["httpMethod"] != "POST" || wait.WebhookID == "" {
		t.Errorf("Wait node %v: want resume on a POST webhook call, which is how the notifier calls back", wait.Parameters)
	}
	if storyboard.Parameters["mode"] != "raw" {
		t.Fatalf("Storyboard node mode %v, want raw JSON", storyboard.Parameters["mode"])
	}
	var item struct {
		Scenes json.RawMessage `json:"scenes"`
	}
	if err := json.Unmarshal([]byte(storyboard.Parameters["jsonOutput"].(string)), &item); err != nil {
		t.Fatalf("Storyboard output: %v", err)
	}
	var scenes []map[string]any
	if err := json.Unmarshal(item.Scenes, &scenes); err != nil || len(scenes) != 6 {
		t.Fatalf("the storyboard has %d scenes (%v), want six", len(scenes), err)
	}

	// A storyboard of 100 scenes, the most one job holds, as a user's own source of
	// scenes would make it: the Storyboard node's scenes over and over, each with a
	// seed of its own (and few steps, to keep the test quick).
	board := make([]map[string]any, storyboardScenes)
	for i := range board {
		var scene map[string]any
		if err := json.Unmarshal(mustJSON(t, scenes[i%len(scenes)]), &scene); err != nil {
			t.Fatal(err)
		}
		params := scene["params"].(map[string]any)
		params["seed"], params["steps"] = 2000+i, 2
		board[i] = scene
	}

	// API keys and the default budgets, as on a server reached over the network.
	b := startSecureStack(t, 0)
	key := b.key(t, "studio", tenancy.RoleSubmit)
	p := submit.Parameters
	target, err := url.Parse(p["url"].(string))
	if p["method"] != "POST" || p["sendBody"] != true || p["specifyBody"] != "json" || err != nil || target.Path != "/v1/jobs" {
		t.Fatalf("Submit job node: %v; want a JSON POST to /v1/jobs", p)
	}
	body := evaluate(t, p["jsonBody"].(string), map[string]string{
		"$execution.resumeUrl":         b.Hooks.URL,
		"JSON.stringify($json.scenes)": string(mustJSON(t, board)),
	})
	// The header that the README has the user add to Submit job and Download.
	withKey := fleettest.Key(key)
	var job struct {
		ID string `json:"id"`
	}
	fleettest.Do(t, "POST", b.APIURL+target.Path, []byte(body), withKey).Want(t, http.StatusAccepted).Decode(t, &job)

	hook := b.Hooks.Wait(t, job.ID, 2*time.Minute)
	if hook.Body.Type != "job.completed" || len(hook.Body.Job.Scenes) != storyboardScenes {
		t.Fatalf("callback %s with %d scenes", hook.Body.Type, len(hook.Body.Job.Scenes))
	}

	nodeJS, err := exec.LookPath("node")
	if err != nil {
		t.Skip("Node.js is not installed: the Code node was not run")
	}
	callback, err := json.Marshal(hook.Body)
	if err != nil {
		t.Fatal(err)
	}
	script := filepath.Join(t.TempDir(), "outputs.js")
	src := fmt.Sprintf("const $input = { first: () => ({ json: { body: %s } }) };\nconsole.log(JSON.stringify((() => {\n%s\n})()));\n",
		callback, code.Parameters["jsCode"])
	if err := os.WriteFile(script, []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(nodeJS, script).Output()
	if err != nil {
		t.Fatalf("the Code node failed on the callback: %v", err)
	}
	var items []struct {
		JSON struct {
			Scene int    `json:"scene"`
			Name  string `json:"name"`
			URL   string `json:"url"`
		} `json:"json"`
	}
	if err := json.Unmarshal(bytes.TrimSpace(out), &items); err != nil || len(items) != storyboardScenes {
		t.Fatalf("the Code node returned %d items (%v), want %d", len(items), err, storyboardScenes)
	}

	// Download sends each batch of items at once, as n8n does; a batch must fit in
	// a key's read burst.
	batch := len(items)
	if opts, ok := download.Parameters["options"].(map[string]any)["batching"].(map[string]any); ok {
		batch = int(opts["batch"].(map[string]any)["batchSize"].(float64))
	}
	if batch > intake.DefaultReadRate.Burst {
		t.Errorf("Download sends %d requests at once; a key's default read burst is %d", batch, intake.DefaultReadRate.Burst)
	}
	results := make([]fleettest.Answer, len(items))
	for start := 0; start < len(items); start += batch {
		var wg sync.WaitGroup
		for i := start; i < min(start+batch, len(items)); i++ {
			wg.Go(func() {
				u := evaluate(t, download.Parameters["url"].(string), map[string]string{"$json.url": items[i].JSON.URL})
				res, err := fleettest.Send(context.Background(), "GET", u, nil, withKey)
				if err != nil {
					t.Error(err)
					return
				}
				results[i] = res
			})
		}
		wg.Wait()
	}
	saved := map[string]int{}
	for i, res := range results {
		if contentType := res.Header.Get("Content-Type"); items[i].JSON.Scene != i || res.Status != http.StatusOK || contentType != "image/png" {
			t.Errorf("item %d: scene %d, %s (%s)", i, items[i].JSON.Scene, res, contentType)
		}
		_, disp, _ := mime.ParseMediaType(res.Header.Get("Content-Disposition"))
		name := disp["filename"]
		if name != items[i].JSON.Name {
			t.Errorf("item %d: n8n would save it as %q, the job calls it %q", i, name, items[i].JSON.Name)
		}
		if j, seen := saved[name]; seen {
			t.Errorf("items %d and %d would both be saved as %q", j, i, name)
		}
		saved[name] = i
	}
}

// storyboardScenes is the size of the storyboard the test plays: the most scenes
// one job holds.
const storyboardScenes = 100

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
