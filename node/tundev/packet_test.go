package tundev

import (
	"encoding/binary"
	"net/netip"
)

// A small IPv4/IPv6 packet builder for the tests. Checksums are right (the
// root test injects these packets into a real kernel), though the filter
// does not look at them.

const (
	synOnly = tcpFlagSYN
	synAck  = tcpFlagSYN | tcpFlagACK
	ackOnly = tcpFlagACK
	rstOnly = 0x04
	finAck  = 0x01 | tcpFlagACK
	pshAck  = 0x08 | tcpFlagACK
)

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

// tcpHdr is a 20-byte TCP header with the given ports and flags.
func tcpHdr(sport, dport uint16, flags uint8, seq, ack uint32) []byte {
	h := make([]byte, 20)
	binary.BigEndian.PutUint16(h[0:], sport)
	binary.BigEndian.PutUint16(h[2:], dport)
	binary.BigEndian.PutUint32(h[4:], seq)
	binary.BigEndian.PutUint32(h[8:], ack)
	h[12] = 5 << 4
	h[13] = flags
	binary.BigEndian.PutUint16(h[14:], 65535) // window
	return h
}

func udpHdr(sport, dport uint16, payload []byte) []byte {
	h := make([]byte, 8+len(payload))
	binary.BigEndian.PutUint16(h[0:], sport)
	binary.BigEndian.PutUint16(h[2:], dport)
	binary.BigEndian.PutUint16(h[4:], uint16(len(h)))
	copy(h[8:], payload)
	return h
}

// icmpHdr is an ICMP (or ICMPv6) message: type, code, checksum, then 4
// bytes (echo id and sequence) and the payload.
func icmpHdr(typ, code uint8, id, seq uint16, payload []byte) []byte {
	h := make([]byte, 8+len(payload))
	h[0], h[1] = typ, code
	binary.BigEndian.PutUint16(h[4:], id)
	binary.BigEndian.PutUint16(h[6:], seq)
	copy(h[8:], payload)
	return h
}

// ipPacket wraps a transport header in an IPv4 or IPv6 header (by the
// family of src) and fills in the checksums.
func ipPacket(src, dst netip.Addr, proto uint8, l4 []byte) []byte {
	l4 = append([]byte(nil), l4...)
	var p []byte
	if src.Is4() {
		p = make([]byte, 20+len(l4))
		p[0] = 4<<4 | 5
		binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
		binary.BigEndian.PutUint16(p[4:], 0x1234) // id
		p[8] = 64
		p[9] = proto
		s, d := src.As4(), dst.As4()
		copy(p[12:], s[:])
		copy(p[16:], d[:])
		binary.BigEndian.PutUint16(p[10:], ^csum(p[:20], 0))
	} else {
		p = make([]byte, 40+len(l4))
		p[0] = 6 << 4
		binary.BigEndian.PutUint16(p[4:], uint16(len(l4)))
		p[6] = proto
		p[7] = 64
		s, d := src.As16(), dst.As16()
		copy(p[8:], s[:])
		copy(p[24:], d[:])
	}
	setL4Checksum(p, proto, l4)
	copy(p[len(p)-len(l4):], l4)
	return p
}

func setL4Checksum(p []byte, proto uint8, l4 []byte) {
	var off int
	switch proto {
	case protoTCP:
		off = 16
	case protoUDP:
		off = 6
	case protoICMP, protoICMPv6:
		off = 2
	default:
		return
	}
	if len(l4) < off+2 {
		return
	}
	l4[off], l4[off+1] = 0, 0
	var sum uint32
	if proto != protoICMP { // pseudo-header
		var src, dst []byte
		if p[0]>>4 == 4 {
			src, dst = p[12:16], p[16:20]
		} else {
			src, dst = p[8:24], p[24:40]
		}
		ph := make([]byte, 0, 40)
		ph = append(ph, src...)
		ph = append(ph, dst...)
		if p[0]>>4 == 4 {
			ph = append(ph, 0, proto)
			ph = binary.BigEndian.AppendUint16(ph, uint16(len(l4)))
		} else {
			ph = binary.BigEndian.AppendUint32(ph, uint32(len(l4)))
			ph = append(ph, 0, 0, 0, proto)
		}
		sum = uint32(csum(ph, 0))
	}
	c := ^csum(l4, sum)
	if c == 0 && proto == protoUDP {
		c = 0xffff
	}
	binary.BigEndian.PutUint16(l4[off:], c)
}

// csum is the ones' complement sum of b added to initial (not inverted).
func csum(b []byte, initial uint32) uint16 {
	s := initial
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(binary.BigEndian.Uint16(b[i:]))
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s > 0xffff {
		s = s>>16 + s&0xffff
	}
	return uint16(s)
}

func tcpPkt(src, dst string, sport, dport uint16, flags uint8) []byte {
	return ipPacket(addr(src), addr(dst), protoTCP, tcpHdr(sport, dport, flags, 1000, 0))
}

func udpPkt(src, dst string, sport, dport uint16, payload string) []byte {
	return ipPacket(addr(src), addr(dst), protoUDP, udpHdr(sport, dport, []byte(payload)))
}

// icmpPkt builds ICMP for IPv4 addresses and ICMPv6 for IPv6 ones.
func icmpPkt(src, dst string, typ uint8) []byte {
	proto := uint8(protoICMP)
	if addr(src).Is6() {
		proto = protoICMPv6
	}
	return ipPacket(addr(src), addr(dst), proto, icmpHdr(typ, 0, 7, 1, []byte("ping")))
}

// withIPv6Ext inserts an 8-byte extension header of type ext right after
// the fixed IPv6 header of p.
func withIPv6Ext(p []byte, ext uint8) []byte {
	q := make([]byte, 0, len(p)+8)
	q = append(q, p[:40]...)
	eh := make([]byte, 8)
	eh[0] = p[6] // next header: the transport
	q = append(q, eh...)
	q = append(q, p[40:]...)
	q[6] = ext
	binary.BigEndian.PutUint16(q[4:], binary.BigEndian.Uint16(p[4:])+8)
	return q
}

// withIPv4Frag sets the IPv4 fragment offset (in 8-byte units) and the
// more-fragments flag.
func withIPv4Frag(p []byte, offset uint16, more bool) []byte {
	q := append([]byte(nil), p...)
	v := offset & 0x1fff
	if more {
		v |= 0x2000
	}
	binary.BigEndian.PutUint16(q[6:], v)
	q[10], q[11] = 0, 0
	binary.BigEndian.PutUint16(q[10:], ^csum(q[:20], 0))
	return q
}

// parsed is what a test needs to know about a packet.
type parsed struct {
	proto        uint8
	src, dst     netip.Addr
	sport, dport uint16
	flags        uint8 // TCP
	typ          uint8 // ICMP
	payload      []byte
}

func parsePkt(p []byte) (parsed, bool) {
	pk, ok := parseIP(p, true)
	if !ok {
		return parsed{}, false
	}
	r := parsed{proto: pk.proto}
	if pk.v6 {
		r.src, r.dst = netip.AddrFrom16([16]byte(pk.src)), netip.AddrFrom16([16]byte(pk.dst))
	} else {
		r.src, r.dst = netip.AddrFrom4([4]byte(pk.src)), netip.AddrFrom4([4]byte(pk.dst))
	}
	h := pk.hdr
	switch pk.proto {
	case protoTCP:
		if len(h) < 20 {
			return parsed{}, false
		}
		r.sport, r.dport, r.flags = binary.BigEndian.Uint16(h), binary.BigEndian.Uint16(h[2:]), h[13]
		r.payload = h[int(h[12]>>4)*4:]
	case protoUDP:
		if len(h) < 8 {
			return parsed{}, false
		}
		r.sport, r.dport, r.payload = binary.BigEndian.Uint16(h), binary.BigEndian.Uint16(h[2:]), h[8:]
	case protoICMP, protoICMPv6:
		if len(h) < 8 {
			return parsed{}, false
		}
		r.typ, r.payload = h[0], h[8:]
	}
	return r, true
}
