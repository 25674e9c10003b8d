package fastnet

import (
	"bytes"
	"encoding/binary"
	"net/netip"
	"testing"
)

// An independent, deliberately plain packet builder and checker: RFC 1071
// summed 16 bits at a time into a uint32, nothing shared with the code under
// test.

func sum16(b []byte, acc uint32) uint32 {
	for len(b) >= 2 {
		acc += uint32(b[0])<<8 | uint32(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		acc += uint32(b[0]) << 8
	}
	return acc
}

func fold(acc uint32) uint16 {
	for acc > 0xffff {
		acc = acc>>16 + acc&0xffff
	}
	return uint16(acc)
}

// refChecksum is the checksum field value for data (field zeroed) with
// the pseudo-header sum acc.
func refChecksum(acc uint32, data []byte) uint16 { return ^fold(sum16(data, acc)) }

func refPseudo(src, dst []byte, proto byte, n int) uint32 {
	acc := sum16(src, 0)
	acc = sum16(dst, acc)
	return acc + uint32(proto) + uint32(n)
}

type tcpSpec struct {
	src, dst         netip.Addr
	sport, dport     uint16
	seq, ack         uint32
	flags            uint8
	win              uint16
	opts             []byte // raw TCP options, padded to 4 bytes by the caller
	id               uint16
	ttl, tos         uint8
	payload          []byte
	badTCP, badIPSum bool
}

func tsOpt(val, ecr uint32) []byte {
	o := []byte{1, 1, 8, 10, 0, 0, 0, 0, 0, 0, 0, 0}
	binary.BigEndian.PutUint32(o[4:], val)
	binary.BigEndian.PutUint32(o[8:], ecr)
	return o
}

// build makes a TCP/IP packet with correct (or deliberately wrong) checksums.
func (s tcpSpec) build() []byte {
	v6 := s.src.Is6()
	ipLen := 20
	if v6 {
		ipLen = 40
	}
	tcpLen := 20 + len(s.opts)
	total := ipLen + tcpLen + len(s.payload)
	p := make([]byte, total)
	ttl := s.ttl
	if ttl == 0 {
		ttl = 64
	}
	if v6 {
		p[0] = 6<<4 | s.tos>>4
		p[1] = s.tos << 4
		binary.BigEndian.PutUint16(p[4:], uint16(total-40))
		p[6] = 6
		p[7] = ttl
		copy(p[8:24], s.src.AsSlice())
		copy(p[24:40], s.dst.AsSlice())
	} else {
		p[0] = 0x45
		p[1] = s.tos
		binary.BigEndian.PutUint16(p[2:], uint16(total))
		binary.BigEndian.PutUint16(p[4:], s.id)
		p[6] = 0x40 // DF
		p[8] = ttl
		p[9] = 6
		copy(p[12:16], s.src.AsSlice())
		copy(p[16:20], s.dst.AsSlice())
		binary.BigEndian.PutUint16(p[10:], refChecksum(0, p[:20]))
		if s.badIPSum {
			p[10] ^= 0x10
		}
	}
	t := p[ipLen:]
	binary.BigEndian.PutUint16(t[0:], s.sport)
	binary.BigEndian.PutUint16(t[2:], s.dport)
	binary.BigEndian.PutUint32(t[4:], s.seq)
	binary.BigEndian.PutUint32(t[8:], s.ack)
	t[12] = byte(tcpLen/4) << 4
	t[13] = s.flags
	win := s.win
	if win == 0 {
		win = 502
	}
	binary.BigEndian.PutUint16(t[14:], win)
	copy(t[20:], s.opts)
	copy(t[tcpLen:], s.payload)
	var src, dst []byte = s.src.AsSlice(), s.dst.AsSlice()
	binary.BigEndian.PutUint16(t[16:], refChecksum(refPseudo(src, dst, 6, len(t)), t))
	if s.badTCP {
		t[16] ^= 0x01
	}
	return p
}

// parsed is a TCP/IP packet as checkPacket sees it.
type parsed struct {
	v6         bool
	src, dst   netip.Addr
	ports      uint32
	id         uint16
	seq, ack   uint32
	flags      uint8
	win        uint16
	opts       []byte
	payload    []byte
	ipHdr      []byte
	tcpHdrCopy []byte
}

// checkPacket verifies lengths and checksums of a TCP/IP packet
// independently and returns its fields.
func checkPacket(t testing.TB, p []byte) parsed {
	t.Helper()
	var r parsed
	if len(p) < 20 {
		t.Fatalf("packet of %d bytes", len(p))
	}
	var ipLen int
	switch p[0] >> 4 {
	case 4:
		ipLen = int(p[0]&0xf) * 4
		if got := int(binary.BigEndian.Uint16(p[2:])); got != len(p) {
			t.Fatalf("IPv4 total length %d, packet %d", got, len(p))
		}
		if fold(sum16(p[:ipLen], 0)) != 0xffff {
			t.Fatalf("bad IPv4 header checksum")
		}
		r.src = netip.AddrFrom4([4]byte(p[12:16]))
		r.dst = netip.AddrFrom4([4]byte(p[16:20]))
		r.id = binary.BigEndian.Uint16(p[4:])
		if p[9] != 6 {
			t.Fatalf("IPv4 protocol %d", p[9])
		}
	case 6:
		ipLen = 40
		r.v6 = true
		if got := int(binary.BigEndian.Uint16(p[4:])) + 40; got != len(p) {
			t.Fatalf("IPv6 payload length+40 = %d, packet %d", got, len(p))
		}
		r.src = netip.AddrFrom16([16]byte(p[8:24]))
		r.dst = netip.AddrFrom16([16]byte(p[24:40]))
	default:
		t.Fatalf("IP version %d", p[0]>>4)
	}
	tcp := p[ipLen:]
	doff := int(tcp[12]>>4) * 4
	if doff < 20 || doff > len(tcp) {
		t.Fatalf("TCP data offset %d", doff)
	}
	if fold(sum16(tcp, refPseudo(r.src.AsSlice(), r.dst.AsSlice(), 6, len(tcp)))) != 0xffff {
		t.Fatalf("bad TCP checksum")
	}
	r.ports = binary.BigEndian.Uint32(tcp)
	r.seq = binary.BigEndian.Uint32(tcp[4:])
	r.ack = binary.BigEndian.Uint32(tcp[8:])
	r.flags = tcp[13]
	r.win = binary.BigEndian.Uint16(tcp[14:])
	r.opts = tcp[20:doff]
	r.payload = tcp[doff:]
	r.ipHdr = p[:ipLen]
	return r
}

func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7+i>>8) ^ seed
	}
	return b
}

var (
	v4a = netip.MustParseAddr("10.77.0.1")
	v4b = netip.MustParseAddr("10.77.0.2")
	v6a = netip.MustParseAddr("fd77::1")
	v6b = netip.MustParseAddr("fd77::2")
)

func specFor(v6 bool) tcpSpec {
	s := tcpSpec{src: v4a, dst: v4b, sport: 40000, dport: 443, seq: 0xfffff000, ack: 12345, flags: tcpFlagACK, id: 0xfff0, tos: 0x10}
	if v6 {
		s.src, s.dst = v6a, v6b
	}
	return s
}

func famName(v6 bool) string {
	if v6 {
		return "IPv6"
	}
	return "IPv4"
}

// TestReferenceBuilder checks the test's own builder against itself, so a
// bug there cannot hide one in the code under test.
func TestReferenceBuilder(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		s := specFor(v6)
		s.payload = pattern(1001, 3)
		s.opts = tsOpt(1, 2)
		r := checkPacket(t, s.build())
		if !bytes.Equal(r.payload, s.payload) || r.seq != s.seq || !bytes.Equal(r.opts, s.opts) {
			t.Fatalf("%s: builder round trip", famName(v6))
		}
		// gVisor's checksum, as the code under test uses it, agrees.
		p := s.build()
		ipLen := 20
		if v6 {
			ipLen = 40
		}
		src, dst := s.src.AsSlice(), s.dst.AsSlice()
		if got, want := pseudoSum(src, dst, 6, len(p)-ipLen), fold(refPseudo(src, dst, 6, len(p)-ipLen)); got != want {
			t.Fatalf("pseudoSum %#x, reference %#x", got, want)
		}
	}
}
