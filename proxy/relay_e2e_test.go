package proxy_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator"
	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/proxy"
	"github.com/meshctl/meshctl/wire"
)

// relayMesh is a coordinator announcing the proxy's SSH endpoint (the way
// to the relay) and a proxy running it.
func relayMesh(t *testing.T) (*meshtest.Coordinator, *meshtest.Proxy) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	sshAddr := ln.Addr().String()
	ln.Close()
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) { o.SSHEndpoint = sshAddr })
	sshOpts := c.SSHOptions(t)
	sshOpts.Listen = sshAddr
	return c, c.AddProxy(t, func(o *proxy.Options) { o.SSH = sshOpts })
}

// getBody fetches http://<peer>:<port>/ from a over the mesh.
func getBody(a *meshtest.Agent, peer string, port uint16) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := a.Dial(ctx, peer, port)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	req, _ := http.NewRequest(http.MethodGet, "http://"+peer+"/", nil)
	if err := req.Write(c); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	if err != nil && len(b) == 0 {
		return "", err
	}
	s := string(b)
	if i := strings.Index(s, "\r\n\r\n"); i >= 0 {
		s = s[i+4:]
	}
	return s, nil
}

func peerPath(t *testing.T, a *meshtest.Agent, peer string) node.PeerStatus {
	t.Helper()
	st, err := a.Status()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range st.Peers {
		if p.Name == peer {
			return p
		}
	}
	return node.PeerStatus{}
}

// Two nodes whose direct path is cut (as behind symmetric NATs) reach
// each other through the proxy's relay, over WireGuard end to end, and
// their status says so; when the path comes back they go direct. The
// proxy's own WireGuard device never routes one node's addresses to
// another (the relay works below WireGuard).
func TestNodesReachEachOtherThroughRelay(t *testing.T) {
	c, px := relayMesh(t)
	bindA, bindB := meshtest.NewBlockableBind(), meshtest.NewBlockableBind()
	a := c.AddNode(t, "pi1").StartAgent(t, func(o *node.AgentOptions) { o.Bind = bindA })
	svc := expose(t, "web="+backend(t, "pi2 via relay")+",public")
	b := c.AddNode(t, "pi2").StartAgent(t, func(o *node.AgentOptions) { o.Bind = bindB; o.Services = []node.Service{svc} })
	sa, _ := a.Status()
	sb, _ := b.Status()
	bindA.BlockPort(sb.ListenPort, true)
	bindB.BlockPort(sa.ListenPort, true)

	start := time.Now()
	meshtest.WaitFor(t, deadline, func() bool { body, _ := getBody(a, "pi2", svc.Port); return body == "pi2 via relay" }, "pi1 to reach pi2's service")
	t.Logf("pi1 reached pi2 through the relay after %s", time.Since(start))
	p := peerPath(t, a, "pi2")
	if p.Path != "relay" || !strings.Contains(p.PathReason, "no direct probe answered") {
		t.Fatalf("pi1's path to pi2: %q (%s)", p.Path, p.PathReason)
	}
	if pp := peerPath(t, a, "proxy"); pp.Path != "direct" {
		t.Fatalf("pi1's path to the proxy: %q (%s)", pp.Path, pp.PathReason)
	}
	// The proxy's device: every peer holds exactly its own host routes.
	assertHostRoutesOnly(t, px.Agent())

	bindA.BlockPort(sb.ListenPort, false)
	bindB.BlockPort(sa.ListenPort, false)
	start = time.Now()
	meshtest.WaitFor(t, deadline, func() bool {
		getBody(a, "pi2", svc.Port)
		return peerPath(t, a, "pi2").Path == "direct"
	}, "pi1's path to pi2 to become direct once UDP between them works")
	t.Logf("direct %s after the path was restored", time.Since(start))
	if body, err := getBody(a, "pi2", svc.Port); body != "pi2 via relay" {
		t.Fatalf("after going direct: %q %v", body, err)
	}
}

// A node whose UDP is blocked entirely (SSH fallback) stays a full mesh
// member: another node reaches its service over WireGuard through the
// relay on its SSH connection; revoking it cuts that at once.
func TestFallbackNodeStaysInMesh(t *testing.T) {
	c, px := relayMesh(t)
	a := c.AddAgent(t, "pi1")
	bind := meshtest.NewBlockableBind()
	bind.Block(true)
	svc := expose(t, "web="+backend(t, "from behind a UDP block")+",public")
	b := c.AddNode(t, "pi2").StartAgent(t, func(o *node.AgentOptions) {
		o.Bind = bind
		o.Services = []node.Service{svc}
		o.FallbackTimeout = time.Second
	})
	start := time.Now()
	meshtest.WaitFor(t, deadline, func() bool { body, _ := getBody(a, "pi2", svc.Port); return body == "from behind a UDP block" }, "pi1 to reach pi2 through the relay")
	t.Logf("pi1 reached pi2 (UDP blocked) through the relay after %s", time.Since(start))
	meshtest.WaitFor(t, deadline, func() bool { st, _ := b.Status(); return st.Fallback.Active }, "pi2 to be in SSH fallback")
	if p := peerPath(t, b, "pi1"); p.Path != "relay" || !strings.Contains(p.PathReason, "SSH") {
		t.Fatalf("pi2's path to pi1: %q (%s)", p.Path, p.PathReason)
	}
	meshtest.WaitFor(t, deadline, func() bool {
		code, body := px.Get(host("pi2"), "/")
		return code == 200 && body == "from behind a UDP block"
	}, "the proxy to serve pi2")

	if err := c.Admin(http.MethodPost, wire.PathAdminNodeRevoke, wire.NameRequest{Name: "pi2"}, nil); err != nil {
		t.Fatal(err)
	}
	meshtest.WaitFor(t, deadline, func() bool { _, err := getBody(a, "pi2", svc.Port); return err != nil }, "pi2 unreachable after its revocation")
}

// assertHostRoutesOnly checks that every peer of the agent's device has
// exactly one /32 and one /128: no peer carries other nodes' addresses.
func assertHostRoutesOnly(t *testing.T, a *node.Agent) {
	t.Helper()
	st, err := a.DeviceState()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range st.Peers {
		if len(p.AllowedIPs) != 2 || p.AllowedIPs[0].Bits() != 32 || p.AllowedIPs[1].Bits() != 128 {
			t.Fatalf("peer %s has allowed IPs %v, want exactly its /32 and /128", p.PublicKey, p.AllowedIPs)
		}
	}
}
