package fastnet

import (
	"encoding/binary"
	"errors"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
)

// Segmentation of the large TCP packets gVisor hands us when the link
// advertises host GSO ("TCP segmentation offload" done by us instead of a
// NIC): one IP+TCP header followed by up to 64 KiB of payload, with only the
// pseudo-header sum in the TCP checksum field (gVisor's CHECKSUM_PARTIAL).
// Every segment leaves with complete IP and TCP headers and full checksums.

const (
	maxIPv4HdrLen = 60
	maxTCPHdrLen  = 60
	maxPacketLen  = 1<<16 - 1

	tcpFlagFIN = 0x01
	tcpFlagSYN = 0x02
	tcpFlagRST = 0x04
	tcpFlagPSH = 0x08
	tcpFlagACK = 0x10
	tcpFlagURG = 0x20
	tcpFlagECE = 0x40
	tcpFlagCWR = 0x80
)

var (
	errShortBuffer = errors.New("fastnet: buffer too small for packet")
	errMalformed   = errors.New("fastnet: malformed TCP/IP packet")
)

// splitter cuts one TCP/IP packet into segments of at most mss payload
// bytes. The payload may be scattered over several slices (gVisor views);
// it is read, never modified.
type splitter struct {
	hdr     []byte // IP + TCP header of the packet (a copy; patched per segment)
	hdrBuf  [128]byte
	ipLen   int // IP header length, extension headers included
	v6      bool
	mss     int
	payload [][]byte // unread payload pieces; payload[0][off:] is next
	off     int
	left    int // payload bytes not yet emitted
	sent    int // payload bytes emitted
	seg     int // segments emitted
	seq     uint32
	id      uint16
	flags   uint8
}

// init prepares s to split the packet whose IP+TCP headers are hdr (ipLen of
// which are the IP header) and whose TCP payload is the concatenation of
// payload. mss <= 0 means no limit (one segment, checksums completed).
func (s *splitter) init(hdr []byte, ipLen int, payload [][]byte, mss int) error {
	if len(hdr) < ipLen+20 || ipLen < 20 {
		return errMalformed
	}
	v := hdr[0] >> 4
	switch {
	case v == 4 && ipLen >= 20 && ipLen <= maxIPv4HdrLen:
		s.v6 = false
	case v == 6 && ipLen >= 40:
		s.v6 = true
	default:
		return errMalformed
	}
	tcp := hdr[ipLen:]
	if int(tcp[12]>>4)*4 != len(tcp) || len(tcp) < 20 {
		return errMalformed
	}
	if len(hdr) <= len(s.hdrBuf) {
		s.hdr = s.hdrBuf[:len(hdr)]
	} else {
		s.hdr = make([]byte, len(hdr))
	}
	copy(s.hdr, hdr)
	s.ipLen = ipLen
	n := 0
	for _, p := range payload {
		n += len(p)
	}
	if mss <= 0 || mss > n {
		mss = n
	}
	if mss == 0 {
		mss = 1 // headers only: one segment
	}
	if len(hdr)+mss > maxPacketLen+boolInt(s.v6)*40 {
		return errMalformed
	}
	s.mss = mss
	s.payload = payload
	s.off = 0
	s.left = n
	s.sent = 0
	s.seg = 0
	s.seq = binary.BigEndian.Uint32(tcp[4:])
	s.flags = tcp[13]
	if !s.v6 {
		s.id = binary.BigEndian.Uint16(s.hdr[4:])
	}
	return nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// done reports whether every segment has been emitted.
func (s *splitter) done() bool { return s.seg > 0 && s.left == 0 }

// remaining is the number of segments still to emit.
func (s *splitter) remaining() int {
	if s.done() {
		return 0
	}
	if s.left == 0 {
		return 1
	}
	return (s.left + s.mss - 1) / s.mss
}

// next writes the next segment into dst and returns its length.
func (s *splitter) next(dst []byte) (int, error) {
	n := min(s.mss, s.left)
	size := len(s.hdr) + n
	if len(dst) < size {
		return 0, errShortBuffer
	}
	copy(dst, s.hdr)
	ip := dst[:s.ipLen]
	tcp := dst[s.ipLen:len(s.hdr)]
	last := n == s.left
	if s.v6 {
		binary.BigEndian.PutUint16(ip[4:], uint16(size-40))
	} else {
		binary.BigEndian.PutUint16(ip[2:], uint16(size))
		binary.BigEndian.PutUint16(ip[4:], s.id+uint16(s.seg))
		setIPv4Checksum(ip)
	}
	binary.BigEndian.PutUint32(tcp[4:], s.seq+uint32(s.sent))
	f := s.flags
	if s.seg > 0 {
		f &^= tcpFlagCWR
	}
	if !last {
		f &^= tcpFlagFIN | tcpFlagPSH
	}
	tcp[13] = f
	// Payload.
	w := dst[len(s.hdr):size]
	for len(w) > 0 {
		c := copy(w, s.payload[0][s.off:])
		w = w[c:]
		s.off += c
		if s.off == len(s.payload[0]) {
			s.payload = s.payload[1:]
			s.off = 0
		}
	}
	// TCP checksum over header and payload, from scratch.
	tcp[16], tcp[17] = 0, 0
	var src, dstAddr []byte
	if s.v6 {
		src, dstAddr = ip[8:24], ip[24:40]
	} else {
		src, dstAddr = ip[12:16], ip[16:20]
	}
	sum := pseudoSum(src, dstAddr, protoTCP, size-s.ipLen)
	sum = checksum.Checksum(dst[s.ipLen:size], sum)
	binary.BigEndian.PutUint16(tcp[16:], ^sum)

	s.left -= n
	s.sent += n
	s.seg++
	return size, nil
}

// tcpHeaderLens returns the IP header length and the IP+TCP header length
// of the TCP/IP packet pkt, which must be complete (its IP length fields
// match len(pkt)). IPv6 extension headers are not supported.
func tcpHeaderLens(pkt []byte) (ipLen, hdrLen int, ok bool) {
	if len(pkt) < 20 {
		return 0, 0, false
	}
	switch pkt[0] >> 4 {
	case 4:
		ipLen = int(pkt[0]&0xf) * 4
		if ipLen < 20 || len(pkt) < ipLen || int(binary.BigEndian.Uint16(pkt[2:])) != len(pkt) || pkt[9] != protoTCP {
			return 0, 0, false
		}
	case 6:
		ipLen = 40
		if len(pkt) < ipLen || int(binary.BigEndian.Uint16(pkt[4:]))+40 != len(pkt) || pkt[6] != protoTCP {
			return 0, 0, false
		}
	default:
		return 0, 0, false
	}
	if len(pkt) < ipLen+20 {
		return 0, 0, false
	}
	doff := int(pkt[ipLen+12]>>4) * 4
	if doff < 20 || len(pkt) < ipLen+doff {
		return 0, 0, false
	}
	return ipLen, ipLen + doff, true
}

// splitTCP cuts the TCP/IP packet pkt into segments of at most mss payload
// bytes, each with complete headers and checksums (the checksum fields of
// pkt are ignored), as Read does for gVisor's GSO packets.
func splitTCP(pkt []byte, mss int) ([][]byte, error) {
	ipLen, hdrLen, ok := tcpHeaderLens(pkt)
	if !ok {
		return nil, errMalformed
	}
	var s splitter
	if err := s.init(pkt[:hdrLen], ipLen, [][]byte{pkt[hdrLen:]}, mss); err != nil {
		return nil, err
	}
	out := make([][]byte, 0, s.remaining())
	for !s.done() {
		b := make([]byte, hdrLen+s.mss)
		n, err := s.next(b)
		if err != nil {
			return nil, err
		}
		out = append(out, b[:n])
	}
	return out, nil
}
