package tundev

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/tun/tuntest"
)

// wgOffset is the offset wireguard-go writes packets at
// (device.MessageTransportOffsetContent).
const wgOffset = 16

// fakeDev is an in-memory tun.Device: Read hands out queued packets, Write
// records copies of what it is given.
type fakeDev struct {
	mu       sync.Mutex
	toRead   [][]byte
	written  [][]byte
	batches  []int // len(bufs) of each Write call
	writeErr error
	discard  bool // don't record (for the allocation test)
	events   chan tun.Event
}

func newFakeDev() *fakeDev { return &fakeDev{events: make(chan tun.Event)} }

func (d *fakeDev) File() *os.File           { return nil }
func (d *fakeDev) MTU() (int, error)        { return DefaultMTU, nil }
func (d *fakeDev) Name() (string, error)    { return "fake0", nil }
func (d *fakeDev) Events() <-chan tun.Event { return d.events }
func (d *fakeDev) Close() error             { return nil }
func (d *fakeDev) BatchSize() int           { return 128 }

func (d *fakeDev) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	n := 0
	for n < len(bufs) && len(d.toRead) > 0 {
		sizes[n] = copy(bufs[n][offset:], d.toRead[0])
		d.toRead = d.toRead[1:]
		n++
	}
	return n, nil
}

func (d *fakeDev) Write(bufs [][]byte, offset int) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.discard {
		return len(bufs), d.writeErr
	}
	d.batches = append(d.batches, len(bufs))
	for _, b := range bufs {
		d.written = append(d.written, append([]byte(nil), b[offset:]...))
	}
	return len(bufs), d.writeErr
}

func (d *fakeDev) queue(pkts ...[]byte) {
	d.mu.Lock()
	d.toRead = append(d.toRead, pkts...)
	d.mu.Unlock()
}

func (d *fakeDev) nWritten() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.written)
}

// atOffset returns a wireguard-go style buffer: wgOffset bytes of headroom,
// then p.
func atOffset(p []byte) []byte { return append(make([]byte, wgOffset), p...) }

// passes writes p alone through f and reports whether it reached the device.
func passes(t *testing.T, f *Filter, d *fakeDev, p []byte) bool {
	t.Helper()
	before := d.nWritten()
	if _, err := f.Write([][]byte{atOffset(p)}, wgOffset); err != nil {
		t.Fatalf("Write: %v", err)
	}
	switch d.nWritten() - before {
	case 0:
		return false
	case 1:
		if got := d.written[len(d.written)-1]; !bytes.Equal(got, p) {
			t.Fatalf("packet changed on the way through:\n got %x\nwant %x", got, p)
		}
		return true
	default:
		t.Fatal("one packet in, several out")
		return false
	}
}

// readOut passes outbound packets (host → mesh) through f.Read.
func readOut(t *testing.T, f *Filter, d *fakeDev, pkts ...[]byte) {
	t.Helper()
	d.queue(pkts...)
	bufs := make([][]byte, 8)
	sizes := make([]int, len(bufs))
	for i := range bufs {
		bufs[i] = make([]byte, wgOffset+2000)
	}
	for got := 0; got < len(pkts); {
		n, err := f.Read(bufs, sizes, wgOffset)
		if err != nil {
			t.Fatalf("Read: %v", err)
		}
		for i := 0; i < n; i++ {
			if !bytes.Equal(bufs[i][wgOffset:wgOffset+sizes[i]], pkts[got+i]) {
				t.Fatalf("Read changed packet %d", got+i)
			}
		}
		got += n
	}
}

type family struct {
	name          string
	local, remote string // host's overlay address, a peer's
	other         string // another peer
}

var families = []family{
	{"IPv4", "198.18.5.5", "198.18.9.9", "198.18.7.7"},
	{"IPv6", "fd00:6440::5", "fd00:6440::9", "fd00:6440::7"},
}

func TestFilterTCP(t *testing.T) {
	for _, fam := range families {
		t.Run(fam.name, func(t *testing.T) {
			d := newFakeDev()
			f := NewFilter(d, AllowTCPPorts(22, 8080))
			in := func(dport uint16, flags uint8) []byte {
				return tcpPkt(fam.remote, fam.local, 40000, dport, flags)
			}
			cases := []struct {
				name  string
				p     []byte
				allow bool
			}{
				{"SYN to allowed port", in(8080, synOnly), true},
				{"SYN to other allowed port", in(22, synOnly), true},
				{"ACK to allowed port", in(8080, ackOnly), true},
				{"SYN to closed port", in(9090, synOnly), false},
				{"SYN+FIN to closed port", in(9090, synOnly|0x01), false},
				{"SYN+RST to closed port", in(9090, synOnly|rstOnly), false},
				{"SYN-ACK (reply to host's connect)", in(50000, synAck), true},
				{"ACK (reply)", in(50000, ackOnly), true},
				{"PSH-ACK (reply data)", in(50000, pshAck), true},
				{"FIN-ACK (reply)", in(50000, finAck), true},
				{"RST (reply)", in(50000, rstOnly), true},
				{"no flags (stray, kernel RSTs)", in(9090, 0), true},
			}
			for _, c := range cases {
				if got := passes(t, f, d, c.p); got != c.allow {
					t.Errorf("%s: passed=%v, want %v", c.name, got, c.allow)
				}
			}
		})
	}
}

func TestFilterNilPolicyAllowsNoListener(t *testing.T) {
	d := newFakeDev()
	f := NewFilter(d, nil)
	for _, port := range []uint16{0, 22, 80, 443, 65535} {
		if passes(t, f, d, tcpPkt("198.18.9.9", "198.18.5.5", 1, port, synOnly)) {
			t.Errorf("SYN to %d passed with nil policy", port)
		}
	}
	if !passes(t, f, d, tcpPkt("198.18.9.9", "198.18.5.5", 80, 40000, synAck)) {
		t.Error("SYN-ACK dropped with nil policy")
	}
}

func TestPolicies(t *testing.T) {
	p := AllowTCPPorts(0, 22, 443, 65535)
	for port, want := range map[uint16]bool{0: true, 22: true, 443: true, 65535: true, 1: false, 23: false, 444: false, 65534: false, 8080: false} {
		if got := p.AllowTCP(port); got != want {
			t.Errorf("AllowTCPPorts: AllowTCP(%d)=%v, want %v", port, got, want)
		}
	}
	var f Policy = PolicyFunc(func(port uint16) bool { return port >= 1024 })
	if f.AllowTCP(80) || !f.AllowTCP(8080) {
		t.Error("PolicyFunc does not call the function")
	}
}

func TestFilterUDPFlows(t *testing.T) {
	for _, fam := range families {
		t.Run(fam.name, func(t *testing.T) {
			d := newFakeDev()
			f := NewFilter(d, AllowTCPPorts(53)) // TCP policy must not open UDP
			reply := func(src string, sport, dport uint16) []byte {
				return udpPkt(src, fam.local, sport, dport, "answer")
			}
			if passes(t, f, d, reply(fam.remote, 53, 5000)) {
				t.Fatal("unsolicited UDP passed")
			}
			readOut(t, f, d, udpPkt(fam.local, fam.remote, 5000, 53, "query"))
			for _, c := range []struct {
				name  string
				p     []byte
				allow bool
			}{
				{"reply", reply(fam.remote, 53, 5000), true},
				{"second reply", reply(fam.remote, 53, 5000), true},
				{"from another port", reply(fam.remote, 54, 5000), false},
				{"to another port", reply(fam.remote, 53, 5001), false},
				{"from another peer", reply(fam.other, 53, 5000), false},
				{"to another local address", udpPkt(fam.remote, fam.other, 53, 5000, "x"), false},
			} {
				if got := passes(t, f, d, c.p); got != c.allow {
					t.Errorf("%s: passed=%v, want %v", c.name, got, c.allow)
				}
			}
		})
	}
	// A flow of one family does not open the other.
	d := newFakeDev()
	f := NewFilter(d, nil)
	readOut(t, f, d, udpPkt("198.18.5.5", "198.18.9.9", 5000, 53, "q"))
	if passes(t, f, d, udpPkt("::ffff:198.18.9.9", "::ffff:198.18.5.5", 53, 5000, "a")) {
		t.Error("an IPv4 flow let an IPv6 (v4-mapped) reply through")
	}
}

func TestFilterUDPOutboundFragmentsAndExtensions(t *testing.T) {
	d := newFakeDev()
	f := NewFilter(d, nil)
	// The kernel fragments a big datagram: the first fragment (MF set,
	// offset 0) carries the UDP header and opens the flow; a later one
	// carries none and records nothing.
	readOut(t, f, d,
		withIPv4Frag(udpPkt("198.18.5.5", "198.18.9.9", 5000, 53, "q"), 0, true),
		withIPv4Frag(udpPkt("198.18.5.5", "198.18.9.9", 6000, 53, "q"), 100, false))
	if !passes(t, f, d, udpPkt("198.18.9.9", "198.18.5.5", 53, 5000, "a")) {
		t.Error("first outbound IPv4 fragment did not open the flow")
	}
	if passes(t, f, d, udpPkt("198.18.9.9", "198.18.5.5", 53, 6000, "a")) {
		t.Error("non-first outbound IPv4 fragment opened a flow")
	}
	// Outbound IPv6 with extension headers (the host's own kernel built
	// them) still opens the flow; the reply has none.
	for i, ext := range []uint8{ipv6HopByHop, ipv6DestOpts, ipv6Routing, ipv6Fragment} {
		sport := uint16(7000 + i)
		readOut(t, f, d, withIPv6Ext(udpPkt("fd00:6440::5", "fd00:6440::9", sport, 53, "q"), ext))
		if !passes(t, f, d, udpPkt("fd00:6440::9", "fd00:6440::5", 53, sport, "a")) {
			t.Errorf("outbound UDP behind IPv6 extension header %d did not open the flow", ext)
		}
	}
	if n := f.flows.len(); n != 5 {
		t.Errorf("flow table has %d flows, want 5", n)
	}
}

func TestFilterICMP(t *testing.T) {
	d := newFakeDev()
	f := NewFilter(d, nil)
	type c struct {
		typ   uint8
		allow bool
	}
	v4 := []c{{0, true}, {8, true}, {3, true}, {11, true}, {12, true},
		{5, false} /* redirect */, {9, false}, {10, false}, {13, false}, {14, false}, {4, false}, {42, false}}
	v6 := []c{{128, true}, {129, true}, {1, true}, {2, true}, {3, true}, {4, true},
		{133, false}, {134, false}, {135, false}, {136, false}, {137, false}, // NDP
		{130, false}, {131, false}, {143, false}, {0, false}, {8, false}, {200, false}}
	for _, x := range v4 {
		if got := passes(t, f, d, icmpPkt("198.18.9.9", "198.18.5.5", x.typ)); got != x.allow {
			t.Errorf("ICMP type %d: passed=%v, want %v", x.typ, got, x.allow)
		}
	}
	for _, x := range v6 {
		if got := passes(t, f, d, icmpPkt("fd00:6440::9", "fd00:6440::5", x.typ)); got != x.allow {
			t.Errorf("ICMPv6 type %d: passed=%v, want %v", x.typ, got, x.allow)
		}
	}
	// ICMPv6 over IPv4 and ICMP over IPv6 make no sense.
	if passes(t, f, d, ipPacket(addr("198.18.9.9"), addr("198.18.5.5"), protoICMPv6, icmpHdr(128, 0, 1, 1, nil))) {
		t.Error("ICMPv6 in IPv4 passed")
	}
	if passes(t, f, d, ipPacket(addr("fd00:6440::9"), addr("fd00:6440::5"), protoICMP, icmpHdr(8, 0, 1, 1, nil))) {
		t.Error("ICMP in IPv6 passed")
	}
}

func TestFilterDropsEverythingElse(t *testing.T) {
	d := newFakeDev()
	f := NewFilter(d, AllowTCPPorts(8080))
	syn4 := tcpPkt("198.18.9.9", "198.18.5.5", 40000, 8080, synOnly)
	syn6 := tcpPkt("fd00:6440::9", "fd00:6440::5", 40000, 8080, synOnly)
	if !passes(t, f, d, syn4) || !passes(t, f, d, syn6) {
		t.Fatal("baseline SYNs to an allowed port dropped")
	}
	// Open a UDP flow so that a UDP packet hiding behind something
	// would be allowed if the filter looked past it.
	readOut(t, f, d, udpPkt("fd00:6440::5", "fd00:6440::9", 5000, 53, "q"))

	badVersion := append([]byte(nil), syn4...)
	badVersion[0] = 5<<4 | 5
	drop := map[string][]byte{
		"empty":                      {},
		"IP version 5":               badVersion,
		"IP version 0":               make([]byte, 40),
		"GRE":                        ipPacket(addr("198.18.9.9"), addr("198.18.5.5"), 47, make([]byte, 8)),
		"ESP":                        ipPacket(addr("198.18.9.9"), addr("198.18.5.5"), 50, make([]byte, 16)),
		"SCTP over IPv6":             ipPacket(addr("fd00:6440::9"), addr("fd00:6440::5"), 132, make([]byte, 16)),
		"IPv6 no next header":        ipPacket(addr("fd00:6440::9"), addr("fd00:6440::5"), 59, nil),
		"IPv4 non-first fragment":    withIPv4Frag(syn4, 1, false),
		"IPv4 last fragment":         withIPv4Frag(syn4, 100, false),
		"IPv4 middle fragment":       withIPv4Frag(syn4, 100, true),
		"IPv6 hop-by-hop then TCP":   withIPv6Ext(syn6, ipv6HopByHop),
		"IPv6 dest-opts then TCP":    withIPv6Ext(syn6, ipv6DestOpts),
		"IPv6 routing then TCP":      withIPv6Ext(syn6, ipv6Routing),
		"IPv6 fragment then TCP":     withIPv6Ext(syn6, ipv6Fragment),
		"IPv6 hop-by-hop then UDP":   withIPv6Ext(udpPkt("fd00:6440::9", "fd00:6440::5", 53, 5000, "a"), ipv6HopByHop),
		"IPv6 fragment then UDP":     withIPv6Ext(udpPkt("fd00:6440::9", "fd00:6440::5", 53, 5000, "a"), ipv6Fragment),
		"IPv6 fragment then ICMPv6":  withIPv6Ext(icmpPkt("fd00:6440::9", "fd00:6440::5", 128), ipv6Fragment),
		"IPv6 hop-by-hop then MLDv2": withIPv6Ext(icmpPkt("fd00:6440::9", "ff02::16", 143), ipv6HopByHop),
	}
	for name, p := range drop {
		if passes(t, f, d, p) {
			t.Errorf("%s: passed", name)
		}
	}
	// The first fragment carries the header and is judged by it.
	if !passes(t, f, d, withIPv4Frag(syn4, 0, true)) {
		t.Error("IPv4 first fragment to an allowed port dropped")
	}
	if passes(t, f, d, withIPv4Frag(tcpPkt("198.18.9.9", "198.18.5.5", 40000, 9090, synOnly), 0, true)) {
		t.Error("IPv4 first fragment with a SYN to a closed port passed")
	}
}

func TestFilterMalformed(t *testing.T) {
	d := newFakeDev()
	f := NewFilter(d, AllowTCPPorts(8080))
	readOut(t, f, d,
		udpPkt("198.18.5.5", "198.18.9.9", 5000, 53, "q"),
		udpPkt("fd00:6440::5", "fd00:6440::9", 5000, 53, "q"))

	good := map[string][]byte{
		"tcp4":   tcpPkt("198.18.9.9", "198.18.5.5", 40000, 8080, synOnly),
		"tcp6":   tcpPkt("fd00:6440::9", "fd00:6440::5", 40000, 8080, synOnly),
		"udp4":   udpPkt("198.18.9.9", "198.18.5.5", 53, 5000, "a"),
		"udp6":   udpPkt("fd00:6440::9", "fd00:6440::5", 53, 5000, "a"),
		"icmp4":  icmpPkt("198.18.9.9", "198.18.5.5", 8),
		"icmp6":  icmpPkt("fd00:6440::9", "fd00:6440::5", 128),
		"reply4": tcpPkt("198.18.9.9", "198.18.5.5", 80, 40000, synAck),
	}
	for name, p := range good {
		if !passes(t, f, d, p) {
			t.Fatalf("%s: well-formed packet dropped", name)
		}
		// Every truncation is dropped: the IP length no longer fits.
		for n := 0; n < len(p); n++ {
			if passes(t, f, d, p[:n]) {
				t.Errorf("%s truncated to %d of %d bytes: passed", name, n, len(p))
			}
		}
		// Bytes after the IP length (padding) do no harm.
		if !passes(t, f, d, append(append([]byte(nil), p...), 0, 0, 0, 0)) {
			t.Errorf("%s with trailing padding: dropped", name)
		}
	}

	// Headers that are consistent in length but malformed inside.
	mut := func(p []byte, fn func(q []byte)) []byte {
		q := append([]byte(nil), p...)
		fn(q)
		return q
	}
	shrinkL4 := func(p []byte, l4len int) []byte {
		// keep only l4len bytes of transport header, fixing IP lengths
		hl := 40
		if p[0]>>4 == 4 {
			hl = int(p[0]&0xf) * 4
		}
		q := append([]byte(nil), p[:hl+l4len]...)
		if q[0]>>4 == 4 {
			binary.BigEndian.PutUint16(q[2:], uint16(len(q)))
		} else {
			binary.BigEndian.PutUint16(q[4:], uint16(l4len))
		}
		return q
	}
	bad := map[string][]byte{
		"IPv4 IHL 4":              mut(good["tcp4"], func(q []byte) { q[0] = 4<<4 | 4 }),
		"IPv4 IHL past the end":   mut(good["tcp4"], func(q []byte) { q[0] = 4<<4 | 15 }),
		"IPv4 total length < IHL": mut(good["tcp4"], func(q []byte) { binary.BigEndian.PutUint16(q[2:], 16) }),
		"IPv4 total length > buf": mut(good["tcp4"], func(q []byte) { binary.BigEndian.PutUint16(q[2:], uint16(len(q)+1)) }),
		"IPv6 payload > buf":      mut(good["tcp6"], func(q []byte) { binary.BigEndian.PutUint16(q[4:], uint16(len(q))) }),
		"TCP header 19 bytes (4)": shrinkL4(good["tcp4"], 19),
		"TCP header 13 bytes (6)": shrinkL4(good["tcp6"], 13),
		"TCP data offset 4":       mut(good["tcp4"], func(q []byte) { q[20+12] = 4 << 4 }),
		"TCP data offset too big": mut(good["tcp6"], func(q []byte) { q[40+12] = 6 << 4 }),
		"UDP header 7 bytes":      shrinkL4(good["udp4"], 7),
		"UDP length 7":            mut(good["udp6"], func(q []byte) { binary.BigEndian.PutUint16(q[40+4:], 7) }),
		"UDP length > IP payload": mut(good["udp4"], func(q []byte) { binary.BigEndian.PutUint16(q[20+4:], 100) }),
		"ICMP header 7 bytes":     shrinkL4(good["icmp4"], 7),
		"ICMPv6 header 4 bytes":   shrinkL4(good["icmp6"], 4),
	}
	for name, p := range bad {
		if passes(t, f, d, p) {
			t.Errorf("%s: passed", name)
		}
	}
	// A write offset past a buffer's end drops that packet, no panic.
	n, err := f.Write([][]byte{make([]byte, 4)}, wgOffset)
	if n != 0 || err != nil {
		t.Errorf("short buffer: Write = %d, %v; want 0, nil", n, err)
	}
	if _, err := f.Write([][]byte{atOffset(good["tcp4"])}, -1); err == nil {
		t.Error("negative offset: no error")
	}
}

func TestFilterBatch(t *testing.T) {
	d := newFakeDev()
	f := NewFilter(d, AllowTCPPorts(8080))
	a := tcpPkt("198.18.9.9", "198.18.5.5", 1, 8080, synOnly)
	b := tcpPkt("198.18.9.9", "198.18.5.5", 2, 9090, synOnly)      // dropped
	c := icmpPkt("fd00:6440::9", "fd00:6440::5", 128)              // passes
	e := udpPkt("fd00:6440::9", "fd00:6440::5", 53, 5000, "nope")  // dropped
	g := tcpPkt("fd00:6440::9", "fd00:6440::5", 80, 40000, pshAck) // passes
	bufs := [][]byte{atOffset(a), atOffset(b), atOffset(c), atOffset(e), atOffset(g)}
	orig := append([][]byte(nil), bufs...)

	n, err := f.Write(bufs, wgOffset)
	if err != nil || n != 3 {
		t.Fatalf("Write = %d, %v; want 3 (the device's count of what it got), nil", n, err)
	}
	if len(d.batches) != 1 || d.batches[0] != 3 {
		t.Fatalf("device got batches %v, want one of 3", d.batches)
	}
	for i, want := range [][]byte{a, c, g} {
		if !bytes.Equal(d.written[i], want) {
			t.Errorf("device packet %d is not the %d-th allowed packet (order kept)", i, i)
		}
	}
	// bufs is a permutation of what the caller passed: no buffer lost.
	seen := map[*byte]int{}
	for _, b := range bufs {
		seen[&b[0]]++
	}
	for _, b := range orig {
		if seen[&b[0]] != 1 {
			t.Fatal("Write lost or duplicated a caller's buffer")
		}
	}
	if al, dr := f.Stats(); al != 3 || dr != 2 {
		t.Errorf("Stats = %d allowed, %d dropped; want 3, 2", al, dr)
	}

	// All dropped: the device is not called and it is no error, so
	// wireguard-go (which only looks at err) logs nothing.
	n, err = f.Write([][]byte{atOffset(b), atOffset(e)}, wgOffset)
	if n != 0 || err != nil {
		t.Errorf("all-dropped Write = %d, %v; want 0, nil", n, err)
	}
	if len(d.batches) != 1 {
		t.Error("device was called for an all-dropped batch")
	}
	if n, err := f.Write(nil, wgOffset); n != 0 || err != nil {
		t.Errorf("empty Write = %d, %v", n, err)
	}
	if al, dr := f.Stats(); al != 3 || dr != 4 {
		t.Errorf("Stats = %d allowed, %d dropped; want 3, 4", al, dr)
	}

	// The device's error comes back as is.
	boom := errors.New("boom")
	d.writeErr = boom
	if _, err := f.Write([][]byte{atOffset(a)}, wgOffset); !errors.Is(err, boom) {
		t.Errorf("device error: got %v", err)
	}
}

func TestFilterReadPassesEverything(t *testing.T) {
	d := newFakeDev()
	f := NewFilter(d, nil)
	pkts := [][]byte{
		tcpPkt("198.18.5.5", "198.18.9.9", 40000, 22, synOnly),
		udpPkt("fd00:6440::5", "fd00:6440::9", 5000, 53, "q"),
		icmpPkt("198.18.5.5", "198.18.9.9", 8),
		ipPacket(addr("198.18.5.5"), addr("198.18.9.9"), 47, make([]byte, 8)),
		{0x45, 0}, // garbage goes out too: it is the host's
	}
	readOut(t, f, d, pkts...) // checks that every packet comes out unchanged
	if n := f.flows.len(); n != 1 {
		t.Errorf("flow table has %d flows, want 1 (only UDP is tracked)", n)
	}
	if al, dr := f.Stats(); al != 0 || dr != 0 {
		t.Errorf("Read changed the inbound stats: %d, %d", al, dr)
	}
}

// fakeClock is a settable clock.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

func newFilterWithClock(d tun.Device, p Policy) (*Filter, *fakeClock) {
	clk := &fakeClock{t: time.Unix(1_700_000_000, 0)}
	f := NewFilter(d, p)
	f.flows.init(FlowTableSize, FlowIdleTimeout, clk.now)
	return f, clk
}

func TestFlowTableExpiry(t *testing.T) {
	d := newFakeDev()
	f, clk := newFilterWithClock(d, nil)
	out := udpPkt("198.18.5.5", "198.18.9.9", 5000, 53, "q")
	in := udpPkt("198.18.9.9", "198.18.5.5", 53, 5000, "a")

	readOut(t, f, d, out)
	clk.advance(FlowIdleTimeout)
	if !passes(t, f, d, in) {
		t.Fatal("reply at exactly the idle timeout dropped")
	}
	// The reply refreshed the flow.
	clk.advance(FlowIdleTimeout - time.Second)
	if !passes(t, f, d, in) {
		t.Fatal("flow refreshed by a reply expired early")
	}
	// Outbound traffic refreshes it too.
	clk.advance(FlowIdleTimeout - time.Second)
	readOut(t, f, d, out)
	clk.advance(FlowIdleTimeout - time.Second)
	if !passes(t, f, d, in) {
		t.Fatal("flow refreshed by outbound traffic expired early")
	}
	clk.advance(FlowIdleTimeout + time.Nanosecond)
	if passes(t, f, d, in) {
		t.Fatal("reply after the idle timeout passed")
	}
	if n := f.flows.len(); n != 0 {
		t.Errorf("expired flow still in the table (%d flows)", n)
	}

	// Expired flows are reaped when new ones come, without lookups.
	for i := 0; i < 100; i++ {
		readOut(t, f, d, udpPkt("198.18.5.5", "198.18.9.9", uint16(6000+i), 53, "q"))
	}
	clk.advance(FlowIdleTimeout / 2)
	readOut(t, f, d, udpPkt("198.18.5.5", "198.18.9.9", 7000, 53, "q"))
	clk.advance(FlowIdleTimeout/2 + time.Second)
	readOut(t, f, d, udpPkt("198.18.5.5", "198.18.9.9", 7001, 53, "q"))
	if n := f.flows.len(); n != 2 {
		t.Errorf("flow table has %d flows, want 2 (100 expired ones reaped)", n)
	}
	if !passes(t, f, d, udpPkt("198.18.9.9", "198.18.5.5", 53, 7000, "a")) {
		t.Error("live flow lost while reaping")
	}
}

func TestFlowTableBound(t *testing.T) {
	d := newFakeDev()
	f, clk := newFilterWithClock(d, nil)
	flow := func(i int) (out, in []byte) {
		remote := fmt.Sprintf("198.18.%d.%d", 100+i>>16, (i>>8)&0xff)
		lport := uint16(i&0xff) + 1000
		return udpPkt("198.18.5.5", remote, lport, 53, "q"), udpPkt(remote, "198.18.5.5", 53, lport, "a")
	}
	// Build the packets once, then pass them through Read in batches.
	outs := make([][]byte, FlowTableSize+1)
	for i := range outs {
		outs[i], _ = flow(i)
	}
	readOut(t, f, d, outs[:2]...)
	clk.advance(time.Second)
	// Flow 0 is refreshed, so flow 1 is now the least recently used.
	readOut(t, f, d, outs[0])
	readOut(t, f, d, outs[2:FlowTableSize]...)
	if n := f.flows.len(); n != FlowTableSize {
		t.Fatalf("table has %d flows, want %d", n, FlowTableSize)
	}
	readOut(t, f, d, outs[FlowTableSize]) // one too many
	if n := f.flows.len(); n != FlowTableSize {
		t.Fatalf("table grew past its bound: %d flows", n)
	}
	if len(f.flows.entries) != FlowTableSize {
		t.Errorf("entry storage is %d, want %d", len(f.flows.entries), FlowTableSize)
	}
	for _, c := range []struct {
		i    int
		live bool
	}{{1, false}, {0, true}, {2, true}, {FlowTableSize - 1, true}, {FlowTableSize, true}} {
		_, in := flow(c.i)
		if got := passes(t, f, d, in); got != c.live {
			t.Errorf("reply to flow %d: passed=%v, want %v", c.i, got, c.live)
		}
	}
}

func TestFilterNoAllocations(t *testing.T) {
	d := newFakeDev()
	d.discard = true
	f := NewFilter(d, AllowTCPPorts(8080))
	readOut(t, f, d, udpPkt("198.18.5.5", "198.18.9.9", 5000, 53, "q"))
	in := [][]byte{
		atOffset(tcpPkt("198.18.9.9", "198.18.5.5", 1, 8080, synOnly)),
		atOffset(tcpPkt("198.18.9.9", "198.18.5.5", 1, 9090, synOnly)),
		atOffset(udpPkt("198.18.9.9", "198.18.5.5", 53, 5000, "a")),
		atOffset(udpPkt("198.18.9.9", "198.18.5.5", 53, 5001, "a")),
		atOffset(icmpPkt("fd00:6440::9", "fd00:6440::5", 128)),
	}
	if a := testing.AllocsPerRun(200, func() { _, _ = f.Write(in, wgOffset) }); a != 0 {
		t.Errorf("Write allocates %v times per batch", a)
	}
	out := udpPkt("198.18.5.5", "198.18.9.9", 5000, 53, "q")
	bufs := [][]byte{make([]byte, wgOffset+len(out))}
	sizes := []int{0}
	backing := [][]byte{out}
	if a := testing.AllocsPerRun(200, func() {
		d.toRead = backing[:1]
		_, _ = f.Read(bufs, sizes, wgOffset)
	}); a != 0 {
		t.Errorf("Read allocates %v times per batch", a)
	}
}

// TestFilterConcurrent runs one reader and several writers at once, as
// wireguard-go does; run with -race.
func TestFilterConcurrent(t *testing.T) {
	d := newFakeDev()
	d.discard = true
	f := NewFilter(d, AllowTCPPorts(8080))
	const rounds = 2000
	var wg sync.WaitGroup
	var stop atomic.Bool
	wg.Add(1)
	go func() {
		defer wg.Done()
		bufs := [][]byte{make([]byte, wgOffset+100)}
		sizes := []int{0}
		for i := 0; !stop.Load(); i++ {
			d.queue(udpPkt("198.18.5.5", "198.18.9.9", uint16(5000+i%500), 53, "q"))
			if _, err := f.Read(bufs, sizes, wgOffset); err != nil {
				t.Error(err)
				return
			}
		}
	}()
	var writers sync.WaitGroup
	for w := 0; w < 4; w++ {
		writers.Add(1)
		go func() {
			defer writers.Done()
			bufs := [][]byte{
				atOffset(udpPkt("198.18.9.9", "198.18.5.5", 53, uint16(5000+w), "a")),
				atOffset(tcpPkt("198.18.9.9", "198.18.5.5", 1, 9090, synOnly)),
			}
			for i := 0; i < rounds; i++ {
				if _, err := f.Write(bufs, wgOffset); err != nil {
					t.Error(err)
					return
				}
			}
		}()
	}
	writers.Wait()
	stop.Store(true)
	wg.Wait()
	al, dr := f.Stats()
	if al+dr != 4*rounds*2 || dr < 4*rounds {
		t.Errorf("Stats = %d allowed, %d dropped after %d packets", al, dr, 4*rounds*2)
	}
}

// TestFilterOnChannelTUN wraps wireguard-go's own test device, to check
// the Filter against a tun.Device implementation that is not ours.
func TestFilterOnChannelTUN(t *testing.T) {
	ch := tuntest.NewChannelTUN()
	f := NewFilter(ch.TUN(), AllowTCPPorts(8080))
	t.Cleanup(func() { f.Close() })

	out := udpPkt("198.18.5.5", "198.18.9.9", 5000, 53, "q")
	go func() { ch.Outbound <- out }()
	bufs, sizes := [][]byte{make([]byte, wgOffset+1500)}, []int{0}
	if n, err := f.Read(bufs, sizes, wgOffset); n != 1 || err != nil || !bytes.Equal(bufs[0][wgOffset:wgOffset+sizes[0]], out) {
		t.Fatalf("Read = %d, %v", n, err)
	}
	good := udpPkt("198.18.9.9", "198.18.5.5", 53, 5000, "a")
	done := make(chan error, 1)
	go func() {
		_, err := f.Write([][]byte{
			atOffset(tcpPkt("198.18.9.9", "198.18.5.5", 1, 22, synOnly)),
			atOffset(good),
		}, wgOffset)
		done <- err
	}()
	select {
	case got := <-ch.Inbound:
		if !bytes.Equal(got, good) {
			t.Fatalf("ChannelTUN got %x, want the UDP reply", got)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("nothing reached the ChannelTUN")
	}
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	if name, _ := f.Name(); name != "loopbackTun1" {
		t.Errorf("Name not passed through: %q", name)
	}
	if mtu, _ := f.MTU(); mtu != tuntest.DefaultMTU {
		t.Errorf("MTU not passed through: %d", mtu)
	}
	if f.BatchSize() != 1 || f.File() != nil {
		t.Error("BatchSize/File not passed through")
	}
	if ev := <-f.Events(); ev != tun.EventUp {
		t.Errorf("first event %v, want EventUp", ev)
	}
}
