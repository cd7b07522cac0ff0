package fleettest

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/api"
)

// HTTP is the client of the calls below, with a transport of its own: httptest
// servers closing in parallel tests close the idle connections of
// http.DefaultTransport, under any request in flight. It sets no timeout of its own,
// so that an event stream may run as long as its context.
var HTTP = &http.Client{Transport: http.DefaultTransport.(*http.Transport).Clone()}

// callTimeout bounds one call of Do: longer than the longest Prefer: wait (60 s).
const callTimeout = 2 * time.Minute

// CallOption adds to a call's request.
type CallOption func(*http.Request)

// Key sends key as the call's bearer token; none if "".
func Key(key string) CallOption {
	return func(r *http.Request) {
		if key != "" {
			r.Header.Set("Authorization", "Bearer "+key)
		}
	}
}

// Header sets the request header name to value.
func Header(name, value string) CallOption {
	return func(r *http.Request) { r.Header.Set(name, value) }
}

// Answer is what a server answered to one call.
type Answer struct {
	// Method and URL name the call.
	Method, URL string
	Status      int
	Header      http.Header
	Body        []byte
}

// String shows the call and its answer as a failure message wants them: method,
// URL, status and body (a problem's details).
func (a Answer) String() string {
	return fmt.Sprintf("%s %s: %d %s: %s", a.Method, a.URL, a.Status, http.StatusText(a.Status), bytes.TrimSpace(a.Body))
}

// Decode decodes the answer's JSON body into out, failing the test with the answer
// when it does not decode.
func (a Answer) Decode(t testing.TB, out any) {
	t.Helper()
	if err := json.Unmarshal(a.Body, out); err != nil {
		t.Fatalf("%v: decode: %v", a, err)
	}
}

// Want fails the test, showing the answer, unless its status is status; it returns
// the answer.
func (a Answer) Want(t testing.TB, status int) Answer {
	t.Helper()
	if a.Status != status {
		t.Fatalf("%v; want %d", a, status)
	}
	return a
}

// Send sends body to url with method: none if nil, else as JSON (application/json),
// a []byte as it is. It returns the whole answer, or the error that kept it
// from coming; it fails no test, so that a goroutine or a condition of Eventually
// may call it.
func Send(ctx context.Context, method, url string, body any, opts ...CallOption) (Answer, error) {
	var raw []byte
	switch b := body.(type) {
	case nil:
	case []byte:
		raw = b
	default:
		var err error
		if raw, err = json.Marshal(b); err != nil {
			return Answer{}, fmt.Errorf("encode the body of %s %s: %w", method, url, err)
		}
	}
	var rd io.Reader
	if raw != nil {
		rd = bytes.NewReader(raw)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, rd)
	if err != nil {
		return Answer{}, fmt.Errorf("%s %s: %w", method, url, err)
	}
	if raw != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for _, o := range opts {
		o(req)
	}
	resp, err := HTTP.Do(req)
	if err != nil {
		return Answer{}, err
	}
	defer resp.Body.Close()
	got, err := io.ReadAll(resp.Body)
	if err != nil {
		return Answer{}, fmt.Errorf("read the answer to %s %s: %w", method, url, err)
	}
	return Answer{Method: method, URL: url, Status: resp.StatusCode, Header: resp.Header, Body: got}, nil
}

// Do is Send that fails the test when the call fails.
func Do(t testing.TB, method, url string, body any, opts ...CallOption) Answer {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	a, err := Send(ctx, method, url, body, opts...)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// Call is Do that decodes the answer into out, unless out is nil or the answer
// empty, and returns its status: a successful answer (2xx) into any out, a problem
// (4xx, 5xx) only into a *Problem. An answer that does not decode fails the test.
func Call(t testing.TB, method, url string, body, out any, opts ...CallOption) int {
	t.Helper()
	a := Do(t, method, url, body, opts...)
	_, problem := out.(*Problem)
	if out != nil && len(a.Body) > 0 && (a.Status < 300 || problem && a.Status >= 400) {
		a.Decode(t, out)
	}
	return a.Status
}

// Get decodes the answer to a GET of url into out, failing the test, with the
// answer, unless it is 200 OK.
func Get(t testing.TB, url string, out any, opts ...CallOption) {
	t.Helper()
	Do(t, http.MethodGet, url, nil, opts...).Want(t, http.StatusOK).Decode(t, out)
}

// SubmitJob posts body to the API at apiURL (POST /v1/jobs) and returns the job
// accepted; anything but 202 Accepted fails the test with the answer.
func SubmitJob(t testing.TB, apiURL string, body any, opts ...CallOption) api.Job {
	t.Helper()
	var job api.Job
	Do(t, http.MethodPost, apiURL+"/v1/jobs", body, opts...).Want(t, http.StatusAccepted).Decode(t, &job)
	return job
}

// GetJob reads job id from the API at apiURL, failing the test with the answer
// unless it is 200 OK.
func GetJob(t testing.TB, apiURL, id string, opts ...CallOption) api.Job {
	t.Helper()
	var job api.Job
	Get(t, apiURL+"/v1/jobs/"+id, &job, opts...)
	return job
}

// Problem is an RFC 9457 problem document as the API (huma) writes it.
type Problem struct {
	Status int    `json:"status"`
	Title  string `json:"title"`
	Detail string `json:"detail"`
	Errors []struct {
		Location string `json:"location"`
		Message  string `json:"message"`
		Value    any    `json:"value"`
	} `json:"errors"`
}

// At reports whether the problem names location ("body.scenes[0].workflow").
func (p Problem) At(location string) bool {
	for _, e := range p.Errors {
		if e.Location == location {
			return true
		}
	}
	return false
}
