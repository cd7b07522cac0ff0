// Package panel serves comfyfleet's web panel at / and the API's documentation at
// /docs, every file from the binary: pages that load nothing from outside the machine,
// for fleets without internet access. The panel is plain HTML, CSS and JavaScript
// modules, with nothing to build; the documentation is Stoplight Elements, vendored
// (see vendor/README.md).
package panel

import (
	"compress/gzip"
	"embed"
	"io"
	"io/fs"
	"mime"
	"net/http"
	"path"
	"strings"
)

//go:embed web vendor docs.html
var files embed.FS

// panelPolicy lets the panel load only its own files and call only its own API;
// outputs are shown from blob: URLs fetched with the API key.
const panelPolicy = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; " +
	"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// docsPolicy is the policy huma's docs page has, with the CDN replaced by our own files.
const docsPolicy = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; " +
	"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// Register serves the panel at GET / (its files under /panel/) and the API's
// documentation at GET /docs, rendering the OpenAPI document at openAPIPath (such
// as "/openapi.json"). None of them needs an API key: the pages hold no data; the
// panel asks the API for it, with the key the user gives it.
func Register(mux *http.ServeMux, openAPIPath string) {
	web, _ := fs.Sub(files, "web")
	vendor, _ := fs.Sub(files, "vendor")
	index, _ := fs.ReadFile(web, "index.html")
	docs, _ := fs.ReadFile(files, "docs.html")
	docs = []byte(strings.ReplaceAll(string(docs), "{{openapi}}", strings.TrimPrefix(openAPIPath, "/")))

	mux.Handle("GET /{$}", page(index, panelPolicy))
	mux.Handle("GET /docs", page(docs, docsPolicy))
	mux.Handle("GET /panel/", http.StripPrefix("/panel/", static(web, "no-cache")))
	// A vendored file's path names its version: it never changes.
	mux.Handle("GET /panel/vendor/", http.StripPrefix("/panel/vendor/", static(vendor, "public, max-age=31536000, immutable")))
}

func page(body []byte, policy string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		h := w.Header()
		h.Set("Content-Type", "text/html; charset=utf-8")
		h.Set("Content-Security-Policy", policy)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cache-Control", "no-cache")
		_, _ = w.Write(body)
	})
}

// static serves the files of fsys, but no directory listings.
func static(fsys fs.FS, cacheControl string) http.Handler {
	files := http.FileServerFS(fsys)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "" || strings.HasSuffix(r.URL.Path, "/") {
			http.NotFound(w, r)
			return
		}
		w.Header().Set("Cache-Control", cacheControl)
		w.Header().Set("X-Content-Type-Options", "nosniff")
		name := strings.TrimPrefix(r.URL.Path, "/")
		if gz, err := fsys.Open(name + ".gz"); err == nil {
			defer gz.Close()
			serveGzipped(w, r, name, gz)
			return
		}
		files.ServeHTTP(w, r)
	})
}

// serveGzipped serves the file name, kept gzipped in the binary (a vendored file of
// megabytes, kept out of git in full): as it is to a client that accepts gzip, as
// every browser does, and decompressed to one that does not.
func serveGzipped(w http.ResponseWriter, r *http.Request, name string, gz io.Reader) {
	h := w.Header()
	h.Set("Content-Type", mime.TypeByExtension(path.Ext(name)))
	h.Add("Vary", "Accept-Encoding")
	if strings.Contains(r.Header.Get("Accept-Encoding"), "gzip") {
		h.Set("Content-Encoding", "gzip")
		_, _ = io.Copy(w, gz)
		return
	}
	plain, err := gzip.NewReader(gz)
	if err != nil {
		http.Error(w, "a vendored file is damaged", http.StatusInternalServerError)
		return
	}
	_, _ = io.Copy(w, plain)
}
