package intake

import (
	"bytes"
	"encoding/json"
	"flag"
	"net/http"
	"os"
	"testing"

	"github.com/danielgtaylor/huma/v2"
)

var update = flag.Bool("update", false, "rewrite testdata/openapi.json from the code")

// TestOpenAPIMatchesGolden catches accidental API changes: run with -update to accept
// an intended one.
func TestOpenAPIMatchesGolden(t *testing.T) {
	api := newAPI(http.NewServeMux(), &intake{})
	got, err := json.MarshalIndent(api.OpenAPI(), "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	got = append(got, '\n')
	const golden = "testdata/openapi.json"
	if *update {
		if err := os.WriteFile(golden, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run go test -run OpenAPI -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("the OpenAPI document changed; if intended, run: go test ./services/intake -run OpenAPI -update")
	}
}

// TestEveryOperationNeedsAKey keeps new routes from being served without API keys:
// only the health probes are public.
func TestEveryOperationNeedsAKey(t *testing.T) {
	api := newAPI(http.NewServeMux(), &intake{})
	public := map[string]bool{"healthz": true, "readyz": true}
	for path, item := range api.OpenAPI().Paths {
		for _, op := range []*huma.Operation{item.Get, item.Post, item.Put, item.Delete, item.Patch} {
			if op == nil || public[op.OperationID] {
				continue
			}
			if _, ok := op.Metadata[roleMetadata]; !ok || len(op.Security) == 0 {
				t.Errorf("%s %s (%s) declares no role: wrap it in secured()", op.Method, path, op.OperationID)
			}
		}
	}
}
