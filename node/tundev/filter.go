package tundev

import (
	"encoding/binary"
	"errors"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/tun"
)

// Policy says what inbound traffic from the mesh may reach the host.
//
// AllowTCP reports whether a peer may open a TCP connection to dstPort on
// the host. It is called for every inbound segment that is not a reply in a
// connection the host opened, from several goroutines at once (wireguard-go
// writes each peer's packets from that peer's own goroutine), so it must be
// safe for concurrent use and cheap.
type Policy interface {
	AllowTCP(dstPort uint16) bool
}

// PolicyFunc adapts a function to a Policy.
type PolicyFunc func(dstPort uint16) bool

// AllowTCP calls f(dstPort).
func (f PolicyFunc) AllowTCP(dstPort uint16) bool { return f(dstPort) }

// AllowTCPPorts returns a Policy that lets peers connect to exactly the
// given TCP ports. With no ports it allows none (the host is then reachable
// only through connections it opens itself).
func AllowTCPPorts(ports ...uint16) Policy {
	s := new(portSet)
	for _, p := range ports {
		s[p/64] |= 1 << (p % 64)
	}
	return s
}

type portSet [65536 / 64]uint64

func (s *portSet) AllowTCP(p uint16) bool { return s[p/64]&(1<<(p%64)) != 0 }

const (
	// FlowTableSize is the most outbound UDP flows a Filter remembers; past
	// it, the least recently used flow is forgotten.
	FlowTableSize = 65536
	// FlowIdleTimeout is how long an outbound UDP flow stays open to replies
	// after its last packet in either direction.
	FlowIdleTimeout = 2 * time.Minute
)

// Filter is an inbound packet filter for TUN mode. It wraps the tun.Device
// that wireguard-go reads from and writes to, and is itself a tun.Device.
//
// In netstack mode only the agent's own listeners are reachable from the
// mesh; in TUN mode every socket on the host bound to 0.0.0.0 or :: would
// be. The Filter restores the netstack's exposure:
//
//   - Read (packets the host sends into the mesh) passes everything and
//     remembers outbound UDP flows.
//   - Write (packets from peers for the host) lets through TCP to a port the
//     Policy allows; TCP segments that are not a bare SYN (SYN without ACK),
//     i.e. segments of connections the host opened (a stray one to a closed
//     port only earns a RST from the kernel); UDP that answers a remembered
//     outbound flow (same addresses and ports, reversed; idle timeout
//     FlowIdleTimeout, at most FlowTableSize flows); ICMP and ICMPv6 echo
//     requests and replies and the ICMP errors (destination unreachable,
//     packet too big, time exceeded, parameter problem). Everything else is
//     dropped: other protocols and ICMP types (NDP and MLD included: the
//     link is point-to-point), IPv6 packets with an extension header before
//     the transport header, IPv4 fragments other than the first, and
//     packets whose IP or transport header is truncated or inconsistent.
//
// A Filter is safe for wireguard-go's concurrent use: one reader and any
// number of writers. Its hot path takes no allocation.
type Filter struct {
	dev    tun.Device
	policy Policy

	allowed atomic.Uint64
	dropped atomic.Uint64

	flows flowTable
}

// NewFilter wraps dev. A nil Policy allows no new inbound TCP connection.
func NewFilter(dev tun.Device, p Policy) *Filter {
	if p == nil {
		p = AllowTCPPorts()
	}
	f := &Filter{dev: dev, policy: p}
	f.flows.init(FlowTableSize, FlowIdleTimeout, time.Now)
	return f
}

var _ tun.Device = (*Filter)(nil)

// Stats returns how many inbound packets (from peers to the host) the
// filter has let through and dropped.
func (f *Filter) Stats() (allowed, dropped uint64) {
	return f.allowed.Load(), f.dropped.Load()
}

// File returns the wrapped device's file.
func (f *Filter) File() *os.File { return f.dev.File() }

// MTU returns the wrapped device's MTU.
func (f *Filter) MTU() (int, error) { return f.dev.MTU() }

// Name returns the wrapped device's name.
func (f *Filter) Name() (string, error) { return f.dev.Name() }

// Events returns the wrapped device's events.
func (f *Filter) Events() <-chan tun.Event { return f.dev.Events() }

// Close closes the wrapped device.
func (f *Filter) Close() error { return f.dev.Close() }

// BatchSize returns the wrapped device's batch size.
func (f *Filter) BatchSize() int { return f.dev.BatchSize() }

// Read reads packets the host sends into the mesh. It passes all of them
// and remembers their UDP flows.
func (f *Filter) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	n, err := f.dev.Read(bufs, sizes, offset)
	var clk lazyNow
	for i := 0; i < n && i < len(bufs) && i < len(sizes); i++ {
		end := offset + sizes[i]
		if sizes[i] <= 0 || offset < 0 || end > len(bufs[i]) {
			continue
		}
		f.noteOutbound(bufs[i][offset:end], &clk)
	}
	return n, err
}

var errBadOffset = errors.New("tundev: negative write offset")

// Write writes the packets from peers that the filter allows to the
// wrapped device, and drops the rest.
//
// Allowed packets are moved to the front of bufs, in their original order,
// and only they are handed to the wrapped device; bufs stays a permutation
// of what the caller passed (no buffer is lost or duplicated). The result
// is the wrapped device's: the count it returns for the allowed packets
// (the tun.Device contract says packets; Linux's NativeTun in fact returns
// bytes, and wireguard-go ignores the count), and its error. When every
// packet is dropped the wrapped device is not called and Write returns
// 0, nil: dropping is not a failure, and wireguard-go only logs a non-nil
// error.
func (f *Filter) Write(bufs [][]byte, offset int) (int, error) {
	if len(bufs) == 0 {
		return 0, nil
	}
	if offset < 0 {
		return 0, errBadOffset
	}
	var clk lazyNow
	kept := 0
	for i := range bufs {
		if offset > len(bufs[i]) || !f.allowInbound(bufs[i][offset:], &clk) {
			continue
		}
		bufs[kept], bufs[i] = bufs[i], bufs[kept]
		kept++
	}
	if kept > 0 {
		f.allowed.Add(uint64(kept))
	}
	if d := len(bufs) - kept; d > 0 {
		f.dropped.Add(uint64(d))
	}
	if kept == 0 {
		return 0, nil
	}
	return f.dev.Write(bufs[:kept], offset)
}

// IP protocol numbers and ICMP types the filter knows.
const (
	protoICMP   = 1
	protoTCP    = 6
	protoUDP    = 17
	protoICMPv6 = 58

	ipv6HopByHop = 0
	ipv6Routing  = 43
	ipv6Fragment = 44
	ipv6DestOpts = 60

	tcpFlagSYN = 0x02
	tcpFlagACK = 0x10
)

// l4 is the transport part of a parsed packet. src and dst alias the
// packet; nothing is copied.
type l4 struct {
	v6       bool
	proto    uint8
	src, dst []byte
	hdr      []byte // transport header and payload
}

// parseIP finds the transport header of an IPv4 or IPv6 packet. It fails
// on anything malformed or truncated, on IPv4 non-first fragments and, when
// walkExt is false, on IPv6 extension headers. With walkExt it skips the
// common IPv6 extension headers (used for outbound packets only, which the
// host's own kernel built).
func parseIP(p []byte, walkExt bool) (l4, bool) {
	if len(p) == 0 {
		return l4{}, false
	}
	switch p[0] >> 4 {
	case 4:
		if len(p) < 20 {
			return l4{}, false
		}
		ihl := int(p[0]&0x0f) * 4
		total := int(binary.BigEndian.Uint16(p[2:4]))
		if ihl < 20 || total < ihl || total > len(p) {
			return l4{}, false
		}
		if binary.BigEndian.Uint16(p[6:8])&0x1fff != 0 {
			return l4{}, false // not the first fragment: no transport header
		}
		return l4{proto: p[9], src: p[12:16], dst: p[16:20], hdr: p[ihl:total]}, true
	case 6:
		if len(p) < 40 {
			return l4{}, false
		}
		end := 40 + int(binary.BigEndian.Uint16(p[4:6]))
		if end > len(p) {
			return l4{}, false
		}
		nh, rest := p[6], p[40:end]
		for hops := 0; walkExt && hops < 8; hops++ {
			if nh == ipv6Fragment {
				if len(rest) < 8 || binary.BigEndian.Uint16(rest[2:4])&0xfff8 != 0 {
					return l4{}, false // not the first fragment
				}
				nh, rest = rest[0], rest[8:]
			} else if nh == ipv6HopByHop || nh == ipv6Routing || nh == ipv6DestOpts {
				if len(rest) < 8 || (int(rest[1])+1)*8 > len(rest) {
					return l4{}, false
				}
				nh, rest = rest[0], rest[(int(rest[1])+1)*8:]
			} else {
				break
			}
		}
		return l4{v6: true, proto: nh, src: p[8:24], dst: p[24:40], hdr: rest}, true
	}
	return l4{}, false
}

// udpPorts returns the ports of a well-formed UDP header.
func udpPorts(h []byte) (sport, dport uint16, ok bool) {
	if len(h) < 8 {
		return 0, 0, false
	}
	if n := int(binary.BigEndian.Uint16(h[4:6])); n < 8 || n > len(h) {
		return 0, 0, false
	}
	return binary.BigEndian.Uint16(h[0:2]), binary.BigEndian.Uint16(h[2:4]), true
}

func (f *Filter) allowInbound(p []byte, clk *lazyNow) bool {
	pk, ok := parseIP(p, false)
	if !ok {
		return false
	}
	h := pk.hdr
	switch pk.proto {
	case protoTCP:
		if len(h) < 20 {
			return false
		}
		if off := int(h[12]>>4) * 4; off < 20 || off > len(h) {
			return false
		}
		if f.policy.AllowTCP(binary.BigEndian.Uint16(h[2:4])) {
			return true
		}
		// Not a listener we expose: only segments of connections the host
		// opened. A bare SYN would open a new one.
		flags := h[13]
		return flags&tcpFlagSYN == 0 || flags&tcpFlagACK != 0
	case protoUDP:
		sport, dport, ok := udpPorts(h)
		if !ok {
			return false
		}
		// The reply to an outbound flow local:lport → remote:rport comes
		// from remote:rport to local:lport.
		return f.flows.hit(makeKey(pk.v6, pk.dst, pk.src, dport, sport), clk.get(&f.flows))
	case protoICMP:
		if pk.v6 || len(h) < 8 {
			return false
		}
		switch h[0] {
		case 0, 8, // echo reply, echo request
			3, 11, 12: // destination unreachable, time exceeded, parameter problem
			return true
		}
		return false
	case protoICMPv6:
		if !pk.v6 || len(h) < 8 {
			return false
		}
		switch h[0] {
		case 128, 129, // echo request, echo reply
			1, 2, 3, 4: // destination unreachable, packet too big, time exceeded, parameter problem
			return true
		}
		return false
	}
	return false
}

func (f *Filter) noteOutbound(p []byte, clk *lazyNow) {
	pk, ok := parseIP(p, true)
	if !ok || pk.proto != protoUDP {
		return
	}
	sport, dport, ok := udpPorts(pk.hdr)
	if !ok {
		return
	}
	f.flows.touch(makeKey(pk.v6, pk.src, pk.dst, sport, dport), clk.get(&f.flows))
}

// flowKey is an outbound UDP flow seen from the host: local → remote.
// IPv4 addresses use the first 4 bytes of the arrays.
type flowKey struct {
	local, remote [16]byte
	lport, rport  uint16
	v6            bool
}

func makeKey(v6 bool, local, remote []byte, lport, rport uint16) flowKey {
	k := flowKey{lport: lport, rport: rport, v6: v6}
	copy(k.local[:], local)
	copy(k.remote[:], remote)
	return k
}

// lazyNow reads the table's clock at most once per batch, and only when a
// packet needs it.
type lazyNow struct {
	t  time.Duration
	ok bool
}

func (l *lazyNow) get(t *flowTable) time.Duration {
	if !l.ok {
		l.t, l.ok = t.clock().Sub(t.epoch), true
	}
	return l.t
}

// flowTable is a bounded LRU set of flows with an idle timeout. Entries
// live in one slice (grown on demand up to max, then reused) linked into a
// recency list by index, so a lookup or refresh allocates nothing.
type flowTable struct {
	mu      sync.Mutex
	index   map[flowKey]int32
	entries []flowEntry
	head    int32 // most recently used, or -1
	tail    int32 // least recently used, or -1
	free    int32 // free list through next, or -1
	max     int
	idle    time.Duration
	clock   func() time.Time
	epoch   time.Time
}

type flowEntry struct {
	key        flowKey
	seen       time.Duration // since epoch
	prev, next int32
}

func (t *flowTable) init(max int, idle time.Duration, clock func() time.Time) {
	t.index = make(map[flowKey]int32)
	t.entries = nil
	t.head, t.tail, t.free = -1, -1, -1
	t.max, t.idle, t.clock = max, idle, clock
	t.epoch = clock()
}

// touch records outbound traffic on k at now.
func (t *flowTable) touch(k flowKey, now time.Duration) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if i, ok := t.index[k]; ok {
		t.entries[i].seen = now
		t.moveToFront(i)
		return
	}
	// Forget flows that have expired anyway (the oldest are at the tail),
	// then, if still full, the least recently used one.
	for t.tail >= 0 && now-t.entries[t.tail].seen > t.idle {
		t.remove(t.tail)
	}
	if len(t.index) >= t.max {
		t.remove(t.tail)
	}
	var i int32
	if t.free >= 0 {
		i = t.free
		t.free = t.entries[i].next
	} else {
		t.entries = append(t.entries, flowEntry{})
		i = int32(len(t.entries) - 1)
	}
	t.entries[i] = flowEntry{key: k, seen: now, prev: -1, next: -1}
	t.index[k] = i
	t.pushFront(i)
}

// hit reports whether k is a live flow at now and, if so, refreshes it.
func (t *flowTable) hit(k flowKey, now time.Duration) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	i, ok := t.index[k]
	if !ok {
		return false
	}
	if now-t.entries[i].seen > t.idle {
		t.remove(i)
		return false
	}
	if now > t.entries[i].seen {
		t.entries[i].seen = now
	}
	t.moveToFront(i)
	return true
}

func (t *flowTable) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.index)
}

func (t *flowTable) unlink(i int32) {
	e := &t.entries[i]
	if e.prev >= 0 {
		t.entries[e.prev].next = e.next
	} else {
		t.head = e.next
	}
	if e.next >= 0 {
		t.entries[e.next].prev = e.prev
	} else {
		t.tail = e.prev
	}
	e.prev, e.next = -1, -1
}

func (t *flowTable) pushFront(i int32) {
	e := &t.entries[i]
	e.prev, e.next = -1, t.head
	if t.head >= 0 {
		t.entries[t.head].prev = i
	}
	t.head = i
	if t.tail < 0 {
		t.tail = i
	}
}

func (t *flowTable) moveToFront(i int32) {
	if t.head == i {
		return
	}
	t.unlink(i)
	t.pushFront(i)
}

func (t *flowTable) remove(i int32) {
	t.unlink(i)
	delete(t.index, t.entries[i].key)
	t.entries[i] = flowEntry{prev: -1, next: t.free}
	t.free = i
}
