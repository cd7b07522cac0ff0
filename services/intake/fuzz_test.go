package intake

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/comfyfleet/comfyfleet/pkg/fleet"
	"github.com/comfyfleet/comfyfleet/pkg/fleettest"
)

// FuzzCreateJob sends arbitrary bodies to POST /v1/jobs of a real intake on a real
// NATS: every answer must be a 2xx or a 4xx, never a 5xx or a panic.
func FuzzCreateJob(f *testing.F) {
	for _, seed := range []string{
		`{"scenes":[{"workflow":"txt2img","params":{"prompt":"fox","seed":1}}]}`,
		`{"priority":10,"callback_url":"http://127.0.0.1:9/x","scenes":[{"workflow":"demo","params":{"size":64}}]}`,
		`{"scenes":[{"graph":{"1":{"class_type":"EmptyImage","inputs":{"width":8}},"2":{"class_type":"SaveImage","inputs":{"images":["1",0]}}}}]}`,
		`{"scenes":[{"graph":{"1":{"class_type":"X","inputs":{"a":["9",0]}}}}]}`,
		`{"scenes":[{"workflow":"txt2img","graph":{}}]}`, `{"scenes":[]}`, `{"priority":0}`, `[]`, `null`, `{`,
		`{"scenes":[{"workflow":"txt2img","params":{"steps":1e400}}]}`, `{"scenes":[{"pool":"a.b","workflow":"demo"}]}`,
		`{"callback_url":"http://[::1`, `{"scenes":[{"workflow":"demo","params":{"size":null}}]}`,
	} {
		f.Add(seed)
	}
	_, nc, _ := fleettest.Fleet(f, fleet.Settings{})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	ln.Close()
	cfg := Config{Conn: nc, Templates: os.DirFS("../../workflows"), Listener: ln, Open: true, SubmitRate: RateLimit{PerSecond: Unlimited}, ReadRate: RateLimit{PerSecond: Unlimited},
		Logger: slog.New(slog.DiscardHandler)}
	if err := cfg.fill(); err != nil {
		f.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	f.Cleanup(func() { cancel(); wg.Wait() })
	in, err := open(ctx, cfg)
	if err != nil {
		f.Fatal(err)
	}
	f.Cleanup(func() { in.queuer.stop(context.Background()) })
	if err := in.followBuckets(ctx, &wg); err != nil {
		f.Fatal(err)
	}
	mux := http.NewServeMux()
	newAPI(mux, in)
	f.Fuzz(func(t *testing.T, body string) {
		req := httptest.NewRequest(http.MethodPost, "/v1/jobs", strings.NewReader(body))
		req.Header.Set("Content-Type", "application/json")
		rec := httptest.NewRecorder()
		mux.ServeHTTP(rec, req)
		if rec.Code >= 500 {
			t.Fatalf("POST /v1/jobs %q: %d %s", body, rec.Code, rec.Body)
		}
	})
}
