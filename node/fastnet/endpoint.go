package fastnet

import (
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// linkEndpoint is the NIC gVisor sees: what gVisor sends goes into q for
// Device.Read; Device.Write delivers to the attached dispatcher.
type linkEndpoint struct {
	dev    *Device
	mtu    uint32
	gso    stack.SupportedGSO
	gsoMax uint32
	q      pktQueue
	mu     sync.RWMutex
	disp   stack.NetworkDispatcher
}

var (
	_ stack.LinkEndpoint = (*linkEndpoint)(nil)
	_ stack.GSOEndpoint  = (*linkEndpoint)(nil)
)

func newLinkEndpoint(d *Device, mtu uint32, opts Options) *linkEndpoint {
	ep := &linkEndpoint{dev: d, mtu: mtu, gso: stack.HostGSOSupported, gsoMax: uint32(opts.GSOMaxSize)}
	if opts.DisableGSO {
		ep.gso = stack.GSONotSupported
	}
	ep.q.init(opts.QueueLen, opts.QueueBytes)
	return ep
}

func (ep *linkEndpoint) dispatcher() stack.NetworkDispatcher {
	ep.mu.RLock()
	defer ep.mu.RUnlock()
	return ep.disp
}

// WritePackets queues gVisor's outbound packets for Read; when the queue is
// full they are dropped (and counted), as a full NIC ring would.
func (ep *linkEndpoint) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	n, dropped := 0, 0
	for _, pkt := range pkts.AsSlice() {
		switch ep.q.push(pkt) {
		case pushOK:
			n++
		case pushFull:
			dropped++
		case pushClosed:
			if n == 0 {
				return 0, &tcpip.ErrClosedForSend{}
			}
			return n, nil
		}
	}
	if dropped > 0 {
		ep.dev.queueDrops.Add(uint64(dropped))
		if n == 0 {
			return 0, &tcpip.ErrNoBufferSpace{}
		}
	}
	return n, nil
}

func (ep *linkEndpoint) MTU() uint32                             { return ep.mtu }
func (ep *linkEndpoint) SetMTU(uint32)                           {}
func (ep *linkEndpoint) MaxHeaderLength() uint16                 { return 0 }
func (ep *linkEndpoint) LinkAddress() tcpip.LinkAddress          { return "" }
func (ep *linkEndpoint) SetLinkAddress(tcpip.LinkAddress)        {}
func (ep *linkEndpoint) Wait()                                   {}
func (ep *linkEndpoint) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }
func (ep *linkEndpoint) AddHeader(*stack.PacketBuffer)           {}
func (ep *linkEndpoint) ParseHeader(*stack.PacketBuffer) bool    { return true }
func (ep *linkEndpoint) SetOnCloseAction(func())                 {}
func (ep *linkEndpoint) Close()                                  {}

// Capabilities: none. In particular no RX checksum offload, so gVisor
// verifies every packet Write injects (this gVisor only allows declaring it
// for the whole link, not per packet); coalesced packets carry a correct
// checksum for it.
func (ep *linkEndpoint) Capabilities() stack.LinkEndpointCapabilities {
	return stack.CapabilityNone
}

func (ep *linkEndpoint) Attach(d stack.NetworkDispatcher) {
	ep.mu.Lock()
	ep.disp = d
	ep.mu.Unlock()
}

func (ep *linkEndpoint) IsAttached() bool { return ep.dispatcher() != nil }

// GSOMaxSize implements stack.GSOEndpoint: TCP packets of up to 64 KiB.
func (ep *linkEndpoint) GSOMaxSize() uint32 { return ep.gsoMax }

// SupportedGSO implements stack.GSOEndpoint.
func (ep *linkEndpoint) SupportedGSO() stack.SupportedGSO { return ep.gso }

type pushResult int

const (
	pushOK pushResult = iota
	pushFull
	pushClosed
)

// pktQueue is a bounded FIFO of packets from gVisor to Read.
type pktQueue struct {
	mu       sync.Mutex
	ring     []*stack.PacketBuffer
	head, n  int
	bytes    int
	maxBytes int
	closed   bool
	ready    chan struct{} // a token when the queue turned non-empty
	done     chan struct{} // closed by close
}

func (q *pktQueue) init(n, maxBytes int) {
	q.ring = make([]*stack.PacketBuffer, n)
	q.maxBytes = maxBytes
	q.ready = make(chan struct{}, 1)
	q.done = make(chan struct{})
}

func (q *pktQueue) push(pkt *stack.PacketBuffer) pushResult {
	sz := pkt.Size()
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		return pushClosed
	}
	if q.n == len(q.ring) || (q.n > 0 && q.bytes+sz > q.maxBytes) {
		q.mu.Unlock()
		return pushFull
	}
	q.ring[(q.head+q.n)%len(q.ring)] = pkt.IncRef()
	q.n++
	q.bytes += sz
	wake := q.n == 1
	q.mu.Unlock()
	if wake {
		select {
		case q.ready <- struct{}{}:
		default:
		}
	}
	return pushOK
}

// pop appends up to max packets to dst. With block, it waits for the first
// one unless the queue is closed; then it returns dst unchanged.
func (q *pktQueue) pop(dst []*stack.PacketBuffer, max int, block bool) []*stack.PacketBuffer {
	for {
		q.mu.Lock()
		if q.n > 0 {
			for k := 0; k < max && q.n > 0; k++ {
				p := q.ring[q.head]
				q.ring[q.head] = nil
				q.head = (q.head + 1) % len(q.ring)
				q.n--
				q.bytes -= p.Size()
				dst = append(dst, p)
			}
			q.mu.Unlock()
			return dst
		}
		closed := q.closed
		q.mu.Unlock()
		if !block || closed {
			return dst
		}
		select {
		case <-q.ready:
		case <-q.done:
		}
	}
}

func (q *pktQueue) close() {
	q.mu.Lock()
	defer q.mu.Unlock()
	if !q.closed {
		q.closed = true
		close(q.done)
	}
}

// drain releases every queued packet.
func (q *pktQueue) drain() {
	q.mu.Lock()
	defer q.mu.Unlock()
	for q.n > 0 {
		q.ring[q.head].DecRef()
		q.ring[q.head] = nil
		q.head = (q.head + 1) % len(q.ring)
		q.n--
	}
	q.bytes = 0
}
