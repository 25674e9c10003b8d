package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"time"

	"github.com/meshctl/meshctl/node/tundev"
	"golang.org/x/net/icmp"
	"golang.zx2c4.com/wireguard/tun"
)

// tunPlane puts the overlay addresses on a kernel TUN interface (root), so
// every program on the host uses the mesh directly. An inbound filter lets
// peers reach only the published service ports (and replies to the host's
// own connections): on a TUN every host listener would otherwise be open.
type tunPlane struct {
	dev    *tundev.Filter
	v4, v6 netip.Addr
}

func newTUNPlane(name string, v4, v6 netip.Addr, mtu int, svcs []Service, pool4, pool6 netip.Prefix) (*tunPlane, error) {
	dev, err := tundev.Create(tundev.Options{
		Name: name, MTU: mtu,
		IPv4: netip.PrefixFrom(v4, pool4.Bits()),
		IPv6: netip.PrefixFrom(v6, pool6.Bits()),
	})
	if err != nil {
		return nil, err
	}
	ports := make([]uint16, 0, len(svcs))
	for _, s := range svcs {
		ports = append(ports, s.Port)
	}
	return &tunPlane{dev: tundev.NewFilter(dev, tundev.AllowTCPPorts(ports...)), v4: v4, v6: v6}, nil
}

func (p *tunPlane) Device() tun.Device { return p.dev }
func (p *tunPlane) Mode() string       { return "tun" }
func (p *tunPlane) Close() error       { return nil }

func (p *tunPlane) Listen(addr netip.AddrPort) (net.Listener, error) {
	return net.Listen("tcp", addr.String())
}

func (p *tunPlane) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var d net.Dialer
	return d.DialContext(ctx, network, addr)
}

func (p *tunPlane) Ping(ctx context.Context, src, dst netip.Addr) (time.Duration, error) {
	network := "ip4:icmp"
	if dst.Is6() {
		network = "ip6:ipv6-icmp"
	}
	c, err := icmp.ListenPacket(network, src.String())
	if err != nil {
		return 0, fmt.Errorf("ICMP socket: %w", err)
	}
	defer c.Close()
	return pingOnce(ctx, &packetPing{c: c, dst: &net.IPAddr{IP: dst.AsSlice()}}, dst.Is6())
}

// packetPing adapts an ICMP PacketConn to pingConn.
type packetPing struct {
	c   *icmp.PacketConn
	dst net.Addr
}

func (p *packetPing) Write(b []byte) (int, error) { return p.c.WriteTo(b, p.dst) }
func (p *packetPing) Read(b []byte) (int, error) {
	for {
		n, from, err := p.c.ReadFrom(b)
		if err != nil || from.String() == p.dst.String() {
			return n, err
		}
	}
}
func (p *packetPing) SetDeadline(t time.Time) error { return p.c.SetDeadline(t) }

// cachedPools reads the overlay pools from the cached netmap (enrollment
// writes one), which a TUN needs for its prefix lengths.
func cachedPools(dir string) (netip.Prefix, netip.Prefix, error) {
	nm, err := LoadNetmap(dir)
	if err != nil {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("--tun needs the overlay pools from the cached netmap: %w", err)
	}
	p4, err1 := netip.ParsePrefix(nm.IPv4Pool)
	p6, err2 := netip.ParsePrefix(nm.IPv6Pool)
	if err := errors.Join(err1, err2); err != nil {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("cached netmap has no usable overlay pools (enrolled with an older coordinator? run `meshctl netmap` once): %w", err)
	}
	return p4, p6, nil
}
