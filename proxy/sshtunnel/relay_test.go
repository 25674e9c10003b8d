package sshtunnel

import (
	"errors"
	"io"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/meshctl/meshctl/wire"
)

// relayRec is a test Options.Relay: it echoes what the node sends and
// reports when it starts and ends.
type relayRec struct {
	started chan string
	ended   chan string
}

func newRelayRec() *relayRec {
	return &relayRec{started: make(chan string, 16), ended: make(chan string, 16)}
}

func (r *relayRec) relay(node string, ch io.ReadWriteCloser) {
	r.started <- node
	io.Copy(ch, ch)
	r.ended <- node
}

// relayEnv is a server with a relay; pi1 and pi2 may relay, pi3 is
// SSH-only (no WireGuard key).
func relayEnv(t *testing.T) (*testEnv, *relayRec) {
	t.Helper()
	rec := newRelayRec()
	e := newEnv(t, func(o *Options) { o.Relay = rec.relay }, nil)
	for _, n := range []string{"pi1", "pi2"} {
		info, _ := e.srv.o.Lookup(n)
		info.Relay = true
		e.setNode(n, info, true)
	}
	return e, rec
}

func openRelay(c *ssh.Client) (ssh.Channel, error) {
	ch, reqs, err := c.OpenChannel(wire.SSHRelayChannel, nil)
	if err != nil {
		return nil, err
	}
	go ssh.DiscardRequests(reqs)
	return ch, nil
}

func wantProhibited(t *testing.T, ch ssh.Channel, err error, what string) {
	t.Helper()
	var oe *ssh.OpenChannelError
	if !errors.As(err, &oe) || oe.Reason != ssh.Prohibited {
		if ch != nil {
			ch.Close()
		}
		t.Fatalf("%s: channel %v, err %v; want Prohibited", what, ch, err)
	}
	t.Logf("%s: %v", what, err)
}

func wantNode(t *testing.T, ch <-chan string, node, what string) {
	t.Helper()
	select {
	case got := <-ch:
		if got != node {
			t.Fatalf("%s: node %q, want %q", what, got, node)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: timed out", what)
	}
}

// echo writes p on ch and reads it back through the test relay.
func echo(t *testing.T, ch ssh.Channel, p string) {
	t.Helper()
	if _, err := io.WriteString(ch, p); err != nil {
		t.Fatalf("write on relay channel: %v", err)
	}
	got := make([]byte, len(p))
	if _, err := io.ReadFull(ch, got); err != nil || string(got) != p {
		t.Fatalf("echo through relay: %q, %v", got, err)
	}
}

// waitChannelClosed fails unless a read on ch ends within a generous
// bound.
func waitChannelClosed(t *testing.T, ch ssh.Channel, what string) {
	t.Helper()
	done := make(chan error, 1)
	go func() {
		_, err := io.Copy(io.Discard, ch)
		done <- err
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: relay channel still open", what)
	}
}

func TestRelayChannelAccepted(t *testing.T) {
	e, rec := relayEnv(t)
	c := e.connect("pi1")
	ch, err := openRelay(c)
	if err != nil {
		t.Fatalf("relay channel of a node that may relay: %v", err)
	}
	wantNode(t, rec.started, "pi1", "Relay called")
	echo(t, ch, "hello relay")
	// Channel requests are refused.
	if ok, err := ch.SendRequest("exec", true, ssh.Marshal(struct{ Cmd string }{"id"})); ok || err != nil {
		t.Errorf("request on relay channel: %v, %v; want false", ok, err)
	}
	echo(t, ch, "still there")
	// Forwards work next to it on the same connection.
	if !forwardReq(t, c, "pi1", 80) {
		t.Error("forward refused while a relay channel is open")
	}
	// The client closing the channel ends Relay, and frees the slot.
	ch.Close()
	wantNode(t, rec.ended, "pi1", "Relay returned")
	ch2, err := openRelay(c)
	if err != nil {
		t.Fatalf("relay channel after the first was closed: %v", err)
	}
	wantNode(t, rec.started, "pi1", "Relay called again")
	echo(t, ch2, "again")
}

func TestRelayChannelRefused(t *testing.T) {
	t.Run("SSH-only node", func(t *testing.T) {
		e, rec := relayEnv(t)
		c := e.connect("pi3")
		ch, err := openRelay(c)
		wantProhibited(t, ch, err, "pi3")
		if !isOpen(c) {
			t.Error("connection closed by the refused relay channel")
		}
		select {
		case n := <-rec.started:
			t.Fatalf("Relay called for %s", n)
		default:
		}
	})
	t.Run("no Options.Relay", func(t *testing.T) {
		e := newEnv(t, nil, nil)
		e.setNode("pi1", NodeInfo{Services: services("web").Services, Relay: true}, true)
		c := e.connect("pi1")
		ch, err := openRelay(c)
		wantProhibited(t, ch, err, "no relay")
		if !isOpen(c) {
			t.Error("connection closed by the refused relay channel")
		}
	})
	t.Run("second channel", func(t *testing.T) {
		e, rec := relayEnv(t)
		c := e.connect("pi1")
		ch, err := openRelay(c)
		if err != nil {
			t.Fatal(err)
		}
		wantNode(t, rec.started, "pi1", "Relay called")
		ch2, err := openRelay(c)
		wantProhibited(t, ch2, err, "second relay channel")
		var oe *ssh.OpenChannelError
		if errors.As(err, &oe) && oe.Message != "a relay channel is already open on this connection" {
			t.Errorf("message %q", oe.Message)
		}
		echo(t, ch, "first still works")
		select {
		case n := <-rec.started:
			t.Fatalf("Relay called twice (%s)", n)
		default:
		}
	})
	t.Run("revoked node", func(t *testing.T) {
		e, _ := relayEnv(t)
		c := e.connect("pi1")
		// A global request answered means the server is past its check
		// right after registration, which would drop the session itself.
		if !isOpen(c) {
			t.Fatal("pi1's session not open")
		}
		e.setNode("pi1", NodeInfo{}, false)
		ch, err := openRelay(c)
		wantProhibited(t, ch, err, "revoked pi1")
		waitClosed(t, c, "revoked pi1 after opening a relay channel")
	})
}

// Every other channel type is still refused when a relay is configured.
func TestOtherChannelsRefusedWithRelay(t *testing.T) {
	e, _ := relayEnv(t)
	c := e.connect("pi1")
	for _, typ := range []string{"session", "direct-tcpip", "x11", "auth-agent@openssh.com", "tun@openssh.com", "direct-streamlocal@openssh.com", "anything", "meshctl-relay2", "MESHCTL-RELAY"} {
		ch, _, err := c.OpenChannel(typ, nil)
		var oe *ssh.OpenChannelError
		if !errors.As(err, &oe) || oe.Reason != ssh.Prohibited || oe.Message != "this server only accepts remote forwards" {
			t.Errorf("open %q: channel %v, err %v; want Prohibited as before", typ, ch, err)
		}
	}
	if !isOpen(c) {
		t.Error("connection closed by refused channels")
	}
}

// The relay channel ends with its session: DropNode, replacement by a
// newer session, Close.
func TestRelayChannelClosedWithSession(t *testing.T) {
	t.Run("DropNode", func(t *testing.T) {
		e, rec := relayEnv(t)
		c := e.connect("pi1")
		other := e.connect("pi2")
		ch, err := openRelay(c)
		if err != nil {
			t.Fatal(err)
		}
		// Each Relay starts in its own goroutine: wait for one before
		// opening the next, so the order on rec.started is fixed.
		wantNode(t, rec.started, "pi1", "Relay pi1")
		och, err := openRelay(other)
		if err != nil {
			t.Fatal(err)
		}
		wantNode(t, rec.started, "pi2", "Relay pi2")
		e.setNode("pi1", NodeInfo{}, false)
		e.srv.DropNode("pi1")
		waitChannelClosed(t, ch, "pi1 after DropNode")
		wantNode(t, rec.ended, "pi1", "Relay pi1 returned")
		echo(t, och, "pi2 unaffected")
	})
	t.Run("replaced", func(t *testing.T) {
		e, rec := relayEnv(t)
		c := e.connect("pi1")
		ch, err := openRelay(c)
		if err != nil {
			t.Fatal(err)
		}
		wantNode(t, rec.started, "pi1", "Relay pi1")
		c2 := e.connect("pi1")
		waitChannelClosed(t, ch, "pi1's old session")
		wantNode(t, rec.ended, "pi1", "old Relay returned")
		ch2, err := openRelay(c2)
		if err != nil {
			t.Fatalf("relay channel on the new session: %v", err)
		}
		wantNode(t, rec.started, "pi1", "Relay on the new session")
		echo(t, ch2, "new session")
	})
	t.Run("Close", func(t *testing.T) {
		e, rec := relayEnv(t)
		c := e.connect("pi1")
		ch, err := openRelay(c)
		if err != nil {
			t.Fatal(err)
		}
		wantNode(t, rec.started, "pi1", "Relay pi1")
		e.srv.Close() // waits for Relay to return
		select {
		case <-rec.ended:
		default:
			t.Fatal("Close returned before Relay")
		}
		waitChannelClosed(t, ch, "after Close")
	})
}
