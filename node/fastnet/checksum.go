package fastnet

import (
	"encoding/binary"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
)

// Checksums here are RFC 1071 one's-complement sums as gVisor's checksum
// package computes them: folded to 16 bits, not inverted. A header whose
// checksum field is correct sums (with its pseudo-header) to 0xffff.

const protoTCP = 6

// pseudoSum is the sum of the TCP/UDP pseudo-header (RFC 793/8200) for
// addresses src and dst (4 or 16 bytes each), protocol proto and transport
// length n.
func pseudoSum(src, dst []byte, proto uint8, n int) uint16 {
	s := checksum.Checksum(src, 0)
	s = checksum.Checksum(dst, s)
	s = checksum.Combine(s, uint16(proto))
	return checksum.Combine(s, uint16(n))
}

// ipv4HeaderChecksum returns the checksum field value for the IPv4 header h
// (whose own checksum field is ignored).
func ipv4HeaderChecksum(h []byte) uint16 {
	s := checksum.Checksum(h[:10], 0)
	s = checksum.Checksum(h[12:], s)
	return ^s
}

// setIPv4Checksum fills in the IPv4 header checksum of h.
func setIPv4Checksum(h []byte) {
	binary.BigEndian.PutUint16(h[10:], ipv4HeaderChecksum(h))
}

// swapSum is the sum of a block as seen from an odd byte offset: one's
// complement sums are byte-order independent up to a byte swap (RFC 1071
// 2.(B)), so a block summed on its own and then placed at an odd offset
// contributes its sum byte-swapped.
func swapSum(s uint16) uint16 { return s<<8 | s>>8 }
