package fastnet

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// Net is the socket side of a Device's stack: TCP and UDP over gVisor's
// gonet adapters, and ICMP echo. Addresses are IP literals (the stack has no
// resolver).
type Net struct {
	stack        *stack.Stack
	hasV4, hasV6 bool
}

func fullAddr(ap netip.AddrPort) (tcpip.FullAddress, tcpip.NetworkProtocolNumber) {
	a := ap.Addr().Unmap()
	proto := ipv4.ProtocolNumber
	if a.Is6() {
		proto = ipv6.ProtocolNumber
	}
	fa := tcpip.FullAddress{NIC: nicID, Port: ap.Port()}
	if a.IsValid() && !a.IsUnspecified() {
		fa.Addr = tcpip.AddrFromSlice(a.AsSlice())
	}
	return fa, proto
}

// ListenTCPAddrPort listens for TCP on addr (an unspecified address means
// every address of its family).
func (n *Net) ListenTCPAddrPort(addr netip.AddrPort) (*gonet.TCPListener, error) {
	fa, proto := fullAddr(addr)
	return gonet.ListenTCP(n.stack, fa, proto)
}

// DialContextTCPAddrPort opens a TCP connection to addr.
func (n *Net) DialContextTCPAddrPort(ctx context.Context, addr netip.AddrPort) (*gonet.TCPConn, error) {
	fa, proto := fullAddr(addr)
	return gonet.DialContextTCP(ctx, n.stack, fa, proto)
}

// DialUDPAddrPort opens a UDP socket bound to laddr (if valid or with a
// port) and connected to raddr (likewise).
func (n *Net) DialUDPAddrPort(laddr, raddr netip.AddrPort) (*gonet.UDPConn, error) {
	var lfa, rfa *tcpip.FullAddress
	var proto tcpip.NetworkProtocolNumber
	if laddr.Addr().IsValid() || laddr.Port() > 0 {
		fa, p := fullAddr(laddr)
		lfa, proto = &fa, p
	}
	if raddr.Addr().IsValid() || raddr.Port() > 0 {
		fa, p := fullAddr(raddr)
		rfa, proto = &fa, p
	}
	return gonet.DialUDP(n.stack, lfa, rfa, proto)
}

// ListenUDPAddrPort opens a UDP socket bound to laddr.
func (n *Net) ListenUDPAddrPort(laddr netip.AddrPort) (*gonet.UDPConn, error) {
	return n.DialUDPAddrPort(laddr, netip.AddrPort{})
}

// Dial is DialContext without a context.
func (n *Net) Dial(network, address string) (net.Conn, error) {
	return n.DialContext(context.Background(), network, address)
}

// DialContext connects to address on network "tcp", "udp" or "ping", each
// optionally suffixed with 4 or 6. The host must be an IP literal; for
// "ping" address is the bare IP.
func (n *Net) DialContext(ctx context.Context, network, address string) (net.Conn, error) {
	opErr := func(err error) error {
		return &net.OpError{Op: "dial", Net: network, Err: err}
	}
	kind, fam := network, byte(0)
	if l := len(network); l > 0 && (network[l-1] == '4' || network[l-1] == '6') {
		kind, fam = network[:l-1], network[l-1]
	}
	if kind != "tcp" && kind != "udp" && kind != "ping" {
		return nil, opErr(net.UnknownNetworkError(network))
	}
	host, port := address, 0
	if kind != "ping" {
		h, p, err := net.SplitHostPort(address)
		if err != nil {
			return nil, opErr(err)
		}
		pn, err := strconv.ParseUint(p, 10, 16)
		if err != nil {
			return nil, opErr(fmt.Errorf("invalid port %q", p))
		}
		host, port = h, int(pn)
	}
	if i := strings.LastIndexByte(host, '%'); i >= 0 && strings.IndexByte(host, ':') >= 0 {
		host = host[:i] // the stack has one NIC: zones mean nothing
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return nil, opErr(&net.DNSError{Err: "no such host (the mesh stack resolves no names)", Name: host, IsNotFound: true})
	}
	ip = ip.Unmap()
	if (fam == '4' && !ip.Is4()) || (fam == '6' && !ip.Is6()) {
		return nil, opErr(&net.AddrError{Err: "address family mismatch", Addr: host})
	}
	if err := ctx.Err(); err != nil {
		return nil, opErr(err)
	}
	ap := netip.AddrPortFrom(ip, uint16(port))
	var c net.Conn
	switch kind {
	case "tcp":
		c, err = n.DialContextTCPAddrPort(ctx, ap)
	case "udp":
		c, err = n.DialUDPAddrPort(netip.AddrPort{}, ap)
	default:
		c, err = n.DialPingAddr(netip.Addr{}, ip)
	}
	if err != nil {
		return nil, err
	}
	return c, nil
}

// PingAddr is the net.Addr of a PingConn.
type PingAddr struct{ Addr netip.Addr }

func (a PingAddr) Network() string {
	if a.Addr.Is6() {
		return "ping6"
	}
	return "ping4"
}

func (a PingAddr) String() string { return a.Addr.String() }

// PingConn is an ICMP echo socket ("ping socket"): it writes ICMP messages
// (type, code, checksum, echo header, data; the stack sets the identifier
// and checksum) and reads the echo replies addressed to it.
type PingConn struct {
	ep           tcpip.Endpoint
	wq           waiter.Queue
	laddr, raddr PingAddr

	mu            sync.Mutex
	deadlineGen   uint64
	closed        chan struct{}
	closeOnce     sync.Once
	deadlineTimer *time.Timer
	deadlineCh    chan struct{} // closed when the read deadline passes
}

var _ net.Conn = (*PingConn)(nil)

// DialPingAddr opens an ICMP echo socket from laddr (if valid) to raddr (if
// valid); at least one must be valid, and they must be of one family.
func (n *Net) DialPingAddr(laddr, raddr netip.Addr) (*PingConn, error) {
	laddr, raddr = laddr.Unmap(), raddr.Unmap()
	if !laddr.IsValid() && !raddr.IsValid() {
		return nil, errors.New("ping dial: no address")
	}
	if laddr.IsValid() && raddr.IsValid() && laddr.Is4() != raddr.Is4() {
		return nil, errors.New("ping dial: mixed address families")
	}
	v6 := laddr.Is6() || raddr.Is6()
	tproto, nproto := icmp.ProtocolNumber4, ipv4.ProtocolNumber
	if v6 {
		tproto, nproto = icmp.ProtocolNumber6, ipv6.ProtocolNumber
	}
	pc := &PingConn{laddr: PingAddr{laddr}, raddr: PingAddr{raddr}, closed: make(chan struct{}), deadlineCh: make(chan struct{})}
	ep, terr := n.stack.NewEndpoint(tproto, nproto, &pc.wq)
	if terr != nil {
		return nil, fmt.Errorf("ping socket: %v", terr)
	}
	pc.ep = ep
	if laddr.IsValid() {
		fa, _ := fullAddr(netip.AddrPortFrom(laddr, 0))
		if terr := ep.Bind(fa); terr != nil {
			ep.Close()
			return nil, fmt.Errorf("ping bind %v: %v", laddr, terr)
		}
	}
	if raddr.IsValid() {
		fa, _ := fullAddr(netip.AddrPortFrom(raddr, 0))
		if terr := ep.Connect(fa); terr != nil {
			ep.Close()
			return nil, fmt.Errorf("ping connect %v: %v", raddr, terr)
		}
	}
	return pc, nil
}

// ListenPingAddr opens an unconnected ICMP echo socket bound to laddr.
func (n *Net) ListenPingAddr(laddr netip.Addr) (*PingConn, error) {
	return n.DialPingAddr(laddr, netip.Addr{})
}

func (pc *PingConn) LocalAddr() net.Addr  { return pc.laddr }
func (pc *PingConn) RemoteAddr() net.Addr { return pc.raddr }

func (pc *PingConn) Close() error {
	pc.closeOnce.Do(func() {
		close(pc.closed)
		pc.ep.Close()
		pc.mu.Lock()
		if pc.deadlineTimer != nil {
			pc.deadlineTimer.Stop()
		}
		pc.mu.Unlock()
	})
	return nil
}

// WriteTo sends the ICMP message p to addr (a PingAddr or *net.IPAddr).
func (pc *PingConn) WriteTo(p []byte, addr net.Addr) (int, error) {
	var ip netip.Addr
	switch a := addr.(type) {
	case PingAddr:
		ip = a.Addr
	case *PingAddr:
		ip = a.Addr
	case *net.IPAddr:
		ip, _ = netip.AddrFromSlice(a.IP)
	default:
		return 0, fmt.Errorf("ping write: unsupported address %T", addr)
	}
	ip = ip.Unmap()
	var opts tcpip.WriteOptions
	if ip.IsValid() && ip != pc.raddr.Addr {
		fa, _ := fullAddr(netip.AddrPortFrom(ip, 0))
		opts.To = &fa
	}
	n, terr := pc.ep.Write(bytes.NewReader(p), opts)
	if terr != nil {
		return int(n), fmt.Errorf("ping write: %v", terr)
	}
	return int(n), nil
}

// Write sends the ICMP message p to the connected address.
func (pc *PingConn) Write(p []byte) (int, error) { return pc.WriteTo(p, pc.raddr) }

// ReadFrom reads one ICMP message.
func (pc *PingConn) ReadFrom(p []byte) (int, net.Addr, error) {
	e, ch := waiter.NewChannelEntry(waiter.EventIn)
	pc.wq.EventRegister(&e)
	defer pc.wq.EventUnregister(&e)
	for {
		w := tcpip.SliceWriter(p)
		res, terr := pc.ep.Read(&w, tcpip.ReadOptions{NeedRemoteAddr: true})
		if terr == nil {
			ra, _ := netip.AddrFromSlice(res.RemoteAddr.Addr.AsSlice())
			return res.Count, PingAddr{ra}, nil
		}
		if _, ok := terr.(*tcpip.ErrWouldBlock); !ok {
			return 0, nil, fmt.Errorf("ping read: %v", terr)
		}
		pc.mu.Lock()
		dl := pc.deadlineCh
		pc.mu.Unlock()
		select {
		case <-ch:
		case <-dl:
			return 0, nil, os.ErrDeadlineExceeded
		case <-pc.closed:
			return 0, nil, net.ErrClosed
		}
	}
}

func (pc *PingConn) Read(p []byte) (int, error) {
	n, _, err := pc.ReadFrom(p)
	return n, err
}

// SetDeadline sets the read deadline (writes never block).
func (pc *PingConn) SetDeadline(t time.Time) error { return pc.SetReadDeadline(t) }

// SetWriteDeadline is accepted and ignored: writes never block.
func (pc *PingConn) SetWriteDeadline(time.Time) error { return nil }

// SetReadDeadline sets the read deadline; the zero time means none. It
// applies to reads already waiting, too.
func (pc *PingConn) SetReadDeadline(t time.Time) error {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	pc.deadlineGen++ // a timer of an earlier deadline that still fires is ignored
	gen := pc.deadlineGen
	if pc.deadlineTimer != nil {
		pc.deadlineTimer.Stop()
		pc.deadlineTimer = nil
	}
	select {
	case <-pc.deadlineCh: // passed: start a fresh one
		pc.deadlineCh = make(chan struct{})
	default:
	}
	if t.IsZero() {
		return nil
	}
	d := time.Until(t)
	if d <= 0 {
		close(pc.deadlineCh)
		return nil
	}
	pc.deadlineTimer = time.AfterFunc(d, func() {
		pc.mu.Lock()
		defer pc.mu.Unlock()
		if pc.deadlineGen == gen {
			close(pc.deadlineCh)
		}
	})
	return nil
}
