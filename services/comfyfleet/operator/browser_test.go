package operator_test

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto"
	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/fetch"
	cdplog "github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
)

// chromiumNames are the names Chromium's binary goes by.
var chromiumNames = []string{"chromium", "chromium-browser", "google-chrome", "headless-shell"}

// browser is a headless Chromium tab whose requests reach only one host:port. It
// collects what a user would see go wrong: console errors, uncaught exceptions,
// failed requests, requests to anywhere else, error answers.
type browser struct {
	ctx  context.Context
	host string

	mu sync.Mutex
	// expected says which error answers (a status of 400 or more) are part of the
	// test, such as a 401 before the page has a key (see expect).
	expected func(u *url.URL, status int64) bool
	problems []string
	urls     map[network.RequestID]string
}

// expect makes the error answers that ok accepts part of the test from now on.
func (b *browser) expect(ok func(u *url.URL, status int64) bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.expected = ok
}

// startBrowser starts Chromium with a window of width×height for one test; its
// network reaches only base's host. It skips the test when no Chromium is installed.
func startBrowser(t *testing.T, base string, width, height int) *browser {
	t.Helper()
	var path string
	for _, name := range chromiumNames {
		if p, err := exec.LookPath(name); err == nil {
			path = p
			break
		}
	}
	if path == "" {
		t.Skipf("no Chromium found (looked for %s): install it (Debian: apt-get install chromium) to run the browser tests", strings.Join(chromiumNames, ", "))
	}
	u, err := url.Parse(base)
	if err != nil {
		t.Fatal(err)
	}
	opts := append(chromedp.DefaultExecAllocatorOptions[:],
		chromedp.ExecPath(path),
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.UserDataDir(t.TempDir()),
		// Chromium makes its singleton socket's directory in TMPDIR and leaves it
		// there when it is killed.
		chromedp.Env("TMPDIR="+t.TempDir()),
		chromedp.WindowSize(width, height),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-quic", true),
	)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(), opts...)
	ctx, cancelTab := chromedp.NewContext(allocCtx)
	b := &browser{ctx: ctx, host: u.Host, urls: map[network.RequestID]string{},
		expected: func(*url.URL, int64) bool { return false }}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		cancelTab()
		cancelAlloc()
		wg.Wait()
	})

	if err := chromedp.Listen(ctx, b.observe); err != nil {
		t.Fatalf("start Chromium (%s): %v", path, err)
	}
	paused := chromedp.Events(ctx, fetch.RequestPaused)
	for _, enable := range []func() error{
		func() error { _, err := chromedp.Call(ctx, network.Enable, network.EnableParams{}); return err },
		func() error { _, err := chromedp.Call(ctx, cdplog.Enable, cdp.Empty{}); return err },
		func() error { _, err := chromedp.Call(ctx, fetch.Enable, fetch.EnableParams{}); return err },
	} {
		if err := enable(); err != nil {
			t.Fatalf("Chromium: %v", err)
		}
	}
	wg.Go(func() {
		for ev, err := range paused {
			if err != nil {
				return
			}
			b.route(ev)
		}
	})
	return b
}

// route lets a request through to the test's host, and fails any other.
func (b *browser) route(ev fetch.EventRequestPaused) {
	u, err := url.Parse(ev.Request.URL)
	if err == nil && (u.Scheme == "http" || u.Scheme == "https") && u.Host == b.host || strings.HasPrefix(ev.Request.URL, "data:") || strings.HasPrefix(ev.Request.URL, "blob:") {
		_, _ = chromedp.Call(b.ctx, fetch.ContinueRequest, fetch.ContinueRequestParams{RequestID: ev.RequestID})
		return
	}
	b.problem("request that leaves the test server: %s %s", ev.Request.Method, ev.Request.URL)
	_, _ = chromedp.Call(b.ctx, fetch.FailRequest, fetch.FailRequestParams{RequestID: ev.RequestID, ErrorReason: network.ErrorReasonBlockedByClient})
}

// observe runs on the tab's reading goroutine: it only records.
func (b *browser) observe(ev any) {
	switch e := ev.(type) {
	case *runtime.EventConsoleAPICalled:
		if e.Type == runtime.ConsoleAPICalledTypeError || e.Type == runtime.ConsoleAPICalledTypeAssert {
			var args []string
			for _, a := range e.Args {
				if a.Value != nil {
					args = append(args, string(a.Value))
				} else {
					args = append(args, a.Description)
				}
			}
			b.problem("console.%s: %s", e.Type, strings.Join(args, " "))
		}
	case *runtime.EventExceptionThrown:
		d := e.ExceptionDetails
		msg := d.Text
		if d.Exception != nil {
			msg += " " + d.Exception.Description
		}
		b.problem("uncaught exception at %s:%d: %s", d.URL, d.LineNumber, msg)
	case *cdplog.EventEntryAdded:
		// Network entries are judged by their answers below.
		if e.Entry.Level == cdplog.EntryLevelError && e.Entry.Source != cdplog.EntrySourceNetwork {
			b.problem("browser log (%s): %s %s", e.Entry.Source, e.Entry.Text, e.Entry.URL)
		}
	case *network.EventRequestWillBeSent:
		b.mu.Lock()
		b.urls[e.RequestID] = e.Request.URL
		b.mu.Unlock()
	case *network.EventLoadingFailed:
		if e.Canceled {
			return // the page aborted it: a job stream it stopped following
		}
		b.mu.Lock()
		u := b.urls[e.RequestID]
		b.mu.Unlock()
		b.problem("request failed: %s: %s %s", u, e.ErrorText, e.BlockedReason)
	case *network.EventResponseReceived:
		if e.Response.Status < 400 {
			return
		}
		b.mu.Lock()
		expected := b.expected
		b.mu.Unlock()
		if u, err := url.Parse(e.Response.URL); err == nil && expected(u, e.Response.Status) {
			return
		}
		b.problem("error answer: %d %s", e.Response.Status, e.Response.URL)
	}
}

func (b *browser) problem(format string, args ...any) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.problems = append(b.problems, fmt.Sprintf(format, args...))
}

// checkClean fails the test for every problem the page had.
func (b *browser) checkClean(t *testing.T) {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, p := range b.problems {
		t.Errorf("in the browser: %s", p)
	}
}

// do runs actions in the tab, within a minute.
func (b *browser) do(t *testing.T, actions ...chromedp.Action[chromedp.Void]) {
	t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, time.Minute)
	defer cancel()
	if err := chromedp.Do(ctx, actions...); err != nil {
		b.checkClean(t)
		t.Fatal(err)
	}
}

// click clicks the element that the CSS selector sel selects, and again if the page
// replaced the element between finding it and clicking it: the panel renders a job's
// card anew as the job changes, as a user's next click would find.
func click(sel string) chromedp.Action[chromedp.Void] {
	return func(ctx context.Context, target *chromedp.Target) (chromedp.Void, error) {
		for {
			v, err := chromedp.Click(chromedp.CSS(sel))(ctx, target)
			var gone *cdproto.Error
			if !errors.As(err, &gone) || !strings.HasPrefix(gone.Message, "Could not find node with given id") || ctx.Err() != nil {
				return v, err
			}
		}
	}
}

// waitFor evaluates the JavaScript expression in the page until it is truthy, and
// returns that value; past within it fails the test, saying what was awaited.
func waitFor[T any](t *testing.T, b *browser, within time.Duration, what, expression string) T {
	t.Helper()
	v, err := chromedp.Run(b.ctx, chromedp.Poll[T](expression,
		chromedp.WithPollingTimeout(within), chromedp.WithPollingInterval(50*time.Millisecond)))
	if err != nil {
		b.checkClean(t)
		shown, _ := chromedp.Run(b.ctx, chromedp.Evaluate[string](`document.querySelector("#conn")?.innerText + " | " + document.querySelector("#toasts")?.innerText`))
		t.Fatalf("waiting for %s: %v (the page's status and messages: %s)", what, err, shown)
	}
	return v
}

// eval evaluates the JavaScript expression in the page.
func eval[T any](t *testing.T, b *browser, expression string) T {
	t.Helper()
	v, err := chromedp.Run(b.ctx, chromedp.Evaluate[T](expression))
	if err != nil {
		t.Fatalf("evaluate %s: %v", expression, err)
	}
	return v
}

// requested reports whether the page has asked for a URL that contains every one of
// parts.
func (b *browser) requested(parts ...string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, u := range b.urls {
		if !slices.ContainsFunc(parts, func(p string) bool { return !strings.Contains(u, p) }) {
			return true
		}
	}
	return false
}
