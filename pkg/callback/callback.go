// Package callback guards the URLs that comfyfleet calls back against server-side
// request forgery: by default no loopback, private, link-local (cloud metadata
// included) or otherwise internal address is reached, unless an operator allows it.
package callback

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"syscall"
	"time"
)

// ErrForbidden is returned for an address the guard refuses.
var ErrForbidden = errors.New("callback address is not allowed")

// internal are the ranges refused unless allowed: the host itself, private networks,
// link-local (169.254.169.254 metadata among them), carrier-grade NAT, and
// addresses that are not unicast.
var internal = []netip.Prefix{
	netip.MustParsePrefix("0.0.0.0/8"),
	netip.MustParsePrefix("10.0.0.0/8"),
	netip.MustParsePrefix("100.64.0.0/10"),
	netip.MustParsePrefix("127.0.0.0/8"),
	netip.MustParsePrefix("169.254.0.0/16"),
	netip.MustParsePrefix("172.16.0.0/12"),
	netip.MustParsePrefix("192.0.0.0/24"),
	netip.MustParsePrefix("192.168.0.0/16"),
	netip.MustParsePrefix("198.18.0.0/15"),
	netip.MustParsePrefix("224.0.0.0/3"),
	netip.MustParsePrefix("::/128"),
	netip.MustParsePrefix("::1/128"),
	netip.MustParsePrefix("fc00::/7"),
	netip.MustParsePrefix("fe80::/10"),
	netip.MustParsePrefix("ff00::/8"),
	netip.MustParsePrefix("fd00:ec2::254/128"),
}

// Guard decides which addresses callbacks may reach.
type Guard struct {
	allow    []netip.Prefix
	resolver *net.Resolver
}

// NewGuard returns a guard that refuses internal addresses except those in allow
// (e.g. 127.0.0.0/8 for an n8n on the same machine, or 10.1.2.3/32).
func NewGuard(allow ...netip.Prefix) *Guard {
	return &Guard{allow: allow, resolver: net.DefaultResolver}
}

// ParsePrefixes reads CIDR prefixes or single addresses, e.g. "10.0.0.0/8 ::1".
func ParsePrefixes(values []string) ([]netip.Prefix, error) {
	var out []netip.Prefix
	for _, v := range values {
		for _, f := range strings.FieldsFunc(v, func(r rune) bool { return r == ',' || r == ' ' }) {
			if p, err := netip.ParsePrefix(f); err == nil {
				out = append(out, p.Masked())
				continue
			}
			a, err := netip.ParseAddr(f)
			if err != nil {
				return nil, fmt.Errorf("%q is neither an address nor a CIDR prefix", f)
			}
			out = append(out, netip.PrefixFrom(a, a.BitLen()))
		}
	}
	return out, nil
}

// Allowed reports whether a callback may connect to addr.
func (g *Guard) Allowed(addr netip.Addr) bool {
	addr = addr.Unmap()
	for _, p := range g.allow {
		if p.Contains(addr) {
			return true
		}
	}
	for _, p := range internal {
		if p.Contains(addr) {
			return false
		}
	}
	return addr.IsValid()
}

// CheckURL checks that raw is an http(s) URL whose host resolves only to allowed
// addresses.
func (g *Guard) CheckURL(ctx context.Context, raw string) error {
	u, err := url.Parse(raw)
	if err != nil {
		return fmt.Errorf("not a URL: %w", err)
	}
	if u.Scheme != "http" && u.Scheme != "https" {
		return errors.New("must be an absolute http or https URL")
	}
	host := u.Hostname()
	if host == "" {
		return errors.New("has no host")
	}
	if u.User != nil {
		return errors.New("must not carry credentials")
	}
	addrs, err := g.lookup(ctx, host)
	if err != nil {
		return err
	}
	for _, a := range addrs {
		if !g.Allowed(a) {
			return fmt.Errorf("host %s is %s: %w (an operator can allow it)", host, a, ErrForbidden)
		}
	}
	return nil
}

func (g *Guard) lookup(ctx context.Context, host string) ([]netip.Addr, error) {
	if a, err := netip.ParseAddr(strings.Trim(host, "[]")); err == nil {
		return []netip.Addr{a}, nil
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	addrs, err := g.resolver.LookupNetIP(ctx, "ip", host)
	if err != nil {
		return nil, fmt.Errorf("host %s does not resolve: %w", host, err)
	}
	return addrs, nil
}

// Client returns an HTTP client for callbacks whose every connection, redirects
// included, is checked at connect time against the resolved address, so a name
// that resolves differently later (DNS rebinding) is refused too. It follows at
// most three redirects, to http(s) only.
func (g *Guard) Client(timeout time.Duration, wrap func(http.RoundTripper) http.RoundTripper) *http.Client {
	dialer := &net.Dialer{Timeout: 10 * time.Second, Control: g.control}
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.DialContext = dialer.DialContext
	transport.Proxy = nil
	var rt http.RoundTripper = transport
	if wrap != nil {
		rt = wrap(transport)
	}
	return &http.Client{
		Timeout:   timeout,
		Transport: rt,
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			if len(via) >= 3 {
				return errors.New("stopped after 3 redirects")
			}
			if req.URL.Scheme != "http" && req.URL.Scheme != "https" {
				return fmt.Errorf("redirect to %s: %w", req.URL.Scheme, ErrForbidden)
			}
			return nil
		},
	}
}

func (g *Guard) control(_, address string, _ syscall.RawConn) error {
	ap, err := netip.ParseAddrPort(address)
	if err != nil {
		return fmt.Errorf("callback address %s: %w", address, err)
	}
	if !g.Allowed(ap.Addr()) {
		return fmt.Errorf("callback to %s: %w", ap.Addr(), ErrForbidden)
	}
	return nil
}
