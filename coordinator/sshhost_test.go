package coordinator_test

import (
	"path/filepath"
	"testing"

	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
	"golang.org/x/crypto/ssh"
)

func TestSSHHostCertForProxiesOnly(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	hostKey, err := pki.LoadOrCreateSSHKey(filepath.Join(t.TempDir(), "host"))
	if err != nil {
		t.Fatal(err)
	}
	req := wire.SSHHostCertRequest{HostKey: string(ssh.MarshalAuthorizedKey(hostKey.PublicKey())), Principals: []string{"proxy.example.com", "192.0.2.10"}}

	plain := c.AddNode(t, "pi1")
	if _, err := plain.Client.RequestSSHHostCert(ctx(t), req); !wire.IsCode(err, wire.CodeForbidden) {
		t.Fatalf("a plain node certifying a host key: %v, want 403", err)
	}

	tok := c.CreateToken(t, wire.TokenCreateRequest{Role: wire.RoleProxy})
	dir := filepath.Join(t.TempDir(), "px")
	if _, _, err := node.Enroll(ctx(t), node.EnrollOptions{Coordinator: c.URL(), Token: tok.Token, CAPin: c.CAPin(), Name: "proxy", StateDir: dir, Role: wire.RoleProxy}); err != nil {
		t.Fatal(err)
	}
	px, err := node.NewClient(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer px.Close()
	resp, err := px.RequestSSHHostCert(ctx(t), req)
	if err != nil {
		t.Fatal(err)
	}
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(resp.Certificate))
	if err != nil {
		t.Fatal(err)
	}
	cert := pub.(*ssh.Certificate)
	ca, _, _, _, _ := ssh.ParseAuthorizedKey([]byte(resp.SSHCA))
	checker := ssh.CertChecker{IsHostAuthority: func(k ssh.PublicKey, _ string) bool { return string(k.Marshal()) == string(ca.Marshal()) }}
	if cert.CertType != ssh.HostCert || checker.CheckCert("proxy.example.com", cert) != nil || checker.CheckCert("192.0.2.10", cert) != nil {
		t.Fatalf("host certificate: type %d principals %v", cert.CertType, cert.ValidPrincipals)
	}
	if checker.CheckCert("other.example.com", cert) == nil {
		t.Fatal("host certificate valid for a name not asked for")
	}
	for _, bad := range [][]string{nil, {"bad name!"}, {""}} {
		r := req
		r.Principals = bad
		if _, err := px.RequestSSHHostCert(ctx(t), r); !wire.IsCode(err, wire.CodeBadRequest) {
			t.Errorf("principals %q: %v, want 400", bad, err)
		}
	}
	r := req
	r.HostKey = "ssh-ed25519 garbage"
	if _, err := px.RequestSSHHostCert(ctx(t), r); !wire.IsCode(err, wire.CodeBadRequest) {
		t.Errorf("bad host key: %v, want 400", err)
	}
}
