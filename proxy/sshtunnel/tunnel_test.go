package sshtunnel

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

// listen makes c request a forward with x/crypto's Listen (tcpip-forward
// with that bind address and port) and splices it to the backend at to.
func listen(t *testing.T, c *ssh.Client, addr, to string) net.Listener {
	t.Helper()
	ln, err := c.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("Listen(%s): %v", addr, err)
	}
	serveForwards(ln, to)
	return ln
}

func TestHappyPath(t *testing.T) {
	e := newEnv(t, nil, nil)
	web, api := backend(t, "web backend"), backend(t, "api backend")
	c := e.connect("pi1")
	listen(t, c, "pi1:80", web)
	apiLn := listen(t, c, "api--pi1:80", api)
	e.wantForwards(Forward{"pi1", "api"}, Forward{"pi1", "web"})
	if n := e.changes.Load(); n != 2 {
		t.Errorf("OnChange called %d times for 2 forwards", n)
	}

	for svc, want := range map[string]string{"web": "web backend", "api": "api backend"} {
		if body, err := httpGet(e.srv, "pi1", svc); err != nil || body != want {
			t.Fatalf("GET %s--pi1 = %q, %v; want %q", svc, body, err, want)
		}
	}
	for _, tc := range [][2]string{{"pi1", "admin"}, {"pi1", "nosuch"}, {"pi2", "web"}, {"ghost", "web"}} {
		if conn, err := e.srv.Dial(context.Background(), tc[0], tc[1]); !errors.Is(err, ErrNoForward) {
			if conn != nil {
				conn.Close()
			}
			t.Errorf("Dial(%s, %s) = %v, want ErrNoForward", tc[0], tc[1], err)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := e.srv.Dial(ctx, "pi1", "web"); !errors.Is(err, context.Canceled) {
		t.Errorf("Dial with a cancelled context: %v", err)
	}

	// The conn adapter: addresses, half-close and deadlines.
	conn, err := e.srv.Dial(context.Background(), "pi1", "web")
	if err != nil {
		t.Fatal(err)
	}
	if got := conn.RemoteAddr().String(); got != "web--pi1" {
		t.Errorf("RemoteAddr = %q", got)
	}
	if _, ok := conn.LocalAddr().(*net.TCPAddr); !ok {
		t.Errorf("LocalAddr = %#v", conn.LocalAddr())
	}
	io.WriteString(conn, "GET / HTTP/1.0\r\nHost: x\r\n\r\n")
	if err := conn.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if b, err := io.ReadAll(conn); err != nil || !strings.HasSuffix(string(b), "web backend") {
		t.Fatalf("HTTP/1.0 over the conn: %q, %v", b, err)
	}
	conn.Close()
	conn, err = e.srv.Dial(context.Background(), "pi1", "web")
	if err != nil {
		t.Fatal(err)
	}
	conn.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
	if _, err := conn.Read(make([]byte, 1)); !isTimeout(err) {
		t.Errorf("Read past the deadline: %v, want a timeout", err)
	}
	if _, err := conn.Read(make([]byte, 1)); !isTimeout(err) {
		t.Errorf("Read after the deadline: %v, want a timeout", err)
	}
	conn.Close()

	// Another node cannot touch pi1's forwards.
	c2 := e.connect("pi2")
	for _, addr := range []string{"pi1", "web--pi1", "api--pi1"} {
		if forwardReq(t, c2, addr, 80) {
			t.Errorf("pi2 could forward %s", addr)
		}
	}
	if ok, _, _ := c2.SendRequest("cancel-tcpip-forward", true, ssh.Marshal(forwardMsg{"pi1", 80})); ok {
		t.Error("pi2 cancelled pi1's forward")
	}
	e.DropNodeAndKeep(t, "pi2", c)
	e.wantForwards(Forward{"pi1", "api"}, Forward{"pi1", "web"})

	// Cancelling a forward (closing an x/crypto listener) removes it.
	if err := apiLn.Close(); err != nil {
		t.Fatalf("cancel-tcpip-forward: %v", err)
	}
	e.wantForwards(Forward{"pi1", "web"})
	if _, err := e.srv.Dial(context.Background(), "pi1", "api"); !errors.Is(err, ErrNoForward) {
		t.Errorf("Dial of a cancelled forward: %v", err)
	}

	// Lookup is asked again: a service the node may no longer publish is
	// not dialled even though it is still forwarded.
	e.setNode("pi1", services("api"), true)
	if _, err := e.srv.Dial(context.Background(), "pi1", "web"); !errors.Is(err, ErrNoForward) {
		t.Errorf("Dial of a withdrawn service: %v", err)
	}
	e.setNode("pi1", services("web", "api"), true)
	if body, err := httpGet(e.srv, "pi1", "web"); err != nil || body != "web backend" {
		t.Fatalf("GET after restoring the service = %q, %v", body, err)
	}

	// DropNode closes the session; its forwards vanish.
	before := e.changes.Load()
	e.srv.DropNode("pi1")
	waitClosed(t, c, "pi1 after DropNode")
	e.wantForwards()
	if e.changes.Load() == before {
		t.Error("OnChange not called by DropNode")
	}
	if _, err := e.srv.Dial(context.Background(), "pi1", "web"); !errors.Is(err, ErrNoForward) {
		t.Errorf("Dial after DropNode: %v", err)
	}
}

// DropNodeAndKeep drops node and checks that keep, another node's client,
// stays connected.
func (e *testEnv) DropNodeAndKeep(t *testing.T, node string, keep ssh.Conn) {
	t.Helper()
	e.srv.DropNode(node)
	if !isOpen(keep) {
		t.Fatalf("DropNode(%s) closed another node's session", node)
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func TestDefaultIsFirstServiceWithoutWeb(t *testing.T) {
	e := newEnv(t, nil, nil)
	metrics := backend(t, "metrics backend")
	c := e.connect("pi3")
	listen(t, c, "pi3:9100", metrics)
	e.wantForwards(Forward{"pi3", "api"})
	listen(t, c, "METRICS--PI3:1", metrics)
	e.wantForwards(Forward{"pi3", "api"}, Forward{"pi3", "metrics"})
	if body, err := httpGet(e.srv, "pi3", "metrics"); err != nil || body != "metrics backend" {
		t.Fatalf("GET metrics--pi3 = %q, %v", body, err)
	}
}

func TestNewSessionReplacesOld(t *testing.T) {
	e := newEnv(t, nil, nil)
	web := backend(t, "web backend")
	old := e.connect("pi1")
	listen(t, old, "pi1:80", web)
	other := e.connect("pi2")
	listen(t, other, "pi2:80", web)
	e.wantForwards(Forward{"pi1", "web"}, Forward{"pi2", "web"})

	before := e.changes.Load()
	cur := e.connect("pi1")
	waitClosed(t, old, "older pi1 session")
	e.wantForwards(Forward{"pi2", "web"})
	if e.changes.Load() == before {
		t.Error("OnChange not called when the old session's forwards vanished")
	}
	if !isOpen(cur) || !isOpen(other) {
		t.Fatal("the new session or another node's session was closed")
	}
	listen(t, cur, "pi1:80", web)
	e.wantForwards(Forward{"pi1", "web"}, Forward{"pi2", "web"})
	if body, err := httpGet(e.srv, "pi1", "web"); err != nil || body != "web backend" {
		t.Fatalf("GET through the new session = %q, %v", body, err)
	}
}

func TestRevokedNodeDroppedOnUse(t *testing.T) {
	e := newEnv(t, nil, nil)
	c := e.connect("pi1")
	listen(t, c, "pi1:80", backend(t, "web"))
	e.setNode("pi1", NodeInfo{}, false)
	if _, err := e.srv.Dial(context.Background(), "pi1", "web"); !errors.Is(err, ErrNoForward) {
		t.Fatalf("Dial to a revoked node: %v", err)
	}
	waitClosed(t, c, "revoked node")
	e.wantForwards()
}

func TestDisconnectRemovesForwards(t *testing.T) {
	e := newEnv(t, nil, nil)
	c := e.connect("pi1")
	listen(t, c, "pi1:80", backend(t, "web"))
	e.wantForwards(Forward{"pi1", "web"})
	before := e.changes.Load()
	c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for len(e.srv.Forwards()) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("forwards of a closed connection remain: %v", e.srv.Forwards())
		}
		time.Sleep(5 * time.Millisecond)
	}
	if e.changes.Load() == before {
		t.Error("OnChange not called when the connection ended")
	}
	if _, err := e.srv.Dial(context.Background(), "pi1", "web"); !errors.Is(err, ErrNoForward) {
		t.Errorf("Dial after disconnect: %v", err)
	}
}

func TestMaxChannels(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.MaxChannels = 1 }, nil)
	c := e.connect("pi1")
	listen(t, c, "pi1:80", backend(t, "web"))
	first, err := e.srv.Dial(context.Background(), "pi1", "web")
	if err != nil {
		t.Fatal(err)
	}
	if conn, err := e.srv.Dial(context.Background(), "pi1", "web"); !errors.Is(err, ErrTooManyChannels) {
		if conn != nil {
			conn.Close()
		}
		t.Fatalf("second Dial with MaxChannels 1: %v", err)
	}
	first.Close()
	second, err := e.srv.Dial(context.Background(), "pi1", "web")
	if err != nil {
		t.Fatalf("Dial after closing the first channel: %v", err)
	}
	second.Close()
}

func TestCloseEndsEverything(t *testing.T) {
	e := newEnv(t, nil, nil)
	c := e.connect("pi1")
	listen(t, c, "pi1:80", backend(t, "web backend"))
	conn, err := e.srv.Dial(context.Background(), "pi1", "web")
	if err != nil {
		t.Fatal(err)
	}
	idle, err := net.Dial("tcp", e.addr) // not yet authenticated
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	before := e.changes.Load()

	if err := e.srv.Close(); err != nil {
		t.Fatal(err)
	}
	e.srv.mu.Lock()
	conns, perIP := len(e.srv.conns), len(e.srv.perIP)
	e.srv.mu.Unlock()
	if conns != 0 || perIP != 0 {
		t.Fatalf("Close returned before connection goroutines finished: %d conns, %d addresses", conns, perIP)
	}
	if err := e.srv.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	// Close has waited for the server's goroutines; one may still be
	// returning from the function whose deferred wg.Done ran, so allow a
	// moment for that, but nothing blocked may remain.
	waitNoGoroutines(t, 2*time.Second, "sshtunnel.(*Server)", "sshtunnel.(*channelConn)")
	waitClosed(t, c, "client after Close")
	if _, err := conn.Read(make([]byte, 1)); err == nil {
		t.Error("dialled conn still readable after Close")
	}
	idle.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, idle); err != nil {
		t.Errorf("pre-auth connection not closed by Close: %v", err)
	}
	e.wantForwards()
	if e.changes.Load() == before {
		t.Error("OnChange not called by Close")
	}
	if _, err := e.srv.Dial(context.Background(), "pi1", "web"); err == nil {
		t.Error("Dial after Close succeeded")
	}
	if _, err := net.DialTimeout("tcp", e.addr, time.Second); err == nil {
		t.Error("listener still accepting after Close")
	}
	if err := e.srv.Serve(mustListen(t)); err != nil {
		t.Errorf("Serve after Close = %v, want nil", err)
	}

	// Client-side x/crypto goroutines end shortly after their connections.
	conn.Close()
	c.Close()
	waitNoGoroutines(t, 10*time.Second, "golang.org/x/crypto/ssh.", "sshtunnel.")
}

// waitNoGoroutines fails unless, within d, no goroutine but the caller has
// any of the markers in its stack.
func waitNoGoroutines(t *testing.T, d time.Duration, markers ...string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		g := leakedGoroutines(markers...)
		if len(g) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("goroutines leaked:\n%s", strings.Join(g, "\n\n"))
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func mustListen(t *testing.T) net.Listener {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln
}
