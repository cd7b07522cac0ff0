package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/danielgtaylor/huma/v2"
)

// clientFlags are the flags of the commands that speak to the HTTP API.
type clientFlags struct {
	api string
	key string
}

func (c *clientFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&c.api, "api", "http://127.0.0.1:8080", "base URL of the comfyfleet API")
	fs.StringVar(&c.key, "key", "", "API key, sent as Authorization: Bearer (up's open API on loopback needs none)")
}

func (c *clientFlags) client() (*apiClient, error) {
	u, err := url.Parse(c.api)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return nil, fmt.Errorf("--api %q: give the API's http(s) base URL, such as http://127.0.0.1:8080", c.api)
	}
	return &apiClient{
		base: strings.TrimSuffix(u.String(), "/"),
		key:  strings.TrimSpace(c.key),
		http: &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()},
	}, nil
}

// apiClient calls comfyfleet's HTTP API.
type apiClient struct {
	base string
	key  string
	// http has no overall timeout: event streams last as long as their job;
	// contexts bound the calls.
	http *http.Client
}

// readRetries is how often a read refused with 429 is sent again, after the
// Retry-After the API gives.
const readRetries = 3

// send sends a request with body (JSON-encoded unless nil) and returns the answer
// when its status is 2xx; otherwise it returns an *apiError. A read refused with
// 429 is sent again after Retry-After.
func (c *apiClient) send(ctx context.Context, method, path string, body any, header http.Header) (*http.Response, error) {
	var raw []byte
	if body != nil {
		var err error
		if raw, err = json.Marshal(body); err != nil {
			return nil, fmt.Errorf("encode the request: %w", err)
		}
	}
	for attempt := 0; ; attempt++ {
		req, err := http.NewRequestWithContext(ctx, method, c.base+path, bytes.NewReader(raw))
		if err != nil {
			return nil, fmt.Errorf("%s %s: %w", method, path, err)
		}
		for k, v := range header {
			req.Header[k] = v
		}
		if body != nil {
			req.Header.Set("Content-Type", "application/json")
		}
		if c.key != "" {
			req.Header.Set("Authorization", "Bearer "+c.key)
		}
		resp, err := c.http.Do(req)
		if err != nil {
			var urlErr *url.Error
			if errors.As(err, &urlErr) {
				err = urlErr.Err
			}
			return nil, fmt.Errorf("%s %s: %w", method, c.base+path, err)
		}
		if resp.StatusCode >= 200 && resp.StatusCode < 300 {
			return resp, nil
		}
		apiErr := readAPIError(resp, method, path)
		if resp.StatusCode != http.StatusTooManyRequests || method != http.MethodGet || attempt == readRetries {
			return nil, apiErr
		}
		if err := pause(ctx, apiErr.retryAfter); err != nil {
			return nil, err
		}
	}
}

// call sends a request and decodes a JSON answer into out, unless out is nil.
func (c *apiClient) call(ctx context.Context, method, path string, body, out any) error {
	resp, err := c.send(ctx, method, path, body, nil)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if out == nil {
		_, _ = io.Copy(io.Discard, resp.Body)
		return nil
	}
	if err := json.NewDecoder(resp.Body).Decode(out); err != nil {
		return fmt.Errorf("%s %s: decode the answer: %w", method, path, err)
	}
	return nil
}

// pause waits d, or until ctx is done.
func pause(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// apiError is an answer that is not 2xx, with its RFC 9457 problem when it has one.
type apiError struct {
	method, path string
	status       int
	problem      huma.ErrorModel
	// text is the start of a body that is not problem JSON.
	text       string
	retryAfter time.Duration
}

func readAPIError(resp *http.Response, method, path string) *apiError {
	defer resp.Body.Close()
	e := &apiError{method: method, path: path, status: resp.StatusCode, retryAfter: time.Second}
	if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && s > 0 {
		e.retryAfter = time.Duration(s) * time.Second
	}
	raw, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if json.Unmarshal(raw, &e.problem) != nil || e.problem.Status == 0 && e.problem.Detail == "" && e.problem.Title == "" {
		e.problem = huma.ErrorModel{}
		e.text = strings.TrimSpace(string(raw))
		if len(e.text) > 200 {
			e.text = e.text[:200] + "…"
		}
	}
	return e
}

// Error reads as "POST /v1/jobs: 422 Unprocessable Entity: validation failed", then
// one line per offending field: "  body.scenes[0].params.steps: expected number <= 150 (value 500)".
func (e *apiError) Error() string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s: %d %s", e.method, e.path, e.status, http.StatusText(e.status))
	if msg := cmp.Or(e.problem.Detail, e.problem.Title, e.text); msg != "" && msg != http.StatusText(e.status) {
		b.WriteString(": " + msg)
	}
	for _, d := range e.problem.Errors {
		b.WriteString("\n  ")
		if d.Location != "" {
			b.WriteString(d.Location + ": ")
		}
		b.WriteString(d.Message)
		if d.Value != nil {
			v, _ := json.Marshal(d.Value)
			if len(v) > 80 {
				v = append(v[:80], "…"...)
			}
			fmt.Fprintf(&b, " (value %s)", v)
		}
	}
	return b.String()
}

// isStatus reports whether err is an answer of the API with status code.
func isStatus(err error, code int) bool {
	var e *apiError
	return errors.As(err, &e) && e.status == code
}

// subcommand runs the subcommand that args[0] names among subs.
func subcommand(ctx context.Context, group string, subs map[string]func(context.Context, []string, io.Writer, io.Writer) error,
	args []string, stdout, stderr io.Writer) error {
	names := make([]string, 0, len(subs))
	for name := range subs {
		names = append(names, name)
	}
	slices.Sort(names)
	if len(args) == 0 {
		return fmt.Errorf("%s: give one of %s ('comfyfleet %s %s -h' lists its flags)", group, strings.Join(names, ", "), group, names[0])
	}
	if args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		fmt.Fprintf(stderr, "usage: comfyfleet %s %s [flags]\n\n'comfyfleet %s %s -h' lists its flags.\n", group, strings.Join(names, "|"), group, names[0])
		return flag.ErrHelp
	}
	run, ok := subs[args[0]]
	if !ok {
		return fmt.Errorf("%s %s: unknown; use one of %s", group, args[0], strings.Join(names, ", "))
	}
	return run(ctx, args[1:], stdout, stderr)
}

// idArg parses the flags of a command about one job or node (what), and returns
// its client and the id.
func idArg(fs *flag.FlagSet, cf *clientFlags, args []string, what string) (*apiClient, string, error) {
	positional, err := parseArgs(fs, args)
	if err != nil {
		return nil, "", err
	}
	if len(positional) != 1 {
		return nil, "", fmt.Errorf("%s: give one %s id", fs.Name(), what)
	}
	c, err := cf.client()
	return c, positional[0], err
}

// noArgs parses the flags of a command that takes no argument.
func noArgs(fs *flag.FlagSet, args []string) error {
	positional, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(positional) > 0 {
		return fmt.Errorf("%s takes no argument: %q", fs.Name(), strings.Join(positional, " "))
	}
	return nil
}

// commandFlags is the flag set of a client command, whose usage line shows its
// arguments (synopsis) before its flags, on stderr.
func commandFlags(name, synopsis string, stderr io.Writer) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Usage = func() {
		fmt.Fprintf(stderr, "usage: comfyfleet %s %s\n", name, synopsis)
		fs.PrintDefaults()
	}
	return fs
}
