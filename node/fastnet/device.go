// Package fastnet is meshctl's userspace data plane: a wireguard-go
// tun.Device backed by a gVisor network stack, in place of wireguard-go's
// stock tun/netstack.
//
// What it does differently from the stock device:
//   - Read drains up to len(bufs) packets per call (wireguard-go offers 128),
//     so a batch leaves in one sendmmsg instead of one packet per call.
//   - gVisor's packet buffers are released as soon as they are copied out or
//     delivered, and nothing is cloned on the way out.
//   - The queue from gVisor to Read is bounded (packets and bytes); beyond it
//     packets are dropped and counted, as a NIC ring would.
//   - The link advertises host GSO: gVisor's TCP hands over segments of
//     several MTUs (six by default, up to 64 KiB), which Read cuts into
//     MTU-sized packets with full headers and checksums (segmentation
//     offload done here, so gVisor's per-segment send path runs once per
//     GSO packet), see gso.go.
//   - Write coalesces in-order TCP segments of one flow within a batch into
//     one large segment before injecting it (GRO), see gro.go, and gives
//     every injected packet's IP header a buffer view of its own (gVisor's
//     receive path would otherwise copy the packet's whole buffer chunk).
//   - TCP: SACK, receive buffer moderation, buffers up to 4 MiB (see the
//     defaults below for what they cost in memory).
//
// Only gVisor's public packages are used.
package fastnet

import (
	"fmt"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"

	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
)

// BatchSize is the most packets Read and Write handle per call, the batch
// wireguard-go allocates for (conn.IdealBatchSize).
const BatchSize = 128

const nicID = 1

// Options tune a Device. The zero value is the production setting.
type Options struct {
	// QueueLen bounds the packets gVisor may queue for Read (default 1024).
	// A GSO packet counts once.
	QueueLen int
	// QueueBytes bounds the bytes queued for Read (default 4 MiB).
	QueueBytes int
	// DisableGSO stops advertising segmentation offload to gVisor: TCP then
	// hands over MTU-sized segments.
	DisableGSO bool
	// GSOMaxSize is the largest TCP packet gVisor hands over, up to 64 KiB
	// (default defaultGSOSegments MTU-sized packets' worth).
	GSOMaxSize int
	// DisableGRO injects received packets one by one, uncoalesced.
	DisableGRO bool
	// TCPSendBuffer and TCPReceiveBuffer are the initial TCP buffer sizes;
	// gVisor grows them with the connection up to TCPMaxSendBuffer and
	// TCPMaxReceiveBuffer. Zero means the defaults below.
	TCPSendBuffer       int
	TCPReceiveBuffer    int
	TCPMaxSendBuffer    int
	TCPMaxReceiveBuffer int
}

// Defaults, chosen by measurement (BenchmarkBulkTCP, TestRSSUnderLoad, and
// transfers with random loss) with a Raspberry Pi's memory in mind.
//
// wireguard-go holds every packet in flight through it in a 64 KiB buffer,
// so what a window lets pile up there while encryption or decryption lags
// costs about 46 times its size. TCP buffers grow to 4 MiB: two nodes on
// loopback then move 410-440 MB/s (300 at 1 MiB, 335 at 2 MiB) and one node
// peaked at 42 MiB RSS sending, 51-59 MiB receiving (with two CPU hogs
// beside it too); at 1 MiB, 23 and 40-50 MiB.
//
// Send buffers start at 256 KiB: gVisor grows each to twice its congestion
// window (up to the maximum), so a long fat path still gets its 4 MiB, but
// many connections that each have a response to send (a proxy's 64
// keep-alive connections fetching 1 MiB bodies) no longer hold 1 MiB each
// at once. Measured through the agent: 1 MiB HTTP via the proxy 95 -> 155
// MB/s, the serving node's peak RSS 104 -> 65-68 MiB; bulk TCP unchanged.
//
// GSO packets are kept to six segments. Larger ones cost less CPU (two
// nodes on loopback: 6.6 cpu-ns/B without GSO, 3.9 at six segments, 3.3 at
// twelve, 4.7 at 64 KiB, whose buffers gVisor does not pool) but hurt under
// loss: gVisor's RACK sees a GSO packet as one segment; a loss within it
// leaves it partly SACKed, and once it has split such a segment to
// retransmit it takes the connection as reordering and stops
// fast-retransmitting on duplicate ACKs, so losses near the end of a flight
// wait for the 200 ms retransmission timeout. Moving 16 MiB between two
// nodes at 1% random loss each way took 0-1 such timeouts without GSO, 1-3
// at six segments, 3-5 at twelve and 4-9 at 64 KiB (0.16-0.4 s, 0.46-0.76,
// 0.78-1.5, 1-2 s; the stock netstack 0.2-0.25 s); at 2%: 2, 2-7, 8-17,
// 12-27 timeouts.
const (
	defaultQueueLen            = 1024
	defaultQueueBytes          = 4 << 20
	defaultTCPSendBuffer       = 256 << 10
	defaultTCPReceiveBuffer    = 1 << 20
	defaultTCPMaxSendBuffer    = 4 << 20
	defaultTCPMaxReceiveBuffer = 4 << 20
	gsoMaxSize                 = 1<<16 - 1
	defaultGSOSegments         = 6
)

// Stats counts what the device did; see Device.Stats.
type Stats struct {
	// QueueDrops counts packets from gVisor dropped because the queue to
	// Read was full.
	QueueDrops uint64
	// Malformed counts packets dropped because they could not be handled:
	// outbound ones too big for wireguard-go's buffer or not segmentable,
	// inbound ones of an unknown IP version.
	Malformed uint64
	// GSOPackets counts large TCP packets gVisor handed over that were
	// split, into GSOSegments packets.
	GSOPackets, GSOSegments uint64
	// GROPackets counts coalesced packets injected, made of GROSegments
	// received segments.
	GROPackets, GROSegments uint64
}

// Device is a tun.Device whose packets are those of a gVisor stack.
type Device struct {
	stack  *stack.Stack
	ep     *linkEndpoint
	mtu    int
	opts   Options
	events chan tun.Event

	closeOnce sync.Once

	// Read state, guarded by readMu: packets taken off the queue but not yet
	// read, and the GSO packet being split.
	readMu   sync.Mutex
	pend     []*stack.PacketBuffer
	pendNext int
	splitPkt *stack.PacketBuffer
	split    splitter
	pieces   [][]byte

	groPool sync.Pool

	queueDrops, malformed   atomic.Uint64
	gsoPackets, gsoSegments atomic.Uint64
	groPackets, groSegments atomic.Uint64
}

var _ tun.Device = (*Device)(nil)

// New returns a Device and the Net of its stack, which owns addrs (IPv4 and
// IPv6; each gets a default route through the device). mtu is the overlay
// MTU, which every packet Read returns respects.
func New(addrs []netip.Addr, mtu int, opts Options) (*Device, *Net, error) {
	if mtu < 1280 || mtu > 65535 {
		return nil, nil, fmt.Errorf("fastnet: MTU %d out of range", mtu)
	}
	if opts.QueueLen <= 0 {
		opts.QueueLen = defaultQueueLen
	}
	if opts.QueueBytes <= 0 {
		opts.QueueBytes = defaultQueueBytes
	}
	if opts.GSOMaxSize <= 0 {
		opts.GSOMaxSize = defaultGSOSegments * mtu
	}
	opts.GSOMaxSize = min(max(opts.GSOMaxSize, mtu), gsoMaxSize)
	if opts.TCPSendBuffer <= 0 {
		opts.TCPSendBuffer = defaultTCPSendBuffer
	}
	if opts.TCPReceiveBuffer <= 0 {
		opts.TCPReceiveBuffer = defaultTCPReceiveBuffer
	}
	if opts.TCPMaxSendBuffer <= 0 {
		opts.TCPMaxSendBuffer = defaultTCPMaxSendBuffer
	}
	if opts.TCPMaxReceiveBuffer <= 0 {
		opts.TCPMaxReceiveBuffer = defaultTCPMaxReceiveBuffer
	}
	opts.TCPMaxSendBuffer = max(opts.TCPMaxSendBuffer, opts.TCPSendBuffer)
	opts.TCPMaxReceiveBuffer = max(opts.TCPMaxReceiveBuffer, opts.TCPReceiveBuffer)

	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
		HandleLocal:        true,
	})
	d := &Device{
		stack:  s,
		mtu:    mtu,
		opts:   opts,
		events: make(chan tun.Event, 1),
		pend:   make([]*stack.PacketBuffer, 0, BatchSize),
	}
	d.ep = newLinkEndpoint(d, uint32(mtu), opts)
	fail := func(what string, err tcpip.Error) (*Device, *Net, error) {
		s.Close()
		return nil, nil, fmt.Errorf("fastnet: %s: %v", what, err)
	}
	if err := setTCPOptions(s, opts); err != nil {
		s.Close()
		return nil, nil, err
	}
	if err := s.CreateNIC(nicID, d.ep); err != nil {
		return fail("create NIC", err)
	}
	n := &Net{stack: s}
	for _, a := range addrs {
		var proto tcpip.NetworkProtocolNumber
		switch {
		case a.Is4():
			proto, n.hasV4 = ipv4.ProtocolNumber, true
		case a.Is6():
			proto, n.hasV6 = ipv6.ProtocolNumber, true
		default:
			s.Close()
			return nil, nil, fmt.Errorf("fastnet: invalid address %v", a)
		}
		pa := tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: tcpip.AddrFromSlice(a.AsSlice()).WithPrefix()}
		if err := s.AddProtocolAddress(nicID, pa, stack.AddressProperties{}); err != nil {
			return fail(fmt.Sprintf("add address %v", a), err)
		}
	}
	if n.hasV4 {
		s.AddRoute(tcpip.Route{Destination: header.IPv4EmptySubnet, NIC: nicID})
	}
	if n.hasV6 {
		s.AddRoute(tcpip.Route{Destination: header.IPv6EmptySubnet, NIC: nicID})
	}
	d.events <- tun.EventUp
	return d, n, nil
}

func setTCPOptions(s *stack.Stack, opts Options) error {
	sack := tcpip.TCPSACKEnabled(true)
	moderate := tcpip.TCPModerateReceiveBufferOption(true)
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: tcp.MinBufferSize, Default: opts.TCPSendBuffer, Max: opts.TCPMaxSendBuffer}
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: tcp.MinBufferSize, Default: opts.TCPReceiveBuffer, Max: opts.TCPMaxReceiveBuffer}
	for _, o := range []struct {
		what string
		opt  tcpip.SettableTransportProtocolOption
	}{
		{"TCP SACK", &sack},
		{"TCP receive buffer moderation", &moderate},
		{"TCP send buffer", &snd},
		{"TCP receive buffer", &rcv},
	} {
		if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, o.opt); err != nil {
			return fmt.Errorf("fastnet: %s: %v", o.what, err)
		}
	}
	return nil
}

// Stats returns the device's counters.
func (d *Device) Stats() Stats {
	return Stats{
		QueueDrops:  d.queueDrops.Load(),
		Malformed:   d.malformed.Load(),
		GSOPackets:  d.gsoPackets.Load(),
		GSOSegments: d.gsoSegments.Load(),
		GROPackets:  d.groPackets.Load(),
		GROSegments: d.groSegments.Load(),
	}
}

// File implements tun.Device; there is no file.
func (d *Device) File() *os.File { return nil }

// Name implements tun.Device.
func (d *Device) Name() (string, error) { return "fastnet", nil }

// MTU implements tun.Device.
func (d *Device) MTU() (int, error) { return d.mtu, nil }

// Events implements tun.Device: EventUp once, closed by Close.
func (d *Device) Events() <-chan tun.Event { return d.events }

// BatchSize implements tun.Device.
func (d *Device) BatchSize() int { return BatchSize }

// Close implements tun.Device: it tears the stack down and releases every
// queued packet. Read then returns os.ErrClosed.
func (d *Device) Close() error {
	d.closeOnce.Do(func() {
		d.ep.q.close()
		d.stack.RemoveNIC(nicID)
		d.stack.Close()
		d.ep.q.drain()
		d.readMu.Lock()
		for _, p := range d.pend[d.pendNext:] {
			p.DecRef()
		}
		d.pend, d.pendNext = d.pend[:0], 0
		if d.splitPkt != nil {
			d.splitPkt.DecRef()
			d.splitPkt = nil
		}
		d.readMu.Unlock()
		close(d.events)
	})
	return nil
}

// Read implements tun.Device. It blocks until gVisor has a packet, then
// fills as many of bufs as the queued packets allow without blocking again,
// splitting GSO packets into MTU-sized ones.
func (d *Device) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	d.readMu.Lock()
	defer d.readMu.Unlock()
	n := 0
	var gsoPkts, gsoSegs uint64
	for n < len(bufs) {
		if d.splitPkt != nil {
			for n < len(bufs) && !d.split.done() {
				sz, err := d.split.next(bufs[n][offset:])
				if err != nil {
					d.malformed.Add(1)
					break
				}
				sizes[n] = sz
				n++
				gsoSegs++
			}
			if d.split.done() || n < len(bufs) { // done, or abandoned on error
				d.splitPkt.DecRef()
				d.splitPkt = nil
				d.split.payload = nil
			}
			continue
		}
		if d.pendNext == len(d.pend) {
			d.pend, d.pendNext = d.pend[:0], 0
			d.pend = d.ep.q.pop(d.pend, len(bufs)-n, n == 0)
			if len(d.pend) == 0 {
				if n == 0 {
					return 0, os.ErrClosed
				}
				break
			}
		}
		pkt := d.pend[d.pendNext]
		d.pend[d.pendNext] = nil
		d.pendNext++
		if g := pkt.GSOOptions; (g.Type == stack.GSOTCPv4 || g.Type == stack.GSOTCPv6) && g.NeedsCsum {
			// TCP with only the pseudo-header in its checksum, maybe
			// longer than the MTU: segment it (one segment if it fits).
			if d.startSplit(pkt, int(g.MSS)) {
				if d.split.remaining() > 1 {
					gsoPkts++
				}
				continue
			}
			d.malformed.Add(1)
			pkt.DecRef()
			continue
		}
		if sz, ok := copyPacket(bufs[n][offset:], pkt); ok {
			sizes[n] = sz
			n++
		} else {
			d.malformed.Add(1)
		}
		pkt.DecRef()
	}
	if gsoPkts > 0 {
		d.gsoPackets.Add(gsoPkts)
		d.gsoSegments.Add(gsoSegs)
	}
	return n, nil
}

// startSplit sets the splitter up for pkt, keeping a reference to it.
func (d *Device) startSplit(pkt *stack.PacketBuffer, mss int) bool {
	d.pieces = packetSlices(d.pieces[:0], pkt)
	ipLen := len(pkt.NetworkHeader().Slice())
	hdrLen := ipLen + len(pkt.TransportHeader().Slice())
	var hb [maxIPv4HdrLen + maxTCPHdrLen]byte
	hdr, payload, ok := cutHeader(hb[:0], d.pieces, hdrLen)
	if !ok || d.split.init(hdr, ipLen, payload, mss) != nil {
		return false
	}
	d.splitPkt = pkt
	return true
}

// packetSlices appends the slices making up pkt, headers included.
func packetSlices(dst [][]byte, pkt *stack.PacketBuffer) [][]byte {
	vl, off := pkt.AsViewList()
	for v := vl.Front(); v != nil; v = v.Next() {
		b := v.AsSlice()
		if off >= len(b) {
			off -= len(b)
			continue
		}
		dst = append(dst, b[off:])
		off = 0
	}
	return dst
}

// cutHeader splits the packet made of pieces into its first n bytes
// (appended to hdr) and the pieces after them.
func cutHeader(hdr []byte, pieces [][]byte, n int) ([]byte, [][]byte, bool) {
	for n > 0 && len(pieces) > 0 {
		c := min(n, len(pieces[0]))
		hdr = append(hdr, pieces[0][:c]...)
		n -= c
		if c == len(pieces[0]) {
			pieces = pieces[1:]
		} else {
			pieces[0] = pieces[0][c:]
		}
	}
	return hdr, pieces, n == 0
}

// copyPacket copies pkt (from its network header on) into dst.
func copyPacket(dst []byte, pkt *stack.PacketBuffer) (int, bool) {
	if pkt.Size() > len(dst) {
		return 0, false
	}
	vl, off := pkt.AsViewList()
	n := 0
	for v := vl.Front(); v != nil; v = v.Next() {
		b := v.AsSlice()
		if off >= len(b) {
			off -= len(b)
			continue
		}
		n += copy(dst[n:], b[off:])
		off = 0
	}
	return n, true
}

// Write implements tun.Device: it injects the packets into gVisor,
// coalescing TCP segments (see gro.go).
func (d *Device) Write(bufs [][]byte, offset int) (int, error) {
	disp := d.ep.dispatcher()
	if disp == nil {
		return 0, os.ErrClosed
	}
	if d.opts.DisableGRO || len(bufs) < 2 {
		for _, b := range bufs {
			d.inject(disp, b[offset:])
		}
		return len(bufs), nil
	}
	c, _ := d.groPool.Get().(*coalescer)
	if c == nil {
		c = new(coalescer)
	}
	pkts := c.pkts[:0]
	for _, b := range bufs {
		pkts = append(pkts, b[offset:])
	}
	c.pkts = pkts
	c.run(pkts)
	var groPkts, groSegs uint64
	for i := range c.items {
		it := &c.items[i]
		if it.n == 1 {
			d.inject(disp, pkts[it.first])
			continue
		}
		groPkts++
		groSegs += uint64(it.n)
		ipLen := c.info[it.first].ipLen
		v := buffer.NewView(c.size(it, pkts) - ipLen)
		v.Write(it.hdr[ipLen:])
		for m := it.first; m >= 0; m = c.info[m].next {
			v.Write(pkts[m][c.info[m].hdrLen:])
		}
		d.deliver(disp, buffer.NewViewWithData(it.hdr[:ipLen]), v)
	}
	clear(c.pkts)
	d.groPool.Put(c)
	if groPkts > 0 {
		d.groPackets.Add(groPkts)
		d.groSegments.Add(groSegs)
	}
	return len(bufs), nil
}

// inject hands one packet to gVisor as it is (gVisor verifies it).
func (d *Device) inject(disp stack.NetworkDispatcher, p []byte) {
	if len(p) == 0 {
		return
	}
	if len(p) < splitViewMin {
		d.deliver(disp, nil, buffer.NewViewWithData(p))
		return
	}
	hl := 40
	if p[0]>>4 == 4 {
		hl = int(p[0]&0xf) * 4
	}
	if hl < 20 || hl >= len(p) {
		d.deliver(disp, nil, buffer.NewViewWithData(p))
		return
	}
	d.deliver(disp, buffer.NewViewWithData(p[:hl]), buffer.NewViewWithData(p[hl:]))
}

// splitViewMin is the packet size from which the IP header is given its own
// buffer view. gVisor's IPv4 and IPv6 receive paths take a reference to the
// network header's view and then pull it up again, which copies the whole
// shared chunk: with the header alone in its chunk, that copy is 64 bytes
// instead of the packet.
const splitViewMin = 256

// deliver injects the packet made of hdr (may be nil) and rest, taking
// ownership of both views.
func (d *Device) deliver(disp stack.NetworkDispatcher, hdr, rest *buffer.View) {
	first := rest
	if hdr != nil {
		first = hdr
	}
	var proto tcpip.NetworkProtocolNumber
	switch first.AsSlice()[0] >> 4 {
	case 4:
		proto = header.IPv4ProtocolNumber
	case 6:
		proto = header.IPv6ProtocolNumber
	default:
		d.malformed.Add(1)
		if hdr != nil {
			hdr.Release()
		}
		rest.Release()
		return
	}
	payload := buffer.MakeWithView(rest)
	if hdr != nil {
		// Prepend keeps hdr a view of its own (rest starts at its chunk's
		// beginning, so nothing is copied into it).
		payload.Prepend(hdr)
	}
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: payload})
	disp.DeliverNetworkPacket(proto, pkt)
	pkt.DecRef()
}
