package pathbind

import (
	"encoding/binary"
	"net/netip"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
)

func wgMsg(typ byte, idx uint32) []byte {
	m := make([]byte, 32)
	m[0] = typ
	binary.LittleEndian.PutUint32(m[indexOff:], idx)
	return m
}

// The bookkeeping behind stale-session detection: which indexes count as
// ours, and how often a peer is reported.
func TestStaleSessionBookkeeping(t *testing.T) {
	reported := make(chan [32]byte, 8)
	b, err := New(Options{Inner: conn.NewDefaultBind(), DiscoPrivate: [32]byte{9}, OnStaleSession: func(k [32]byte) { reported <- k }})
	if err != nil {
		t.Fatal(err)
	}
	key := [32]byte{1, 2, 3}
	b.SetPeers([]PeerConfig{{Key: key, Name: "pi"}})
	p := b.peerByKey(key)

	// Initiations and responses we send hand out indexes; the newest
	// oursLen are remembered.
	const sent = oursLen + 4
	for i := uint32(1); i <= sent; i++ {
		typ := byte(msgInitiation)
		if i%2 == 0 {
			typ = msgResponse
		}
		p.noteSent([][]byte{wgMsg(typ, i)})
	}
	for i := uint32(1); i <= sent; i++ {
		if want := i > sent-oursLen; p.isOurs(i) != want {
			t.Errorf("index %d: ours = %v, want %v", i, !want, want)
		}
	}
	// Cookie replies and transport data hand out nothing; neither does a
	// message with non-zero reserved bytes.
	bad := wgMsg(msgInitiation, 300)
	bad[2] = 1
	p.noteSent([][]byte{wgMsg(3, 100), wgMsg(msgTransport, 200), bad, {msgInitiation, 0, 0}})
	for _, idx := range []uint32{100, 200, 300} {
		if p.isOurs(idx) {
			t.Errorf("index %d counted as ours", idx)
		}
	}

	now := time.Now().UnixNano()
	expect := func(what string, want uint64) {
		t.Helper()
		if got := b.stats.StaleSessions.Load(); got != want {
			t.Fatalf("%s: %d reports, want %d", what, got, want)
		}
	}
	b.checkSession(p, wgMsg(msgTransport, sent), now)
	expect("transport under our index", 0)
	b.checkSession(p, wgMsg(msgInitiation, 77), now)
	b.checkSession(p, wgMsg(msgTransport, 77)[:indexOff+3], now)
	expect("handshake and short message", 0)
	b.checkSession(p, wgMsg(msgTransport, 77), now)
	expect("transport under a foreign index", 1)
	b.checkSession(p, wgMsg(msgTransport, 78), now+int64(time.Second))
	expect("again within staleEvery", 1)
	b.checkSession(p, wgMsg(msgTransport, 78), now+int64(staleEvery))
	expect("again after staleEvery", 2)
	for range 2 {
		select {
		case k := <-reported:
			if k != key {
				t.Fatalf("reported key %x, want %x", k, key)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("OnStaleSession not called")
		}
	}
}

// A session we made answering a handshake from an address no peer was
// known at (a node that started before its endpoint reached us) is ours
// too: its data, attributed once the address is known, is no stale
// session.
func TestStrangerSessionIsOurs(t *testing.T) {
	b, err := New(Options{Inner: conn.NewDefaultBind(), DiscoPrivate: [32]byte{9}})
	if err != nil {
		t.Fatal(err)
	}
	key := [32]byte{4}
	b.SetPeers([]PeerConfig{{Key: key, Name: "pi"}})
	p := b.peerByKey(key)
	ep, err := b.inner.ParseEndpoint("127.0.0.1:9")
	if err != nil {
		t.Fatal(err)
	}
	// The response goes to the stranger (the inner bind is not open, so
	// the send itself fails; what was handed out is recorded first).
	b.Send([][]byte{wgMsg(msgResponse, 77)}, &stranger{Endpoint: ep, addr: netip.MustParseAddrPort("127.0.0.1:9")})
	now := time.Now().UnixNano()
	b.checkSession(p, wgMsg(msgTransport, 77), now)
	if n := b.stats.StaleSessions.Load(); n != 0 {
		t.Fatalf("the session answered to a stranger was taken as stale (%d reports)", n)
	}
	b.checkSession(p, wgMsg(msgTransport, 78), now)
	if n := b.stats.StaleSessions.Load(); n != 1 {
		t.Fatalf("a foreign index: %d reports, want 1", n)
	}
	// Many nodes starting at once: 200 more answers to strangers, and the
	// first is still ours (with a per-peer-sized ring it would not be).
	for i := range uint32(200) {
		b.Send([][]byte{wgMsg(msgResponse, 1000+i)}, &stranger{Endpoint: ep, addr: netip.MustParseAddrPort("127.0.0.1:9")})
	}
	if !b.strangerOurs.has(1000) || !b.strangerOurs.has(1199) {
		t.Error("answers to 200 strangers do not all count as ours")
	}
}
