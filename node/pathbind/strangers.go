package pathbind

import (
	"net/netip"
	"sync"
	"time"
)

// Strangers: addresses that sent us a WireGuard handshake message before
// any peer was known at them.
//
// A node that starts right after it enrolled sends its first handshake
// (persistent keepalive to the proxy) before the proxy's netmap has the
// node's endpoints. The handshake reaches WireGuard as a stranger's, and
// WireGuard answers; but the initiator's next packet, the keepalive that
// confirms the session, is transport data from the same unknown address.
// Dropped, it leaves the responder with an unconfirmed session that it
// may not send under, and WireGuard starts no handshake of its own within
// REKEY_TIMEOUT (5 s) of its response: the proxy's first request to a
// fresh node stalled for 5 s. So for strangerWindow after a handshake
// message from an address, transport data from it goes to WireGuard too,
// which authenticates it (a packet under no session of ours is dropped at
// its index lookup, before any decryption).

const (
	strangerWindow = 10 * time.Second
	maxStrangers   = 256 // bounds the table against handshakes from spoofed sources
)

type strangerTable struct {
	mu   sync.Mutex
	seen map[netip.AddrPort]int64 // unix nanos of the last handshake message
}

// note records a handshake message from src at now.
func (s *strangerTable) note(src netip.AddrPort, now int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.seen == nil {
		s.seen = map[netip.AddrPort]int64{}
	}
	if _, ok := s.seen[src]; !ok && len(s.seen) >= maxStrangers {
		for a, t := range s.seen {
			if now-t >= int64(strangerWindow) {
				delete(s.seen, a)
			}
		}
		if len(s.seen) >= maxStrangers {
			return // full of fresh entries: this one waits for the netmap
		}
	}
	s.seen[src] = now
}

// recent reports whether src sent a handshake message within
// strangerWindow before now.
func (s *strangerTable) recent(src netip.AddrPort, now int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.seen[src]
	if ok && now-t >= int64(strangerWindow) {
		delete(s.seen, src)
		ok = false
	}
	return ok
}
