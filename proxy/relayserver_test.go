package proxy

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"maps"
	"net"
	"slices"
	"testing"
	"time"

	"github.com/meshctl/meshctl/proxy/relay"
	"github.com/meshctl/meshctl/wire"
)

func testKey(t *testing.T) ([32]byte, string) {
	t.Helper()
	var k [32]byte
	if _, err := rand.Read(k[:]); err != nil {
		t.Fatal(err)
	}
	return k, base64.StdEncoding.EncodeToString(k[:])
}

func TestRelayKeys(t *testing.T) {
	kn, sn := testKey(t)
	kp, sp := testKey(t)
	ks, ss := testKey(t)
	_, other := testKey(t)
	nm := &wire.Netmap{
		Self: wire.Peer{Name: "px", Role: wire.RoleProxy, WireGuardKey: ss},
		Peers: []wire.Peer{
			{Name: "pi1", Role: wire.RoleNode, WireGuardKey: sn},
			{Name: "px2", Role: wire.RoleProxy, WireGuardKey: sp},
			{Name: "bad", Role: wire.RoleNode, WireGuardKey: "not base64!"},
			{Name: "short", Role: wire.RoleNode, WireGuardKey: base64.StdEncoding.EncodeToString(make([]byte, 31))},
			{Name: "odd", Role: "admin", WireGuardKey: other},
		},
		SSHOnly: []wire.Peer{{Name: "cam", Role: wire.RoleSSH}},
	}
	want := map[string][32]byte{"pi1": kn, "px2": kp, "px": ks}
	if got := relayKeys(nm); !maps.Equal(got, want) {
		t.Fatalf("relayKeys = %v, want %v", slices.Sorted(maps.Keys(got)), slices.Sorted(maps.Keys(want)))
	}
}

// attach serves name on r's relay over a pipe and returns a client.
func attach(t *testing.T, r *meshRelay, name string) (*relay.Client, <-chan error) {
	t.Helper()
	c, s := net.Pipe()
	cl := relay.NewClient(c)
	t.Cleanup(func() { cl.Close() })
	done := make(chan error, 1)
	go func() { done <- r.srv.ServeConn(name, s) }()
	return cl, done
}

func waitConnected(t *testing.T, r *meshRelay, want ...string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !slices.Equal(r.srv.Connected(), want) {
		if time.Now().After(deadline) {
			t.Fatalf("relay nodes %v, want %v", r.srv.Connected(), want)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func wantEnded(t *testing.T, done <-chan error, want error, what string) {
	t.Helper()
	select {
	case err := <-done:
		if err != want {
			t.Fatalf("%s: stream ended with %v, want %v", what, err, want)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: stream still served", what)
	}
}

// The proxy attaches to its relay in-process under its own name (known
// before any netmap, from its state); nodes that leave the netmap or
// change their key are cut.
func TestMeshRelay(t *testing.T) {
	kself, sself := testKey(t)
	r, err := newMeshRelay("px", kself, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer r.close()

	// The proxy's own attachment works before the first netmap.
	own, err := r.dial(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	pc := relay.NewClient(own)
	defer pc.Close()
	waitConnected(t, r, "px")
	// No node is known yet.
	_, refused := attach(t, r, "pi1")
	wantEnded(t, refused, relay.ErrRefused, "pi1 before the netmap")

	k1, s1 := testKey(t)
	_, s2 := testKey(t)
	nm := &wire.Netmap{
		Self: wire.Peer{Name: "px", Role: wire.RoleProxy, WireGuardKey: sself},
		Peers: []wire.Peer{
			{Name: "pi1", Role: wire.RoleNode, WireGuardKey: s1},
			{Name: "pi2", Role: wire.RoleNode, WireGuardKey: s2},
		},
	}
	r.setKeys(relayKeys(nm))
	c1, done1 := attach(t, r, "pi1")
	_, done2 := attach(t, r, "pi2")
	waitConnected(t, r, "pi1", "pi2", "px")

	// A node reaches the proxy through the relay, and the other way round.
	p := make([]byte, 148)
	p[0] = 1
	if err := c1.Send(kself, p); err != nil {
		t.Fatal(err)
	}
	src, got, err := pc.Recv()
	if err != nil || src != k1 || !bytes.Equal(got, p) {
		t.Fatalf("proxy received from %x: %v", src[:4], err)
	}
	if err := pc.Send(k1, p); err != nil {
		t.Fatal(err)
	}
	if src, got, err = c1.Recv(); err != nil || src != kself || !bytes.Equal(got, p) {
		t.Fatalf("pi1 received from %x: %v", src[:4], err)
	}

	// pi1 is revoked (leaves the netmap), pi2 gets a new key.
	k2b, s2b := testKey(t)
	nm.Peers = []wire.Peer{{Name: "pi2", Role: wire.RoleNode, WireGuardKey: s2b}}
	r.setKeys(relayKeys(nm))
	wantEnded(t, done1, relay.ErrDropped, "revoked pi1")
	wantEnded(t, done2, relay.ErrDropped, "rekeyed pi2")
	waitConnected(t, r, "px")
	_, again := attach(t, r, "pi1")
	wantEnded(t, again, relay.ErrRefused, "revoked pi1 again")
	c2b, done2b := attach(t, r, "pi2")
	waitConnected(t, r, "pi2", "px")
	if err := c2b.Send(kself, p); err != nil {
		t.Fatal(err)
	}
	if src, _, err = pc.Recv(); err != nil || src != k2b {
		t.Fatalf("proxy received from %x (%v), want pi2's new key", src[:4], err)
	}

	// Close cuts everything; dial then fails.
	r.close()
	wantEnded(t, done2b, relay.ErrServerClosed, "after close")
	if _, err := r.dial(t.Context()); err == nil {
		t.Fatal("dial after close succeeded")
	}
}

// proxyRelay is the relay of a proxy named px (closed when the test ends),
// its WireGuard key, and its own netmap entry.
func proxyRelay(t *testing.T) (*meshRelay, [32]byte, wire.Peer) {
	t.Helper()
	kself, sself := testKey(t)
	r, err := newMeshRelay("px", kself, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.close)
	return r, kself, wire.Peer{Name: "px", Role: wire.RoleProxy, WireGuardKey: sself}
}

// In the hub topology nodes may not reach each other, so the relay
// forwards only between a node and a proxy.
func TestMeshRelayHub(t *testing.T) {
	r, kself, self := proxyRelay(t)
	k1, s1 := testKey(t)
	k2, s2 := testKey(t)
	nm := &wire.Netmap{
		Topology: "hub",
		Self:     self,
		Peers: []wire.Peer{
			{Name: "pi1", Role: wire.RoleNode, WireGuardKey: s1},
			{Name: "pi2", Role: wire.RoleNode, WireGuardKey: s2},
		},
	}
	r.setTopology(nm)
	r.setKeys(relayKeys(nm))
	own, err := r.dial(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	pc := relay.NewClient(own)
	defer pc.Close()
	c1, _ := attach(t, r, "pi1")
	c2, _ := attach(t, r, "pi2")
	waitConnected(t, r, "pi1", "pi2", "px")

	p := make([]byte, 148)
	p[0] = 1
	if err := c1.Send(k2, p); err != nil { // node to node: refused
		t.Fatal(err)
	}
	if err := c1.Send(kself, p); err != nil { // node to proxy: forwarded
		t.Fatal(err)
	}
	if src, _, err := pc.Recv(); err != nil || src != k1 {
		t.Fatalf("proxy received from %x: %v", src[:4], err)
	}
	if st := r.srv.Stats(); st.DropDenied != 1 {
		t.Fatalf("stats %+v, want one packet refused", st)
	}
	if err := pc.Send(k2, p); err != nil { // proxy to node: forwarded
		t.Fatal(err)
	}
	if src, _, err := c2.Recv(); err != nil || src != kself {
		t.Fatalf("pi2 received from %x (%v), want the proxy (and nothing from pi1)", src[:4], err)
	}

	// Back to a mesh: nodes may reach each other again.
	nm.Topology = ""
	r.setTopology(nm)
	if err := c1.Send(k2, p); err != nil {
		t.Fatal(err)
	}
	if src, _, err := c2.Recv(); err != nil || src != k1 {
		t.Fatalf("pi2 received from %x (%v), want pi1", src[:4], err)
	}
}

// In the tags topology the relay forwards between a node and a proxy, and
// between two nodes that share a tag; nothing else. An unknown topology
// (a newer coordinator's) gets the hub's rule.
func TestMeshRelayTags(t *testing.T) {
	r, _, self := proxyRelay(t)
	k1, s1 := testKey(t)
	k2, s2 := testKey(t)
	_, s3 := testKey(t)
	nm := &wire.Netmap{
		Topology: wire.TopologyTags,
		Self:     self,
		Peers: []wire.Peer{
			{Name: "pi1", Role: wire.RoleNode, WireGuardKey: s1, Tags: []string{"lab", "cam"}},
			{Name: "pi2", Role: wire.RoleNode, WireGuardKey: s2, Tags: []string{"cam"}},
			{Name: "pi3", Role: wire.RoleNode, WireGuardKey: s3},
			{Name: "px2", Role: wire.RoleProxy},
		},
	}
	r.setTopology(nm)
	r.setKeys(relayKeys(nm))
	for _, tt := range []struct {
		src, dst string
		want     bool
	}{
		{"pi1", "pi2", true}, {"pi2", "pi1", true}, // share "cam"
		{"pi1", "pi3", false}, {"pi3", "pi2", false}, // pi3 has no tags
		{"pi3", "px", true}, {"px", "pi3", true}, {"pi3", "px2", true}, {"px2", "pi1", true},
		{"pi1", "stranger", false},
	} {
		if got := r.allow(tt.src, tt.dst); got != tt.want {
			t.Errorf("allow(%s, %s) = %v, want %v", tt.src, tt.dst, got, tt.want)
		}
	}

	// Through the real relay: pi3's packet to pi1 is refused, pi2's
	// arrives.
	c1, _ := attach(t, r, "pi1")
	c2, _ := attach(t, r, "pi2")
	c3, _ := attach(t, r, "pi3")
	waitConnected(t, r, "pi1", "pi2", "pi3")
	p := make([]byte, 148)
	p[0] = 1
	if err := c3.Send(k1, p); err != nil {
		t.Fatal(err)
	}
	if err := c2.Send(k1, p); err != nil {
		t.Fatal(err)
	}
	if src, _, err := c1.Recv(); err != nil || src != k2 {
		t.Fatalf("pi1 received from %x (%v), want pi2 (and nothing from pi3)", src[:4], err)
	}
	if st := r.srv.Stats(); st.DropDenied != 1 {
		t.Fatalf("stats %+v, want one packet refused", st)
	}

	nm.Topology = "future"
	r.setTopology(nm)
	if r.allow("pi1", "pi2") || !r.allow("pi1", "px") {
		t.Error("an unknown topology does not get the hub's rule")
	}
}
