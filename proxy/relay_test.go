package proxy_test

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"io"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/proxy"
	"github.com/meshctl/meshctl/proxy/relay"
	"github.com/meshctl/meshctl/wire"
	"golang.org/x/crypto/ssh"
)

type relayMsg struct {
	src [32]byte
	pkt []byte
	err error
}

// relayOverSSH logs n in to the proxy's SSH server (retrying until the
// proxy's netmap knows n), opens its relay channel and starts a receive
// loop.
func relayOverSSH(t *testing.T, c *meshtest.Coordinator, px *meshtest.Proxy, n *meshtest.Node) (*ssh.Client, *relay.Client, <-chan relayMsg) {
	t.Helper()
	var cl *ssh.Client
	meshtest.WaitFor(t, deadline, func() bool {
		var err error
		cl, err = dialSSH(t, n, px.SSHAddr().String(), c.SSHCA().PublicKey())
		return err == nil
	}, n.Name+" logged in to the proxy's SSH server")
	t.Cleanup(func() { cl.Close() })
	ch, reqs, err := cl.OpenChannel(wire.SSHRelayChannel, nil)
	if err != nil {
		t.Fatalf("%s: relay channel: %v", n.Name, err)
	}
	go ssh.DiscardRequests(reqs)
	rc := relay.NewClient(ch)
	t.Cleanup(func() { rc.Close() })
	in := make(chan relayMsg, 64)
	go func() {
		defer close(in)
		for {
			src, pkt, err := rc.Recv()
			in <- relayMsg{src, bytes.Clone(pkt), err} // Recv reuses pkt
			if err != nil {
				return
			}
		}
	}()
	return cl, rc, in
}

// handshakeInit is shaped like a WireGuard handshake initiation: 148
// bytes starting 01 00 00 00.
func handshakeInit(t *testing.T) []byte {
	p := make([]byte, 148)
	if _, err := rand.Read(p); err != nil {
		t.Fatal(err)
	}
	p[0], p[1], p[2], p[3] = 1, 0, 0, 0
	return p
}

// Two nodes reach each other through the relay over their SSH connections
// to the proxy: the relay delivers WireGuard-shaped packets with the
// sender's key as source, drops anything else, and a revoked node's relay
// channel is closed.
func TestRelayBetweenNodesOverSSH(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	px := c.AddProxy(t, func(o *proxy.Options) {
		o.SSH = c.SSHOptions(t)
		o.Metrics = "127.0.0.1:0"
	})
	a := c.AddNode(t, "pi1")
	b := c.AddNode(t, "pi2")
	ka, kb := [32]byte(a.State.WireGuardKey().PublicKey()), [32]byte(b.State.WireGuardKey().PublicKey())

	_, ra, inA := relayOverSSH(t, c, px, a)
	clB, rb, inB := relayOverSSH(t, c, px, b)

	// B's stream attaches to the relay right after its channel opens;
	// resend until it is there.
	p := handshakeInit(t)
	if err := ra.Send(kb, p); err != nil {
		t.Fatal(err)
	}
	resend := time.NewTicker(50 * time.Millisecond)
	defer resend.Stop()
	timeout := time.After(deadline)
wait:
	for {
		select {
		case m := <-inB:
			if m.err != nil {
				t.Fatalf("pi2's relay stream: %v", m.err)
			}
			if m.src != ka || !bytes.Equal(m.pkt, p) {
				t.Fatalf("pi2 received %d bytes from %x, want pi1's packet from %x", len(m.pkt), m.src[:4], ka[:4])
			}
			break wait
		case <-resend.C:
			if err := ra.Send(kb, p); err != nil {
				t.Fatal(err)
			}
		case <-timeout:
			t.Fatal("pi1's packet never reached pi2 through the relay")
		}
	}
	resend.Stop()
	for len(inB) > 0 { // resent copies
		if m := <-inB; m.err != nil || m.src != ka || !bytes.Equal(m.pkt, p) {
			t.Fatalf("unexpected delivery %+v", m)
		}
	}

	// Not WireGuard: dropped. The marker sent after it arrives first.
	junk := []byte("GET / HTTP/1.1\r\nHost: pi2\r\n\r\n")
	if err := ra.Send(kb, junk); err != nil {
		t.Fatal(err)
	}
	marker := handshakeInit(t)
	if err := ra.Send(kb, marker); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-inB:
		if m.err != nil || m.src != ka || !bytes.Equal(m.pkt, marker) {
			t.Fatalf("after the junk pi2 received %q from %x (%v), want the marker", head(m.pkt), m.src[:4], m.err)
		}
	case <-time.After(deadline):
		t.Fatal("marker not delivered")
	}
	// And back: a handshake response from B to A, with B's key as source.
	q := handshakeInit(t)[:92]
	q[0] = 2
	if err := rb.Send(ka, q); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-inA:
		if m.err != nil || m.src != kb || !bytes.Equal(m.pkt, q) {
			t.Fatalf("pi1 received %d bytes from %x (%v), want pi2's packet", len(m.pkt), m.src[:4], m.err)
		}
	case <-time.After(deadline):
		t.Fatal("pi2's packet never reached pi1")
	}

	// The relay's counters are in the proxy's metrics.
	body := scrape(t, px.Addrs()[1].String())
	if v := metric(body, `meshctl_proxy_relay_dropped_packets_total{reason="not_wireguard"}`); v != 1 {
		t.Errorf("not_wireguard drops = %v, want 1", v)
	}
	if v := metric(body, "meshctl_proxy_relay_forwarded_packets_total"); v < 3 {
		t.Errorf("forwarded packets = %v, want ≥ 3", v)
	}
	// pi1, pi2, and the proxy's own agent once it attaches (RelayDial).
	if v := metric(body, "meshctl_proxy_relay_nodes"); v < 2 || v > 3 {
		t.Errorf("relay nodes = %v, want 2 or 3", v)
	}

	// Revoking pi2 closes its relay channel (and its SSH connection).
	if err := c.Admin(http.MethodPost, wire.PathAdminNodeRevoke, wire.NameRequest{Name: "pi2"}, nil); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	timeout = time.After(deadline)
	for closed := false; !closed; {
		select {
		case m, ok := <-inB:
			if ok && m.err == nil {
				t.Fatalf("pi2 received a packet after revocation")
			}
			closed = true
		case <-timeout:
			t.Fatal("revoked pi2's relay channel still open")
		}
	}
	t.Logf("revoked node's relay channel closed after %s", time.Since(start))
	waitDone := make(chan error, 1)
	go func() { waitDone <- clB.Wait() }()
	select {
	case <-waitDone:
	case <-time.After(deadline):
		t.Fatal("revoked pi2's SSH connection still open")
	}
	// pi1 is unaffected; its packets for pi2 go nowhere.
	if err := ra.Send(kb, handshakeInit(t)); err != nil {
		t.Fatalf("pi1's relay stream after pi2's revocation: %v", err)
	}
	select {
	case m := <-inA:
		t.Fatalf("pi1 received %+v", m)
	default:
	}
}

func head(b []byte) []byte { return b[:min(16, len(b))] }

// metric returns the value of the sample named series in body, -1 if none.
func metric(body, series string) float64 {
	for line := range strings.Lines(body) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), series+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				return -1
			}
			return f
		}
	}
	return -1
}

func scrape(t *testing.T, addr string) string {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// An SSH-only node (no WireGuard key) logs in but gets no relay channel.
func TestRelayRefusedForSSHOnlyNode(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	px := c.AddProxy(t, func(o *proxy.Options) { o.SSH = c.SSHOptions(t) })
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		t.Fatal(err)
	}
	var resp wire.AddSSHResponse
	if err := c.Admin(http.MethodPost, wire.PathAdminNodeAddSSH, wire.AddSSHRequest{
		Name: "cam", SSHKey: string(ssh.MarshalAuthorizedKey(signer.PublicKey())),
	}, &resp); err != nil {
		t.Fatal(err)
	}
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(resp.Certificate))
	if err != nil {
		t.Fatal(err)
	}
	certSigner, err := ssh.NewCertSigner(pub.(*ssh.Certificate), signer)
	if err != nil {
		t.Fatal(err)
	}
	hostCA := c.SSHCA().PublicKey()
	hostCheck := &ssh.CertChecker{IsHostAuthority: func(k ssh.PublicKey, _ string) bool { return bytes.Equal(k.Marshal(), hostCA.Marshal()) }}
	var cl *ssh.Client
	meshtest.WaitFor(t, deadline, func() bool {
		cl, err = ssh.Dial("tcp", px.SSHAddr().String(), &ssh.ClientConfig{
			User: "cam", Auth: []ssh.AuthMethod{ssh.PublicKeys(certSigner)},
			HostKeyCallback: hostCheck.CheckHostKey, Timeout: 5 * time.Second,
		})
		return err == nil
	}, "cam logged in")
	defer cl.Close()
	ch, _, err := cl.OpenChannel(wire.SSHRelayChannel, nil)
	var oe *ssh.OpenChannelError
	if !errors.As(err, &oe) || oe.Reason != ssh.Prohibited {
		if ch != nil {
			ch.Close()
		}
		t.Fatalf("SSH-only node's relay channel: %v, want Prohibited", err)
	}
	// Forwarding its own service still works on that connection.
	ln, err := cl.Listen("tcp", "cam:80")
	if err != nil {
		t.Fatalf("cam's forward after the refused relay channel: %v", err)
	}
	ln.Close()
}
