package inflight

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
)

// TestRebatchedStdBindKeepsEveryDatagram sends bursts of full-size
// WireGuard-shaped datagrams between two stock binds on loopback (the
// sender coalesces them with UDP GSO where the kernel offers it, the
// receiver reads them with UDP GRO) and checks that every one arrives
// through the rebatching receive function whole: it would fail if the
// stock bind read coalesced segments into a buffer the gate made small.
func TestRebatchedStdBindKeepsEveryDatagram(t *testing.T) {
	g := New(1 << 20)
	rx := g.Bind(conn.NewStdNetBind())
	fns, port, err := rx.Open(0)
	if err != nil {
		t.Fatal(err)
	}
	defer rx.Close()
	tx := conn.NewStdNetBind()
	if _, _, err := tx.Open(0); err != nil {
		t.Fatal(err)
	}
	defer tx.Close()
	ep, err := tx.ParseEndpoint(netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, 0, 1}), port).String())
	if err != nil {
		t.Fatal(err)
	}

	const bursts, perBurst, size = 20, 100, 1452 // MTU 1420 + 32
	msg := func(i int) []byte {
		n := size
		if i%perBurst == perBurst-1 {
			n -= 100 // a burst's last GSO segment may be short
		}
		b := make([]byte, n, largeBuf) // room to coalesce into, as wireguard-go's buffers have
		b[0] = transportType
		binary.BigEndian.PutUint32(b[4:], uint32(i))
		for j := 8; j < len(b); j++ {
			b[j] = byte(i + j)
		}
		return b
	}
	for b := range bursts {
		batch := make([][]byte, perBurst)
		for j := range batch {
			batch[j] = msg(b*perBurst + j)
		}
		if err := tx.Send(batch, ep); err != nil {
			t.Fatal(err)
		}
	}
	// Read only once all is sent, so that the kernel has coalesced what it
	// could (UDP GRO).
	got := make(map[int]bool)
	var count atomic.Int64
	done := make(chan error, 1)
	go func() {
		bufs := make([][]byte, ReceiveBatch)
		for i := range bufs {
			bufs[i] = make([]byte, largeBuf)
		}
		sizes, eps := make([]int, len(bufs)), make([]conn.Endpoint, len(bufs))
		for len(got) < bursts*perBurst {
			n, err := fns[0](bufs, sizes, eps)
			if err != nil {
				done <- err
				return
			}
			for k := range n {
				b := bufs[k][:sizes[k]]
				if len(b) < 8 {
					done <- fmt.Errorf("datagram of %d bytes", len(b))
					return
				}
				i := int(binary.BigEndian.Uint32(b[4:]))
				if i >= bursts*perBurst || !bytes.Equal(b, msg(i)) {
					done <- fmt.Errorf("datagram %d of %d bytes is not what was sent (truncated or mixed up)", i, len(b))
					return
				}
				got[i] = true
				count.Store(int64(len(got)))
			}
		}
		done <- nil
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("received %d of %d datagrams", count.Load(), bursts*perBurst)
	}
}
