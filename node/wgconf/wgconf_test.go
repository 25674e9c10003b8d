package wgconf

import (
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshctl/meshctl/wire"
)

// testKey returns a deterministic non-zero key whose bytes sort by i.
func testKey(i byte) wgtypes.Key {
	var k wgtypes.Key
	k[0] = i
	k[31] = 0x5a
	return k
}

func baseNetmap() *wire.Netmap {
	return &wire.Netmap{
		Version: 7,
		Self:    wire.Peer{Name: "self", WireGuardKey: testKey(1).String(), IPv4: "100.64.0.1", IPv6: "fd7a:115c::1"},
		Peers: []wire.Peer{
			{Name: "c", Role: wire.RoleNode, WireGuardKey: testKey(9).String(), IPv4: "100.64.0.9", IPv6: "fd7a:115c::9",
				Endpoints: []string{"0.0.0.0:1", "198.51.100.9:0", "198.51.100.9:51820", "203.0.113.9:51820"}},
			{Name: "a", Role: wire.RoleNode, WireGuardKey: testKey(3).String(), IPv4: "100.64.0.3", IPv6: "fd7a:115c::3"},
			{Name: "p", Role: wire.RoleProxy, WireGuardKey: testKey(5).String(), IPv4: "100.64.0.5", IPv6: "fd7a:115c::5",
				Endpoints: []string{"198.51.100.5:51820"}},
		},
		ProxyEndpoint: "203.0.113.1:443",
	}
}

func baseOpts() Options {
	return Options{Self: testKey(1), ProxyKeepalive: 25 * time.Second}
}

func TestFromNetmapHappy(t *testing.T) {
	peers, err := FromNetmap(baseNetmap(), baseOpts())
	if err != nil {
		t.Fatal(err)
	}
	want := []Peer{
		{Name: "a", PublicKey: testKey(3), IPv4: netip.MustParseAddr("100.64.0.3"), IPv6: netip.MustParseAddr("fd7a:115c::3")},
		{Name: "p", PublicKey: testKey(5), IPv4: netip.MustParseAddr("100.64.0.5"), IPv6: netip.MustParseAddr("fd7a:115c::5"),
			Endpoint: netip.MustParseAddrPort("203.0.113.1:443"), Keepalive: 25 * time.Second,
			Candidates: []netip.AddrPort{netip.MustParseAddrPort("203.0.113.1:443"), netip.MustParseAddrPort("198.51.100.5:51820")}},
		{Name: "c", PublicKey: testKey(9), IPv4: netip.MustParseAddr("100.64.0.9"), IPv6: netip.MustParseAddr("fd7a:115c::9"),
			Endpoint: netip.MustParseAddrPort("198.51.100.9:51820"), Candidates: []netip.AddrPort{netip.MustParseAddrPort("198.51.100.9:51820"), netip.MustParseAddrPort("203.0.113.9:51820")}},
	}
	if !reflect.DeepEqual(peers, want) {
		t.Fatalf("peers:\n got %+v\nwant %+v", peers, want)
	}
	wantIPs := []netip.Prefix{netip.MustParsePrefix("100.64.0.9/32"), netip.MustParsePrefix("fd7a:115c::9/128")}
	if got := peers[2].AllowedIPs(); !slices.Equal(got, wantIPs) {
		t.Errorf("AllowedIPs = %v, want %v", got, wantIPs)
	}
}

func TestFromNetmapEndpoints(t *testing.T) {
	local := map[netip.Addr]bool{
		netip.MustParseAddr("192.0.2.7"):   true,
		netip.MustParseAddr("2001:db8::7"): true,
	}
	tests := []struct {
		name      string
		role      string
		endpoints []string
		proxyEP   string
		keepalive time.Duration
		want      string // "" = zero endpoint
		wantKA    time.Duration
	}{
		{name: "none", want: ""},
		{name: "first usable", endpoints: []string{"[ff02::1]:5", "[fe80::1]:5", "127.0.0.1:5", "255.255.255.255:5", "192.0.2.1:7", "192.0.2.2:8"}, want: "192.0.2.1:7"},
		{name: "no usable", endpoints: []string{"[::]:5", "224.0.0.1:5"}, want: ""},
		{name: "loopback as last resort", endpoints: []string{"[::]:5", "127.0.0.1:6"}, want: "127.0.0.1:6"},
		{name: "loopback after others", endpoints: []string{"127.0.0.1:6", "192.0.2.9:7"}, want: "192.0.2.9:7"},
		{name: "loopback proxy", role: wire.RoleProxy, proxyEP: "127.0.0.1:51820", keepalive: time.Second, want: "127.0.0.1:51820", wantKA: time.Second},
		{name: "mapped v4 unmapped", endpoints: []string{"[::ffff:192.0.2.3]:9"}, want: "192.0.2.3:9"},
		{name: "local v4", endpoints: []string{"192.0.2.7:51820"}, want: "127.0.0.1:51820"},
		{name: "local v6", endpoints: []string{"[2001:db8::7]:51821", "192.0.2.1:1"}, want: "[::1]:51821"},
		{name: "v6 remote", endpoints: []string{"[2001:db8::8]:51821"}, want: "[2001:db8::8]:51821"},
		{name: "proxy uses ProxyEndpoint", role: wire.RoleProxy, endpoints: []string{"192.0.2.1:1"}, proxyEP: "198.51.100.1:443",
			keepalive: 20 * time.Second, want: "198.51.100.1:443", wantKA: 20 * time.Second},
		{name: "proxy without ProxyEndpoint", role: wire.RoleProxy, endpoints: []string{"192.0.2.1:1"},
			keepalive: 1500 * time.Millisecond, want: "192.0.2.1:1", wantKA: 2 * time.Second},
		{name: "local proxy", role: wire.RoleProxy, proxyEP: "192.0.2.7:443", keepalive: time.Second, want: "127.0.0.1:443", wantKA: time.Second},
		{name: "node ignores ProxyEndpoint", endpoints: []string{"192.0.2.1:1"}, proxyEP: "198.51.100.1:443", keepalive: time.Second, want: "192.0.2.1:1"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			nm := &wire.Netmap{ProxyEndpoint: tc.proxyEP, Peers: []wire.Peer{{
				Name: "x", Role: tc.role, WireGuardKey: testKey(2).String(),
				IPv4: "100.64.0.2", IPv6: "fd7a:115c::2", Endpoints: tc.endpoints,
			}}}
			opts := Options{Self: testKey(1), ProxyKeepalive: tc.keepalive, IsLocal: func(a netip.Addr) bool { return local[a] }}
			peers, err := FromNetmap(nm, opts)
			if err != nil {
				t.Fatal(err)
			}
			var want netip.AddrPort
			if tc.want != "" {
				want = netip.MustParseAddrPort(tc.want)
			}
			if peers[0].Endpoint != want || peers[0].Keepalive != tc.wantKA {
				t.Errorf("endpoint, keepalive = %v, %v; want %v, %v", peers[0].Endpoint, peers[0].Keepalive, want, tc.wantKA)
			}
		})
	}
}

func TestFromNetmapRejects(t *testing.T) {
	tests := []struct {
		name    string
		opts    func(*Options)
		edit    func(*wire.Netmap)
		wantErr string // substring of the error
	}{
		{"zero Self key", func(o *Options) { o.Self = wgtypes.Key{} }, nil, "Self"},
		{"negative keepalive", func(o *Options) { o.ProxyKeepalive = -time.Second }, nil, "keepalive"},
		{"self lists other key", nil, func(nm *wire.Netmap) { nm.Self.WireGuardKey = testKey(2).String() }, "netmap is for key"},
		{"own key as peer", nil, func(nm *wire.Netmap) { nm.Peers[1].WireGuardKey = testKey(1).String() }, `peer 1 "a": public key`},
		{"duplicate key", nil, func(nm *wire.Netmap) { nm.Peers[1].WireGuardKey = testKey(9).String() }, `already used by peer 0 "c"`},
		{"duplicate ipv4", nil, func(nm *wire.Netmap) { nm.Peers[1].IPv4 = "100.64.0.9" }, "address 100.64.0.9 already used"},
		{"duplicate ipv6", nil, func(nm *wire.Netmap) { nm.Peers[2].IPv6 = "fd7a:115c::3" }, `peer 2 "p": address fd7a:115c::3 already used by peer 1`},
		{"ipv4 of self", nil, func(nm *wire.Netmap) { nm.Peers[0].IPv4 = "100.64.0.1" }, "already used by self"},
		{"ipv6 of self", nil, func(nm *wire.Netmap) { nm.Peers[0].IPv6 = "fd7a:115c::1" }, "already used by self"},
		{"ipv4 prefix", nil, func(nm *wire.Netmap) { nm.Peers[0].IPv4 = "100.64.0.0/10" }, "ipv4"},
		{"ipv6 in ipv4", nil, func(nm *wire.Netmap) { nm.Peers[0].IPv4 = "fd7a:115c::9" }, "not an IPv4"},
		{"mapped in ipv4", nil, func(nm *wire.Netmap) { nm.Peers[0].IPv4 = "::ffff:100.64.0.9" }, "not an IPv4"},
		{"ipv4 in ipv6", nil, func(nm *wire.Netmap) { nm.Peers[0].IPv6 = "100.64.0.10" }, "not an IPv6"},
		{"mapped in ipv6", nil, func(nm *wire.Netmap) { nm.Peers[0].IPv6 = "::ffff:100.64.0.10" }, "not an IPv6"},
		{"ipv6 prefix", nil, func(nm *wire.Netmap) { nm.Peers[0].IPv6 = "fd7a:115c::/48" }, "ipv6"},
		{"zone", nil, func(nm *wire.Netmap) { nm.Peers[0].IPv6 = "fd7a:115c::9%eth0" }, "zone"},
		{"missing ipv4", nil, func(nm *wire.Netmap) { nm.Peers[0].IPv4 = "" }, "missing"},
		{"missing ipv6", nil, func(nm *wire.Netmap) { nm.Peers[0].IPv6 = "" }, "missing"},
		{"unspecified v4", nil, func(nm *wire.Netmap) { nm.Peers[0].IPv4 = "0.0.0.0" }, "unspecified"},
		{"unspecified v6", nil, func(nm *wire.Netmap) { nm.Peers[0].IPv6 = "::" }, "unspecified"},
		{"multicast v4", nil, func(nm *wire.Netmap) { nm.Peers[0].IPv4 = "224.0.0.1" }, "multicast"},
		{"multicast v6", nil, func(nm *wire.Netmap) { nm.Peers[0].IPv6 = "ff02::1" }, "multicast"},
		{"loopback v4", nil, func(nm *wire.Netmap) { nm.Peers[0].IPv4 = "127.0.0.2" }, "loopback"},
		{"loopback v6", nil, func(nm *wire.Netmap) { nm.Peers[0].IPv6 = "::1" }, "loopback"},
		{"bad self address", nil, func(nm *wire.Netmap) { nm.Self.IPv4 = "fd7a::1" }, "self: ipv4"},
		{"key not base64", nil, func(nm *wire.Netmap) { nm.Peers[0].WireGuardKey = "not a key!" }, "not base64"},
		{"key too short", nil, func(nm *wire.Netmap) { nm.Peers[0].WireGuardKey = "AAAA" }, "not base64 of 32 bytes"},
		{"key empty", nil, func(nm *wire.Netmap) { nm.Peers[0].WireGuardKey = "" }, "public key"},
		{"key zero", nil, func(nm *wire.Netmap) { nm.Peers[0].WireGuardKey = wgtypes.Key{}.String() }, "all zeros"},
		{"endpoint no port", nil, func(nm *wire.Netmap) { nm.Peers[0].Endpoints = []string{"198.51.100.9"} }, "endpoint"},
		{"endpoint hostname", nil, func(nm *wire.Netmap) { nm.Peers[0].Endpoints = []string{"example.com:51820"} }, "not IP:port"},
		{"later endpoint bad", nil, func(nm *wire.Netmap) { nm.Peers[0].Endpoints = []string{"198.51.100.9:1", "x"} }, `"x"`},
		{"proxy endpoint hostname", nil, func(nm *wire.Netmap) { nm.ProxyEndpoint = "proxy.example.com:443" }, "proxy endpoint"},
		{"proxy endpoint unusable", nil, func(nm *wire.Netmap) { nm.ProxyEndpoint = "0.0.0.0:443" }, "proxy endpoint"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			nm, opts := baseNetmap(), baseOpts()
			if tc.edit != nil {
				tc.edit(nm)
			}
			if tc.opts != nil {
				tc.opts(&opts)
			}
			peers, err := FromNetmap(nm, opts)
			if err == nil || peers != nil {
				t.Fatalf("FromNetmap = %v, %v; want nil peers and an error", peers, err)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("error %q does not contain %q", err, tc.wantErr)
			}
		})
	}
	if _, err := FromNetmap(nil, baseOpts()); err == nil {
		t.Error("nil netmap accepted")
	}
}

func TestProxyEndpointOnlyCheckedWithProxy(t *testing.T) {
	nm := baseNetmap()
	nm.Peers = nm.Peers[:2] // no proxy peer
	nm.ProxyEndpoint = "proxy.example.com:443"
	if _, err := FromNetmap(nm, baseOpts()); err != nil {
		t.Fatalf("unused proxy endpoint rejected: %v", err)
	}
}
