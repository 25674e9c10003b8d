package inflight

import (
	"errors"
	"net"
	"os"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/tun"
)

// fakeTUN hands out one packet per Read call slot while it has any; it is
// the seam a test controls (how many packets the stack offers), the gate's
// counting is what is checked.
type fakeTUN struct {
	tun.Device
	reads  chan int // Read returns min(n, len(bufs)) packets for each n sent
	writes chan int
}

func (f *fakeTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	n, ok := <-f.reads
	if !ok {
		return 0, os.ErrClosed
	}
	n = min(n, len(bufs))
	for i := range n {
		sizes[i] = 100
	}
	return n, nil
}

func (f *fakeTUN) Write(bufs [][]byte, offset int) (int, error) {
	f.writes <- len(bufs)
	return len(bufs), nil
}

func (f *fakeTUN) Close() error { return nil }

type fakeBind struct {
	conn.Bind
	recv chan int // each receive call returns this many data messages
}

func (b *fakeBind) Send(bufs [][]byte, ep conn.Endpoint) error { return nil }

func (b *fakeBind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	fn := func(bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		n, ok := <-b.recv
		if !ok {
			return 0, net.ErrClosed
		}
		for i := range n {
			bufs[i][0] = transportType
			sizes[i] = 100
		}
		return n, nil
	}
	return []conn.ReceiveFunc{fn}, port, nil
}

func dataMsgs(n, size int) [][]byte {
	bufs := make([][]byte, n)
	for i := range bufs {
		bufs[i] = make([]byte, size)
		bufs[i][0] = transportType
	}
	return bufs
}

func batch() ([][]byte, []int) {
	bufs := make([][]byte, 8)
	for i := range bufs {
		bufs[i] = make([]byte, 200)
	}
	return bufs, make([]int, 8)
}

// readAsync starts a Read and reports its result on the returned channel.
func readAsync(d tun.Device) chan error {
	done := make(chan error, 1)
	go func() {
		bufs, sizes := batch()
		_, err := d.Read(bufs, sizes, 0)
		done <- err
	}()
	return done
}

func TestReadWaitsUntilSendMakesRoom(t *testing.T) {
	g := New(4)
	g.out.leak = time.Hour // no leak recovery in this test
	f := &fakeTUN{reads: make(chan int, 4)}
	d, b := g.Device(f), g.Bind(&fakeBind{})

	f.reads <- 8
	bufs, sizes := batch()
	if n, err := d.Read(bufs, sizes, 0); n != 8 || err != nil {
		t.Fatalf("first Read = %d, %v; want the whole batch of 8", n, err)
	}
	if out, _ := g.Stats(); out.InFlight != 8 {
		t.Fatalf("in flight %d, want 8", out.InFlight)
	}
	f.reads <- 1
	done := readAsync(d)
	select {
	case err := <-done:
		t.Fatalf("Read with 8 of 4 in flight returned (%v) instead of waiting", err)
	case <-time.After(50 * time.Millisecond):
	}
	// Keepalives and handshakes make no room.
	b.Send([][]byte{dataMsgs(1, keepaliveLen)[0], {1, 0, 0, 0}}, nil)
	select {
	case err := <-done:
		t.Fatalf("Read went on after a keepalive and a handshake (%v)", err)
	case <-time.After(50 * time.Millisecond):
	}
	b.Send(dataMsgs(5, 100), nil) // 3 in flight: below the limit
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Read still waiting after Send made room")
	}
	if out, _ := g.Stats(); out.InFlight != 4 || out.Waits != 1 || out.Resets != 0 {
		t.Errorf("stats %+v, want 4 in flight, 1 wait, no reset", out)
	}
}

func TestLeakedCreditIsForgotten(t *testing.T) {
	g := New(2)
	g.out.leak = 20 * time.Millisecond
	f := &fakeTUN{reads: make(chan int, 2)}
	d := g.Device(f)
	f.reads <- 8 // read, then dropped inside wireguard-go: never sent
	bufs, sizes := batch()
	d.Read(bufs, sizes, 0)
	f.reads <- 1
	select {
	case err := <-readAsync(d):
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Read never recovered from packets that were never sent")
	}
	if out, _ := g.Stats(); out.Resets == 0 || out.InFlight != 1 {
		t.Errorf("stats %+v, want a reset and the one new packet in flight", out)
	}
}

func TestCloseEndsAWaitingRead(t *testing.T) {
	g := New(1)
	g.out.leak = time.Hour
	f := &fakeTUN{reads: make(chan int, 1)}
	d := g.Device(f)
	f.reads <- 1
	bufs, sizes := batch()
	d.Read(bufs, sizes, 0)
	done := readAsync(d)
	time.Sleep(20 * time.Millisecond) // let it wait (it would pass either way)
	d.Close()
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrClosed) {
			t.Fatalf("Read after Close = %v, want os.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close left Read waiting")
	}
}

func TestReceiveWaitsUntilWriteMakesRoom(t *testing.T) {
	g := New(4)
	g.in.leak = time.Hour
	fb := &fakeBind{recv: make(chan int, 4)}
	f := &fakeTUN{writes: make(chan int, 4)}
	d, b := g.Device(f), g.Bind(fb)
	fns, _, err := b.Open(0)
	if err != nil {
		t.Fatal(err)
	}
	recv := func() chan int {
		done := make(chan int, 1)
		go func() {
			bufs, sizes := batch()
			n, _ := fns[0](bufs, sizes, make([]conn.Endpoint, len(bufs)))
			done <- n
		}()
		return done
	}
	fb.recv <- 6
	if n := <-recv(); n != 6 {
		t.Fatalf("first receive = %d, want 6", n)
	}
	fb.recv <- 2
	done := recv()
	select {
	case n := <-done:
		t.Fatalf("receive with 6 of 4 in flight returned %d instead of waiting", n)
	case <-time.After(50 * time.Millisecond):
	}
	d.Write(make([][]byte, 3), 0)
	<-f.writes
	select {
	case n := <-done:
		if n != 2 {
			t.Fatalf("receive = %d, want 2", n)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("receive still waiting after Write made room")
	}
	if _, in := g.Stats(); in.InFlight != 5 {
		t.Errorf("inbound in flight %d, want 5", in.InFlight)
	}
}
