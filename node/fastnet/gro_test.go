package fastnet

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"testing"
)

// segments builds the in-order segments of one flow carrying payload in
// pieces of mss (the last shorter), PSH on the last, timestamps if ts.
func segments(s tcpSpec, payload []byte, mss int, ts bool) [][]byte {
	var out [][]byte
	for off := 0; off < len(payload); off += mss {
		seg := s
		seg.seq = s.seq + uint32(off)
		seg.id = s.id + uint16(len(out))
		seg.payload = payload[off:min(off+mss, len(payload))]
		if off+mss >= len(payload) {
			seg.flags |= tcpFlagPSH
		}
		if ts {
			seg.opts = tsOpt(1000, 2000)
		}
		out = append(out, seg.build())
	}
	return out
}

func TestCoalesceRoundTrip(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		for _, ts := range []bool{false, true} {
			hdr := 20
			if ts {
				hdr = 32
			}
			mss := mssFor(v6)
			for _, n := range []int{1, mss - 1, mss, mss + 1, 3*mss - 1, 20 * mss, maxPayload(v6, hdr)} {
				name := fmt.Sprintf("%s/ts=%v/%d", famName(v6), ts, n)
				s := specFor(v6)
				payload := pattern(n, byte(n>>3))
				segs := segments(s, payload, mss, ts)
				out := coalesceTCP(segs)
				if len(out) != 1 {
					t.Fatalf("%s: %d packets out of %d segments, want 1", name, len(out), len(segs))
				}
				r := checkPacket(t, out[0])
				if !bytes.Equal(r.payload, payload) || r.seq != s.seq || r.flags != tcpFlagACK|tcpFlagPSH {
					t.Fatalf("%s: coalesced packet wrong (seq %d flags %#x, %d bytes)", name, r.seq, r.flags, len(r.payload))
				}
				if !v6 && r.id != s.id {
					t.Fatalf("%s: IPv4 id %#x, want the first's %#x", name, r.id, s.id)
				}
				// Split again at the same size: the very same segments but
				// for IPv4 ids, which the splitter numbers from the first.
				again, err := splitTCP(out[0], mss)
				if err != nil {
					t.Fatal(err)
				}
				if len(again) != len(segs) {
					t.Fatalf("%s: split into %d, had %d", name, len(again), len(segs))
				}
				for i := range segs {
					if !bytes.Equal(again[i], segs[i]) {
						t.Fatalf("%s: segment %d changed by coalesce+split", name, i)
					}
				}
				// And the split of a GSO packet coalesces back to it.
				if back := coalesceTCP(again); len(back) != 1 || !bytes.Equal(back[0], out[0]) {
					t.Fatalf("%s: not a fixed point", name)
				}
			}
		}
	}
}

// TestCoalesceMaxSize: a long run becomes several packets, none over 64 KiB.
func TestCoalesceMaxSize(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		s := specFor(v6)
		payload := pattern(200000, 5)
		segs := segments(s, payload, 1000, true)[:128]
		payload = payload[:128*1000]
		out := coalesceTCP(segs)
		if len(out) < 2 || len(out) > 3 {
			t.Fatalf("%s: %d packets", famName(v6), len(out))
		}
		var stream []byte
		for _, p := range out {
			if len(p) > maxPacketLen {
				t.Fatalf("%s: %d-byte packet", famName(v6), len(p))
			}
			r := checkPacket(t, p)
			if r.seq != s.seq+uint32(len(stream)) {
				t.Fatalf("%s: seq gap", famName(v6))
			}
			stream = append(stream, r.payload...)
		}
		if !bytes.Equal(stream, payload) {
			t.Fatalf("%s: stream changed", famName(v6))
		}
	}
}

type flowState struct {
	spec   tcpSpec
	stream []byte
	segs   [][]byte
}

// TestCoalesceInterleaved mixes several flows of both families, a UDP
// packet and pure ACKs; per flow, order and bytes must survive.
func TestCoalesceInterleaved(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for round := 0; round < 200; round++ {
		nflows := 1 + rng.IntN(maxOpenFlows+3)
		flows := make([]*flowState, nflows)
		for i := range flows {
			s := specFor(i%2 == 1)
			s.sport = uint16(1000 + i)
			s.seq = rng.Uint32()
			f := &flowState{spec: s}
			n := 1 + rng.IntN(30000)
			f.stream = pattern(n, byte(i))
			f.segs = segments(s, f.stream, 1+rng.IntN(1400), rng.IntN(2) == 0)
			flows[i] = f
		}
		// Interleave keeping each flow's order.
		var batch [][]byte
		var owner []int
		next := make([]int, nflows)
		for {
			var cand []int
			for i, f := range flows {
				if next[i] < len(f.segs) {
					cand = append(cand, i)
				}
			}
			if len(cand) == 0 {
				break
			}
			i := cand[rng.IntN(len(cand))]
			batch = append(batch, flows[i].segs[next[i]])
			owner = append(owner, i)
			next[i]++
			if rng.IntN(20) == 0 { // a UDP packet
				batch = append(batch, udpPacket())
				owner = append(owner, -1)
			}
		}
		out := coalesceTCP(batch)
		if len(out) > len(batch) {
			t.Fatalf("round %d: %d packets out of %d", round, len(out), len(batch))
		}
		got := make([][]byte, nflows)
		udp := 0
		for _, p := range out {
			if p[0]>>4 == 4 && p[9] == 17 {
				udp++
				continue
			}
			r := checkPacket(t, p)
			i := int(r.ports>>16) - 1000
			if r.seq != flows[i].spec.seq+uint32(len(got[i])) {
				t.Fatalf("round %d flow %d: segment out of order", round, i)
			}
			got[i] = append(got[i], r.payload...)
		}
		for i, f := range flows {
			if !bytes.Equal(got[i], f.stream) {
				t.Fatalf("round %d flow %d: stream changed", round, i)
			}
		}
		if want := count(owner, -1); udp != want {
			t.Fatalf("round %d: %d UDP packets out, %d in", round, udp, want)
		}
	}
}

func count(s []int, v int) int {
	n := 0
	for _, x := range s {
		if x == v {
			n++
		}
	}
	return n
}

func udpPacket() []byte {
	p := make([]byte, 20+8+10)
	p[0] = 0x45
	binary.BigEndian.PutUint16(p[2:], uint16(len(p)))
	p[8], p[9] = 64, 17
	copy(p[12:], v4a.AsSlice())
	copy(p[16:], v4b.AsSlice())
	binary.BigEndian.PutUint16(p[10:], refChecksum(0, p[:20]))
	binary.BigEndian.PutUint16(p[24:], 18)
	return p
}

// TestCoalesceBadChecksum: a segment with a wrong TCP or IPv4 header
// checksum is passed on unchanged and alone, whatever its position.
func TestCoalesceBadChecksum(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		for _, kind := range []string{"tcp", "tcp-payload", "ip"} {
			if kind == "ip" && v6 {
				continue
			}
			for bad := 0; bad < 6; bad++ {
				name := fmt.Sprintf("%s/%s/%d", famName(v6), kind, bad)
				s := specFor(v6)
				payload := pattern(6*1000, 1)
				segs := segments(s, payload, 1000, true)
				seg := s
				seg.seq = s.seq + uint32(bad*1000)
				seg.id = s.id + uint16(bad)
				seg.payload = payload[bad*1000 : bad*1000+1000]
				seg.opts = tsOpt(1000, 2000)
				if bad == 5 {
					seg.flags |= tcpFlagPSH
				}
				switch kind {
				case "tcp":
					seg.badTCP = true
				case "ip":
					seg.badIPSum = true
				}
				corrupt := seg.build()
				if kind == "tcp-payload" {
					corrupt[len(corrupt)-7] ^= 0x40 // payload bit flip, checksum of the original
				}
				segs[bad] = corrupt
				out := coalesceTCP(segs)
				seen := false
				var stream []byte
				for _, p := range out {
					if bytes.Equal(p, corrupt) {
						seen = true
						continue
					}
					r := checkPacket(t, p)
					stream = append(stream, r.payload...)
				}
				if !seen {
					t.Fatalf("%s: the bad segment was not passed on as it was", name)
				}
				want := append(bytes.Clone(payload[:bad*1000]), payload[bad*1000+1000:]...)
				if !bytes.Equal(stream, want) {
					t.Fatalf("%s: good segments' bytes changed", name)
				}
			}
		}
	}
}

// TestCoalesceIneligible: what must never be merged.
func TestCoalesceIneligible(t *testing.T) {
	for _, v6 := range []bool{false, true} {
		base := specFor(v6)
		base.opts = tsOpt(5, 6)
		mk := func(i int, mod func(*tcpSpec)) []byte {
			s := base
			s.seq = base.seq + uint32(i*100)
			s.payload = pattern(100, byte(i))
			if mod != nil {
				mod(&s)
			}
			return s.build()
		}
		cases := map[string]func(*tcpSpec){
			"FIN":          func(s *tcpSpec) { s.flags |= tcpFlagFIN },
			"SYN":          func(s *tcpSpec) { s.flags |= tcpFlagSYN },
			"RST":          func(s *tcpSpec) { s.flags |= tcpFlagRST },
			"URG":          func(s *tcpSpec) { s.flags |= tcpFlagURG },
			"CWR":          func(s *tcpSpec) { s.flags |= tcpFlagCWR },
			"ECE":          func(s *tcpSpec) { s.flags |= tcpFlagECE },
			"no ACK":       func(s *tcpSpec) { s.flags = 0 },
			"other ack":    func(s *tcpSpec) { s.ack++ },
			"other window": func(s *tcpSpec) { s.win = 1000 },
			"other TS":     func(s *tcpSpec) { s.opts = tsOpt(6, 6) },
			"no TS":        func(s *tcpSpec) { s.opts = nil },
			"SACK":         func(s *tcpSpec) { s.opts = []byte{1, 1, 5, 10, 0, 0, 0, 1, 0, 0, 0, 2} },
			"seq gap":      func(s *tcpSpec) { s.seq++ },
			"seq overlap":  func(s *tcpSpec) { s.seq-- },
			"other port":   func(s *tcpSpec) { s.dport++ },
			"other TTL":    func(s *tcpSpec) { s.ttl = 3 },
			"other TOS":    func(s *tcpSpec) { s.tos = 0x20 },
			"empty":        func(s *tcpSpec) { s.payload = nil },
			"bigger":       func(s *tcpSpec) { s.payload = pattern(101, 2) },
		}
		for name, mod := range cases {
			// Segment 1 is the odd one: it must not join segment 0.
			pkts := [][]byte{mk(0, nil), mk(1, mod)}
			out := coalesceTCP(pkts)
			if len(out) != 2 || !bytes.Equal(out[0], pkts[0]) || !bytes.Equal(out[1], pkts[1]) {
				t.Errorf("%s/%s: merged", famName(v6), name)
			}
		}
		// After PSH, or after a short segment, a group takes no more.
		for name, mod := range map[string]func(*tcpSpec){
			"after PSH":   func(s *tcpSpec) { s.flags |= tcpFlagPSH },
			"after short": func(s *tcpSpec) { s.payload = s.payload[:50] },
		} {
			first := mk(0, nil)
			second := mk(1, mod)
			third := mk(2, func(s *tcpSpec) {
				if name == "after short" {
					s.seq -= 50
				}
			})
			out := coalesceTCP([][]byte{first, second, third})
			if len(out) != 2 || !bytes.Equal(out[1], third) {
				t.Errorf("%s/%s: got %d packets", famName(v6), name, len(out))
			}
			checkPacket(t, out[0])
		}
		// An IPv4 fragment or IPv4 options.
		if !v6 {
			p0, p1 := mk(0, nil), mk(1, nil)
			p1[6] |= 0x20 // MF
			binary.BigEndian.PutUint16(p1[10:], 0)
			binary.BigEndian.PutUint16(p1[10:], refChecksum(0, p1[:20]))
			if out := coalesceTCP([][]byte{p0, p1}); len(out) != 2 {
				t.Errorf("fragment merged")
			}
		}
	}
}

// TestCoalesceNotTCP: garbage and other protocols pass through unchanged.
func TestCoalesceNotTCP(t *testing.T) {
	s := specFor(false)
	s.payload = pattern(10, 1)
	good := s.build()
	in := [][]byte{{}, {0x45}, {0x60, 1, 2}, udpPacket(), bytes.Repeat([]byte{0xff}, 100), good, good}
	out := coalesceTCP(in)
	if len(out) != len(in) {
		t.Fatalf("%d packets out of %d", len(out), len(in))
	}
	for i := range in {
		if !bytes.Equal(out[i], in[i]) {
			t.Fatalf("packet %d changed", i)
		}
	}
}
