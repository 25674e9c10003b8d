package node

import (
	"context"
	"net"
	"net/netip"
	"time"

	"golang.zx2c4.com/wireguard/tun"
)

// dataplane is where the node's overlay addresses live: a gVisor netstack
// inside the agent (no root), or a kernel TUN interface (root). The
// WireGuard device reads and writes the packets of Device(); services
// listen, outbound programs dial and pings go through the same plane.
type dataplane interface {
	// Device is the tun.Device the WireGuard device is built on.
	Device() tun.Device
	// Listen listens for TCP on addr (an overlay address and port).
	Listen(addr netip.AddrPort) (net.Listener, error)
	// DialContext opens a connection to an overlay address.
	DialContext(ctx context.Context, network, addr string) (net.Conn, error)
	// Ping sends one ICMP echo request to dst and waits for the reply.
	Ping(ctx context.Context, src, dst netip.Addr) (time.Duration, error)
	// Mode is "netstack" or "tun", for status.
	Mode() string
	// Close releases what the plane holds beyond the tun.Device (which the
	// WireGuard device closes).
	Close() error
}
