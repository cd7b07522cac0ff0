package panel_test

import (
	"bytes"
	"compress/gzip"
	"io"
	"net/http"
	"net/http/httptest"
	"regexp"
	"strings"
	"testing"

	"github.com/comfyfleet/comfyfleet/services/intake/panel"
)

func serve(t *testing.T) *httptest.Server {
	t.Helper()
	mux := http.NewServeMux()
	panel.Register(mux, "/openapi.json")
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv
}

// get GETs url with header (name, value pairs) and returns the response and its
// body as sent: a gzip encoding the client asked for is not undone.
func get(t *testing.T, url string, header ...string) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(header); i += 2 {
		req.Header.Set(header[i], header[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp, string(body)
}

// localRef finds the files a page or module loads: src, href and import paths.
var localRef = regexp.MustCompile(`(?:src|href)="([^"#]+)"|from "(\./[^"]+)"`)

// TestPagesLoadOnlyTheirOwnFiles follows every file the panel and the docs load and
// checks that each is served, with its type, and that none is elsewhere.
func TestPagesLoadOnlyTheirOwnFiles(t *testing.T) {
	srv := serve(t)
	wantType := map[string]string{".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
	seen := map[string]bool{}
	var follow func(page, base string)
	follow = func(page, base string) {
		resp, body := get(t, srv.URL+page)
		if resp.StatusCode != http.StatusOK {
			t.Errorf("GET %s: %s", page, resp.Status)
			return
		}
		if strings.HasSuffix(page, ".min.js") || strings.HasSuffix(page, ".css") {
			return // vendored: checked for their type only
		}
		for _, m := range localRef.FindAllStringSubmatch(body, -1) {
			ref := m[1] + m[2]
			if strings.Contains(ref, "://") || strings.HasPrefix(ref, "//") {
				t.Errorf("%s loads %s from elsewhere", page, ref)
				continue
			}
			if ref == "docs" || strings.HasPrefix(ref, "{{") {
				continue // a link to the docs page
			}
			path := base + strings.TrimPrefix(ref, "./")
			if strings.HasPrefix(ref, "/") {
				path = ref
			}
			if seen[path] {
				continue
			}
			seen[path] = true
			r, _ := get(t, srv.URL+path)
			for ext, ct := range wantType {
				if strings.HasSuffix(path, ext) && !strings.HasPrefix(r.Header.Get("Content-Type"), ct) {
					t.Errorf("GET %s: Content-Type %q, want %s", path, r.Header.Get("Content-Type"), ct)
				}
			}
			if strings.HasSuffix(path, ".js") || strings.HasSuffix(path, ".css") {
				follow(path, path[:strings.LastIndex(path, "/")+1])
			}
		}
	}
	follow("/", "/")
	follow("/docs", "/")
	for _, want := range []string{"/panel/app.js", "/panel/jobs.js", "/panel/api.js", "/panel/vendor/uplot-1.6.32/uPlot.iife.min.js",
		"/panel/vendor/elements-9.0.15/web-components.min.js"} {
		if !seen[want] {
			t.Errorf("the pages never load %s", want)
		}
	}
}

func TestPagesHaveAContentSecurityPolicy(t *testing.T) {
	srv := serve(t)
	for _, page := range []string{"/", "/docs"} {
		resp, body := get(t, srv.URL+page)
		csp := resp.Header.Get("Content-Security-Policy")
		if !strings.Contains(csp, "default-src 'none'") || !strings.Contains(csp, "script-src 'self'") {
			t.Errorf("GET %s: Content-Security-Policy %q", page, csp)
		}
		if page == "/docs" && !strings.Contains(body, `apiDescriptionUrl="openapi.json"`) {
			t.Errorf("/docs does not render openapi.json:\n%s", body)
		}
	}
}

func TestNoDirectoryListingOrUnknownPage(t *testing.T) {
	srv := serve(t)
	for _, path := range []string{"/panel/", "/panel/vendor/", "/panel/vendor/uplot-1.6.32/", "/panel/nothing.js", "/elsewhere"} {
		if resp, _ := get(t, srv.URL+path); resp.StatusCode != http.StatusNotFound {
			t.Errorf("GET %s: %s, want 404", path, resp.Status)
		}
	}
}

// TestGzippedVendorFileIsServedEitherWay: a vendored file kept gzipped goes as it is,
// with its type and encoding, to a client that accepts gzip, and decompressed to one
// that does not; both are the same script.
func TestGzippedVendorFileIsServedEitherWay(t *testing.T) {
	srv := serve(t)
	url := srv.URL + "/panel/vendor/elements-9.0.15/web-components.min.js"
	fetch := func(acceptGzip bool) (*http.Response, []byte) {
		// Go's transport asks for gzip itself, and undoes it, unless told otherwise.
		encoding := "identity"
		if acceptGzip {
			encoding = "gzip"
		}
		resp, body := get(t, url, "Accept-Encoding", encoding)
		if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/javascript") {
			t.Fatalf("GET (gzip accepted: %v): %s, %s", acceptGzip, resp.Status, resp.Header.Get("Content-Type"))
		}
		return resp, []byte(body)
	}
	resp, zipped := fetch(true)
	if resp.Header.Get("Content-Encoding") != "gzip" {
		t.Fatalf("Content-Encoding %q to a client that accepts gzip", resp.Header.Get("Content-Encoding"))
	}
	zr, err := gzip.NewReader(bytes.NewReader(zipped))
	if err != nil {
		t.Fatal(err)
	}
	unzipped, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	resp, plain := fetch(false)
	if resp.Header.Get("Content-Encoding") != "" || !bytes.Equal(plain, unzipped) || len(plain) < 1<<20 {
		t.Errorf("without gzip: encoding %q, %d bytes; want the script itself, %d bytes",
			resp.Header.Get("Content-Encoding"), len(plain), len(unzipped))
	}
}
