// Package inflight bounds the packets a wireguard-go device holds on their
// way through it, in both directions: between the tun.Device's Read and the
// conn.Bind's Send (outbound), and between the bind's receive functions and
// the device's Write (inbound).
//
// Why: wireguard-go keeps every packet in a buffer of MaxMessageSize
// (64 KiB) taken from a sync.Pool, and its queues hold up to about a
// thousand batches. When packets arrive faster than they are encrypted and
// sent (or decrypted and delivered), the queues fill: thousands of 64 KiB
// buffers, hundreds of MiB of heap for a few MiB of data. Under the agent's
// memory limit the garbage collector then runs every few milliseconds and
// empties the pool each cycle, so buffers are allocated again and again.
// Measured on a 4-stream bulk transfer between two agents with a 64 MiB
// limit: the sender allocated 2.5 GB of pool buffers in 6 s, collected
// every 3 ms, and moved 79–140 MB/s.
//
// A Gate counts data packets as they enter and leave the device, and lets
// a Read (or a receive) start only while fewer than Limit packets are in
// flight in its direction. A call that starts gets a whole batch (a kernel
// TUN with offloads must be able to split a 64 KiB segment into it; UDP GRO
// fills the receive batch), so at most Limit plus one batch per reading
// goroutine are in flight. The backlog then stays where it is cheap and
// where TCP sees it: in the network stack's bounded send buffer or the
// kernel's socket and TUN queues.
//
// Packets that never leave (wireguard-go drops packets for unknown
// destinations, the oldest staged ones while a handshake is pending, and
// replayed or forged ones) would leak credit; so a wait that lasts Leak
// without any packet leaving forgets what it was waiting for and counts
// afresh. Keepalives (empty data messages) are not counted.
//
// The gate also shrinks wireguard-go's standing buffers. wireguard-go
// allocates a batch of 64 KiB buffers for the TUN reader and for every
// receive function (three here: IPv4, IPv6, relay), 128 each: 32 MiB that
// never go away and that the runtime counts in full against the memory
// limit (only the first 1.5 KiB of each is ever written). The gate
// advertises a smaller batch (Batch, 32 for reads and 16 for receives) and
// lets each receive function read a full 128-datagram batch into small
// buffers of its own (4 KiB; the last few 64 KiB, where the stock bind
// reads coalesced UDP GRO segments before splitting them), then hands it to
// wireguard-go 16 at a time, copying each packet once.
package inflight

import (
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/tun"
)

// DefaultLimit: 64 packets plus a batch of 128 are ~270 KiB of data in
// 12 MiB of wireguard-go buffers per direction, enough to keep encryption
// and the socket busy. Measured with 4-stream bulk TCP between two agents
// under their 64 MiB memory limit (MB/s, sender RSS): no gate 69–199 and
// 55 MiB; 32: 189–317; 64: 298–342 and 56 MiB; 128: 215–291; 256: 153–201
// (the collector's share grows again). DefaultLeak is far longer than a
// batch takes on a Pi and short enough that a leak costs only a blip.
const (
	DefaultLimit = 64
	DefaultLeak  = 20 * time.Millisecond

	// ReadBatch is the batch the TUN reader gets (each Read fills at most
	// this many packets; sendmmsg and UDP GSO carry them in one call), and
	// ReceiveBatch the one wireguard-go's receive routines get.
	ReadBatch    = 32
	ReceiveBatch = 16

	// innerBatch datagrams are read per receive call (the stock bind's
	// conn.IdealBatchSize; it needs exactly that many buffers), into
	// buffers of smallBuf bytes, except the last largeBufs of MaxSegment
	// bytes: the stock bind reads coalesced GRO segments into its last
	// IdealBatchSize/64 (2) buffers and splits them into the first ones.
	innerBatch = conn.IdealBatchSize
	smallBuf   = 4 << 10
	largeBufs  = 4
	largeBuf   = 1<<16 - 1
)

// WireGuard data message: type 4, a 16-byte header and a 16-byte tag
// around the packet; an empty one is a keepalive.
const (
	transportType = 4
	keepaliveLen  = 32
)

// Gate bounds the packets in flight through a wireguard-go device.
type Gate struct {
	out, in   limiter
	readBatch int
	done      chan struct{} // closed with the device
	once      sync.Once
}

// New returns a gate letting limit packets (0 means DefaultLimit) be in
// flight in each direction.
func New(limit int) *Gate { return NewWithReadBatch(limit, ReadBatch) }

// NewWithReadBatch is New with the cap on the TUN reader's batch: a kernel
// TUN with offloads needs room to split a 64 KiB TSO segment (up to ~48
// packets; wireguard-go drops them all with ErrTooManySegments otherwise),
// so it keeps the device's own batch (readBatch 0 means no cap).
func NewWithReadBatch(limit, readBatch int) *Gate {
	if limit <= 0 {
		limit = DefaultLimit
	}
	g := &Gate{done: make(chan struct{}), readBatch: readBatch}
	for _, l := range []*limiter{&g.out, &g.in} {
		*l = limiter{limit: int64(limit), leak: DefaultLeak, kick: make(chan struct{}, 1), done: g.done}
	}
	return g
}

// Stats are a gate's counters for one direction.
type Stats struct {
	InFlight int64  // data packets entered and not yet left
	Waits    uint64 // reads that had to wait for room
	Resets   uint64 // waits that ended by forgetting leaked credit
}

// Stats returns the gate's counters, outbound (Read to Send) and inbound
// (receive to Write).
func (g *Gate) Stats() (out, in Stats) { return g.out.stats(), g.in.stats() }

// Device wraps d: Read waits for outbound room, Write makes inbound room.
func (g *Gate) Device(d tun.Device) tun.Device { return &device{Device: d, g: g} }

// Bind wraps b: Send makes outbound room, receiving waits for inbound room.
func (g *Gate) Bind(b conn.Bind) conn.Bind { return &bind{Bind: b, g: g} }

func (g *Gate) close() { g.once.Do(func() { close(g.done) }) }

// limiter counts one direction's packets in flight.
type limiter struct {
	limit int64
	leak  time.Duration
	kick  chan struct{} // a packet left
	done  chan struct{}

	n      atomic.Int64  // packets entered and not yet left
	leaves atomic.Uint64 // calls that let packets leave, to tell a stall from a leak
	waits  atomic.Uint64
	resets atomic.Uint64
}

func (l *limiter) stats() Stats {
	return Stats{InFlight: l.n.Load(), Waits: l.waits.Load(), Resets: l.resets.Load()}
}

// wait returns once fewer than limit packets are in flight; false means
// the device was closed.
func (l *limiter) wait() bool {
	var timer *time.Timer
	for {
		if l.n.Load() < l.limit {
			if timer != nil {
				timer.Stop()
			}
			return true
		}
		if timer == nil {
			l.waits.Add(1)
			timer = time.NewTimer(l.leak)
		}
		leaves := l.leaves.Load()
		select {
		case <-l.kick:
		case <-l.done:
			timer.Stop()
			return false
		case <-timer.C:
			if l.leaves.Load() == leaves {
				// Nothing left for a whole Leak: what is counted was
				// dropped, not queued.
				l.n.Store(0)
				l.resets.Add(1)
			}
			timer.Reset(l.leak)
		}
	}
}

func (l *limiter) enter(k int) {
	if k > 0 {
		l.n.Add(int64(k))
	}
}

func (l *limiter) leave(k int) {
	if k == 0 {
		return
	}
	l.leaves.Add(1)
	if l.n.Add(-int64(k)) < 0 {
		// Packets entered before a reset; never count below zero.
		l.n.Store(0)
	}
	select {
	case l.kick <- struct{}{}:
	default:
	}
}

// isData reports whether msg is a WireGuard data message carrying a
// packet (a keepalive carries none).
func isData(msg []byte) bool { return len(msg) > keepaliveLen && msg[0] == transportType }

// dataPackets counts the data messages among msgs.
func dataPackets(msgs [][]byte) int {
	k := 0
	for _, m := range msgs {
		if isData(m) {
			k++
		}
	}
	return k
}

type device struct {
	tun.Device
	g *Gate
}

func (d *device) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	if !d.g.out.wait() {
		return 0, os.ErrClosed
	}
	n, err := d.Device.Read(bufs, sizes, offset)
	d.g.out.enter(n)
	return n, err
}

func (d *device) Write(bufs [][]byte, offset int) (int, error) {
	n, err := d.Device.Write(bufs, offset)
	d.g.in.leave(len(bufs)) // written or dropped, they have left
	return n, err
}

// BatchSize is the smaller of the device's and the gate's read batch.
func (d *device) BatchSize() int {
	if d.g.readBatch <= 0 {
		return d.Device.BatchSize()
	}
	return min(d.Device.BatchSize(), d.g.readBatch)
}

func (d *device) Close() error {
	d.g.close()
	return d.Device.Close()
}

type bind struct {
	conn.Bind
	g *Gate
}

func (b *bind) Send(bufs [][]byte, ep conn.Endpoint) error {
	err := b.Bind.Send(bufs, ep)
	b.g.out.leave(dataPackets(bufs))
	return err
}

// BatchSize is what wireguard-go allocates receive buffers for; the inner
// bind still reads its own full batch (see rebatcher).
func (b *bind) BatchSize() int { return min(b.Bind.BatchSize(), ReceiveBatch) }

// Open wraps the receive functions so that each reads a full batch into
// small buffers, waits for inbound room before reading, and hands packets
// on a few at a time.
func (b *bind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	fns, actual, err := b.Bind.Open(port)
	for i, fn := range fns {
		fns[i] = newRebatcher(fn, b.g).receive
	}
	return fns, actual, err
}

// rebatcher reads a batch of datagrams from one receive function into its
// own buffers and returns them a few per call. wireguard-go calls each
// receive function from one goroutine only, so it needs no lock.
type rebatcher struct {
	fn    conn.ReceiveFunc
	g     *Gate
	bufs  [][]byte
	sizes []int
	eps   []conn.Endpoint
	next  int   // the first pending datagram
	n     int   // datagrams read
	err   error // the read's error, returned once its datagrams are out
}

func newRebatcher(fn conn.ReceiveFunc, g *Gate) *rebatcher {
	r := &rebatcher{fn: fn, g: g, bufs: make([][]byte, innerBatch), sizes: make([]int, innerBatch), eps: make([]conn.Endpoint, innerBatch)}
	for i := range r.bufs {
		size := smallBuf
		if i >= innerBatch-largeBufs {
			size = largeBuf
		}
		r.bufs[i] = make([]byte, size)
	}
	return r
}

func (r *rebatcher) receive(bufs [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
	if r.next >= r.n {
		if err := r.err; err != nil {
			r.err = nil
			return 0, err
		}
		if !r.g.in.wait() {
			return 0, net.ErrClosed
		}
		n, err := r.fn(r.bufs, r.sizes, r.eps)
		r.next, r.n, r.err = 0, n, err
		k := 0
		for j := range n {
			if isData(r.bufs[j][:r.sizes[j]]) {
				k++
			}
		}
		r.g.in.enter(k)
		if n == 0 {
			r.err = nil
			return 0, err
		}
	}
	k := 0
	for ; k < len(bufs) && r.next < r.n; r.next++ {
		i := r.next
		sizes[k] = copy(bufs[k], r.bufs[i][:r.sizes[i]])
		eps[k], r.eps[i] = r.eps[i], nil
		k++
	}
	return k, nil
}
