package node_test

import (
	"encoding/json"
	"math"
	"net/netip"
	"reflect"
	"slices"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/wire"
)

// devicePeers is what the WireGuard device runs: each peer's key and its
// AllowedIPs.
func devicePeers(t *testing.T, a *meshtest.Agent) map[wgtypes.Key][]netip.Prefix {
	t.Helper()
	dev, err := a.DeviceState()
	if err != nil {
		t.Fatal(err)
	}
	out := map[wgtypes.Key][]netip.Prefix{}
	for _, p := range dev.Peers {
		out[p.PublicKey] = slices.Clone(p.AllowedIPs)
	}
	return out
}

// FuzzAgentApplyNetmap hands a running agent netmaps whose peer list is
// fuzzed (as JSON), as if the coordinator had sent them. The agent's
// coordinator is unreachable (a closed loopback port), so nothing else
// changes its netmap, and endpoints are stripped, so an accepted netmap
// sends no packet anywhere. Invariants, checked against the WireGuard
// device itself:
//   - a rejected netmap leaves the last good one in place: the same
//     applied netmap, and the device's peers and AllowedIPs unchanged;
//   - an accepted one is applied whole: the device holds exactly its
//     peers, never our own key, each with AllowedIPs exactly its IPv4/32
//     and IPv6/128.
//
// The seed corpus is made at start-up from the real netmap (keys are
// fresh), plus testdata/fuzz/FuzzAgentApplyNetmap.
func FuzzAgentApplyNetmap(f *testing.F) {
	c := meshtest.NewCoordinator(f)
	c.AddNode(f, "b") // a peer of a, never started
	a := c.AddNode(f, "a").StartAgent(f, func(o *node.AgentOptions) { o.Coordinator = "https://127.0.0.1:1" })
	meshtest.WaitFor(f, meshDeadline, func() bool { return a.AppliedNetmap() != nil }, "a to come up from its cached netmap")
	good := a.AppliedNetmap()
	self := a.Node.State.WireGuardKey().PublicKey()

	peers := func(mod func(ps []wire.Peer) []wire.Peer) []byte {
		ps := slices.Clone(good.Peers)
		b, _ := json.Marshal(mod(ps))
		return b
	}
	fresh, _ := wgtypes.GeneratePrivateKey()
	newPeer := wire.Peer{ID: "n1", Name: "new", Role: wire.RoleNode, WireGuardKey: fresh.PublicKey().String(), IPv4: "100.64.9.9", IPv6: "fd00::9:9"}
	f.Add(peers(func(ps []wire.Peer) []wire.Peer { return ps }))
	f.Add(peers(func(ps []wire.Peer) []wire.Peer { return nil }))
	f.Add(peers(func(ps []wire.Peer) []wire.Peer { return append(ps, newPeer) }))
	f.Add(peers(func(ps []wire.Peer) []wire.Peer {
		p := newPeer
		p.WireGuardKey = self.String()
		return append(ps, p)
	}))
	f.Add(peers(func(ps []wire.Peer) []wire.Peer {
		p := newPeer
		p.WireGuardKey = ps[0].WireGuardKey
		return append(ps, p)
	}))
	f.Add(peers(func(ps []wire.Peer) []wire.Peer { p := newPeer; p.IPv4 = ps[0].IPv4; return append(ps, p) }))
	f.Add(peers(func(ps []wire.Peer) []wire.Peer { ps[0].IPv4 = "100.64.0.0/10"; return ps }))
	f.Add(peers(func(ps []wire.Peer) []wire.Peer { ps[0].IPv6 = "::ffff:100.64.0.2"; return ps }))
	f.Add(peers(func(ps []wire.Peer) []wire.Peer { ps[0].IPv4 = good.Self.IPv4; return ps }))

	version := uint64(math.MaxUint64 - 1<<32) // never a version the coordinator sends
	f.Fuzz(func(t *testing.T, peersJSON []byte) {
		var ps []wire.Peer
		if json.Unmarshal(peersJSON, &ps) != nil {
			return
		}
		for i := range ps {
			ps[i].Endpoints = nil // no packet leaves for an address taken from fuzz input
		}
		nm := *good
		version++
		nm.Version, nm.Peers, nm.ProxyEndpoint, nm.ProxySSH, nm.SSHOnly = version, ps, "", "", nil

		prev, prevDev := a.AppliedNetmap(), devicePeers(t, a)
		err := a.ApplyNetmap(&nm)
		dev := devicePeers(t, a)
		if err != nil {
			if a.AppliedNetmap() != prev || !reflect.DeepEqual(dev, prevDev) {
				t.Fatalf("rejected netmap (%v) changed the agent: device %v, was %v", err, dev, prevDev)
			}
			return
		}
		if a.AppliedNetmap() != &nm {
			t.Fatal("accepted netmap is not the applied one")
		}
		if len(dev) != len(ps) {
			t.Fatalf("device has %d peers, the netmap %d", len(dev), len(ps))
		}
		for _, p := range ps {
			k, err := wgtypes.ParseKey(p.WireGuardKey)
			allowed, ok := dev[k]
			if err != nil || !ok || k == self {
				t.Fatalf("peer %q (%s): not on the device, or our own key", p.Name, p.WireGuardKey)
			}
			want := []netip.Prefix{netip.PrefixFrom(netip.MustParseAddr(p.IPv4), 32), netip.PrefixFrom(netip.MustParseAddr(p.IPv6), 128)}
			slices.SortFunc(allowed, func(x, y netip.Prefix) int { return x.Addr().Compare(y.Addr()) })
			if !slices.Equal(allowed, want) {
				t.Fatalf("peer %q: AllowedIPs %v, want %v", p.Name, allowed, want)
			}
		}
	})
}
