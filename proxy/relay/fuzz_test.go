package relay

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"slices"
	"sync"
	"testing"
	"time"
)

// fuzzStream is a stream that reads r and swallows writes.
type fuzzStream struct {
	r      io.Reader
	mu     sync.Mutex
	w      bytes.Buffer
	closed bool
}

func (f *fuzzStream) Read(p []byte) (int, error) { return f.r.Read(p) }
func (f *fuzzStream) Write(p []byte) (int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.w.Write(p)
}
func (f *fuzzStream) Close() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.closed = true
	return nil
}

type fuzzFrame struct {
	typ byte
	key [32]byte
	pkt []byte
}

// splitFrames parses a stream as the protocol defines it; bad is set when
// it stops at a frame of the wrong type, length 0 or longer than max
// (not at a truncated one).
func splitFrames(b []byte, want byte, max int) (frames []fuzzFrame, bad bool) {
	for len(b) >= headerLen {
		n := int(binary.BigEndian.Uint16(b[33:]))
		if b[0] != want || n == 0 || n > max {
			return frames, true
		}
		if len(b) < headerLen+n {
			return frames, false
		}
		frames = append(frames, fuzzFrame{typ: b[0], key: [32]byte(b[1:33]), pkt: b[headerLen : headerLen+n]})
		b = b[headerLen+n:]
	}
	return frames, false
}

func frame(typ byte, key [32]byte, pkt []byte) []byte {
	out := append([]byte{typ}, key[:]...)
	out = binary.BigEndian.AppendUint16(out, uint16(len(pkt)))
	return append(out, pkt...)
}

var keyA, keyB, keyC = [32]byte{'a'}, [32]byte{'b'}, [32]byte{'c'}

// FuzzServerFrames feeds arbitrary bytes as node a's stream to a relay
// where node b is connected and c is known but not. Invariants:
//   - b receives only WireGuard-shaped payloads that a addressed to b's
//     key, in a's order, each with a's key as the source (never a key a
//     wrote), and nothing a addressed elsewhere;
//   - every such payload is either delivered or counted as a queue drop;
//   - a's stream ends with ErrBadFrame exactly when the input holds a
//     frame of another type, length 0 or over MaxPacket before it ends.
//
// Seeds: f.Add below and testdata/fuzz/FuzzServerFrames.
func FuzzServerFrames(f *testing.F) {
	wg := func(typ byte, n int) []byte { p := make([]byte, n); p[0] = typ; p[n-1] = 0x5a; return p }
	f.Add(frame(frameSend, keyB, wg(4, 32)))
	f.Add(slices.Concat(frame(frameSend, keyB, wg(1, 148)), frame(frameSend, keyC, wg(2, 92)), frame(frameSend, keyA, wg(3, 64)),
		frame(frameSend, keyB, []byte{4, 0, 0, 1, 5, 6, 7, 8}), frame(frameSend, keyB, wg(4, 40))))
	f.Add(slices.Concat(frame(frameSend, keyB, wg(4, 32)), frame(frameFrom, keyB, wg(4, 32)), frame(frameSend, keyB, wg(4, 33))))
	f.Add(slices.Concat(frame(frameSend, keyB, wg(4, 32)), []byte{frameSend}, keyB[:], []byte{0, 0}))
	f.Add(frame(frameSend, keyB, wg(4, 40))[:50])
	f.Add([]byte{})
	const maxPacket = 1500
	f.Fuzz(func(t *testing.T, input []byte) {
		now := time.Unix(1e9, 0)
		s, err := New(Options{Now: func() time.Time { return now }, MaxPacket: maxPacket,
			Lookup: func(node string) ([32]byte, bool) {
				switch node {
				case "a":
					return keyA, true
				case "b":
					return keyB, true
				case "c":
					return keyC, true
				}
				return [32]byte{}, false
			}})
		if err != nil {
			t.Fatal(err)
		}
		defer s.Close()
		bSrv, bCli := net.Pipe()
		go s.ServeConn("b", bSrv)
		client := NewClient(bCli)
		var mu sync.Mutex
		var got []fuzzFrame
		recvDone := make(chan struct{})
		go func() {
			defer close(recvDone)
			for {
				src, pkt, err := client.Recv()
				if err != nil {
					return
				}
				mu.Lock()
				got = append(got, fuzzFrame{typ: frameFrom, key: src, pkt: slices.Clone(pkt)})
				mu.Unlock()
			}
		}()
		poll(t, func() bool { return slices.Contains(s.Connected(), "b") }, "b to connect")

		err = s.ServeConn("a", &fuzzStream{r: bytes.NewReader(input)})
		frames, bad := splitFrames(input, frameSend, maxPacket)
		if bad != errors.Is(err, ErrBadFrame) {
			t.Fatalf("stream ended with %v; input has a bad frame: %v", err, bad)
		}
		var want []fuzzFrame
		for _, fr := range frames {
			if fr.key == keyB && IsWireGuard(fr.pkt) {
				want = append(want, fuzzFrame{typ: frameFrom, key: keyA, pkt: fr.pkt})
			}
		}
		st := s.Stats()
		if int(st.Forwarded+st.DropQueue) != len(want) {
			t.Fatalf("%d packets for b, %d forwarded and %d dropped at the queue", len(want), st.Forwarded, st.DropQueue)
		}
		poll(t, func() bool { mu.Lock(); defer mu.Unlock(); return uint64(len(got)) == st.Forwarded }, "b to receive what was forwarded")
		s.Close()
		<-recvDone
		i := 0
		for _, g := range got {
			for i < len(want) && !(g.key == want[i].key && bytes.Equal(g.pkt, want[i].pkt)) {
				i++
			}
			if i == len(want) {
				t.Fatalf("b received %x from %x: not a packet a sent to b, or out of order", g.pkt, g.key)
			}
			i++
		}
	})
}

// poll waits for cond (5 s at most), checking often: a fuzz run executes
// the target thousands of times.
func poll(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Microsecond)
	}
}

// FuzzClient decodes arbitrary bytes as the relay's stream to a node and
// encodes a fuzzed packet. Invariants: Recv returns exactly the frames the
// protocol defines, in order, with their source key and payload; a frame
// of another type or length 0 closes the client (Send then fails with
// ErrClientClosed); Send writes exactly one frame, type 1, that the
// server-side parse takes back to the same key and packet, and refuses
// empty and oversized packets.
func FuzzClient(f *testing.F) {
	f.Add(frame(frameFrom, keyA, []byte{4, 0, 0, 0}), []byte{1, 0, 0, 0}, byte('b'))
	f.Add(slices.Concat(frame(frameFrom, keyA, []byte{1}), frame(frameFrom, keyC, []byte{2, 2})), []byte{}, byte(0))
	f.Add(slices.Concat(frame(frameFrom, keyA, []byte{1}), frame(frameSend, keyC, []byte{2, 2})), []byte{9}, byte(1))
	f.Add(slices.Concat(frame(frameFrom, keyA, []byte{1}), []byte{frameFrom}, keyB[:], []byte{0, 0}), []byte{9}, byte(1))
	f.Add(frame(frameFrom, keyA, []byte{1, 2, 3})[:36], make([]byte, DefaultMaxPacket+1), byte(2))
	f.Fuzz(func(t *testing.T, stream, pkt []byte, dstByte byte) {
		rs := &fuzzStream{r: bytes.NewReader(stream)}
		c := NewClient(rs)
		frames, bad := splitFrames(stream, frameFrom, DefaultMaxPacket)
		for i := 0; ; i++ {
			src, p, err := c.Recv()
			if err != nil {
				if i != len(frames) {
					t.Fatalf("Recv failed (%v) after %d frames, the stream holds %d", err, i, len(frames))
				}
				if closed := errors.Is(c.Send(keyB, []byte{1}), ErrClientClosed); closed != bad {
					t.Fatalf("after %v: client closed %v, bad frame %v", err, closed, bad)
				}
				break
			}
			if i >= len(frames) || src != frames[i].key || !bytes.Equal(p, frames[i].pkt) {
				t.Fatalf("Recv %d = %x from %x, not the frame in the stream", i, p, src)
			}
		}

		ws := &fuzzStream{r: bytes.NewReader(nil)}
		dst := [32]byte{dstByte, 1}
		err := NewClient(ws).Send(dst, pkt)
		if len(pkt) == 0 || len(pkt) > DefaultMaxPacket {
			if err == nil || ws.w.Len() != 0 {
				t.Fatalf("Send of %d bytes: %v, wrote %d", len(pkt), err, ws.w.Len())
			}
			return
		}
		out, bad := splitFrames(ws.w.Bytes(), frameSend, DefaultMaxPacket)
		if err != nil || bad || len(out) != 1 || out[0].key != dst || !bytes.Equal(out[0].pkt, pkt) || ws.w.Len() != headerLen+len(pkt) {
			t.Fatalf("Send wrote %x (%v)", ws.w.Bytes(), err)
		}
	})
}
