package fastnet

import (
	"bytes"
	"fmt"
	"testing"
)

// mssFor is the payload per segment at the overlay MTU, with timestamps.
func mssFor(v6 bool) int {
	if v6 {
		return 1420 - 40 - 32
	}
	return 1420 - 20 - 32
}

// maxPayload is the most payload a coalesced packet carries with tcpHdr
// bytes of TCP header: the whole packet stays within 64 KiB - 1 bytes (one
// pooled gVisor buffer chunk), for IPv6 too.
func maxPayload(v6 bool, tcpHdr int) int {
	if v6 {
		return maxPacketLen - 40 - tcpHdr
	}
	return maxPacketLen - 20 - tcpHdr
}

func TestSplit(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		mss := mssFor(v6)
		for _, n := range []int{0, 1, 2, mss - 1, mss, mss + 1, 2*mss - 1, 2 * mss, 2*mss + 1, 10*mss + 7, 40000, 65535 - 100, maxPayload(v6, 32)} {
			for _, flags := range []uint8{tcpFlagACK, tcpFlagACK | tcpFlagPSH, tcpFlagACK | tcpFlagPSH | tcpFlagFIN | tcpFlagCWR | tcpFlagECE} {
				name := fmt.Sprintf("%s/%d/%#x", famName(v6), n, flags)
				s := specFor(v6)
				s.flags = flags
				s.opts = tsOpt(77, 88)
				s.payload = pattern(n, byte(n))
				in := s.build()
				// gVisor leaves only the pseudo-header sum in GSO packets:
				// the splitter must not rely on the field.
				ipLen := 20
				if v6 {
					ipLen = 40
				}
				in[ipLen+16], in[ipLen+17] = 0xde, 0xad
				if !v6 {
					in[10], in[11] = 0, 0
				}
				segs, err := splitTCP(in, mss)
				if err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				want := max(1, (n+mss-1)/mss)
				if len(segs) != want {
					t.Fatalf("%s: %d segments, want %d", name, len(segs), want)
				}
				var stream []byte
				for i, seg := range segs {
					r := checkPacket(t, seg)
					last := i == len(segs)-1
					if len(seg) > 1420 && n <= 65535-100 && mss < 1420 {
						t.Fatalf("%s: segment %d is %d bytes, over the MTU", name, i, len(seg))
					}
					if !last && len(r.payload) != mss {
						t.Fatalf("%s: segment %d carries %d bytes, want %d", name, i, len(r.payload), mss)
					}
					if r.seq != s.seq+uint32(len(stream)) {
						t.Fatalf("%s: segment %d seq %d, want %d", name, i, r.seq, s.seq+uint32(len(stream)))
					}
					wantFlags := flags
					if i > 0 {
						wantFlags &^= tcpFlagCWR
					}
					if !last {
						wantFlags &^= tcpFlagFIN | tcpFlagPSH
					}
					if r.flags != wantFlags {
						t.Fatalf("%s: segment %d flags %#x, want %#x", name, i, r.flags, wantFlags)
					}
					if !v6 && r.id != s.id+uint16(i) {
						t.Fatalf("%s: segment %d IPv4 id %#x, want %#x", name, i, r.id, s.id+uint16(i))
					}
					if r.ack != s.ack || r.win != 502 || !bytes.Equal(r.opts, s.opts) || r.src != s.src || r.dst != s.dst {
						t.Fatalf("%s: segment %d header fields changed", name, i)
					}
					stream = append(stream, r.payload...)
				}
				if !bytes.Equal(stream, s.payload) {
					t.Fatalf("%s: payload not preserved", name)
				}
			}
		}
	}
}

// TestSplitScattered feeds the splitter payload in odd-sized pieces, as
// gVisor's views come.
func TestSplitScattered(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		s := specFor(v6)
		s.payload = pattern(30001, 9)
		pkt := s.build()
		ipLen, hdrLen, ok := tcpHeaderLens(pkt)
		if !ok {
			t.Fatal("tcpHeaderLens")
		}
		want, err := splitTCP(pkt, 1000)
		if err != nil {
			t.Fatal(err)
		}
		var pieces [][]byte
		for rest, k := pkt[hdrLen:], 1; len(rest) > 0; k = k*3%1777 + 1 {
			c := min(k, len(rest))
			pieces = append(pieces, rest[:c])
			rest = rest[c:]
		}
		var sp splitter
		if err := sp.init(pkt[:hdrLen], ipLen, pieces, 1000); err != nil {
			t.Fatal(err)
		}
		for i := 0; !sp.done(); i++ {
			b := make([]byte, 2000)
			n, err := sp.next(b)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(b[:n], want[i]) {
				t.Fatalf("%s: segment %d differs from the contiguous split", famName(v6), i)
			}
		}
	}
}

func TestSplitShortBuffer(t *testing.T) {
	s := specFor(false)
	s.payload = pattern(3000, 1)
	pkt := s.build()
	ipLen, hdrLen, _ := tcpHeaderLens(pkt)
	var sp splitter
	if err := sp.init(pkt[:hdrLen], ipLen, [][]byte{pkt[hdrLen:]}, 1400); err != nil {
		t.Fatal(err)
	}
	if _, err := sp.next(make([]byte, 100)); err != errShortBuffer {
		t.Fatalf("got %v, want errShortBuffer", err)
	}
}

func TestSplitRejectsMalformed(t *testing.T) {
	s := specFor(false)
	s.payload = pattern(100, 1)
	pkt := s.build()
	for name, mangle := range map[string]func([]byte) []byte{
		"short":         func(p []byte) []byte { return p[:30] },
		"version":       func(p []byte) []byte { p[0] = 0x55; return p },
		"ihl":           func(p []byte) []byte { p[0] = 0x44; return p },
		"length":        func(p []byte) []byte { p[3]++; return p },
		"not TCP":       func(p []byte) []byte { p[9] = 17; return p },
		"data offset":   func(p []byte) []byte { p[32] = 0x40; return p },
		"data past end": func(p []byte) []byte { p = p[:60]; p[3] = 60; p[32] = 0xf0; return p },
	} {
		p := mangle(bytes.Clone(pkt))
		if _, err := splitTCP(p, 1000); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}
