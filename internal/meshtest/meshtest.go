// Package meshtest is the one-process test harness: a real coordinator
// (SQLite in a temp dir, loopback, ports :0) and real enrolled nodes, with
// helpers that later layers (data plane, proxy) extend.
//
//	c := meshtest.NewCoordinator(t)
//	a := c.AddNode(t, "a")
//	meshtest.WaitFor(t, 5*time.Second, func() bool { … }, "a sees b")
package meshtest

import (
	"context"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator"
	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/wire"
)

// Clock is a settable clock for expiry tests. It starts at the real time
// (so TLS certificates stay valid for real clients) and only moves when
// told to.
type Clock struct {
	mu sync.Mutex
	t  time.Time
}

// NewClock returns a Clock at time.Now().
func NewClock() *Clock { return &Clock{t: time.Now()} }

// Now returns the clock's time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

// Advance moves the clock forward by d.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// ShortTempDir returns a fresh directory with a short path (Unix socket
// paths are limited to 108 bytes; t.TempDir() paths can be longer),
// removed when the test ends.
func ShortTempDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "m")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// WaitFor polls cond every 10ms until it holds or timeout passes, then
// fails the test with what.
func WaitFor(t testing.TB, timeout time.Duration, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for: %s", timeout, what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Coordinator is a running in-process coordinator.
type Coordinator struct {
	*coordinator.Server
	Dir   string
	Clock *Clock
	admin *http.Client
}

// NewCoordinator starts a coordinator on 127.0.0.1:0 with its data (and
// SQLite store) in a short temp dir, an injected Clock, and a 2 s
// long-poll. mod may adjust the options. It is closed when the test ends.
func NewCoordinator(t testing.TB, mod ...func(*coordinator.Options)) *Coordinator {
	t.Helper()
	dir := filepath.Join(ShortTempDir(t), "d")
	clock := NewClock()
	opts := coordinator.Options{
		DataDir:    dir,
		Listen:     "127.0.0.1:0",
		PublicHost: "127.0.0.1",
		LongPoll:   2 * time.Second,
		Now:        clock.Now,
		Version:    "test",
	}
	for _, m := range mod {
		m(&opts)
	}
	srv, err := coordinator.New(opts)
	if err != nil {
		t.Fatalf("coordinator.New: %v", err)
	}
	if err := srv.Start(); err != nil {
		srv.Close()
		t.Fatalf("coordinator.Start: %v", err)
	}
	t.Cleanup(func() { srv.Close() })
	sock := srv.AdminSocket()
	admin := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	return &Coordinator{Server: srv, Dir: dir, Clock: clock, admin: admin}
}

// Admin calls the admin API over the Unix socket.
func (c *Coordinator) Admin(method, path string, in, out any) error {
	return wire.Call(context.Background(), c.admin, method, "http://admin"+path, nil, in, out)
}

// CreateToken creates an enrollment token through the admin API.
func (c *Coordinator) CreateToken(t testing.TB, req wire.TokenCreateRequest) wire.TokenCreateResponse {
	t.Helper()
	var resp wire.TokenCreateResponse
	if err := c.Admin(http.MethodPost, wire.PathAdminTokens, req, &resp); err != nil {
		t.Fatalf("create token: %v", err)
	}
	return resp
}

// Node is an enrolled node's identity and control client.
type Node struct {
	Name   string
	Dir    string
	State  *node.State
	Client *node.Client
	Enroll *wire.EnrollResponse
}

// Enroll enrolls name with token into a fresh state dir.
func (c *Coordinator) Enroll(t testing.TB, name, token string) (*Node, error) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), name)
	st, resp, err := node.Enroll(context.Background(), node.EnrollOptions{
		Coordinator: c.URL(), Token: token, CAPin: c.CAPin(), Name: name, StateDir: dir,
	})
	if err != nil {
		return nil, err
	}
	cl, err := node.NewClient(dir)
	if err != nil {
		t.Fatalf("node.NewClient: %v", err)
	}
	t.Cleanup(cl.Close)
	return &Node{Name: name, Dir: dir, State: st, Client: cl, Enroll: resp}, nil
}

// AddNode creates a single-use token and enrolls name with it.
func (c *Coordinator) AddNode(t testing.TB, name string) *Node {
	t.Helper()
	tok := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 1})
	n, err := c.Enroll(t, name, tok.Token)
	if err != nil {
		t.Fatalf("enroll %s: %v", name, err)
	}
	return n
}

// Nodes lists all nodes through the admin API.
func (c *Coordinator) Nodes(t testing.TB) []wire.Node {
	t.Helper()
	var nodes []wire.Node
	if err := c.Admin(http.MethodGet, wire.PathAdminNodes, nil, &nodes); err != nil {
		t.Fatalf("list nodes: %v", err)
	}
	return nodes
}
