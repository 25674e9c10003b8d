package sshtunnel

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/meshctl/meshctl/wire"
)

// testEnv is a running Server on a loopback listener with a user CA, a host
// CA that certified the host key, and a mutable node table.
type testEnv struct {
	t       *testing.T
	userCA  ssh.Signer
	hostCA  ssh.Signer
	srv     *Server
	addr    string
	changes atomic.Int64
	skew    atomic.Int64 // added to time.Now for Options.Now

	mu    sync.Mutex
	nodes map[string]NodeInfo
}

func newSigner(t *testing.T) (ssh.Signer, ed25519.PrivateKey) {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	return s, priv
}

func services(names ...string) NodeInfo {
	var info NodeInfo
	for i, n := range names {
		info.Services = append(info.Services, wire.Service{Name: n, Port: uint16(8000 + i)})
	}
	return info
}

// newEnv starts a server. opts may adjust the options and pre the server
// before it serves.
func newEnv(t *testing.T, opts func(*Options), pre func(*Server)) *testEnv {
	t.Helper()
	e := &testEnv{t: t, nodes: map[string]NodeInfo{
		"pi1": services("web", "api", "admin"),
		"pi2": services("web"),
		"pi3": services("api", "metrics"),
	}}
	e.userCA, _ = newSigner(t)
	e.hostCA, _ = newSigner(t)
	hostKey, _ := newSigner(t)
	hostCert := &ssh.Certificate{
		Key:             hostKey.PublicKey(),
		CertType:        ssh.HostCert,
		KeyId:           "test proxy",
		ValidPrincipals: []string{"127.0.0.1", "localhost"},
		ValidAfter:      uint64(time.Now().Add(-time.Hour).Unix()),
		ValidBefore:     uint64(time.Now().Add(time.Hour).Unix()),
	}
	if err := hostCert.SignCert(rand.Reader, e.hostCA); err != nil {
		t.Fatal(err)
	}
	hostSigner, err := ssh.NewCertSigner(hostCert, hostKey)
	if err != nil {
		t.Fatal(err)
	}
	o := Options{
		HostSigner: hostSigner,
		UserCA:     e.userCA.PublicKey(),
		Lookup: func(node string) (NodeInfo, bool) {
			e.mu.Lock()
			defer e.mu.Unlock()
			info, ok := e.nodes[node]
			return info, ok
		},
		Now:      func() time.Time { return time.Now().Add(time.Duration(e.skew.Load())) },
		OnChange: func() { e.changes.Add(1) },
	}
	if opts != nil {
		opts(&o)
	}
	e.srv, err = New(o)
	if err != nil {
		t.Fatal(err)
	}
	if pre != nil {
		pre(e.srv)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.addr = ln.Addr().String()
	served := make(chan error, 1)
	go func() { served <- e.srv.Serve(ln) }()
	t.Cleanup(func() {
		if err := e.srv.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := <-served; err != nil {
			t.Errorf("Serve returned %v after Close, want nil", err)
		}
	})
	return e
}

func (e *testEnv) setNode(name string, info NodeInfo, ok bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if ok {
		e.nodes[name] = info
	} else {
		delete(e.nodes, name)
	}
}

// userCert returns a signer presenting a user certificate of principals,
// signed by ca, valid from after to before.
func userCert(t *testing.T, ca ssh.Signer, after, before time.Time, principals ...string) (ssh.Signer, *ssh.Certificate, ed25519.PrivateKey) {
	t.Helper()
	return userCertExt(t, ca, map[string]string{"permit-port-forwarding": ""}, after, before, principals...)
}

// userCertExt is userCert with the given certificate extensions (the
// coordinator grants exactly permit-port-forwarding).
func userCertExt(t *testing.T, ca ssh.Signer, ext map[string]string, after, before time.Time, principals ...string) (ssh.Signer, *ssh.Certificate, ed25519.PrivateKey) {
	t.Helper()
	key, priv := newSigner(t)
	cert := &ssh.Certificate{
		Key:             key.PublicKey(),
		CertType:        ssh.UserCert,
		KeyId:           "test " + strings.Join(principals, ","),
		ValidPrincipals: principals,
		ValidAfter:      uint64(after.Unix()),
		ValidBefore:     uint64(before.Unix()),
		Permissions:     ssh.Permissions{Extensions: ext},
	}
	if err := cert.SignCert(rand.Reader, ca); err != nil {
		t.Fatal(err)
	}
	s, err := ssh.NewCertSigner(cert, key)
	if err != nil {
		t.Fatal(err)
	}
	return s, cert, priv
}

// nodeSigner is a valid certificate signer for node.
func (e *testEnv) nodeSigner(node string) ssh.Signer {
	s, _, _ := userCert(e.t, e.userCA, time.Now().Add(-time.Hour), time.Now().Add(time.Hour), node)
	return s
}

func (e *testEnv) clientConfig(user string, auth ...ssh.AuthMethod) *ssh.ClientConfig {
	hostCA := e.hostCA.PublicKey().Marshal()
	checker := &ssh.CertChecker{IsHostAuthority: func(a ssh.PublicKey, _ string) bool {
		return string(a.Marshal()) == string(hostCA)
	}}
	return &ssh.ClientConfig{
		User:            user,
		Auth:            auth,
		HostKeyCallback: checker.CheckHostKey,
		Timeout:         5 * time.Second,
	}
}

// dial connects as user with the given auth methods.
func (e *testEnv) dial(user string, auth ...ssh.AuthMethod) (*ssh.Client, error) {
	c, err := ssh.Dial("tcp", e.addr, e.clientConfig(user, auth...))
	if err == nil {
		e.t.Cleanup(func() { c.Close() })
	}
	return c, err
}

// connect connects as node with a valid certificate or fails the test.
func (e *testEnv) connect(node string) *ssh.Client {
	e.t.Helper()
	c, err := e.dial(node, ssh.PublicKeys(e.nodeSigner(node)))
	if err != nil {
		e.t.Fatalf("connect %s: %v", node, err)
	}
	return c
}

// forwardReq sends a raw tcpip-forward request and returns the reply.
func forwardReq(t *testing.T, c *ssh.Client, addr string, port uint32) bool {
	t.Helper()
	ok, payload, err := c.SendRequest("tcpip-forward", true, ssh.Marshal(forwardMsg{Addr: addr, Port: port}))
	if err != nil {
		t.Fatalf("tcpip-forward %q:%d: %v", addr, port, err)
	}
	if ok && len(payload) != 0 {
		t.Errorf("tcpip-forward %q:%d replied with payload %x, want none", addr, port, payload)
	}
	return ok
}

// waitClosed fails unless c's connection ends within a generous bound.
func waitClosed(t *testing.T, c ssh.Conn, what string) {
	t.Helper()
	done := make(chan struct{})
	go func() { c.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: connection still open", what)
	}
}

// isOpen reports whether c still answers a global request.
// waitAccepted retries dial until the server accepts a connection (the
// test freed a slot), for up to 10 s.
func waitAccepted(t *testing.T, what string, dial func() (*ssh.Client, error)) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := dial()
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v", what, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func isOpen(c ssh.Conn) bool {
	ok, _, err := c.SendRequest("keepalive@openssh.com", true, nil)
	return err == nil && ok
}

func (e *testEnv) wantForwards(want ...Forward) {
	e.t.Helper()
	if got := e.srv.Forwards(); !slices.Equal(got, want) {
		e.t.Fatalf("Forwards() = %v, want %v", got, want)
	}
}

// backend is a local HTTP server whose every response body is body.
func backend(t *testing.T, body string) string {
	t.Helper()
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, body)
	}))
	t.Cleanup(ts.Close)
	return ts.Listener.Addr().String()
}

// serveForwards splices every connection from ln to the TCP address to,
// like "ssh -R" does, until ln fails.
func serveForwards(ln net.Listener, to string) {
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go splice(c, to)
		}
	}()
}

func splice(c net.Conn, to string) {
	defer c.Close()
	b, err := net.Dial("tcp", to)
	if err != nil {
		return
	}
	defer b.Close()
	done := make(chan struct{})
	go func() {
		io.Copy(b, c)
		b.(*net.TCPConn).CloseWrite()
		close(done)
	}()
	io.Copy(c, b)
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		cw.CloseWrite()
	}
	<-done
}

// httpGet fetches "/" from service of node through srv.Dial.
func httpGet(srv *Server, node, service string) (string, error) {
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return srv.Dial(ctx, node, service)
		},
		DisableKeepAlives: true,
	}
	defer tr.CloseIdleConnections()
	cl := &http.Client{Transport: tr, Timeout: 10 * time.Second}
	resp, err := cl.Get("http://" + service + "--" + node + ".mesh.example/")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != http.StatusOK {
		err = errors.New(resp.Status)
	}
	return string(b), err
}

// leakedGoroutines returns the stacks of goroutines, other than the
// calling one, whose stack contains any of the markers.
func leakedGoroutines(markers ...string) []string {
	buf := make([]byte, 1<<20)
	for {
		n := runtime.Stack(buf, true)
		if n < len(buf) {
			buf = buf[:n]
			break
		}
		buf = make([]byte, 2*len(buf))
	}
	var out []string
	gs := strings.Split(string(buf), "\n\n")
	for _, g := range gs[1:] { // the first is the caller
		for _, m := range markers {
			if strings.Contains(g, m) {
				out = append(out, g)
				break
			}
		}
	}
	return out
}
