package stack_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
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
// fleet: it follows the workflow's connections, builds the request body the way n8n
// would, posts it, takes the callback in place of n8n's Wait node, runs the Code node
// (when Node.js is installed) on the callback, and downloads what it lists.
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
	var scenes []any
	if err := json.Unmarshal(item.Scenes, &scenes); err != nil || len(scenes) != 6 {
		t.Fatalf("the storyboard has %d scenes (%v), want six", len(scenes), err)
	}

	b := startStack(t, testSims(1, 1, 1))
	p := submit.Parameters
	target, err := url.Parse(p["url"].(string))
	if p["method"] != "POST" || p["sendBody"] != true || p["specifyBody"] != "json" || err != nil || target.Path != "/v1/jobs" {
		t.Fatalf("Submit job node: %v; want a JSON POST to /v1/jobs", p)
	}
	body := evaluate(t, p["jsonBody"].(string), map[string]string{
		"$execution.resumeUrl":         b.hooks.URL,
		"JSON.stringify($json.scenes)": string(item.Scenes),
	})
	resp, err := client.Post(b.stack.APIURL+target.Path, "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	var job struct {
		ID string `json:"id"`
	}
	err = json.NewDecoder(resp.Body).Decode(&job)
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted || err != nil {
		t.Fatalf("POST the example's body: %s (%v); body:\n%s", resp.Status, err, body)
	}

	hook := b.hooks.wait(t, job.ID, 60*time.Second)
	if hook.Body.Type != "job.completed" || len(hook.Body.Job.Scenes) != 6 {
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
			URL   string `json:"url"`
		} `json:"json"`
	}
	if err := json.Unmarshal(bytes.TrimSpace(out), &items); err != nil || len(items) != 6 {
		t.Fatalf("the Code node returned %s (%v), want six items", out, err)
	}
	for i, it := range items {
		u := evaluate(t, download.Parameters["url"].(string), map[string]string{"$json.url": it.JSON.URL})
		res, err := client.Get(u)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		if it.JSON.Scene != i || res.StatusCode != http.StatusOK || res.Header.Get("Content-Type") != "image/png" {
			t.Errorf("item %d: scene %d, GET %s: %s %s", i, it.JSON.Scene, u, res.Status, res.Header.Get("Content-Type"))
		}
	}
}
