package meshtest

import (
	"log/slog"
	"os"
	"testing"
	"time"

	"github.com/meshctl/meshctl/node"
)

// Agent is a running node agent on the userspace network stack.
type Agent struct {
	*node.Agent
	Node *Node
}

// verbose: MESHTEST_LOG=1 sends agent logs to stderr.
func testLogger() *slog.Logger {
	if os.Getenv("MESHTEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return nil
}

// StartAgent runs n's agent on netstack with an ephemeral WireGuard port,
// a fast retry, and the UAPI socket in its state dir. mod may adjust the
// options. It is closed when the test ends.
func (n *Node) StartAgent(t testing.TB, mod ...func(*node.AgentOptions)) *Agent {
	t.Helper()
	opts := node.AgentOptions{
		StateDir: n.Dir,
		UAPIDir:  n.Dir,
		RetryMin: 50 * time.Millisecond,
		RetryMax: 500 * time.Millisecond,
		Logger:   testLogger(),
	}
	for _, m := range mod {
		m(&opts)
	}
	a, err := node.NewAgent(opts)
	if err != nil {
		t.Fatalf("agent %s: %v", n.Name, err)
	}
	if err := a.Start(); err != nil {
		t.Fatalf("agent %s start: %v", n.Name, err)
	}
	t.Cleanup(func() { a.Close() })
	return &Agent{Agent: a, Node: n}
}

// AddAgent enrolls name and starts its agent with the given services.
func (c *Coordinator) AddAgent(t testing.TB, name string, svcs ...node.Service) *Agent {
	t.Helper()
	return c.AddNode(t, name).StartAgent(t, func(o *node.AgentOptions) { o.Services = svcs })
}

// HasPeer reports whether a's WireGuard device has a peer with name's key.
func (a *Agent) HasPeer(t testing.TB, name string) bool {
	t.Helper()
	st, err := a.Status()
	if err != nil {
		t.Fatalf("status of %s: %v", a.Node.Name, err)
	}
	for _, p := range st.Peers {
		if p.Name == name {
			return true
		}
	}
	return false
}
