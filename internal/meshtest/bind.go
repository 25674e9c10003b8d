package meshtest

import (
	"net/netip"
	"sync"
	"sync/atomic"

	"golang.zx2c4.com/wireguard/conn"
)

// BlockableBind is WireGuard's standard UDP bind with a switch that drops
// every packet in both directions: a network that blocks UDP, at the seam
// the test controls.
type BlockableBind struct {
	conn.Bind
	blocked atomic.Bool
	ports   sync.Map // uint16 -> struct{}: peers' UDP ports whose path is cut
}

// NewBlockableBind wraps the standard bind, initially not blocking.
func NewBlockableBind() *BlockableBind { return &BlockableBind{Bind: conn.NewDefaultBind()} }

// Block starts or stops dropping all UDP.
func (b *BlockableBind) Block(on bool) { b.blocked.Store(on) }

// BlockPort cuts (or restores) only the path to and from the UDP port of
// one peer on loopback: two nodes that cannot reach each other directly
// while both still reach the proxy, as behind symmetric NATs.
func (b *BlockableBind) BlockPort(port int, on bool) {
	if on {
		b.ports.Store(uint16(port), struct{}{})
	} else {
		b.ports.Delete(uint16(port))
	}
}

func (b *BlockableBind) cut(ep conn.Endpoint) bool {
	if b.blocked.Load() {
		return true
	}
	ap, err := netip.ParseAddrPort(ep.DstToString())
	if err != nil {
		return false
	}
	_, cut := b.ports.Load(ap.Port())
	return cut
}

// Open wraps the receive functions so that blocked packets never arrive.
func (b *BlockableBind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	fns, actual, err := b.Bind.Open(port)
	if err != nil {
		return nil, 0, err
	}
	wrapped := make([]conn.ReceiveFunc, len(fns))
	for i, fn := range fns {
		wrapped[i] = func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
			for {
				n, err := fn(packets, sizes, eps)
				if err != nil || !b.blocked.Load() {
					for i := 0; i < n; i++ {
						if b.cut(eps[i]) {
							sizes[i] = 0 // WireGuard skips it
						}
					}
					return n, err
				}
				// dropped: wait for the next packets
			}
		}
	}
	return wrapped, actual, nil
}

// Send drops everything while blocked.
func (b *BlockableBind) Send(bufs [][]byte, ep conn.Endpoint) error {
	if b.cut(ep) {
		return nil
	}
	return b.Bind.Send(bufs, ep)
}
