package coordinator_test

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"errors"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator"
	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/wire"
	"golang.org/x/crypto/ssh"
)

// newSSHKey returns a fresh SSH public key as an authorized_keys line.
func newSSHKey(t *testing.T, kind string) (ssh.PublicKey, string) {
	t.Helper()
	var raw any
	switch kind {
	case "ed25519":
		pub, _, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		raw = pub
	case "ecdsa":
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		raw = &k.PublicKey
	case "rsa":
		k, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			t.Fatal(err)
		}
		raw = &k.PublicKey
	}
	pub, err := ssh.NewPublicKey(raw)
	if err != nil {
		t.Fatal(err)
	}
	return pub, strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub))) + " device@example"
}

func addSSH(t *testing.T, c *meshtest.Coordinator, req wire.AddSSHRequest) wire.AddSSHResponse {
	t.Helper()
	var resp wire.AddSSHResponse
	if err := c.Admin(http.MethodPost, wire.PathAdminNodeAddSSH, req, &resp); err != nil {
		t.Fatalf("add-ssh %s: %v", req.Name, err)
	}
	return resp
}

// checkSSHCert checks that resp's certificate is a user certificate for
// name, of key, from the SSH CA in resp, valid for ttl from now.
func checkSSHCert(t *testing.T, c *meshtest.Coordinator, resp wire.AddSSHResponse, name string, key ssh.PublicKey, ttl time.Duration) {
	t.Helper()
	ca, _, _, _, err := ssh.ParseAuthorizedKey([]byte(resp.SSHCA))
	if err != nil {
		t.Fatalf("ssh_ca %q: %v", resp.SSHCA, err)
	}
	if !bytes.Equal(ca.Marshal(), c.SSHCA().PublicKey().Marshal()) {
		t.Error("ssh_ca is not the coordinator's SSH CA")
	}
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(resp.Certificate))
	if err != nil {
		t.Fatalf("certificate %q: %v", resp.Certificate, err)
	}
	cert, ok := pub.(*ssh.Certificate)
	if !ok {
		t.Fatalf("certificate is a %T, not a certificate", pub)
	}
	checker := ssh.CertChecker{
		IsUserAuthority: func(auth ssh.PublicKey) bool { return bytes.Equal(auth.Marshal(), ca.Marshal()) },
		Clock:           c.Clock.Now,
	}
	if err := checker.CheckCert(name, cert); err != nil {
		t.Errorf("certificate not valid for %s from the SSH CA: %v", name, err)
	}
	if cert.CertType != ssh.UserCert || !bytes.Equal(cert.Key.Marshal(), key.Marshal()) ||
		cert.KeyId != "ssh-node:"+resp.Node.ID || !slices.Equal(cert.ValidPrincipals, []string{name}) {
		t.Errorf("certificate type %d key id %q principals %v (key matches: %t)", cert.CertType, cert.KeyId,
			cert.ValidPrincipals, bytes.Equal(cert.Key.Marshal(), key.Marshal()))
	}
	if got, want := int64(cert.ValidBefore), c.Clock.Now().Add(ttl).Unix(); got < want-2 || got > want+2 {
		t.Errorf("certificate valid before %d, want %d (ttl %s)", got, want, ttl)
	}
}

func findNode(l []wire.Node, id string) (wire.Node, bool) {
	for _, n := range l {
		if n.ID == id {
			return n, true
		}
	}
	return wire.Node{}, false
}

func TestAddSSHNode(t *testing.T) {
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) {
		o.SSHEndpoint = "proxy.example:2222"
		o.Domain = "mesh.example"
	})
	pi := c.AddNode(t, "pi")
	px := addProxy(t, c, "px")

	key1, line1 := newSSHKey(t, "ed25519")
	resp := addSSH(t, c, wire.AddSSHRequest{Name: "cam", SSHKey: line1, TTL: wire.Duration(48 * time.Hour), Services: []string{"web", "rtsp"}})
	id := resp.Node.ID
	if n := resp.Node; id == "" || n.Name != "cam" || n.Role != wire.RoleSSH || n.IPv4 != "" || n.IPv6 != "" ||
		n.WireGuardKey != "" || n.Online || n.Revoked {
		t.Errorf("add-ssh node = %+v", n)
	}
	if resp.ProxySSH != "proxy.example:2222" || resp.Domain != "mesh.example" {
		t.Errorf("add-ssh proxy_ssh %q domain %q", resp.ProxySSH, resp.Domain)
	}
	checkSSHCert(t, c, resp, "cam", key1, 48*time.Hour)

	// Listed, with role ssh and no addresses.
	n, ok := findNode(c.Nodes(t), id)
	if !ok || n.Role != wire.RoleSSH || n.IPv4 != "" || n.IPv6 != "" || n.WireGuardKey != "" || n.Revoked ||
		len(n.Services) != 2 || n.Services[0] != (wire.Service{Name: "web", Port: 80}) || n.Services[1].Name != "rtsp" {
		t.Errorf("nodes list has %+v (found %t)", n, ok)
	}

	// Only proxies see it, and only in SSHOnly.
	nmP, err := px.Netmap(ctx(t), 0)
	if err != nil {
		t.Fatal(err)
	}
	wantPeer := wire.Peer{ID: id, Name: "cam", Role: wire.RoleSSH,
		Services: []wire.Service{{Name: "web", Port: 80}, {Name: "rtsp", Port: 80}}}
	if len(nmP.SSHOnly) != 1 || !peerEqual(nmP.SSHOnly[0], wantPeer) {
		t.Errorf("proxy netmap SSHOnly = %+v, want [%+v]", nmP.SSHOnly, wantPeer)
	}
	if peerNames(nmP)["cam"] {
		t.Error("SSH-only node among the proxy's WireGuard peers")
	}
	nmA, err := pi.Client.Netmap(ctx(t), 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(nmA.SSHOnly) != 0 || peerNames(nmA)["cam"] || !peerNames(nmA)["px"] {
		t.Errorf("node netmap: SSHOnly %+v, peers %v", nmA.SSHOnly, peerNames(nmA))
	}
	if raw := rawNetmap(t, c, pi.State); strings.Contains(raw, "ssh_only") {
		t.Errorf("node's raw netmap mentions ssh_only: %s", raw)
	}

	// Again: re-certified, same node, new key, default services.
	key2, line2 := newSSHKey(t, "ecdsa")
	resp2 := addSSH(t, c, wire.AddSSHRequest{Name: "cam", SSHKey: line2})
	if resp2.Node.ID != id || !resp2.Node.Created.Equal(resp.Node.Created) {
		t.Errorf("re-certified node %+v; want the same node %s", resp2.Node, id)
	}
	checkSSHCert(t, c, resp2, "cam", key2, 7*24*time.Hour)
	count := 0
	for _, n := range c.Nodes(t) {
		if n.Name == "cam" {
			count++
		}
	}
	if count != 1 {
		t.Errorf("%d nodes named cam after re-certifying, want 1", count)
	}
	nmP2, err := px.Netmap(ctx(t), 0)
	if err != nil {
		t.Fatal(err)
	}
	if nmP2.Version == nmP.Version || len(nmP2.SSHOnly) != 1 ||
		!slices.Equal(nmP2.SSHOnly[0].Services, []wire.Service{{Name: "web", Port: 80}}) {
		t.Errorf("proxy netmap after re-certifying: version %d (was %d), SSHOnly %+v", nmP2.Version, nmP.Version, nmP2.SSHOnly)
	}

	// Visibility applies to its services.
	if err := c.Admin(http.MethodPost, wire.PathAdminVisibility, wire.VisibilityRequest{Node: "cam", Service: "web", Public: true}, nil); err != nil {
		t.Fatalf("set visibility: %v", err)
	}
	if nm, _ := px.Netmap(ctx(t), 0); len(nm.SSHOnly) != 1 || !publicOf(nm.SSHOnly[0].Services)["web"] {
		t.Errorf("proxy netmap after making web public: %+v", nm.SSHOnly)
	}
	err = c.Admin(http.MethodPost, wire.PathAdminVisibility, wire.VisibilityRequest{Node: "cam", Service: "db", Public: true}, nil)
	if ae := (*wire.APIError)(nil); !errors.As(err, &ae) || ae.Status != http.StatusBadRequest || !strings.Contains(ae.Message, "not certified") {
		t.Errorf("visibility of a service the SSH-only node lacks: %v", err)
	}

	// Revocation wakes the proxy's long-poll and removes the node at once.
	nmP, _ = px.Netmap(ctx(t), 0)
	poll := make(chan *wire.Netmap, 1)
	go func() {
		nm, err := px.Netmap(ctx(t), nmP.Version)
		if err != nil {
			t.Errorf("long-poll: %v", err)
		}
		poll <- nm
	}()
	time.Sleep(50 * time.Millisecond) // let it wait
	if err := c.Admin(http.MethodPost, wire.PathAdminNodeRevoke, wire.NameRequest{Name: "cam"}, nil); err != nil {
		t.Fatalf("revoke: %v", err)
	}
	select {
	case nm := <-poll:
		if nm == nil || len(nm.SSHOnly) != 0 {
			t.Errorf("proxy netmap after revocation: %+v", nm)
		}
	case <-time.After(time.Second): // well under the 2s long-poll
		t.Fatal("revocation did not wake the proxy's long-poll")
	}
	if n, ok := findNode(c.Nodes(t), id); !ok || !n.Revoked || n.RevokedAt == nil || n.Role != wire.RoleSSH {
		t.Errorf("revoked SSH-only node listed as %+v (found %t)", n, ok)
	}
	if !hasAudit(auditActions(t, c), "node.add-ssh", "cam", "id="+id) ||
		!hasAudit(auditActions(t, c), "node.ssh-recertify", "cam", "id="+id) ||
		!hasAudit(auditActions(t, c), "node.revoke", "cam", "id="+id) {
		t.Errorf("audit log lacks the SSH-only node's rows: %+v", auditActions(t, c))
	}

	// Its name is free again: a new SSH-only node gets a new id.
	_, line3 := newSSHKey(t, "ed25519")
	if r := addSSH(t, c, wire.AddSSHRequest{Name: "cam", SSHKey: line3}); r.Node.ID == id {
		t.Error("add-ssh after revocation reused the revoked node's id")
	}
}

func peerEqual(a, b wire.Peer) bool {
	return a.ID == b.ID && a.Name == b.Name && a.Role == b.Role && a.WireGuardKey == b.WireGuardKey &&
		a.IPv4 == b.IPv4 && a.IPv6 == b.IPv6 && len(a.Endpoints) == 0 && len(a.Tags) == 0 &&
		slices.Equal(a.Services, b.Services)
}

// TestSSHNodeSurvivesRestart checks the SSH-only nodes are loaded into the
// netmap when the coordinator starts.
func TestSSHNodeSurvivesRestart(t *testing.T) {
	dir := meshtest.ShortTempDir(t)
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) { o.DataDir = dir })
	_, line := newSSHKey(t, "ed25519")
	keep := addSSH(t, c, wire.AddSSHRequest{Name: "cam", SSHKey: line})
	gone := addSSH(t, c, wire.AddSSHRequest{Name: "gone", SSHKey: line})
	if err := c.Admin(http.MethodPost, wire.PathAdminNodeRevoke, wire.NameRequest{Name: "gone"}, nil); err != nil {
		t.Fatal(err)
	}
	c.Server.Close()

	c2 := meshtest.NewCoordinator(t, func(o *coordinator.Options) { o.DataDir = dir })
	px := addProxy(t, c2, "px")
	nm, err := px.Netmap(ctx(t), 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(nm.SSHOnly) != 1 || nm.SSHOnly[0].ID != keep.Node.ID || len(nm.Peers) != 0 {
		t.Errorf("after restart: SSHOnly %+v (want only %s, not %s), peers %+v", nm.SSHOnly, keep.Node.ID, gone.Node.ID, nm.Peers)
	}
}

func TestAddSSHNodeRefusals(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	c.AddNode(t, "pi")
	_, line := newSSHKey(t, "ed25519")
	_, rsaLine := newSSHKey(t, "rsa")
	addSSH(t, c, wire.AddSSHRequest{Name: "cam", SSHKey: line})

	many := make([]string, 17)
	for i := range many {
		many[i] = "s" + string(rune('a'+i))
	}
	for _, bad := range []struct {
		req    wire.AddSSHRequest
		status int
		want   string
	}{
		{wire.AddSSHRequest{Name: "pi", SSHKey: line}, http.StatusConflict, "in use by an enrolled node"},
		{wire.AddSSHRequest{Name: "dog", SSHKey: "ssh-ed25519 garbage"}, http.StatusBadRequest, "ssh key"},
		{wire.AddSSHRequest{Name: "dog", SSHKey: rsaLine}, http.StatusBadRequest, "not accepted"},
		{wire.AddSSHRequest{Name: "dog"}, http.StatusBadRequest, "ssh_key is empty"},
		{wire.AddSSHRequest{Name: "admin", SSHKey: line}, http.StatusBadRequest, "reserved"},
		{wire.AddSSHRequest{Name: "Dog", SSHKey: line}, http.StatusBadRequest, "upper-case"},
		{wire.AddSSHRequest{Name: "dog", SSHKey: line, Services: []string{"a--b"}}, http.StatusBadRequest, "service name"},
		{wire.AddSSHRequest{Name: "dog", SSHKey: line, Services: []string{"web", "web"}}, http.StatusBadRequest, "twice"},
		{wire.AddSSHRequest{Name: "dog", SSHKey: line, Services: many}, http.StatusBadRequest, "at most 16"},
		{wire.AddSSHRequest{Name: "dog", SSHKey: line, TTL: wire.Duration(366 * 24 * time.Hour)}, http.StatusBadRequest, "365 days"},
		{wire.AddSSHRequest{Name: "dog", SSHKey: line, TTL: wire.Duration(-time.Hour)}, http.StatusBadRequest, "ttl"},
	} {
		err := c.Admin(http.MethodPost, wire.PathAdminNodeAddSSH, bad.req, nil)
		var ae *wire.APIError
		if !errors.As(err, &ae) || ae.Status != bad.status || !strings.Contains(ae.Message, bad.want) {
			t.Errorf("add-ssh %+v: %v; want %d and %q", bad.req, err, bad.status, bad.want)
		}
	}
	for _, n := range c.Nodes(t) {
		if n.Name == "dog" || (n.Name == "pi" && n.Role != wire.RoleNode) {
			t.Errorf("refused add-ssh left node %+v", n)
		}
	}

	// An enrollment under an SSH-only node's name is refused.
	tok := c.CreateToken(t, wire.TokenCreateRequest{})
	_, err := c.Enroll(t, "cam", tok.Token)
	var ae *wire.APIError
	if !errors.As(err, &ae) || ae.Status != http.StatusConflict || ae.Code != wire.CodeNameTaken {
		t.Errorf("enroll as cam (an SSH-only node's name): %v; want 409 name taken", err)
	}
	// So is renaming onto it, and renaming it.
	err = c.Admin(http.MethodPost, wire.PathAdminNodeRename, wire.NameRequest{Name: "pi", NewName: "cam"}, nil)
	if !errors.As(err, &ae) || ae.Status != http.StatusConflict {
		t.Errorf("rename pi to cam: %v; want 409", err)
	}
	err = c.Admin(http.MethodPost, wire.PathAdminNodeRename, wire.NameRequest{Name: "cam", NewName: "cam2"}, nil)
	if !errors.As(err, &ae) || ae.Status != http.StatusBadRequest || !strings.Contains(ae.Message, "SSH-only") {
		t.Errorf("rename of an SSH-only node: %v; want 400", err)
	}
	// An access key may be limited to an SSH-only node.
	if k := createAccessKey(t, c, wire.AccessKeyCreateRequest{Node: "cam"}); k.Node != "cam" {
		t.Errorf("access key for cam: %+v", k)
	}
}
