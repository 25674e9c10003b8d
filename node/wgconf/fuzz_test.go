package wgconf

import (
	"bytes"
	"encoding/json"
	"net/netip"
	"reflect"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshctl/meshctl/wire"
)

// fuzzKey is a fixed, valid, non-zero key derived from b.
func fuzzKey(b byte) wgtypes.Key {
	var k wgtypes.Key
	for i := range k {
		k[i] = b + byte(i)
	}
	return k
}

// FuzzFromNetmap validates arbitrary netmaps (JSON as a coordinator would
// send it) as the agent does before touching the device. Invariants:
//   - a rejected netmap yields no peers at all (rejected whole), and the
//     netmap passed in is never modified;
//   - an accepted one never lists our own key, has no two peers with one
//     key and no two holders (peers or self) of one address, and every
//     peer's AllowedIPs are exactly one IPv4 /32 and one IPv6 /128 that
//     are neither loopback, multicast nor unspecified; peers are sorted by
//     key;
//   - fixed point: the netmap re-encoded to JSON and decoded validates to
//     the same peers, and so does the netmap rewritten with each key and
//     address in its canonical spelling.
//
// Seeds: f.Add below and testdata/fuzz/FuzzFromNetmap. Run longer with
//
//	go test -run '^$' -fuzz '^FuzzFromNetmap$' -fuzztime 5m ./node/wgconf/
func FuzzFromNetmap(f *testing.F) {
	self := fuzzKey(1)
	peer := func(n byte, v4, v6 string, eps ...string) wire.Peer {
		return wire.Peer{ID: string('a' + rune(n)), Name: "p" + string('a'+rune(n)), Role: wire.RoleNode,
			WireGuardKey: fuzzKey(n).String(), IPv4: v4, IPv6: v6, Endpoints: eps}
	}
	seeds := []wire.Netmap{
		{Version: 1, Self: wire.Peer{WireGuardKey: self.String(), IPv4: "100.64.0.1", IPv6: "fd00::1"},
			Peers: []wire.Peer{peer(2, "100.64.0.2", "fd00::2", "192.0.2.2:51820"), peer(3, "100.64.0.3", "fd00::3")}},
		{Version: 2, Peers: []wire.Peer{peer(1, "100.64.0.2", "fd00::2")}},                                   // our own key
		{Version: 3, Peers: []wire.Peer{peer(2, "100.64.0.2", "fd00::2"), peer(2, "100.64.0.3", "fd00::3")}}, // duplicate key
		{Version: 4, Peers: []wire.Peer{peer(2, "100.64.0.2", "fd00::2"), peer(3, "100.64.0.2", "fd00::3")}}, // duplicate address
		{Version: 5, Peers: []wire.Peer{peer(2, "100.64.0.0/10", "fd00::2")}},                                // prefix
		{Version: 6, Peers: []wire.Peer{peer(2, "::ffff:100.64.0.2", "fd00::2")}},
		{Version: 7, Peers: []wire.Peer{peer(2, "100.64.0.2", "::ffff:100.64.0.9")}},
		{Version: 8, Self: wire.Peer{IPv4: "100.64.0.2"}, Peers: []wire.Peer{peer(2, "100.64.0.2", "fd00::2")}},
		{Version: 9, ProxyEndpoint: "203.0.113.1:443", Peers: []wire.Peer{
			{Name: "proxy", Role: wire.RoleProxy, WireGuardKey: fuzzKey(9).String(), IPv4: "100.64.0.9", IPv6: "fd00::9",
				Endpoints: []string{"203.0.113.1:443", "127.0.0.1:1", "[fe80::1%eth0]:5"}}}},
		{Version: 10, Peers: []wire.Peer{peer(2, "100.64.0.2", "FD00:0::2")}},
	}
	for _, nm := range seeds {
		b, _ := json.Marshal(nm)
		f.Add(b)
	}
	opts := Options{Self: self, IsLocal: func(a netip.Addr) bool { return a == netip.MustParseAddr("192.0.2.77") }}
	f.Fuzz(func(t *testing.T, data []byte) {
		var nm wire.Netmap
		if json.Unmarshal(data, &nm) != nil {
			return
		}
		before, _ := json.Marshal(&nm)
		peers, err := FromNetmap(&nm, opts)
		if after, _ := json.Marshal(&nm); !bytes.Equal(before, after) {
			t.Fatalf("FromNetmap modified its netmap")
		}
		if err != nil {
			if peers != nil {
				t.Fatalf("rejected netmap (%v) yielded %d peers", err, len(peers))
			}
			return
		}
		if len(peers) != len(nm.Peers) {
			t.Fatalf("%d peers from a netmap of %d", len(peers), len(nm.Peers))
		}
		keys := map[wgtypes.Key]bool{}
		addrs := map[netip.Addr]bool{}
		for _, s := range []string{nm.Self.IPv4, nm.Self.IPv6} {
			if a, err := netip.ParseAddr(s); err == nil {
				addrs[a] = true
			}
		}
		for i, p := range peers {
			if p.PublicKey == self || keys[p.PublicKey] || p.PublicKey == (wgtypes.Key{}) {
				t.Fatalf("peer %q: key %s is ours, zero or listed twice", p.Name, p.PublicKey)
			}
			keys[p.PublicKey] = true
			if i > 0 && bytes.Compare(peers[i-1].PublicKey[:], p.PublicKey[:]) >= 0 {
				t.Fatal("peers not sorted by key")
			}
			allowed := p.AllowedIPs()
			if len(allowed) != 2 || !allowed[0].Addr().Is4() || allowed[0].Bits() != 32 ||
				!allowed[1].Addr().Is6() || allowed[1].Addr().Is4In6() || allowed[1].Bits() != 128 {
				t.Fatalf("peer %q: AllowedIPs %v are not one IPv4 /32 and one IPv6 /128", p.Name, allowed)
			}
			for _, pr := range allowed {
				a := pr.Addr()
				if addrs[a] || a.IsLoopback() || a.IsMulticast() || a.IsUnspecified() || a.Zone() != "" {
					t.Fatalf("peer %q: address %s is taken, loopback, multicast, unspecified or zoned", p.Name, a)
				}
				addrs[a] = true
			}
			if p.Endpoint.IsValid() != (len(p.Candidates) > 0) || len(p.Candidates) > 0 && p.Endpoint != p.Candidates[0] {
				t.Fatalf("peer %q: endpoint %v is not the first of %v", p.Name, p.Endpoint, p.Candidates)
			}
			for _, c := range p.Candidates {
				if !usableEndpoint(c) || c.Addr().Is4In6() {
					t.Fatalf("peer %q: unusable candidate %v", p.Name, c)
				}
			}
		}

		// Fixed point: through JSON, and in canonical spelling.
		var again wire.Netmap
		if err := json.Unmarshal(before, &again); err != nil {
			t.Fatal(err)
		}
		if peers2, err := FromNetmap(&again, opts); err != nil || !reflect.DeepEqual(peers, peers2) {
			t.Fatalf("re-encoded netmap validates differently: %v", err)
		}
		canon := nm
		canon.Peers = make([]wire.Peer, len(nm.Peers))
		for i, wp := range nm.Peers {
			k, _ := wgtypes.ParseKey(wp.WireGuardKey)
			wp.WireGuardKey = k.String()
			wp.IPv4 = netip.MustParseAddr(wp.IPv4).String()
			wp.IPv6 = netip.MustParseAddr(wp.IPv6).String()
			canon.Peers[i] = wp
		}
		if peers2, err := FromNetmap(&canon, opts); err != nil || !reflect.DeepEqual(peers, peers2) {
			t.Fatalf("canonical netmap validates differently: %v", err)
		}
	})
}
