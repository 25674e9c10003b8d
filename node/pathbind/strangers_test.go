package pathbind

import (
	"net/netip"
	"testing"
	"time"
)

// The stranger table remembers a handshake's source for strangerWindow
// and holds at most maxStrangers fresh entries (spoofed sources cannot
// grow it), making room from expired ones.
func TestStrangerTableBounds(t *testing.T) {
	var s strangerTable
	addr := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{127, 0, byte(i >> 8), byte(i)}), 51820)
	}
	now := time.Now().UnixNano()
	for i := range maxStrangers + 10 {
		s.note(addr(i), now)
	}
	if n := len(s.seen); n != maxStrangers {
		t.Fatalf("%d entries, want the cap %d", n, maxStrangers)
	}
	if !s.recent(addr(0), now+int64(time.Second)) {
		t.Error("a stranger within the window is not recent")
	}
	if s.recent(addr(maxStrangers), now) {
		t.Error("a stranger noted over the cap is recent")
	}
	// Expired entries make room for new ones.
	later := now + int64(strangerWindow)
	s.note(addr(maxStrangers+1), later)
	if !s.recent(addr(maxStrangers+1), later) {
		t.Error("no room made from expired entries")
	}
	if n := len(s.seen); n != 1 {
		t.Errorf("%d entries after the expired ones were dropped, want 1", n)
	}
	s.note(addr(1), now)
	if s.recent(addr(1), later) {
		t.Error("a stranger is still recent after the window")
	}
}
