package pathbind_test

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshctl/meshctl/node/pathbind"
	"github.com/meshctl/meshctl/proxy/relay"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/netstack"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// Two real wireguard-go devices on netstack, each with a pathbind.Bind
// around the stock UDP bind on loopback, behind a lossyBind the test
// controls (the fake part: which UDP datagrams get lost), and the real
// relay (proxy/relay) attached over in-memory streams.

const deadline = 15 * time.Second

// lossyBind drops the datagrams it sends while blocked: a path whose UDP
// is lost (both ways, since both ends' binds are blocked).
type lossyBind struct {
	conn.Bind
	blocked atomic.Bool
	dropped atomic.Uint64
}

func (l *lossyBind) Send(bufs [][]byte, ep conn.Endpoint) error {
	if l.blocked.Load() {
		l.dropped.Add(uint64(len(bufs)))
		return nil
	}
	return l.Bind.Send(bufs, ep)
}

type testNode struct {
	name   string
	key    wgtypes.Key
	ip     netip.Addr
	dev    *device.Device
	net    *netstack.Net
	bind   *pathbind.Bind
	lossy  *lossyBind
	port   uint16
	cancel context.CancelFunc
}

func (n *testNode) pub() [32]byte { return n.key.PublicKey() }

// newNode starts a device; rel (may be nil) is the relay it attaches to.
func newNode(t *testing.T, name string, ip string, rel *relay.Server) *testNode {
	t.Helper()
	key, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	var port uint16
	if startAs != nil {
		key, port = startAs.key, startAs.port
	}
	n := &testNode{name: name, key: key, ip: netip.MustParseAddr(ip)}
	tdev, tnet, err := netstack.CreateNetTUN([]netip.Addr{n.ip}, nil, 1420)
	if err != nil {
		t.Fatal(err)
	}
	n.net = tnet
	n.lossy = &lossyBind{Bind: conn.NewDefaultBind()}
	priv, _ := pathbind.DiscoKeyFromWireGuard([32]byte(key))
	o := pathbind.Options{
		Inner: n.lossy, DiscoPrivate: priv,
		ProbeInterval: 200 * time.Millisecond, DirectProbe: 300 * time.Millisecond,
		TrustWindow: time.Second, RelayLinger: time.Second,
		// As the agent does (node.Agent.handshakeNow).
		OnStaleSession: func(k [32]byte) {
			if p := n.dev.LookupPeer(device.NoisePublicKey(k)); p != nil {
				p.SendHandshakeInitiation(false)
			}
		},
	}
	if rel != nil {
		o.RelayDial = func(context.Context) (pathbind.RelayConn, error) {
			a, b := net.Pipe()
			go rel.ServeConn(name, a)
			return relay.NewClient(b), nil
		}
	}
	if n.bind, err = pathbind.New(o); err != nil {
		t.Fatal(err)
	}
	if rel != nil {
		n.bind.SetRelay(true, netip.MustParseAddrPort("127.0.0.1:2222"))
	}
	n.dev = device.NewDevice(tdev, n.bind, device.NewLogger(device.LogLevelSilent, ""))
	if err := n.dev.IpcSet(fmt.Sprintf("private_key=%s\nlisten_port=%d\n", hex.EncodeToString(key[:]), port)); err != nil {
		t.Fatal(err)
	}
	if err := n.dev.Up(); err != nil {
		t.Fatal(err)
	}
	cfg, _ := n.dev.IpcGet()
	for _, line := range strings.Split(cfg, "\n") {
		if v, ok := strings.CutPrefix(line, "listen_port="); ok {
			fmt.Sscan(v, &n.port)
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	n.cancel = cancel
	done := make(chan struct{})
	go func() { defer close(done); n.bind.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done; n.dev.Close() })
	return n
}

// peer makes a and b peers of each other, each knowing the other's
// loopback endpoint as its candidate.
func peer(t *testing.T, a, b *testNode) {
	t.Helper()
	knows(t, a, b)
	knows(t, b, a)
}

// knows makes other a peer of self, at its loopback endpoint.
func knows(t *testing.T, self, other *testNode) {
	t.Helper()
	_, otherDisco := pathbind.DiscoKeyFromWireGuard([32]byte(other.key))
	self.bind.SetPeers([]pathbind.PeerConfig{{
		Key: other.pub(), Name: other.name, DiscoKey: otherDisco,
		Candidates: []netip.AddrPort{netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), other.port)},
	}})
	pk := other.pub()
	if err := self.dev.IpcSet(fmt.Sprintf("public_key=%s\nendpoint=%s\nallowed_ip=%s/32\n",
		hex.EncodeToString(pk[:]), pathbind.EndpointID(pk), other.ip)); err != nil {
		t.Fatal(err)
	}
}

// directPair starts two peers with no relay, "a" (100.64.0.1) and "b"
// (100.64.0.2), serves echo on the second and waits until the first
// reaches it.
func directPair(t *testing.T) (client, server *testNode) {
	t.Helper()
	client = newNode(t, "a", "100.64.0.1", nil)
	server = newNode(t, "b", "100.64.0.2", nil)
	peer(t, client, server)
	echoServer(t, server)
	waitFor(t, "a to reach b", func() bool { return roundTrip(client, server) == nil })
	return client, server
}

// echoServer answers each line on port 7 of n.
func echoServer(t *testing.T, n *testNode) {
	ln, err := n.net.ListenTCP(&net.TCPAddr{IP: n.ip.AsSlice(), Port: 7})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); io.Copy(c, c) }()
		}
	}()
}

// roundTrip dials b's echo from a and checks one message.
func roundTrip(a, b *testNode) error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	c, err := a.net.DialContextTCPAddrPort(ctx, netip.AddrPortFrom(b.ip, 7))
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(3 * time.Second))
	msg := make([]byte, 1000)
	rand.Read(msg)
	if _, err := c.Write(msg); err != nil {
		return err
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil {
		return err
	}
	if string(got) != string(msg) {
		return fmt.Errorf("echo differs")
	}
	return nil
}

func waitFor(t *testing.T, what string, cond func() bool) time.Duration {
	t.Helper()
	start := time.Now()
	for time.Since(start) < deadline {
		if cond() {
			return time.Since(start)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("timed out after %s waiting for %s", deadline, what)
	return 0
}

func pathOf(n, peer *testNode) pathbind.PathInfo {
	info, _ := n.bind.PathOf(peer.pub())
	return info
}

func newRelay(t *testing.T, nodes ...*testNode) *relay.Server {
	t.Helper()
	var mu sync.Mutex
	keys := map[string][32]byte{}
	rel, err := relay.New(relay.Options{Lookup: func(name string) ([32]byte, bool) {
		mu.Lock()
		defer mu.Unlock()
		k, ok := keys[name]
		return k, ok
	}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rel.Close() })
	relayKeys = func(n *testNode) {
		mu.Lock()
		keys[n.name] = n.pub()
		mu.Unlock()
	}
	return rel
}

var relayKeys func(*testNode)

// The path follows what works: direct while UDP gets through, the relay
// when it does not (the connection survives the switch), direct again
// when UDP is back.
func TestPathSwitchesBetweenDirectAndRelay(t *testing.T) {
	rel := newRelay(t)
	a := newNode(t, "a", "100.64.0.1", rel)
	b := newNode(t, "b", "100.64.0.2", rel)
	relayKeys(a)
	relayKeys(b)
	peer(t, a, b)
	echoServer(t, b)

	waitFor(t, "a to reach b", func() bool { return roundTrip(a, b) == nil })
	d := waitFor(t, "a's path to b to be direct", func() bool { p := pathOf(a, b); return p.Path == "direct" && p.Confirmed })
	t.Logf("direct after %s: %+v", d, pathOf(a, b))
	if p := pathOf(a, b); p.Endpoint.Port() != b.port {
		t.Fatalf("direct endpoint %v, want b's port %d", p.Endpoint, b.port)
	}
	// One connection spans the switches.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	c, err := a.net.DialContextTCPAddrPort(ctx, netip.AddrPortFrom(b.ip, 7))
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echo := func() error {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte("ping\n")); err != nil {
			return err
		}
		buf := make([]byte, 5)
		_, err := io.ReadFull(c, buf)
		return err
	}
	if err := echo(); err != nil {
		t.Fatal(err)
	}

	relayedBefore := a.bind.Stats().RelaySent.Load()
	a.lossy.blocked.Store(true)
	b.lossy.blocked.Store(true)
	d = waitFor(t, "a's path to b to be the relay", func() bool { return pathOf(a, b).Path == "relay" })
	t.Logf("relay after %s: %+v", d, pathOf(a, b))
	if err := echo(); err != nil {
		t.Fatalf("the connection did not survive the switch to the relay: %v", err)
	}
	if err := roundTrip(a, b); err != nil {
		t.Fatalf("new connection over the relay: %v", err)
	}
	if a.bind.Stats().RelaySent.Load() == relayedBefore || b.bind.Stats().RelayRecv.Load() == 0 {
		t.Fatalf("traffic did not go through the relay: sent %d, b received %d", a.bind.Stats().RelaySent.Load(), b.bind.Stats().RelayRecv.Load())
	}
	if rs := rel.Stats(); rs.Forwarded == 0 {
		t.Fatalf("relay forwarded nothing: %+v", rs)
	}

	a.lossy.blocked.Store(false)
	b.lossy.blocked.Store(false)
	d = waitFor(t, "a's path to b to be direct again", func() bool { p := pathOf(a, b); return p.Path == "direct" && p.Confirmed })
	t.Logf("direct again after %s", d)
	directBefore := a.bind.Stats().DirectSent.Load()
	if err := echo(); err != nil {
		t.Fatalf("the connection did not survive the switch back: %v", err)
	}
	if a.bind.Stats().DirectSent.Load() == directBefore {
		t.Fatal("traffic did not go direct again")
	}
}

// Without a relay, a peer is reached at its first candidate, as plain
// WireGuard would.
func TestNoRelaySendsToCandidate(t *testing.T) {
	a, b := directPair(t)
	if p := pathOf(a, b); p.Path != "direct" {
		t.Fatalf("path %+v", p)
	}
	if a.bind.RelayConnected() {
		t.Fatal("a relay connection without a relay")
	}
}

// Datagrams from addresses no peer is known at are dropped, and probes
// that do not authenticate are refused.
func TestStrangersAreDropped(t *testing.T) {
	a, b := directPair(t)

	stranger, err := net.ListenUDP("udp4", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer stranger.Close()
	to := &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(a.port)}

	// A WireGuard data message shape from an unknown address (handshake
	// messages go on to WireGuard, which authenticates them).
	data := make([]byte, 64)
	data[0] = 4
	rand.Read(data[4:])
	before := a.bind.Stats().UnknownDropped.Load()
	stranger.WriteToUDP(data, to)
	waitFor(t, "the stranger's packet to be dropped", func() bool { return a.bind.Stats().UnknownDropped.Load() > before })

	// A probe claiming b's disco key but sealed with another key, and one
	// from an unknown key.
	_, bDisco := pathbind.DiscoKeyFromWireGuard([32]byte(b.key))
	forged := append([]byte("mcdisco1"), bDisco[:]...)
	forged = append(forged, make([]byte, 24+16+13)...)
	rand.Read(forged[8+32:])
	unknown := append([]byte("mcdisco1"), make([]byte, 32+24+16+13)...)
	rand.Read(unknown[8:])
	bad := a.bind.Stats().BadProbes.Load()
	stranger.WriteToUDP(forged, to)
	stranger.WriteToUDP(unknown, to)
	waitFor(t, "both bad probes to be refused", func() bool { return a.bind.Stats().BadProbes.Load() >= bad+2 })
	// The stranger learned nothing: no pong came back.
	stranger.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	if n, _, err := stranger.ReadFromUDP(make([]byte, 1500)); err == nil {
		t.Fatalf("the stranger got a %d-byte answer", n)
	}
	// And b is still a's peer at its own address.
	if err := roundTrip(a, b); err != nil {
		t.Fatal(err)
	}
}

// A peer that moves to a new address (restart, roaming) is followed as
// soon as its probes arrive from there, without waiting for the old path's
// trust to run out.
func TestPeerMoves(t *testing.T) {
	a := newNode(t, "a", "100.64.0.1", nil)
	b := newNode(t, "b", "100.64.0.2", nil)
	peer(t, a, b)
	echoServer(t, a)
	waitFor(t, "b to reach a", func() bool { return roundTrip(b, a) == nil })
	waitFor(t, "a's path to b direct", func() bool { p := pathOf(a, b); return p.Confirmed })
	oldPort := b.port

	// b restarts with the same key on a new port; a still lists the old
	// port as b's candidate (as with a stale netmap).
	b.cancel()
	b.dev.Close()
	b2 := restarted(t, b, 0)
	knows(t, b2, a)
	d := waitFor(t, "restarted b to reach a", func() bool { return roundTrip(b2, a) == nil })
	t.Logf("b reached a %s after its restart", d)
	if p := pathOf(a, b2); p.Endpoint.Port() == oldPort || p.Endpoint.Port() != b2.port {
		t.Fatalf("a's path to b: %+v (old port %d, new %d)", p, oldPort, b2.port)
	}
}

// restarted starts n again (after the test stopped it) with its key, on
// UDP port port (0: any free port).
func restarted(t *testing.T, n *testNode, port uint16) *testNode {
	t.Helper()
	startAs = &startSpec{key: n.key, port: port}
	defer func() { startAs = nil }()
	return newNode(t, n.name, n.ip.String(), nil)
}

// startAs, when set, gives newNode its key and port.
var startAs *startSpec

type startSpec struct {
	key  wgtypes.Key
	port uint16
}

// A node that restarts (same key, same port) while its peer holds a
// session with the old process: the peer's packets arrive under a session
// the new process never made, and the Bind has WireGuard handshake with
// the peer at once. Without that, the peer's timers give up on the old
// session only after 15 s (REKEY_TIMEOUT + KEEPALIVE_TIMEOUT).
func TestRestartedNodeHandshakesWithStalePeer(t *testing.T) {
	a, b := directPair(t)
	if n := b.bind.Stats().StaleSessions.Load(); n != 0 {
		t.Fatalf("%d stale sessions reported between two fresh nodes", n)
	}

	b.cancel()
	b.dev.Close()
	b2 := restarted(t, b, b.port)
	knows(t, b2, a)
	echoServer(t, b2)

	// Well under the 15 s WireGuard alone would take, and generous for a
	// loaded machine under -race: a's first SYN is lost, the retransmit
	// (gVisor's RTO starts at 1 s) goes under the new session.
	const within = 8 * time.Second
	start := time.Now()
	var err error
	for time.Since(start) < within {
		if err = roundTrip(a, b2); err == nil {
			break
		}
	}
	if err != nil {
		t.Fatalf("a did not reach the restarted b within %s: %v", within, err)
	}
	t.Logf("a reached the restarted b after %s", time.Since(start).Round(time.Millisecond))
	if n := b2.bind.Stats().StaleSessions.Load(); n == 0 {
		t.Fatal("the restarted b reported no stale session")
	}
	if n := a.bind.Stats().StaleSessions.Load(); n != 0 {
		t.Fatalf("a, which kept its sessions, reported %d stale sessions", n)
	}
}

// Peers that never reach each other directly (as behind a symmetric NAT)
// talk through the relay from the first packet.
func TestRelayOnlyFromStart(t *testing.T) {
	rel := newRelay(t)
	a := newNode(t, "a", "100.64.0.1", rel)
	b := newNode(t, "b", "100.64.0.2", rel)
	relayKeys(a)
	relayKeys(b)
	a.lossy.blocked.Store(true)
	b.lossy.blocked.Store(true)
	peer(t, a, b)
	echoServer(t, b)
	d := waitFor(t, "a to reach b through the relay", func() bool { return roundTrip(a, b) == nil })
	t.Logf("reached through the relay after %s", d)
	if p := pathOf(a, b); p.Path != "relay" || !strings.Contains(p.Reason, "no direct probe answered") {
		t.Fatalf("path %+v", p)
	}
	if a.bind.Stats().DirectSent.Load() != 0 {
		t.Fatal("data went direct on a path no probe confirmed")
	}
}
