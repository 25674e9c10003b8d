package proxy_test

import (
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/proxy"
	"github.com/meshctl/meshctl/wire"
)

const deadline = 10 * time.Second // generous for -race on 2 cores; the properties are < 1 s

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
	if err := c.Admin(http.MethodPost, wire.PathAdminNodeRevoke, wire.NameRequest{Name: "pi1"}, nil); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	meshtest.WaitFor(t, deadline, func() bool { code, _ := px.Get(host("pi1"), "/"); return code == http.StatusNotFound }, "pi1 to be 404 after revocation")
	t.Logf("revoked node's route gone after %s", time.Since(start))
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
