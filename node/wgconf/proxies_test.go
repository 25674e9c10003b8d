package wgconf

import (
	"testing"

	"github.com/meshctl/meshctl/wire"
)

// With a standalone proxy beside the server's embedded one, only the proxy
// named by ProxyEndpointKey gets ProxyEndpoint; giving it to both made the
// path layer attribute one proxy's packets to the other (found by
// cmd/meshctl/TestChaosLoopback: the embedded proxy stopped reaching
// nodes once a standalone proxy joined).
func TestProxyEndpointGoesToItsProxyOnly(t *testing.T) {
	embedded, edge := testKey(2), testKey(3)
	nm := func(key string) *wire.Netmap {
		return &wire.Netmap{ProxyEndpoint: "198.51.100.1:51830", ProxyEndpointKey: key, Peers: []wire.Peer{
			{Name: "proxy", Role: wire.RoleProxy, WireGuardKey: embedded.String(), IPv4: "100.64.0.2", IPv6: "fd7a:115c::2",
				Endpoints: []string{"192.0.2.2:51830"}},
			{Name: "edge", Role: wire.RoleProxy, WireGuardKey: edge.String(), IPv4: "100.64.0.3", IPv6: "fd7a:115c::3",
				Endpoints: []string{"192.0.2.3:51820"}},
		}}
	}
	endpoints := func(t *testing.T, m *wire.Netmap) map[string]string {
		t.Helper()
		peers, err := FromNetmap(m, Options{Self: testKey(1), ProxyKeepalive: 25e9})
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]string{}
		for _, p := range peers {
			if p.Keepalive == 0 {
				t.Errorf("proxy %s has no keepalive", p.Name)
			}
			out[p.Name] = p.Endpoint.String()
		}
		return out
	}
	got := endpoints(t, nm(embedded.String()))
	if got["proxy"] != "198.51.100.1:51830" || got["edge"] != "192.0.2.3:51820" {
		t.Errorf("with the key: endpoints %v, want proxy at ProxyEndpoint and edge at its own", got)
	}
	// No key (an older coordinator) and two proxies: ambiguous, so
	// neither gets it.
	got = endpoints(t, nm(""))
	if got["proxy"] != "192.0.2.2:51830" || got["edge"] != "192.0.2.3:51820" {
		t.Errorf("without the key: endpoints %v, want each proxy at its own", got)
	}
	// No key and one proxy: it gets it, as before.
	one := nm("")
	one.Peers = one.Peers[:1]
	if got = endpoints(t, one); got["proxy"] != "198.51.100.1:51830" {
		t.Errorf("one proxy, no key: endpoints %v, want ProxyEndpoint", got)
	}
	// A key that names no proxy: nobody gets it; a malformed key is refused.
	if got = endpoints(t, nm(testKey(7).String())); got["proxy"] != "192.0.2.2:51830" {
		t.Errorf("key of no proxy: endpoints %v", got)
	}
	if _, err := FromNetmap(nm("not a key"), Options{Self: testKey(1)}); err == nil {
		t.Error("a malformed proxy endpoint key was accepted")
	}
}
