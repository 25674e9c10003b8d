package meshtest

import (
	"context"
	"io"
	"net/http"
	"path/filepath"
	"testing"
	"time"

	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/proxy"
	"github.com/meshctl/meshctl/wire"
	"golang.org/x/crypto/ssh"
)

// Domain is the proxy domain the harness uses.
const Domain = "mesh.test"

// Proxy is a running proxy on netstack with plain HTTP on 127.0.0.1.
type Proxy struct {
	*proxy.Proxy
	Dir string
	URL string // http://127.0.0.1:PORT
}

// AddProxy enrolls a proxy with a proxy token and starts it with domain
// Domain and HTTP on 127.0.0.1:0. mod may adjust the options.
func (c *Coordinator) AddProxy(t testing.TB, mod ...func(*proxy.Options)) *Proxy {
	t.Helper()
	tok := c.CreateToken(t, wire.TokenCreateRequest{Role: wire.RoleProxy})
	dir := filepath.Join(t.TempDir(), "proxy")
	if _, _, err := node.Enroll(context.Background(), node.EnrollOptions{
		Coordinator: c.URL(), Token: tok.Token, CAPin: c.CAPin(), Name: "proxy", StateDir: dir, Role: wire.RoleProxy,
	}); err != nil {
		t.Fatalf("enroll proxy: %v", err)
	}
	opts := proxy.Options{
		Domain: Domain,
		HTTP:   "127.0.0.1:0",
		Agent: node.AgentOptions{
			StateDir: dir, UAPIDir: dir,
			RetryMin: 50 * time.Millisecond, RetryMax: 500 * time.Millisecond,
		},
		Logger: testLogger(),
	}
	for _, m := range mod {
		m(&opts)
	}
	px, err := proxy.New(opts)
	if err != nil {
		t.Fatalf("proxy.New: %v", err)
	}
	if err := px.Start(); err != nil {
		t.Fatalf("proxy start: %v", err)
	}
	t.Cleanup(func() { px.Close() })
	return &Proxy{Proxy: px, Dir: dir, URL: "http://" + px.Addrs()[0].String()}
}

// Get sends GET path to the proxy with the Host header host and returns
// the status and body (status 0 on a transport error).
func (p *Proxy) Get(host, path string) (int, string) {
	req, _ := http.NewRequest(http.MethodGet, p.URL+path, nil)
	req.Host = host
	hc := &http.Client{Timeout: 10 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := hc.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// SSHOptions returns SSH fallback options for a proxy of c: a fresh host
// key certified by c's SSH CA for 127.0.0.1 and localhost, on 127.0.0.1:0.
func (c *Coordinator) SSHOptions(t testing.TB) *proxy.SSHOptions {
	t.Helper()
	hostKey, err := pki.LoadOrCreateSSHKey(filepath.Join(t.TempDir(), "host_key"))
	if err != nil {
		t.Fatal(err)
	}
	cert, err := pki.SignSSHHostCert(c.SSHCA(), hostKey.PublicKey(), []string{"127.0.0.1", "localhost"}, time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.NewCertSigner(cert, hostKey)
	if err != nil {
		t.Fatal(err)
	}
	return &proxy.SSHOptions{Listen: "127.0.0.1:0", HostSigner: signer, UserCA: c.SSHCA().PublicKey()}
}
