package fastnet

import (
	"bytes"
	"encoding/binary"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
)

// Receive coalescing (GRO) for the packets wireguard-go writes in one batch:
// consecutive in-order TCP segments of one flow become one large segment, so
// gVisor runs its per-segment work (demux, ACK processing, queueing, window
// updates) once per batch and flow instead of once per MTU-sized packet.
//
// A segment is coalesced only when it is plainly bulk data: IPv4 without
// options or fragmentation, or IPv6 without extension headers; flags ACK
// (PSH allowed on the last segment only); no TCP options other than a
// timestamp identical to the group's; the same addresses, ports, ACK number,
// window, TOS/traffic class and TTL/hop limit as the group; a sequence
// number directly following the group; and verified IPv4 header and TCP
// checksums. Anything else, including every packet whose checksum is wrong,
// goes to gVisor untouched, which checks (and drops) it as usual. The group
// leaves with correct lengths, IPv4 header checksum and a full TCP checksum
// derived from its segments' verified sums, so gVisor verifies it like any
// other packet.

// maxOpenFlows bounds the flows coalesced at once within a batch.
const maxOpenFlows = 8

type flowKey struct {
	addrs [32]byte // src, dst (IPv4 in the first 4 bytes of each half)
	ports uint32
	v6    bool
}

// segInfo is what the coalescer learned of one packet of the batch.
type segInfo struct {
	ipLen, hdrLen int
	plen          int    // TCP payload length
	psum          uint16 // checksum of the payload alone
	seq           uint32
	next          int32 // next member of the same group, -1 at the end
}

// groItem is one packet to inject: a single packet of the batch as it came,
// or a group of coalesced segments.
type groItem struct {
	first, last int32
	n           int
	payload     int // total payload bytes of the group
	key         flowKey
	hdr         []byte // coalesced IP+TCP header, when n > 1
	hdrBuf      [maxIPv4HdrLen + maxTCPHdrLen]byte
}

// coalescer holds the reusable state for coalescing one batch.
type coalescer struct {
	info  []segInfo
	items []groItem
	open  []int    // indices into items of groups still accepting segments
	pkts  [][]byte // scratch for Write
}

// run analyses pkts (each a complete IP packet) and fills c.items.
func (c *coalescer) run(pkts [][]byte) {
	if cap(c.info) < len(pkts) {
		c.info = make([]segInfo, len(pkts))
	}
	c.info = c.info[:len(pkts)]
	c.items = c.items[:0]
	c.open = c.open[:0]
	for i, p := range pkts {
		key, eligible, isTCP := c.classify(i, p)
		if !isTCP {
			c.single(i)
			continue
		}
		g := c.findOpen(key)
		if g >= 0 && eligible && c.canAppend(&c.items[g], pkts, i) {
			c.appendTo(g, i)
			continue
		}
		if g >= 0 {
			// Anything else of this flow ends its group, so that segments
			// of one flow reach gVisor in the order they came.
			c.closeGroup(g)
		}
		if !eligible {
			c.single(i)
			continue
		}
		c.openGroup(i, key)
	}
	for i := range c.items {
		if it := &c.items[i]; it.n > 1 {
			c.finish(it, pkts)
		}
	}
}

func (c *coalescer) single(i int) {
	c.items = append(c.items, groItem{first: int32(i), last: int32(i), n: 1})
	c.info[i].next = -1
}

// classify parses packet i. isTCP reports a TCP packet whose headers are
// sane enough to name its flow (key); eligible reports one that may be
// coalesced, its checksums verified.
func (c *coalescer) classify(i int, p []byte) (key flowKey, eligible, isTCP bool) {
	in := &c.info[i]
	*in = segInfo{next: -1}
	ipLen, hdrLen, ok := tcpHeaderLens(p)
	if !ok {
		return key, false, false
	}
	var src, dst []byte
	if p[0]>>4 == 4 {
		src, dst = p[12:16], p[16:20]
	} else {
		src, dst = p[8:24], p[24:40]
		key.v6 = true
	}
	copy(key.addrs[:16], src)
	copy(key.addrs[16:], dst)
	key.ports = binary.BigEndian.Uint32(p[ipLen:])
	in.ipLen, in.hdrLen = ipLen, hdrLen
	in.plen = len(p) - hdrLen
	in.seq = binary.BigEndian.Uint32(p[ipLen+4:])

	if in.plen == 0 {
		return key, false, true
	}
	if !key.v6 {
		if ipLen != 20 || binary.BigEndian.Uint16(p[6:])&0x3fff != 0 { // options, MF or fragment offset
			return key, false, true
		}
	}
	tcp := p[ipLen:hdrLen]
	if f := tcp[13]; f != tcpFlagACK && f != tcpFlagACK|tcpFlagPSH {
		return key, false, true
	}
	switch len(tcp) {
	case 20:
	case 32: // NOP, NOP, timestamp
		if tcp[20] != 1 || tcp[21] != 1 || tcp[22] != 8 || tcp[23] != 10 {
			return key, false, true
		}
	default:
		return key, false, true
	}
	// Checksums: IPv4 header, then TCP over the pseudo-header, the TCP
	// header and the payload (summed apart, to be reused by finish).
	if !key.v6 && checksum.Checksum(p[:20], 0) != 0xffff {
		return key, false, true
	}
	in.psum = checksum.Checksum(p[hdrLen:], 0)
	sum := pseudoSum(src, dst, protoTCP, len(p)-ipLen)
	sum = checksum.Checksum(tcp, sum)
	if checksum.Combine(sum, in.psum) != 0xffff {
		return key, false, true
	}
	return key, true, true
}

func (c *coalescer) findOpen(key flowKey) int {
	for _, g := range c.open {
		if c.items[g].key == key {
			return g
		}
	}
	return -1
}

func (c *coalescer) openGroup(i int, key flowKey) {
	if len(c.open) == maxOpenFlows {
		c.closeGroup(c.open[0])
	}
	c.items = append(c.items, groItem{first: int32(i), last: int32(i), n: 1, key: key, payload: c.info[i].plen})
	c.open = append(c.open, len(c.items)-1)
}

func (c *coalescer) closeGroup(g int) {
	for j, o := range c.open {
		if o == g {
			c.open = append(c.open[:j], c.open[j+1:]...)
			return
		}
	}
}

// canAppend reports whether eligible packet i continues group g.
func (c *coalescer) canAppend(g *groItem, pkts [][]byte, i int) bool {
	fi, li, in := &c.info[g.first], &c.info[g.last], &c.info[i]
	first, last, p := pkts[g.first], pkts[g.last], pkts[i]
	if in.hdrLen != fi.hdrLen ||
		li.plen != fi.plen || in.plen > fi.plen || // equal sizes; a short one ends the group
		in.seq != li.seq+uint32(li.plen) ||
		in.hdrLen+g.payload+in.plen > maxPacketLen {
		return false
	}
	lt, pt := last[li.ipLen:li.hdrLen], p[in.ipLen:in.hdrLen]
	if lt[13]&tcpFlagPSH != 0 { // PSH only on a group's last segment
		return false
	}
	// ACK number, flags but PSH, window, and options equal.
	if !bytes.Equal(lt[8:12], pt[8:12]) || lt[13] != pt[13]&^tcpFlagPSH ||
		!bytes.Equal(lt[14:16], pt[14:16]) || !bytes.Equal(lt[20:], pt[20:]) {
		return false
	}
	if first[0]>>4 == 4 {
		// TOS, DF, TTL.
		return first[1] == p[1] && first[6] == p[6] && first[8] == p[8]
	}
	// Traffic class and flow label; hop limit.
	return bytes.Equal(first[:4], p[:4]) && first[7] == p[7]
}

func (c *coalescer) appendTo(g, i int) {
	it := &c.items[g]
	c.info[it.last].next = int32(i)
	it.last = int32(i)
	it.n++
	it.payload += c.info[i].plen
}

// finish writes the header of the coalesced group it.
func (c *coalescer) finish(it *groItem, pkts [][]byte) {
	fi := &c.info[it.first]
	first := pkts[it.first]
	h := it.hdrBuf[:fi.hdrLen]
	copy(h, first[:fi.hdrLen])
	it.hdr = h
	ip, tcp := h[:fi.ipLen], h[fi.ipLen:]
	total := fi.hdrLen + it.payload
	var src, dst []byte
	if ip[0]>>4 == 4 {
		binary.BigEndian.PutUint16(ip[2:], uint16(total))
		setIPv4Checksum(ip)
		src, dst = ip[12:16], ip[16:20]
	} else {
		binary.BigEndian.PutUint16(ip[4:], uint16(total-40))
		src, dst = ip[8:24], ip[24:40]
	}
	last := pkts[it.last]
	tcp[13] |= last[c.info[it.last].ipLen+13] & tcpFlagPSH
	tcp[16], tcp[17] = 0, 0
	sum := pseudoSum(src, dst, protoTCP, total-fi.ipLen)
	sum = checksum.Checksum(tcp, sum)
	off := 0
	for m := it.first; m >= 0; m = c.info[m].next {
		s := c.info[m].psum
		if off&1 != 0 {
			s = swapSum(s)
		}
		sum = checksum.Combine(sum, s)
		off += c.info[m].plen
	}
	binary.BigEndian.PutUint16(tcp[16:], ^sum)
}

// size is the length of the packet item it stands for.
func (c *coalescer) size(it *groItem, pkts [][]byte) int {
	if it.n == 1 {
		return len(pkts[it.first])
	}
	return len(it.hdr) + it.payload
}

// appendPacket appends the packet item it stands for to dst.
func (c *coalescer) appendPacket(dst []byte, it *groItem, pkts [][]byte) []byte {
	if it.n == 1 {
		return append(dst, pkts[it.first]...)
	}
	dst = append(dst, it.hdr...)
	for m := it.first; m >= 0; m = c.info[m].next {
		dst = append(dst, pkts[m][c.info[m].hdrLen:]...)
	}
	return dst
}

// coalesceTCP coalesces pkts as Write does and returns the packets gVisor
// would receive.
func coalesceTCP(pkts [][]byte) [][]byte {
	var c coalescer
	c.run(pkts)
	out := make([][]byte, len(c.items))
	for i := range c.items {
		it := &c.items[i]
		out[i] = c.appendPacket(make([]byte, 0, c.size(it, pkts)), it, pkts)
	}
	return out
}
