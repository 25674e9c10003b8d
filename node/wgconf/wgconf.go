// Package wgconf turns a netmap into WireGuard peer configuration for
// wireguard-go's UAPI (the text protocol behind device.IpcSet and
// device.IpcGet, https://www.wireguard.com/xplatform/). It validates
// netmaps, renders full configurations and minimal diffs between two
// desired peer sets, and parses "get=1" answers for status displays.
//
// UAPI bodies produced here are sequences of "key=value\n" lines without the
// "set=1" header and without the terminating blank line, ready for
// device.IpcSet. Keys are lower-case hex in UAPI, base64 everywhere else.
package wgconf

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshctl/meshctl/wire"
)

// maxKeepalive is the largest persistent keepalive UAPI accepts (uint16 seconds).
const maxKeepalive = 65535 * time.Second

// Peer is the desired configuration of one WireGuard peer.
type Peer struct {
	Name      string // for logs and status only
	PublicKey wgtypes.Key
	// IPv4 and IPv6 are the peer's overlay addresses; its AllowedIPs are
	// exactly IPv4/32 and IPv6/128.
	IPv4 netip.Addr
	IPv6 netip.Addr
	// Endpoint is where to send handshakes; the zero value means none is
	// known (the peer must contact us first).
	Endpoint netip.AddrPort
	// Candidates are all the usable endpoints the peer advertised (the
	// proxy endpoint first for a proxy), localized like Endpoint, without
	// duplicates, loopback ones last; Endpoint is the first. A Bind that
	// probes paths per peer (node/pathbind) tries them all.
	Candidates []netip.AddrPort
	// EndpointID, when set, is written as the UAPI endpoint value instead
	// of Endpoint: a Bind that chooses the path per peer parses it into
	// its per-peer endpoint (node/pathbind). FromNetmap leaves it empty.
	EndpointID string
	// Keepalive is the persistent keepalive interval; 0 = off. UAPI counts
	// whole seconds, so it is rounded up to a second when rendered.
	Keepalive time.Duration
}

// AllowedIPs returns exactly IPv4/32 and IPv6/128, in that order. An
// invalid (zero) address contributes no prefix.
func (p Peer) AllowedIPs() []netip.Prefix {
	out := make([]netip.Prefix, 0, 2)
	if p.IPv4.IsValid() {
		out = append(out, netip.PrefixFrom(p.IPv4, 32))
	}
	if p.IPv6.IsValid() {
		out = append(out, netip.PrefixFrom(p.IPv6, 128))
	}
	return out
}

// label is how logs and summaries name the peer.
func (p Peer) label() string {
	if p.Name != "" {
		return p.Name
	}
	return p.PublicKey.String()
}

// Options for FromNetmap.
type Options struct {
	// Self is our own WireGuard public key. It must be set.
	Self wgtypes.Key
	// IsLocal reports whether an address belongs to this host; a peer whose
	// advertised endpoint is one of our own addresses runs on this host, and
	// is reached at 127.0.0.1:port (or [::1]:port) instead. Nil = nothing is
	// local.
	IsLocal func(netip.Addr) bool
	// ProxyKeepalive is the persistent keepalive set toward peers with role
	// "proxy" (nodes behind NAT keep their mapping open). It is rounded up
	// to whole seconds and must be within 0..65535 s.
	ProxyKeepalive time.Duration
}

// FromNetmap validates nm and returns the peers it describes, sorted by
// public key (byte order). The netmap is rejected whole (error, nil peers) if:
//   - it lists our own key (Options.Self) as a peer, two peers share a key, or
//     nm.Self names a key other than Options.Self;
//   - two peers, or a peer and nm.Self, share an IPv4 or IPv6 address;
//   - a peer address is missing or is not a single address of the right
//     family (a prefix, an IPv6 or IPv4-mapped address in the ipv4 field, an
//     IPv4 in the ipv6 field, a zone), or is unspecified, multicast or
//     loopback; nm.Self's addresses are checked the same way when present;
//   - a key is not standard base64 of 32 bytes, or is all zeros;
//   - a peer endpoint does not parse as IP:port (an empty list is fine).
//
// Errors name the peer and what is wrong.
//
// Endpoint choice: the first advertised endpoint that is usable (non-zero
// port; not unspecified, multicast, broadcast, loopback, zoned or IPv6
// link-local). If its address is local (Options.IsLocal), the loopback
// address of the same family with that port is used instead. No usable
// endpoint leaves Endpoint zero.
//
// Peers with role wire.RoleProxy get Keepalive = opts.ProxyKeepalive. The
// proxy nm.ProxyEndpoint belongs to gets it as its first endpoint: the one
// whose key is nm.ProxyEndpointKey, or, when that is empty (an older
// coordinator), the netmap's only proxy; with several proxies and no key,
// none does (one address given to two peers would send one proxy's
// packets to the other). ProxyEndpoint must be a usable literal IP:port
// (host names are rejected: nothing is resolved here); it is checked only
// when the netmap has a proxy peer.
func FromNetmap(nm *wire.Netmap, opts Options) ([]Peer, error) {
	if nm == nil {
		return nil, errors.New("wgconf: nil netmap")
	}
	if isZero(opts.Self) {
		return nil, errors.New("wgconf: options: our own public key (Self) is not set")
	}
	if opts.ProxyKeepalive < 0 || opts.ProxyKeepalive > maxKeepalive {
		return nil, fmt.Errorf("wgconf: options: proxy keepalive %v out of range 0..%v", opts.ProxyKeepalive, maxKeepalive)
	}
	if nm.Self.WireGuardKey != "" {
		k, err := parseKey(nm.Self.WireGuardKey)
		if err != nil {
			return nil, fmt.Errorf("wgconf: self: public key: %w", err)
		}
		if k != opts.Self {
			return nil, fmt.Errorf("wgconf: self: netmap is for key %s, but we are %s", k, opts.Self)
		}
	}

	// epOwner is the proxy nm.ProxyEndpoint belongs to, when named.
	proxies := 0
	for _, wp := range nm.Peers {
		if wp.Role == wire.RoleProxy {
			proxies++
		}
	}
	var epOwner wgtypes.Key
	epOwnerKnown := false
	if nm.ProxyEndpointKey != "" && proxies > 0 {
		k, err := parseKey(nm.ProxyEndpointKey)
		if err != nil {
			return nil, fmt.Errorf("wgconf: proxy endpoint key: %w", err)
		}
		epOwner, epOwnerKnown = k, true
	}
	// owner maps addresses already claimed to who claimed them.
	owner := make(map[netip.Addr]string)
	for _, f := range []struct {
		name, val string
		v4        bool
	}{{"ipv4", nm.Self.IPv4, true}, {"ipv6", nm.Self.IPv6, false}} {
		if f.val == "" {
			continue
		}
		a, err := parseAddr(f.val, f.v4)
		if err != nil {
			return nil, fmt.Errorf("wgconf: self: %s %q: %w", f.name, f.val, err)
		}
		owner[a] = "self"
	}

	var proxyEP *netip.AddrPort // parsed lazily, at the first proxy peer
	keys := make(map[wgtypes.Key]string)
	peers := make([]Peer, 0, len(nm.Peers))
	for i, wp := range nm.Peers {
		who := fmt.Sprintf("peer %d %q", i, wp.Name)
		fail := func(format string, args ...any) ([]Peer, error) {
			return nil, fmt.Errorf("wgconf: %s: %s", who, fmt.Sprintf(format, args...))
		}
		p := Peer{Name: wp.Name}

		k, err := parseKey(wp.WireGuardKey)
		if err != nil {
			return fail("public key: %v", err)
		}
		if k == opts.Self {
			return fail("public key %s is our own key", k)
		}
		if prev, dup := keys[k]; dup {
			return fail("public key %s already used by %s", k, prev)
		}
		keys[k] = who
		p.PublicKey = k

		if p.IPv4, err = parseAddr(wp.IPv4, true); err != nil {
			return fail("ipv4 %q: %v", wp.IPv4, err)
		}
		if p.IPv6, err = parseAddr(wp.IPv6, false); err != nil {
			return fail("ipv6 %q: %v", wp.IPv6, err)
		}
		for _, a := range []netip.Addr{p.IPv4, p.IPv6} {
			if prev, dup := owner[a]; dup {
				return fail("address %s already used by %s", a, prev)
			}
			owner[a] = who
		}

		var loopback []netip.AddrPort
		for _, s := range wp.Endpoints {
			ap, err := netip.ParseAddrPort(s)
			if err != nil {
				return fail("endpoint %q is not IP:port: %v", s, err)
			}
			switch {
			case !usableEndpoint(ap):
				// validated, not used
			case ap.Addr().Unmap().IsLoopback():
				// A peer on a host with no other address advertises loopback:
				// only useful from the same host, so the last resort.
				loopback = appendNew(loopback, netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()))
			default:
				p.Candidates = appendNew(p.Candidates, localize(ap, opts.IsLocal))
			}
		}
		for _, ap := range loopback {
			p.Candidates = appendNew(p.Candidates, ap)
		}

		if wp.Role == wire.RoleProxy {
			p.Keepalive = roundKeepalive(opts.ProxyKeepalive)
			owns := proxies == 1
			if epOwnerKnown {
				owns = k == epOwner
			}
			if nm.ProxyEndpoint != "" {
				if proxyEP == nil {
					ap, err := netip.ParseAddrPort(nm.ProxyEndpoint)
					if err != nil {
						return nil, fmt.Errorf("wgconf: proxy endpoint %q is not IP:port: %w", nm.ProxyEndpoint, err)
					}
					if !usableEndpoint(ap) {
						return nil, fmt.Errorf("wgconf: proxy endpoint %q is not a usable address", nm.ProxyEndpoint)
					}
					ap = localize(ap, opts.IsLocal)
					proxyEP = &ap
				}
			}
			if proxyEP != nil && owns {
				p.Candidates = append([]netip.AddrPort{*proxyEP}, slices.DeleteFunc(p.Candidates, func(a netip.AddrPort) bool { return a == *proxyEP })...)
			}
		}
		if len(p.Candidates) > 0 {
			p.Endpoint = p.Candidates[0]
		}
		peers = append(peers, p)
	}
	slices.SortFunc(peers, func(a, b Peer) int { return bytes.Compare(a.PublicKey[:], b.PublicKey[:]) })
	return peers, nil
}

// appendNew appends ap unless list holds it already.
func appendNew(list []netip.AddrPort, ap netip.AddrPort) []netip.AddrPort {
	if slices.Contains(list, ap) {
		return list
	}
	return append(list, ap)
}

func isZero(k wgtypes.Key) bool { return k == wgtypes.Key{} }

// parseKey parses a base64 WireGuard key and rejects the all-zero key.
func parseKey(s string) (wgtypes.Key, error) {
	k, err := wgtypes.ParseKey(s)
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("%q is not base64 of 32 bytes", s)
	}
	if isZero(k) {
		return wgtypes.Key{}, errors.New("key is all zeros")
	}
	return k, nil
}

// parseAddr parses a single overlay address of the given family.
func parseAddr(s string, v4 bool) (netip.Addr, error) {
	if s == "" {
		return netip.Addr{}, errors.New("missing")
	}
	a, err := netip.ParseAddr(s)
	switch {
	case err != nil:
		return netip.Addr{}, errors.New("not a single IP address")
	case a.Zone() != "":
		return netip.Addr{}, errors.New("must not have a zone")
	case v4 && !a.Is4():
		return netip.Addr{}, errors.New("not an IPv4 address")
	case !v4 && (!a.Is6() || a.Is4In6()):
		return netip.Addr{}, errors.New("not an IPv6 address")
	case a.IsUnspecified():
		return netip.Addr{}, errors.New("unspecified address")
	case a.IsMulticast():
		return netip.Addr{}, errors.New("multicast address")
	case a.IsLoopback():
		return netip.Addr{}, errors.New("loopback address")
	}
	return a, nil
}

// usableEndpoint reports whether ap can be sent to at all. Loopback is
// usable (a peer or proxy on this very host); FromNetmap prefers other
// addresses for peers.
func usableEndpoint(ap netip.AddrPort) bool {
	a := ap.Addr().Unmap()
	return ap.Port() != 0 && a.Zone() == "" &&
		!a.IsUnspecified() && !a.IsMulticast() &&
		!(a.Is6() && a.IsLinkLocalUnicast()) &&
		a != netip.AddrFrom4([4]byte{255, 255, 255, 255})
}

// localize unmaps ap and replaces one of our own addresses with loopback.
func localize(ap netip.AddrPort, isLocal func(netip.Addr) bool) netip.AddrPort {
	a := ap.Addr().Unmap()
	if isLocal != nil && isLocal(a) {
		if a.Is4() {
			a = netip.AddrFrom4([4]byte{127, 0, 0, 1})
		} else {
			a = netip.IPv6Loopback()
		}
	}
	return netip.AddrPortFrom(a, ap.Port())
}

// keepaliveSeconds is d in whole UAPI seconds, rounded up and clamped.
func keepaliveSeconds(d time.Duration) int {
	switch {
	case d <= 0:
		return 0
	case d >= maxKeepalive:
		return int(maxKeepalive / time.Second)
	}
	return int((d + time.Second - 1) / time.Second)
}

// roundKeepalive is d as the device will report it.
func roundKeepalive(d time.Duration) time.Duration {
	return time.Duration(keepaliveSeconds(d)) * time.Second
}
