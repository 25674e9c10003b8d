package fastnet

import (
	"bytes"
	"testing"
)

// FuzzSplitCoalesce throws arbitrary bytes at the GSO splitter and the GRO
// coalescer (they must not panic, and whatever they make must be valid), and
// builds a valid TCP stream from the same input to check that coalescing
// and splitting preserve the byte stream and reach a fixed point.
//
// The seed corpus is in testdata/fuzz/FuzzSplitCoalesce. Run the fuzzer
// with
//
//	go test -run '^$' -fuzz FuzzSplitCoalesce -fuzzminimizetime 1s ./node/fastnet/
//
// (with the default minute of minimization per new input, the first minutes
// go to minimizing and the exec counter barely moves).
func FuzzSplitCoalesce(f *testing.F) {
	s := specFor(false)
	s.payload = pattern(3000, 1)
	f.Add(s.build(), uint16(1368), uint8(0), false)
	s = specFor(true)
	s.opts = tsOpt(1, 2)
	s.payload = pattern(5000, 2)
	f.Add(s.build(), uint16(1348), uint8(3), true)
	f.Add([]byte{}, uint16(0), uint8(0), false)
	f.Add([]byte{0x45, 0, 0, 20}, uint16(1), uint8(255), true)

	f.Fuzz(func(t *testing.T, data []byte, mss uint16, cut uint8, v6 bool) {
		// 1. Arbitrary bytes as one packet to split.
		if segs, err := splitTCP(data, int(mss)); err == nil {
			_, hdrLen, _ := tcpHeaderLens(data)
			var stream []byte
			for _, seg := range segs {
				r := checkPacket(t, seg)
				if mss > 0 && len(r.payload) > int(mss) {
					t.Fatalf("segment of %d bytes over mss %d", len(r.payload), mss)
				}
				stream = append(stream, r.payload...)
			}
			if !bytes.Equal(stream, data[hdrLen:]) {
				t.Fatal("split changed the payload")
			}
		}

		// 2. Arbitrary bytes cut into a batch to coalesce: every packet out
		// is one that came in or a valid TCP packet.
		var batch [][]byte
		step := int(cut%64) + 1
		for rest := data; len(rest) > 0 && len(batch) < BatchSize; {
			n := min(len(rest), step*int(mss%97+1))
			batch = append(batch, rest[:n])
			rest = rest[n:]
		}
		batch = append(batch, data, data) // and twice whole
		for _, p := range coalesceTCP(batch) {
			if !containsPacket(batch, p) {
				checkPacket(t, p)
			}
		}

		// 3. A valid stream from the input: split into segments, coalesce,
		// split and coalesce again.
		seg := int(mss%1400) + 1
		spec := specFor(v6)
		spec.seq = uint32(len(data)) * 2654435761
		if cut&1 != 0 {
			spec.opts = tsOpt(uint32(cut), 7)
		}
		payload := data
		if len(payload) > 100000 {
			payload = payload[:100000]
		}
		if len(payload) == 0 {
			return
		}
		segs := segments(spec, payload, seg, cut&1 != 0)
		once := coalesceTCP(segs)
		var stream []byte
		var resplit [][]byte
		for _, p := range once {
			r := checkPacket(t, p)
			if r.seq != spec.seq+uint32(len(stream)) {
				t.Fatal("coalesced packets out of order")
			}
			stream = append(stream, r.payload...)
			ss, err := splitTCP(p, seg)
			if err != nil {
				t.Fatal(err)
			}
			resplit = append(resplit, ss...)
		}
		if !bytes.Equal(stream, payload) {
			t.Fatal("coalescing changed the stream")
		}
		twice := coalesceTCP(resplit)
		if len(twice) != len(once) {
			t.Fatalf("not a fixed point: %d packets, then %d", len(once), len(twice))
		}
		for i := range once {
			if !bytes.Equal(once[i], twice[i]) {
				t.Fatalf("not a fixed point: packet %d differs", i)
			}
		}
	})
}

func containsPacket(batch [][]byte, p []byte) bool {
	for _, b := range batch {
		if bytes.Equal(b, p) {
			return true
		}
	}
	return false
}
