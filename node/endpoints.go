package node

import (
	"net"
	"net/netip"
	"slices"
)

// interfaceAddrs lists the addresses of this host's up interfaces.
func interfaceAddrs() []netip.Addr {
	ifs, err := net.Interfaces()
	if err != nil {
		return nil
	}
	var out []netip.Addr
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagUp == 0 {
			continue
		}
		addrs, _ := ifc.Addrs()
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(ipn.IP); ok {
					out = append(out, ip.Unmap())
				}
			}
		}
	}
	return out
}

// localAddrChecker reports whether an address belongs to this host (so a
// peer advertising it runs here and is reached over loopback).
func localAddrChecker() func(netip.Addr) bool {
	addrs := interfaceAddrs()
	return func(a netip.Addr) bool { return a.IsLoopback() || slices.Contains(addrs, a.Unmap()) }
}

// localEndpoints are the endpoints a node advertises: each global or
// private unicast address of an up, non-loopback interface with the
// WireGuard port; 127.0.0.1 when there is none, so that nodes on one host
// still find each other.
func localEndpoints(port int) []netip.AddrPort {
	var out []netip.AddrPort
	for _, a := range interfaceAddrs() {
		if a.IsLoopback() || a.IsLinkLocalUnicast() || !a.IsGlobalUnicast() || isOverlay(a) {
			continue
		}
		out = append(out, netip.AddrPortFrom(a, uint16(port)))
		if len(out) == 8 {
			break
		}
	}
	if len(out) == 0 {
		out = append(out, netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), uint16(port)))
	}
	return out
}

// isOverlay reports addresses that are mesh addresses themselves (ours in
// TUN mode, or another mesh's), which must not be advertised as endpoints.
func isOverlay(a netip.Addr) bool {
	return cgnat.Contains(a) || ula.Contains(a)
}

var (
	cgnat = netip.MustParsePrefix("100.64.0.0/10")
	ula   = netip.MustParsePrefix("fc00::/7")
)
