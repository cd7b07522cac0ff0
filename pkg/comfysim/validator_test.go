package comfysim_test

import (
	"encoding/json"
	"errors"
	"os"
	"testing"

	"github.com/comfyfleet/comfyfleet/pkg/comfysim"
)

// recorded reads one HTTP exchange of the transcripts: the request body's prompt and
// the answer's status and body (as recorded, else as the transcript keeps it parsed).
func recorded(t *testing.T, name string) (prompt json.RawMessage, status int, body string) {
	t.Helper()
	raw, err := os.ReadFile("../comfy/testdata/transcripts/" + name)
	if err != nil {
		t.Fatal(err)
	}
	var ex struct {
		Request struct {
			Body struct {
				Prompt json.RawMessage `json:"prompt"`
			} `json:"body"`
		} `json:"request"`
		Response struct {
			Status  int             `json:"status"`
			BodyRaw string          `json:"body_raw"`
			Body    json.RawMessage `json:"body"`
		} `json:"response"`
	}
	if err := json.Unmarshal(raw, &ex); err != nil {
		t.Fatal(err)
	}
	if ex.Response.BodyRaw == "" {
		ex.Response.BodyRaw = string(ex.Response.Body)
	}
	return ex.Request.Body.Prompt, ex.Response.Status, ex.Response.BodyRaw
}

func TestValidatorRefusesAsTheRecordedServer(t *testing.T) {
	t.Parallel()
	_, _, info := recorded(t, "06_get_object_info_full.json")
	v, err := comfysim.NewValidator([]byte(info))
	if err != nil {
		t.Fatal(err)
	}
	noFiles := func(string) bool { return false }
	for _, name := range []string{
		"23_post_prompt_invalid_unknown_class.json",
		"24_post_prompt_invalid_values.json",
		"25_post_prompt_invalid_type.json",
		"26_post_prompt_invalid_dangling_link.json",
		"27_post_prompt_invalid_above_max.json",
		"29_post_prompt_invalid_no_outputs.json",
		"32_post_prompt_invalid_missing_class_type.json",
	} {
		prompt, status, want := recorded(t, name)
		verdict, err := v.Validate(prompt, noFiles)
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if verdict.OK || status != 400 {
			t.Fatalf("%s: ok %v, recorded status %d", name, verdict.OK, status)
		}
		got := `{"error": ` + string(verdict.Error) + `, "node_errors": ` + string(verdict.NodeErrors) + `}`
		if got != want {
			t.Errorf("%s:\n got %s\nwant %s", name, got, want)
		}
	}

	prompt, _, _ := recorded(t, "10_post_prompt_good.json")
	verdict, err := v.Validate(prompt, noFiles)
	if err != nil || !verdict.OK || string(verdict.NodeErrors) != "{}" || len(verdict.Outputs) != 1 || verdict.Outputs[0] != "4" {
		t.Errorf("good prompt: %+v, %v", verdict, err)
	}

	prompt, _, want := recorded(t, "60_post_prompt_invalid_load_image_missing_file.json")
	_, _, loadInfo := recorded(t, "57_get_object_info_LoadImage.json")
	merged := info[:len(info)-1] + ", " + loadInfo[1:]
	if v, err = comfysim.NewValidator([]byte(merged)); err != nil {
		t.Fatal(err)
	}
	verdict, _ = v.Validate(prompt, noFiles)
	if got := `{"error": ` + string(verdict.Error) + `, "node_errors": ` + string(verdict.NodeErrors) + `}`; got != want {
		t.Errorf("missing input file:\n got %s\nwant %s", got, want)
	}
	if verdict, _ = v.Validate(prompt, func(name string) bool { return name == "no_such_file.png" }); !verdict.OK {
		t.Errorf("a file inputFile knows is refused: %s", verdict.NodeErrors)
	}

	if _, err := v.Validate(json.RawMessage(`[1, 2]`), noFiles); !errors.Is(err, comfysim.ErrMalformedPrompt) {
		t.Errorf("a list as prompt: %v; want ErrMalformedPrompt", err)
	}
}
