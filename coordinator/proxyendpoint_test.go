package coordinator

import (
	"net/netip"
	"testing"
	"time"

	"github.com/meshctl/meshctl/wire"
)

// The netmap names the proxy WGEndpoint belongs to (Options.EmbeddedProxy)
// by its key, so that nodes do not give that endpoint to a standalone
// proxy too; without the option, or without that proxy, no key is sent.
func TestProxyEndpointKeyNamesEmbeddedProxy(t *testing.T) {
	s := newTestState(tpeer("n", "pi1", wire.RoleNode), tpeer("p", "proxy", wire.RoleProxy), tpeer("e", "edge", wire.RoleProxy))
	snap := s.current()
	ula := netip.MustParsePrefix("fd00:1:2::/48")
	o := &Options{Topology: TopologyMesh, IPv4Pool: DefaultIPv4Pool, WGEndpoint: "192.0.2.1:51820", EmbeddedProxy: "proxy", Now: time.Now}
	node := snap.byID["n"]
	if h := snap.headFor(node, o, ula); h.ProxyEndpointKey != snap.byID["p"].WireGuardKey || h.ProxyEndpointKey == "" {
		t.Errorf("proxy_endpoint_key = %q, want the embedded proxy's key %q", h.ProxyEndpointKey, snap.byID["p"].WireGuardKey)
	}
	for name, o := range map[string]*Options{
		"no EmbeddedProxy":   {Topology: TopologyMesh, IPv4Pool: DefaultIPv4Pool, WGEndpoint: "192.0.2.1:51820", Now: time.Now},
		"no such proxy":      {Topology: TopologyMesh, IPv4Pool: DefaultIPv4Pool, WGEndpoint: "192.0.2.1:51820", EmbeddedProxy: "other", Now: time.Now},
		"a node of the name": {Topology: TopologyMesh, IPv4Pool: DefaultIPv4Pool, WGEndpoint: "192.0.2.1:51820", EmbeddedProxy: "pi1", Now: time.Now},
		"no WGEndpoint":      {Topology: TopologyMesh, IPv4Pool: DefaultIPv4Pool, EmbeddedProxy: "proxy", Now: time.Now},
	} {
		if h := snap.headFor(node, o, ula); h.ProxyEndpointKey != "" {
			t.Errorf("%s: proxy_endpoint_key = %q, want none", name, h.ProxyEndpointKey)
		}
	}
}
