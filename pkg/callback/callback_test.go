package callback_test

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"testing"
	"time"

	"github.com/comfyfleet/comfyfleet/pkg/callback"
)

func TestCheckURLRefusesInternalAddressesUnlessAllowed(t *testing.T) {
	t.Parallel()
	g := callback.NewGuard()
	for _, u := range []string{
		"http://127.0.0.1:9000/hook", "http://localhost/x", "http://[::1]/x", "http://10.1.2.3/x",
		"http://192.168.1.10/x", "http://172.20.0.1/x", "http://169.254.169.254/latest/meta-data",
		"http://[fd00:ec2::254]/x", "http://0.0.0.0/x", "http://[::ffff:127.0.0.1]/x", "http://100.64.0.1/x",
	} {
		if err := g.CheckURL(context.Background(), u); !errors.Is(err, callback.ErrForbidden) {
			t.Errorf("CheckURL(%s) = %v, want ErrForbidden", u, err)
		}
	}
	if err := g.CheckURL(context.Background(), "http://93.184.215.14/hook"); err != nil {
		t.Errorf("a public address was refused: %v", err)
	}
	allow, err := callback.ParsePrefixes([]string{"127.0.0.0/8, 10.1.2.3"})
	if err != nil {
		t.Fatal(err)
	}
	g = callback.NewGuard(allow...)
	for _, u := range []string{"http://127.0.0.1:5678/webhook-waiting/15", "http://10.1.2.3/x"} {
		if err := g.CheckURL(context.Background(), u); err != nil {
			t.Errorf("allowed %s refused: %v", u, err)
		}
	}
	if err := g.CheckURL(context.Background(), "http://10.1.2.4/x"); !errors.Is(err, callback.ErrForbidden) {
		t.Errorf("10.1.2.4 outside the allowed /32: %v", err)
	}
}

// TestClientChecksEveryConnection shows that a connection to a refused address
// fails at connect time, also when an allowed server redirects to it.
func TestClientChecksEveryConnection(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Skipf("no second loopback address here: %v", err)
	}
	refused := httptest.NewUnstartedServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) {
		t.Error("the refused server was reached")
	}))
	refused.Listener = ln
	refused.Start()
	defer refused.Close()
	redirector := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, refused.URL, http.StatusTemporaryRedirect)
	}))
	defer redirector.Close()

	g := callback.NewGuard(netip.MustParsePrefix("127.0.0.1/32"))
	if _, err := g.Client(5*time.Second, nil).Post(refused.URL, "application/json", nil); !errors.Is(err, callback.ErrForbidden) {
		t.Errorf("POST to 127.0.0.2: %v, want ErrForbidden", err)
	}
	if _, err := g.Client(5*time.Second, nil).Post(redirector.URL, "application/json", nil); !errors.Is(err, callback.ErrForbidden) {
		t.Errorf("redirect from the allowed 127.0.0.1 to 127.0.0.2: %v, want ErrForbidden", err)
	}
}
