package node

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"time"

	"github.com/meshctl/meshctl/node/fastnet"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.zx2c4.com/wireguard/tun"
)

// DefaultMTU is the overlay MTU: 1500 minus IPv6 (40), UDP (8) and
// WireGuard (32) overhead, as wg-quick uses.
const DefaultMTU = 1420

// netstackPlane runs the overlay addresses in a userspace gVisor stack
// (node/fastnet, meshctl's own batched, GSO/GRO data plane): only the
// agent's own listeners exist there, so every other overlay port refuses
// (RST) without any firewall.
type netstackPlane struct {
	dev  *fastnet.Device
	tnet *fastnet.Net
}

func newNetstackPlane(v4, v6 netip.Addr, mtu int) (*netstackPlane, error) {
	dev, tnet, err := fastnet.New([]netip.Addr{v4, v6}, mtu, fastnet.Options{})
	if err != nil {
		return nil, fmt.Errorf("userspace network stack: %w", err)
	}
	return &netstackPlane{dev: dev, tnet: tnet}, nil
}

func (p *netstackPlane) Device() tun.Device { return p.dev }
func (p *netstackPlane) Mode() string       { return "netstack" }
func (p *netstackPlane) Close() error       { return nil }

func (p *netstackPlane) Listen(addr netip.AddrPort) (net.Listener, error) {
	return p.tnet.ListenTCPAddrPort(addr)
}

func (p *netstackPlane) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return p.tnet.DialContext(ctx, network, addr)
}

func (p *netstackPlane) Ping(ctx context.Context, src, dst netip.Addr) (time.Duration, error) {
	c, err := p.tnet.DialPingAddr(src, dst)
	if err != nil {
		return 0, err
	}
	defer c.Close()
	return pingOnce(ctx, c, dst.Is6())
}

// pingConn is what pingOnce needs of an ICMP socket.
type pingConn interface {
	Write([]byte) (int, error)
	Read([]byte) (int, error)
	SetDeadline(time.Time) error
}

// pingOnce sends an echo request on c and waits for the matching reply.
func pingOnce(ctx context.Context, c pingConn, v6 bool) (time.Duration, error) {
	var typ, replyTyp icmp.Type = ipv4.ICMPTypeEcho, ipv4.ICMPTypeEchoReply
	proto := 1
	if v6 {
		typ, replyTyp, proto = ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply, 58
	}
	id, seq := rand.N(1<<16), rand.N(1<<16)
	payload := []byte("meshctl ping")
	req, err := (&icmp.Message{Type: typ, Body: &icmp.Echo{ID: id, Seq: seq, Data: payload}}).Marshal(nil)
	if err != nil {
		return 0, err
	}
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Now().Add(5 * time.Second)
	}
	c.SetDeadline(deadline)
	start := time.Now()
	if _, err := c.Write(req); err != nil {
		return 0, err
	}
	buf := make([]byte, 1500)
	for {
		n, err := c.Read(buf)
		if err != nil {
			if errors.Is(err, context.DeadlineExceeded) || isTimeout(err) {
				return 0, fmt.Errorf("no reply within %s", deadline.Sub(start).Round(time.Millisecond))
			}
			return 0, err
		}
		m, err := icmp.ParseMessage(proto, buf[:n])
		if err != nil || m.Type != replyTyp {
			continue
		}
		if e, ok := m.Body.(*icmp.Echo); ok && e.Seq == seq {
			return time.Since(start), nil
		}
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}
