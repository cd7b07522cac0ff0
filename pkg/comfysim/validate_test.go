package comfysim_test

import (
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
)

// validationAnswer is a POST /prompt answer, decoded.
type validationAnswer struct {
	status   int
	PromptID string      `json:"prompt_id"`
	Number   json.Number `json:"number"`
	Error    struct {
		Type    string `json:"type"`
		Message string `json:"message"`
	} `json:"error"`
	NodeErrors map[string]struct {
		Errors []struct {
			Type      string         `json:"type"`
			Message   string         `json:"message"`
			Details   string         `json:"details"`
			ExtraInfo map[string]any `json:"extra_info"`
		} `json:"errors"`
		DependentOutputs []string `json:"dependent_outputs"`
		ClassType        string   `json:"class_type"`
	} `json:"node_errors"`
}

func postPrompt(t *testing.T, c *client, body string) validationAnswer {
	t.Helper()
	resp := c.postJSON("/prompt", body)
	var a validationAnswer
	if err := json.Unmarshal(resp.body, &a); err != nil {
		t.Fatalf("decode %d %s: %v", resp.status, resp.body, err)
	}
	a.status = resp.status
	return a
}

// summary lists a node's errors as "type: message [details]".
func (a validationAnswer) summary(node string) []string {
	var out []string
	for _, e := range a.NodeErrors[node].Errors {
		out = append(out, fmt.Sprintf("%s: %s [%s]", e.Type, e.Message, e.Details))
	}
	return out
}

func TestValidation(t *testing.T) {
	sim := startSim(t, comfysim.Config{StepDuration: time.Millisecond})
	c := newClient(t, sim.URL())

	t.Run("widget values", func(t *testing.T) {
		a := postPrompt(t, c, `{"prompt": {
			"3": {"class_type": "KSampler", "inputs": {"seed": 18446744073709551616, "steps": 0, "cfg": "abc", "sampler_name": "bogus", "scheduler": "karras", "denoise": 1.5, "model": ["4", 0], "positive": ["6", 0], "negative": ["6", 0], "latent_image": ["5", 0]}},
			"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "nope.safetensors"}},
			"5": {"class_type": "EmptyLatentImage", "inputs": {"width": "512", "height": 512.9, "batch_size": true}},
			"6": {"class_type": "CLIPTextEncode", "inputs": {"text": 12, "clip": ["4", 1]}},
			"8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
			"9": {"class_type": "PreviewImage", "inputs": {"images": ["8", 0]}}}}`)
		if a.status != http.StatusBadRequest || a.Error.Type != "prompt_outputs_failed_validation" {
			t.Fatalf("%d %+v", a.status, a.Error)
		}
		want := map[string][]string{
			"4": {"value_not_in_list: Value not in list [ckpt_name: 'nope.safetensors' not in ['sd_xl_base_1.0.safetensors', 'sd_xl_refiner_1.0.safetensors', 'svd.safetensors', 'svd_xt.safetensors', 'v1-5-pruned-emaonly.safetensors']]"},
			"3": {
				"value_bigger_than_max: Value 18446744073709551616 bigger than max of 18446744073709551615 [seed]",
				"value_smaller_than_min: Value 0 smaller than min of 1 [steps]",
				"invalid_input_type: Failed to convert an input value to a FLOAT value [cfg, abc, could not convert string to float: 'abc']",
				"value_not_in_list: Value not in list [sampler_name: 'bogus' not in (list of length 42)]",
				"value_bigger_than_max: Value 1.5 bigger than max of 1.0 [denoise]",
			},
		}
		for node, errs := range want {
			if got := a.summary(node); strings.Join(got, "\n") != strings.Join(errs, "\n") {
				t.Errorf("node %s errors:\n%s\nwant\n%s", node, strings.Join(got, "\n"), strings.Join(errs, "\n"))
			}
		}
		if len(a.NodeErrors) != 2 {
			t.Errorf("node_errors for %v, want only 3 and 4 (5 and 6 convert fine)", keys(a.NodeErrors))
		}
		if e := a.NodeErrors["3"].Errors[3]; e.ExtraInfo["input_config"] != nil {
			t.Errorf("a long combo's input_config is %v, want null", e.ExtraInfo["input_config"])
		}
	})

	t.Run("links", func(t *testing.T) {
		cases := []struct {
			name, prompt, node string
			want               []string
		}{
			{"dangling output link", `{"1": {"class_type": "SaveImage", "inputs": {"images": ["42", 0], "filename_prefix": "x"}}}`,
				"1", []string{"exception_during_validation: Exception when validating node ['42']"}},
			{"slot out of range", `{"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}, "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 5]}}, "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}}`,
				"2", []string{"exception_during_inner_validation: Exception when validating inner node [tuple index out of range]"}},
			{"type mismatch", `{"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 512, "batch_size": 1}}, "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}}, "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}}}`,
				"2", []string{"return_type_mismatch: Return type mismatch between linked nodes [image, received_type(LATENT) mismatch input_type(IMAGE)]"}},
			{"short link", `{"1": {"class_type": "SaveImage", "inputs": {"images": ["1"], "filename_prefix": "x"}}}`,
				"1", []string{"bad_linked_input: Bad linked input, must be a length-2 list of [node_id, slot_index] [images]"}},
		}
		for _, tc := range cases {
			a := postPrompt(t, c, `{"prompt": `+tc.prompt+`}`)
			if got := a.summary(tc.node); a.status != http.StatusBadRequest || strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
				t.Errorf("%s: %d %v, want %v", tc.name, a.status, got, tc.want)
			}
		}
	})

	t.Run("partly valid", func(t *testing.T) {
		ws := dialWS(t, sim.URL(), "partly", false)
		mark := ws.mark()
		a := postPrompt(t, c, `{"client_id": "partly", "prompt": {
			"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
			"2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "ok"}},
			"3": {"class_type": "PreviewImage", "inputs": {}}}}`)
		if a.status != http.StatusOK || fmt.Sprint(a.summary("3")) != "[required_input_missing: Required input is missing [images]]" {
			t.Fatalf("%d %v", a.status, a.NodeErrors)
		}
		ws.waitDone(mark, a.PromptID)
		for _, f := range ws.since(mark) {
			if f.typ == "executing" && strings.Contains(string(f.data), `"node": "3"`) {
				t.Errorf("the invalid output ran")
			}
		}
		if out := firstOutput(t, c.history(a.PromptID), "2", "images"); out["filename"] != "ok_00001_.png" {
			t.Errorf("output %v", out)
		}
	})

	t.Run("numbers", func(t *testing.T) {
		fresh := startSim(t, comfysim.Config{})
		fc := newClient(t, fresh.URL())
		ok := `{"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}, "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "n"}}}`
		steps := []struct {
			body   string
			status int
			number string
		}{
			{`{"prompt": ` + ok + `}`, 200, "0"},
			{`{"prompt": {}}`, 400, ""},
			{`[1]`, 400, ""},
			{`{not json`, 500, ""},
			{`{"prompt": ` + ok + `, "front": true}`, 200, "-3"},
			{`{"prompt": ` + ok + `, "number": 7}`, 200, "7.0"},
			{`{"prompt": ` + ok + `}`, 200, "4"},
		}
		for i, s := range steps {
			resp := fc.postJSON("/prompt", s.body)
			var a validationAnswer
			json.Unmarshal(resp.body, &a)
			if resp.status != s.status || a.Number.String() != s.number {
				t.Errorf("step %d: %d number %q, want %d %q (%s)", i, resp.status, a.Number, s.status, s.number, resp.body)
			}
			if s.number != "" && !strings.Contains(string(resp.body), `"number": `+s.number+`,`) {
				t.Errorf("step %d: %s", i, resp.body)
			}
		}
	})
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	return out
}
