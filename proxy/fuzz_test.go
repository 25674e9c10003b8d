package proxy

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshctl/meshctl/node/wgconf"
	"github.com/meshctl/meshctl/wire"
)

// asciiUpper upper-cases ASCII letters only (Unicode case mapping can turn
// an invalid host into a valid one, e.g. dotless i).
func asciiUpper(s string) string {
	b := []byte(s)
	for i, c := range b {
		if c >= 'a' && c <= 'z' {
			b[i] = c - 'a' + 'A'
		}
	}
	return string(b)
}

// FuzzCanonicalHost checks Host normalisation: it is idempotent; what it
// returns is "" or a valid lower-case DNS name that is not an IP literal
// (no colon, no trailing dot, last label not a number); IP literals of
// every form, bracketed or with a port, normalise to ""; and upper case, a
// trailing dot and a port do not change a host's canonical form.
func FuzzCanonicalHost(f *testing.F) {
	for _, s := range []string{"pi1.example.com", "PI1.Example.COM.", "pi1.example.com:8443", "web--pi1.example.com.:80",
		"127.0.0.1", "127.1", "0x7f.1", "[::1]:80", "::1", "[::1]", "1.2.3.4:80", "", ".", "a..b", "a.b:", "a.b:+1",
		"xn--bcher-kva.example", "ı.example", "a_b.example", "-a.example", strings.Repeat("a.", 127) + "a"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, host string) {
		c := CanonicalHost(host)
		if again := CanonicalHost(c); again != c {
			t.Fatalf("CanonicalHost(%q) = %q, but CanonicalHost(%q) = %q", host, c, c, again)
		}
		if ip, err := netip.ParseAddr(strings.Trim(host, "[]")); err == nil && c != "" {
			t.Fatalf("IP literal %q (%v) normalised to %q", host, ip, c)
		}
		if ap, err := netip.ParseAddrPort(host); err == nil && c != "" {
			t.Fatalf("IP literal with port %q (%v) normalised to %q", host, ap, c)
		}
		if c == "" {
			return
		}
		if !validHost(c) || strings.ContainsAny(c, ":[]%") || strings.HasSuffix(c, ".") || strings.ToLower(c) != c {
			t.Fatalf("CanonicalHost(%q) = %q, not a canonical DNS name", host, c)
		}
		if _, err := netip.ParseAddr(c); err == nil {
			t.Fatalf("CanonicalHost(%q) = %q, an IP address", host, c)
		}
		for _, v := range []string{asciiUpper(c), c + ".", c + ":443", asciiUpper(c) + ".:80"} {
			if got := CanonicalHost(v); got != c {
				t.Fatalf("CanonicalHost(%q) = %q, want %q (of %q)", v, got, c, host)
			}
		}
	})
}

const fuzzDomain = "mesh.example.com"

func fuzzKey(b byte) string {
	var k wgtypes.Key
	for i := range k {
		k[i] = b ^ byte(i*7)
	}
	return k.String()
}

// fuzzNetmap is a netmap with fixed members and one fuzzed peer (a node,
// or an SSH-only node).
func fuzzNetmap(name, svc, ipv4 string, port uint16, public, sshOnly bool) *wire.Netmap {
	p := func(id, name, v4 string, key byte, svcs ...wire.Service) wire.Peer {
		return wire.Peer{ID: id, Name: name, Role: wire.RoleNode, WireGuardKey: fuzzKey(key), IPv4: v4,
			IPv6: "fd00::" + id, Services: svcs}
	}
	nm := &wire.Netmap{Version: 1, Self: wire.Peer{ID: "f0", Name: "proxy", Role: wire.RoleProxy, WireGuardKey: fuzzKey(1),
		IPv4: "100.64.0.1", IPv6: "fd00::f0"}}
	nm.Peers = []wire.Peer{
		p("a1", "pi1", "100.64.0.11", 2, wire.Service{Name: "ssh", Port: 22}, wire.Service{Name: "web", Port: 80, Public: true}),
		p("a2", "pi2", "100.64.0.12", 3, wire.Service{Name: "api", Port: 8080}, wire.Service{Name: "api", Port: 9090}),
		p("a3", "bare", "100.64.0.13", 4),
	}
	nm.SSHOnly = []wire.Peer{{ID: "b1", Name: "legacy", Role: wire.RoleSSH, Services: []wire.Service{{Name: "web", Port: 3000}}}}
	fz := wire.Peer{ID: "c1", Name: name, Role: wire.RoleNode, WireGuardKey: fuzzKey(5), IPv4: ipv4, IPv6: "fd00::c1",
		Services: []wire.Service{{Name: svc, Port: port, Public: public}}}
	if sshOnly {
		fz.Role, fz.WireGuardKey, fz.IPv4, fz.IPv6 = wire.RoleSSH, "", "", ""
		nm.SSHOnly = append(nm.SSHOnly, fz)
	} else {
		nm.Peers = append(nm.Peers, fz)
	}
	return nm
}

// owner returns the peer that a route's host name belongs to: the first
// one of that name, as BuildTable takes it.
func owner(nm *wire.Netmap, name string) (wire.Peer, bool) {
	for _, p := range append(slices.Clone(nm.Peers), nm.SSHOnly...) {
		if p.Name == name {
			return p, true
		}
	}
	return wire.Peer{}, false
}

// pipeBackend answers one request on c with the Host it received.
func pipeBackend(c net.Conn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	req, err := http.ReadRequest(bufio.NewReader(c))
	if err != nil {
		return
	}
	fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s", len(req.Host), req.Host)
}

// FuzzRouting builds a route table from a netmap the proxy's agent would
// accept, with one fuzzed member, and sends a request with a fuzzed Host
// through the real Handler, whose Dial is an in-memory pipe. Invariants:
//   - a host routes (Lookup) exactly when its canonical form is the host
//     of a route; empty hosts, IP literals and unknown names never do;
//   - a route leads to the node that owns the name: the host is <node> or
//     <service>--<node> under the domain, the first member of that name is
//     the route's node, the service is one of its own, and the address is
//     its overlay IPv4 and the service's port (a placeholder in 240/4 for
//     SSH-only nodes); the address leads back to that node (RouteFor);
//   - the Handler dials only that address, and nothing for a host without
//     a route (404); the backend receives the canonical host.
//
// Seeds: f.Add below and testdata/fuzz/FuzzRouting.
func FuzzRouting(f *testing.F) {
	f.Add("pi1."+fuzzDomain, "pi3", "web", "100.64.0.14", uint16(80), false, false)
	f.Add("WEB--PI3.MESH.EXAMPLE.COM.:8443", "pi3", "web", "100.64.0.14", uint16(80), true, false)
	f.Add("pi1."+fuzzDomain, "pi1", "web", "100.64.0.14", uint16(81), false, false)  // a second "pi1"
	f.Add("x--pi3."+fuzzDomain, "pi3", "x", "100.64.0.11", uint16(22), false, false) // pi1's address
	f.Add("100.64.0.11", "pi3", "web", "100.64.0.14", uint16(80), false, false)
	f.Add("[fd00::a1]:80", "pi3", "web", "100.64.0.14", uint16(80), false, false)
	f.Add("", "pi3", "web", "100.64.0.14", uint16(80), false, false)
	f.Add("legacy."+fuzzDomain, "legacy", "web", "", uint16(80), false, true)
	f.Add("api--pi2."+fuzzDomain, "pi3", "web", "100.64.0.14", uint16(80), false, false)
	f.Add("bare."+fuzzDomain, "pi3", "web", "100.64.0.14", uint16(80), false, false)
	f.Add("web--pi3."+fuzzDomain, "pi3", "web", "100.64.0.14/32", uint16(80), false, false)
	f.Add("pi3.evil.com", "pi3", "web", "100.64.0.14", uint16(80), false, false)
	f.Add("pi3."+fuzzDomain+".evil.com", "pi3", "web", "100.64.0.14", uint16(80), false, false)

	self, _ := wgtypes.ParseKey(fuzzKey(1))
	f.Fuzz(func(t *testing.T, host, name, svc, ipv4 string, port uint16, public, sshOnly bool) {
		nm := fuzzNetmap(name, svc, ipv4, port, public, sshOnly)
		if _, err := wgconf.FromNetmap(nm, wgconf.Options{Self: self}); err != nil {
			return // the proxy's agent never hands this netmap to the table
		}
		table := BuildTable(nm, fuzzDomain)

		seen := map[string]bool{}
		for _, rt := range table.Routes() {
			if seen[rt.Host] {
				t.Fatalf("host %q routed twice", rt.Host)
			}
			seen[rt.Host] = true
			checkRoute(t, nm, table, rt)
		}

		rt, ok := table.Lookup(host)
		c := CanonicalHost(host)
		if ok != seen[c] || ok && rt.Host != c {
			t.Fatalf("Lookup(%q) = %+v, %v; canonical %q, routed hosts %v", host, rt, ok, c, seen)
		}

		// Through the handler.
		var mu sync.Mutex
		var dialed []string
		h, err := NewHandler(HandlerOptions{
			Table: func() *Table { return table },
			Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
				mu.Lock()
				dialed = append(dialed, addr)
				mu.Unlock()
				a, b := net.Pipe()
				go pipeBackend(b)
				return a, nil
			},
			DialTimeout: 5 * time.Second, ResponseHeaderTimeout: 5 * time.Second,
		})
		if err != nil {
			t.Fatal(err)
		}
		defer h.transport.CloseIdleConnections()
		r := httptest.NewRequest(http.MethodGet, "http://placeholder/", nil)
		r.Host = host
		w := httptest.NewRecorder()
		h.ServeHTTP(w, r)
		mu.Lock()
		defer mu.Unlock()
		if !ok {
			if w.Code != http.StatusNotFound || len(dialed) != 0 {
				t.Fatalf("host %q without a route: status %d, dialed %v", host, w.Code, dialed)
			}
			return
		}
		if rt.SSHOnly {
			return // served through the node's SSH tunnel, not by this Handler's Dial
		}
		if len(dialed) != 1 || dialed[0] != rt.Addr.String() {
			t.Fatalf("host %q (route to %s) dialed %v", host, rt.Addr, dialed)
		}
		wantHost := rt.Host
		if _, p, err := net.SplitHostPort(host); err == nil && p != "" {
			wantHost = net.JoinHostPort(rt.Host, p)
		}
		if w.Code != http.StatusOK || w.Body.String() != wantHost {
			t.Fatalf("host %q: status %d, backend saw Host %q, want %q", host, w.Code, w.Body.String(), wantHost)
		}
	})
}

// checkRoute checks that rt leads to the member that owns its host name.
func checkRoute(t *testing.T, nm *wire.Netmap, table *Table, rt Route) {
	t.Helper()
	label, ok := strings.CutSuffix(rt.Host, "."+fuzzDomain)
	if !ok || strings.Contains(label, ".") || CanonicalHost(rt.Host) != rt.Host {
		t.Fatalf("route host %q is not one label under %s", rt.Host, fuzzDomain)
	}
	if label != rt.Node && label != rt.Service+"--"+rt.Node {
		t.Fatalf("route host %q leads to service %q of node %q", rt.Host, rt.Service, rt.Node)
	}
	p, ok := owner(nm, rt.Node)
	if !ok || p.ID != rt.NodeID {
		t.Fatalf("route %q leads to node %q (%s), but that name belongs to %q", rt.Host, rt.Node, rt.NodeID, p.ID)
	}
	i := slices.IndexFunc(p.Services, func(s wire.Service) bool { return s.Name == rt.Service })
	if i < 0 || rt.Public != p.Services[i].Public {
		t.Fatalf("route %q: service %q is not %q's own (or public differs)", rt.Host, rt.Service, rt.Node)
	}
	if rt.SSHOnly {
		if p.Role != wire.RoleSSH || !netip.MustParsePrefix("240.0.0.0/4").Contains(rt.Addr.Addr()) {
			t.Fatalf("SSH-only route %q to %v", rt.Host, rt.Addr)
		}
	} else if p.Role != wire.RoleNode || rt.Addr.Addr().String() != p.IPv4 || rt.Addr.Port() != p.Services[i].Port {
		t.Fatalf("route %q to %v, but %q is %s with %q on port %d", rt.Host, rt.Addr, p.Name, p.IPv4, rt.Service, p.Services[i].Port)
	}
	if back, ok := table.RouteFor(rt.Addr); !ok || back.NodeID != rt.NodeID {
		t.Fatalf("address %v of route %q leads back to %+v", rt.Addr, rt.Host, back)
	}
}

var fuzzSessionKey = []byte("0123456789abcdef0123456789abcdef")

// fuzzAccess is an access checker with a fixed key and clock; key id
// "gone" is revoked.
func fuzzAccess(key []byte, now time.Time) *access {
	a := &access{key: key, now: func() time.Time { return now }}
	a.setRevoked([]string{"gone"})
	return a
}

func withCookie(value string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "/", nil)
	r.Header.Set("Cookie", sessionCookie+"="+value)
	return r
}

// FuzzSessionCookie mints session cookies for fuzzed hosts, key ids and
// expiries and checks: a minted cookie authenticates exactly on its own
// host, before its expiry, for a key id that is not revoked (and that a
// "|" cannot forge); it never authenticates on another host; and a cookie
// with one byte changed authenticates only if it still decodes to the very
// bytes that were signed (base64 padding bits), never to other content.
func FuzzSessionCookie(f *testing.F) {
	f.Add("pi1."+fuzzDomain, "k1", int64(3600), uint16(5), byte('A'))
	f.Add("pi1."+fuzzDomain, "gone", int64(3600), uint16(0), byte('x'))
	f.Add("pi1."+fuzzDomain, "k1", int64(-1), uint16(70), byte('.'))
	f.Add("pi1."+fuzzDomain, "k1|pi2."+fuzzDomain, int64(3600), uint16(9), byte('_'))
	f.Add("pi1|x", "k1", int64(3600), uint16(200), byte('-'))
	f.Add("", "", int64(0), uint16(0), byte(0))
	now := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	f.Fuzz(func(t *testing.T, host, keyID string, ttl int64, pos uint16, b byte) {
		a := fuzzAccess(fuzzSessionKey, now)
		exp := now.Add(time.Duration(ttl%(1<<40)) * time.Millisecond)
		v := a.mint(host, keyID, exp)
		want := !strings.Contains(host+keyID, "|") && now.Before(time.Unix(exp.Unix(), 0)) && keyID != "gone"
		if got := a.validSession(withCookie(v), Route{Host: host}); got != want {
			t.Fatalf("minted cookie for %q / %q / %v: valid %v, want %v", host, keyID, exp, got, want)
		}
		if a.validSession(withCookie(v), Route{Host: host + "x"}) || a.validSession(withCookie(v), Route{Host: "other." + fuzzDomain}) && host != "other."+fuzzDomain {
			t.Fatalf("cookie for %q authenticates on another host", host)
		}
		i := int(pos) % len(v)
		if v[i] == b {
			return
		}
		m := v[:i] + string([]byte{b}) + v[i+1:]
		if !a.validSession(withCookie(m), Route{Host: host}) {
			return
		}
		p64, s64, _ := strings.Cut(v, ".")
		mp64, ms64, _ := strings.Cut(m, ".")
		p1, _ := base64.RawURLEncoding.DecodeString(p64)
		s1, _ := base64.RawURLEncoding.DecodeString(s64)
		p2, err1 := base64.RawURLEncoding.DecodeString(mp64)
		s2, err2 := base64.RawURLEncoding.DecodeString(ms64)
		if err1 != nil || err2 != nil || string(p1) != string(p2) || string(s1) != string(s2) {
			t.Fatalf("tampered cookie %q (of %q) authenticates", m, v)
		}
	})
}

// FuzzForeignCookie sends arbitrary Cookie headers to a proxy whose
// session key the fuzzer cannot know (random per process). Invariants: no
// cookie authenticates (that would be a forgery); and after the session
// cookie is stripped, the header the device would get holds no cookie of
// that name while every other cookie is kept, in order.
func FuzzForeignCookie(f *testing.F) {
	known := fuzzAccess(fuzzSessionKey, time.Now())
	f.Add(sessionCookie + "=" + known.mint("pi1."+fuzzDomain, "k1", time.Now().Add(time.Hour)))
	f.Add("a=1; " + sessionCookie + "=x.y; b=2")
	f.Add(sessionCookie + "=" + base64.RawURLEncoding.EncodeToString([]byte("v1|pi1."+fuzzDomain+"|k1|99999999999")) + ".")
	f.Add(sessionCookie + "=\"x.y\"; " + sessionCookie + "=z")
	f.Add("a=meshctl_session=x; Meshctl_Session=y")
	key := make([]byte, 32)
	rand.Read(key)
	a := fuzzAccess(key, time.Now())
	f.Fuzz(func(t *testing.T, header string) {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		r.Header.Set("Cookie", header)
		if a.validSession(r, Route{Host: "pi1." + fuzzDomain}) {
			t.Fatalf("cookie header %q authenticates without the session key", header)
		}
		var others []string
		for _, c := range r.Cookies() {
			if c.Name != sessionCookie {
				others = append(others, c.Name+"="+c.Value)
			}
		}
		stripSessionCookie(r)
		var after []string
		for _, c := range r.Cookies() {
			if c.Name == sessionCookie {
				t.Fatalf("session cookie left in %q (from %q)", r.Header.Values("Cookie"), header)
			}
			after = append(after, c.Name+"="+c.Value)
		}
		if !slices.Equal(others, after) {
			t.Fatalf("other cookies %q became %q", others, after)
		}
	})
}
