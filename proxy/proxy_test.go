package proxy_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator"
	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/proxy"
	"github.com/meshctl/meshctl/wire"
)

const deadline = 10 * time.Second // generous for -race on 2 cores; the properties are < 1 s

// revocationBound is how long a revocation may take from the admin's call
// to the proxy (P6: 1 s), with room for -race on 2 loaded cores.
func revocationBound() time.Duration {
	if raceEnabled {
		return 3 * time.Second
	}
	return time.Second
}

func backend(t *testing.T, body string) string {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, body)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

func expose(t *testing.T, spec string) node.Service {
	t.Helper()
	s, err := node.ParseExpose(spec)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func host(name string) string { return name + "." + meshtest.Domain }

func TestProxyServesNodesByHost(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	px := c.AddProxy(t)
	c.AddAgent(t, "pi1", expose(t, "web="+backend(t, "pi1 web")+",public"), expose(t, "api="+backend(t, "pi1 api")+",public"))
	c.AddAgent(t, "pi2", expose(t, "web="+backend(t, "pi2 web")+",public"))

	meshtest.WaitFor(t, deadline, func() bool { code, body := px.Get(host("pi1"), "/"); return code == 200 && body == "pi1 web" }, "pi1.<domain> to serve pi1's web service")
	meshtest.WaitFor(t, deadline, func() bool { code, body := px.Get(host("pi2"), "/"); return code == 200 && body == "pi2 web" }, "pi2.<domain> to serve pi2's web service")
	if code, body := px.Get("api--pi1."+meshtest.Domain, "/"); code != 200 || body != "pi1 api" {
		t.Fatalf("named service: %d %q", code, body)
	}
	for _, h := range []string{"PI1." + meshtest.Domain, host("pi1") + ".", host("pi1") + ":8080"} {
		if code, body := px.Get(h, "/"); code != 200 || body != "pi1 web" {
			t.Errorf("host %q: %d %q", h, code, body)
		}
	}
	for _, h := range []string{host("nosuch"), "127.0.0.1", "", "proxy." + meshtest.Domain, meshtest.Domain} {
		if code, _ := px.Get(h, "/"); code != http.StatusNotFound {
			t.Errorf("host %q: %d, want 404", h, code)
		}
	}
}

func TestPrivateServiceNeedsSignIn(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	px := c.AddProxy(t)
	c.AddAgent(t, "pi1", expose(t, "web="+backend(t, "secret")))
	meshtest.WaitFor(t, deadline, func() bool { return px.Table().Len() > 0 }, "a route for pi1")
	code, body := px.Get(host("pi1"), "/")
	if code != http.StatusUnauthorized || strings.Contains(body, "secret") {
		t.Fatalf("private service without sign-in: %d %q", code, body)
	}
}

func TestRevokedNodeIs404(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	px := c.AddProxy(t)
	c.AddAgent(t, "pi1", expose(t, "web="+backend(t, "pi1")+",public"))
	meshtest.WaitFor(t, deadline, func() bool { code, _ := px.Get(host("pi1"), "/"); return code == 200 }, "pi1 served")
	start := time.Now()
	if err := c.Admin(http.MethodPost, wire.PathAdminNodeRevoke, wire.NameRequest{Name: "pi1"}, nil); err != nil {
		t.Fatal(err)
	}
	committed := time.Since(start)
	meshtest.WaitFor(t, deadline, func() bool { code, _ := px.Get(host("pi1"), "/"); return code == http.StatusNotFound }, "pi1 to be 404 after revocation")
	took := time.Since(start)
	t.Logf("revoked node's route gone %s after the revoke call (committed after %s)", took, committed)
	if bound := revocationBound(); took > bound {
		t.Errorf("revocation took %s to reach the proxy, want at most %s (P6: 1 s; 3 s under -race)", took, bound)
	}
}

// TestMetricsNotOnNodeHosts runs a proxy with its metrics listener on: the
// public listener answers /metrics and the coordinator's API paths on a
// node's host with the node's own page, and on any other host with 404;
// the metrics listener serves metrics only, never a node.
func TestMetricsNotOnNodeHosts(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	px := c.AddProxy(t, func(o *proxy.Options) { o.Metrics = "127.0.0.1:0" })
	c.AddAgent(t, "pi1", expose(t, "web="+backend(t, "pi1 web")+",public"))
	meshtest.WaitFor(t, deadline, func() bool { code, body := px.Get(host("pi1"), "/"); return code == 200 && body == "pi1 web" }, "pi1 served")
	metricsURL := "http://" + px.Addrs()[1].String()
	get := func(base, host, path string) (int, string) {
		t.Helper()
		req, err := http.NewRequest(http.MethodGet, base+path, nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = host
		res, err := http.DefaultTransport.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		defer res.Body.Close()
		b, _ := io.ReadAll(res.Body)
		return res.StatusCode, string(b)
	}
	// The metrics listener is really on, so the checks below mean something.
	if code, body := get(metricsURL, "127.0.0.1", "/metrics"); code != 200 || !strings.Contains(body, "meshctl_proxy_open_connections") {
		t.Fatalf("metrics listener: %d %.200q", code, body)
	}
	paths := []string{"/metrics", wire.PathAdminNodes, wire.PathAdminInfo, wire.PathAdminTokens, wire.PathNetmap, wire.PathHealthz}
	for _, p := range paths {
		if code, body := get(px.URL, host("pi1"), p); code != 200 || body != "pi1 web" {
			t.Errorf("%s%s on the proxy: %d %.200q, want pi1's page", host("pi1"), p, code, body)
		}
		for _, h := range []string{"proxy." + meshtest.Domain, meshtest.Domain, "127.0.0.1", "localhost", ""} {
			if code, body := get(px.URL, h, p); code != http.StatusNotFound || strings.Contains(body, "meshctl_") {
				t.Errorf("host %q %s on the proxy: %d %.200q, want the proxy's 404", h, p, code, body)
			}
		}
		if code, body := get(metricsURL, host("pi1"), p); p != "/metrics" && (code != http.StatusNotFound || strings.Contains(body, "pi1 web")) {
			t.Errorf("%s%s on the metrics listener: %d %.200q, want 404", host("pi1"), p, code, body)
		}
	}
}

func TestNodeDownIs502(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	px := c.AddProxy(t, func(o *proxy.Options) { o.DialTimeout = time.Second })
	a := c.AddAgent(t, "pi1", expose(t, "web="+backend(t, "pi1")+",public"))
	meshtest.WaitFor(t, deadline, func() bool { code, _ := px.Get(host("pi1"), "/"); return code == 200 }, "pi1 served")
	a.Close() // the node goes away without being revoked: its route stays
	meshtest.WaitFor(t, 30*time.Second, func() bool { code, _ := px.Get(host("pi1"), "/"); return code == http.StatusBadGateway }, "502 for a node that is down")
}

func TestProxyNeedsProxyToken(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	tok := c.CreateToken(t, wire.TokenCreateRequest{}) // an ordinary node token
	_, _, err := node.Enroll(t.Context(), node.EnrollOptions{
		Coordinator: c.URL(), Token: tok.Token, CAPin: c.CAPin(), Name: "proxy", StateDir: t.TempDir() + "/p", Role: wire.RoleProxy,
	})
	if !wire.IsCode(err, wire.CodeWrongRole) || !strings.Contains(err.Error(), "--role proxy") {
		t.Fatalf("proxy enrolling with a node token: %v", err)
	}
	// The token was not used: an ordinary node can still enroll with it.
	if _, err := c.Enroll(t, "pi1", tok.Token); err != nil {
		t.Fatalf("node token after the refused proxy enrollment: %v", err)
	}
}

// HTTPS with a certificate from the coordinator's CA (what --tls-local
// does), HTTP/2 negotiated, and plain HTTP redirected to HTTPS.
func TestTLSFromCoordinatorCAWithHTTP2(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	cert, err := c.CA().IssueServerCert([]string{"*." + meshtest.Domain, meshtest.Domain}, time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	px := c.AddProxy(t, func(o *proxy.Options) {
		o.HTTPS = "127.0.0.1:0"
		o.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}}
	})
	c.AddAgent(t, "pi1", expose(t, "web="+backend(t, "over tls")+",public"))
	httpsAddr, httpAddr := px.Addrs()[0].String(), px.Addrs()[1].String()
	roots := x509.NewCertPool()
	roots.AddCert(c.CA().Cert)
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		TLSClientConfig:   &tls.Config{RootCAs: roots},
		ForceAttemptHTTP2: true,
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, httpsAddr) // every host → the proxy
		},
	}, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	var resp *http.Response
	meshtest.WaitFor(t, deadline, func() bool {
		r, err := hc.Get("https://" + host("pi1") + "/")
		if err != nil {
			return false
		}
		defer r.Body.Close()
		b, _ := io.ReadAll(r.Body)
		resp = r
		return r.StatusCode == 200 && string(b) == "over tls"
	}, "pi1 over HTTPS")
	if resp.ProtoMajor != 2 {
		t.Fatalf("protocol %s, want HTTP/2", resp.Proto)
	}
	req, _ := http.NewRequest(http.MethodGet, "http://"+httpAddr+"/x?y=1", nil)
	req.Host = host("pi1")
	r, err := http.DefaultTransport.RoundTrip(req)
	if err != nil {
		t.Fatal(err)
	}
	r.Body.Close()
	_, port, _ := net.SplitHostPort(httpsAddr)
	if r.StatusCode != http.StatusPermanentRedirect || r.Header.Get("Location") != "https://"+host("pi1")+":"+port+"/x?y=1" {
		t.Fatalf("plain HTTP with TLS on: %d %q", r.StatusCode, r.Header.Get("Location"))
	}
}

// The whole private-route flow against the real coordinator: sign-in page,
// a wrong key refused, an access key from the coordinator lets the browser
// in with a host-only cookie, and revoking the key ends the session.
func TestAccessKeySignIn(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	px := c.AddProxy(t)
	c.AddAgent(t, "pi1", expose(t, "web="+backend(t, "private page")))
	meshtest.WaitFor(t, deadline, func() bool { return px.Table().Len() > 0 }, "a route for pi1")

	var key wire.AccessKeyCreateResponse
	if err := c.Admin(http.MethodPost, wire.PathAdminAccessKeys, wire.AccessKeyCreateRequest{Node: "pi1"}, &key); err != nil {
		t.Fatal(err)
	}
	jar, _ := cookiejar.New(nil)
	hc := &http.Client{Jar: jar, Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, network, strings.TrimPrefix(px.URL, "http://"))
		},
	}}
	base := "http://" + host("pi1")
	get := func() (int, string) {
		r, err := hc.Get(base + "/")
		if err != nil {
			t.Fatal(err)
		}
		defer r.Body.Close()
		b, _ := io.ReadAll(r.Body)
		return r.StatusCode, string(b)
	}
	if code, body := get(); code != http.StatusUnauthorized || !strings.Contains(body, `name="key"`) {
		t.Fatalf("private page without a session: %d %q", code, body)
	}
	post := func(k string) int {
		r, err := hc.PostForm(base+"/.meshctl/signin", url.Values{"key": {k}, "next": {"/"}})
		if err != nil {
			t.Fatal(err)
		}
		r.Body.Close()
		return r.StatusCode
	}
	wrong := key.Key[:len(key.Key)-1] + "x"
	if strings.HasSuffix(key.Key, "x") {
		wrong = key.Key[:len(key.Key)-1] + "y" // still one character off
	}
	if code := post(wrong); code != http.StatusUnauthorized {
		t.Fatalf("wrong key: %d", code)
	}
	if code := post(key.Key); code != http.StatusOK { // 303 followed to the page
		t.Fatalf("good key: %d", code)
	}
	if code, body := get(); code != 200 || body != "private page" {
		t.Fatalf("with a session: %d %q", code, body)
	}
	if err := c.Admin(http.MethodPost, wire.PathAdminAccessKeyRevoke, wire.IDRequest{ID: key.ID}, nil); err != nil {
		t.Fatal(err)
	}
	meshtest.WaitFor(t, deadline, func() bool { code, _ := get(); return code == http.StatusUnauthorized }, "the revoked key's session to end")
}

// In the hub topology nodes see only the proxy: they cannot reach each
// other, and the proxy still serves all of them.
func TestHubTopology(t *testing.T) {
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) { o.Topology = coordinator.TopologyHub })
	px := c.AddProxy(t)
	a := c.AddAgent(t, "pi1", expose(t, "web="+backend(t, "pi1")+",public"))
	svc2 := expose(t, "web="+backend(t, "pi2")+",public")
	c.AddAgent(t, "pi2", svc2)
	for _, n := range []string{"pi1", "pi2"} {
		meshtest.WaitFor(t, deadline, func() bool { code, body := px.Get(host(n), "/"); return code == 200 && body == n }, n+" served through the proxy")
	}
	nm, err := a.Node.Client.Netmap(t.Context(), 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(nm.Peers) != 1 || nm.Peers[0].Role != wire.RoleProxy {
		t.Fatalf("pi1's netmap in the hub topology: %+v", nm.Peers)
	}
	if a.HasPeer(t, "pi2") {
		t.Fatal("pi1's WireGuard device has pi2 as a peer")
	}
	wantUnreachable(t, c, a, "pi2", svc2.Port)
}

// wantUnreachable fails if agent a connects to node name's service port,
// dialled at name's overlay address (a's netmap has no name to resolve).
func wantUnreachable(t *testing.T, c *meshtest.Coordinator, a *meshtest.Agent, name string, port uint16) {
	t.Helper()
	var ip string
	for _, n := range c.Nodes(t) {
		if n.Name == name {
			ip = n.IPv4
		}
	}
	if ip == "" {
		t.Fatalf("no node %s", name)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel()
	if conn, err := a.DialContext(ctx, "tcp", net.JoinHostPort(ip, strconv.Itoa(int(port)))); err == nil {
		conn.Close()
		t.Fatalf("%s reached %s at %s", a.Node.Name, name, ip)
	}
}

// In the tags topology nodes that share a tag (from their tokens) reach
// each other; a node with no tag in common is not even a WireGuard peer;
// the proxy serves all of them.
func TestTagsTopology(t *testing.T) {
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) { o.Topology = coordinator.TopologyTags })
	px := c.AddProxy(t)
	port := map[string]uint16{} // each node's web service, on its overlay address
	add := func(name string, tags ...string) *meshtest.Agent {
		tok := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 1, Tags: tags})
		n, err := c.Enroll(t, name, tok.Token)
		if err != nil {
			t.Fatal(err)
		}
		svc := expose(t, "web="+backend(t, name)+",public")
		port[name] = svc.Port
		return n.StartAgent(t, func(o *node.AgentOptions) { o.Services = []node.Service{svc} })
	}
	a := add("pi1", "lab", "cam")
	add("pi2", "cam")
	add("pi3", "office")
	for _, n := range []string{"pi1", "pi2", "pi3"} {
		meshtest.WaitFor(t, deadline, func() bool { code, body := px.Get(host(n), "/"); return code == 200 && body == n }, n+" served through the proxy")
	}
	nm, err := a.Node.Client.Netmap(t.Context(), 0)
	if err != nil {
		t.Fatal(err)
	}
	var seen []string
	for _, p := range nm.Peers {
		seen = append(seen, p.Name)
	}
	if !slices.Equal(seen, []string{"pi2", "proxy"}) || nm.Topology != wire.TopologyTags {
		t.Fatalf("pi1's netmap in the tags topology: topology %q, peers %v; want pi2 and the proxy", nm.Topology, seen)
	}
	meshtest.WaitFor(t, deadline, func() bool {
		ctx, cancel := context.WithTimeout(t.Context(), 2*time.Second)
		defer cancel()
		conn, err := a.Dial(ctx, "pi2", port["pi2"])
		if err == nil {
			conn.Close()
		}
		return err == nil
	}, "pi1 to reach pi2 (they share the tag cam)")
	if a.HasPeer(t, "pi3") {
		t.Fatal("pi1's WireGuard device has pi3 as a peer")
	}
	wantUnreachable(t, c, a, "pi3", port["pi3"])
}
