package ipam

import (
	"bytes"
	"crypto/rand"
	"errors"
	mrand "math/rand/v2"
	"net/netip"
	"strings"
	"testing"
	"testing/iotest"
)

func none(netip.Addr) bool { return false }

func TestNextBasics(t *testing.T) {
	tests := []struct {
		pool string
		used []string
		want string // "" = exhausted
	}{
		{"10.0.0.0/24", nil, "10.0.0.1"},
		{"10.0.0.77/24", nil, "10.0.0.1"}, // masked first
		{"10.0.0.0/24", []string{"10.0.0.1", "10.0.0.2"}, "10.0.0.3"},
		{"10.0.0.0/24", []string{"10.0.0.2"}, "10.0.0.1"},
		{"10.0.0.0/30", []string{"10.0.0.1"}, "10.0.0.2"},
		{"10.0.0.0/30", []string{"10.0.0.1", "10.0.0.2"}, ""}, // .3 is broadcast
		{"10.0.0.0/31", nil, "10.0.0.1"},                      // no broadcast; network still skipped
		{"10.0.0.0/31", []string{"10.0.0.1"}, ""},
		{"10.0.0.0/32", nil, ""},
		{"255.255.255.0/24", []string{"255.255.255.1"}, "255.255.255.2"},
		{"255.255.255.252/30", []string{"255.255.255.253", "255.255.255.254"}, ""},
		{"0.0.0.0/0", nil, "0.0.0.1"},
		{"fd00::/64", nil, ""}, // IPv6 pools are not allocated from
	}
	for _, tt := range tests {
		used := map[netip.Addr]bool{}
		for _, u := range tt.used {
			used[netip.MustParseAddr(u)] = true
		}
		got, ok := Next(netip.MustParsePrefix(tt.pool), func(a netip.Addr) bool { return used[a] })
		if tt.want == "" {
			if ok {
				t.Errorf("Next(%s, %v) = %v, want exhausted", tt.pool, tt.used, got)
			}
			continue
		}
		if !ok || got != netip.MustParseAddr(tt.want) {
			t.Errorf("Next(%s, %v) = %v, %v; want %s", tt.pool, tt.used, got, ok, tt.want)
		}
	}
	if _, ok := Next(netip.Prefix{}, none); ok {
		t.Error("Next(invalid prefix) reported an address")
	}
}

func TestNextLargePoolManyUsed(t *testing.T) {
	// A /8 with the first 200k addresses used: one linear pass.
	pool := netip.MustParsePrefix("10.0.0.0/8")
	const n = 200_000
	calls := 0
	used := func(a netip.Addr) bool {
		calls++
		b := a.As4()
		off := int(b[1])<<16 | int(b[2])<<8 | int(b[3])
		return off <= n
	}
	got, ok := Next(pool, used)
	next := uint32(n + 1)
	want := netip.AddrFrom4([4]byte{10, byte(next >> 16), byte(next >> 8), byte(next)})
	if !ok || got != want {
		t.Fatalf("Next = %v, %v; want %v", got, ok, want)
	}
	if calls != n+1 {
		t.Errorf("used called %d times, want %d (each candidate once)", calls, n+1)
	}
}

func TestNextFullSlash8(t *testing.T) {
	if testing.Short() {
		t.Skip("scans 16M addresses")
	}
	calls := 0
	_, ok := Next(netip.MustParsePrefix("10.0.0.0/8"), func(netip.Addr) bool { calls++; return true })
	if ok {
		t.Fatal("full /8 not reported exhausted")
	}
	if want := 1<<24 - 2; calls != want {
		t.Errorf("used called %d times, want %d", calls, want)
	}
}

// naiveNext is the reference: enumerate every address of the pool by
// repeated Next(), skipping network and broadcast by comparison.
func naiveNext(pool netip.Prefix, used map[netip.Addr]bool) (netip.Addr, bool) {
	pool = pool.Masked()
	network := pool.Addr()
	var broadcast netip.Addr
	for a := network; pool.Contains(a); a = a.Next() {
		broadcast = a
	}
	for a := network; pool.Contains(a); a = a.Next() {
		if a == network || (pool.Bits() < 31 && a == broadcast) || used[a] {
			continue
		}
		return a, true
	}
	return netip.Addr{}, false
}

func TestNextDifferential(t *testing.T) {
	r := mrand.New(mrand.NewPCG(1, 2))
	for i := 0; i < 2000; i++ {
		bits := 24 + r.IntN(9) // /24 .. /32
		var b [4]byte
		for j := range b {
			b[j] = byte(r.Uint32())
		}
		pool := netip.PrefixFrom(netip.AddrFrom4(b), bits).Masked()
		size := 1 << (32 - bits)
		density := r.Float64()
		used := map[netip.Addr]bool{}
		for a, k := pool.Addr(), 0; k < size; a, k = a.Next(), k+1 {
			if r.Float64() < density {
				used[a] = true
			}
		}
		// Sometimes include addresses outside the pool: they must not matter.
		used[pool.Addr().Prev()] = r.IntN(2) == 0
		got, gotOK := Next(pool, func(a netip.Addr) bool { return used[a] })
		want, wantOK := naiveNext(pool, used)
		if got != want || gotOK != wantOK {
			t.Fatalf("pool %v with %d used: Next = %v, %v; reference = %v, %v", pool, len(used), got, gotOK, want, wantOK)
		}
		if gotOK && (!pool.Contains(got) || used[got]) {
			t.Fatalf("pool %v: Next returned %v, outside the pool or used", pool, got)
		}
	}
}

func TestIPv6For(t *testing.T) {
	tests := []struct {
		pool, v4, want string
	}{
		{"fd12:3456:789a::/48", "10.77.0.1", "fd12:3456:789a::a4d:1"},
		{"fd12:3456:789a::/48", "255.255.255.254", "fd12:3456:789a::ffff:fffe"},
		{"fd00:1:2:3:4:5::/96", "100.64.0.9", "fd00:1:2:3:4:5:6440:9"},
		{"fd12:3456:789a:ffff::/48", "10.0.0.1", "fd12:3456:789a::a00:1"},   // masked
		{"fd12:3456:789a::/48", "::ffff:10.0.0.1", "fd12:3456:789a::a00:1"}, // unmapped
	}
	for _, tt := range tests {
		got, err := IPv6For(netip.MustParsePrefix(tt.pool), netip.MustParseAddr(tt.v4))
		if err != nil || got != netip.MustParseAddr(tt.want) {
			t.Errorf("IPv6For(%s, %s) = %v, %v; want %s", tt.pool, tt.v4, got, err, tt.want)
		}
	}
	bad := []struct{ pool, v4 string }{
		{"fd00::/97", "10.0.0.1"},
		{"10.0.0.0/8", "10.0.0.1"},
		{"fd00::/48", "fd00::1"},
	}
	for _, tt := range bad {
		if got, err := IPv6For(netip.MustParsePrefix(tt.pool), netip.MustParseAddr(tt.v4)); err == nil {
			t.Errorf("IPv6For(%s, %s) = %v, want error", tt.pool, tt.v4, got)
		}
	}
	if _, err := IPv6For(netip.Prefix{}, netip.MustParseAddr("10.0.0.1")); err == nil {
		t.Error("IPv6For(invalid prefix) succeeded")
	}
}

func TestValidatePools(t *testing.T) {
	okV6 := netip.MustParsePrefix("fd12:3456:789a::/48")
	okV4 := netip.MustParsePrefix("10.100.0.0/16")
	if err := ValidatePools(okV4, okV6); err != nil {
		t.Fatalf("valid pools rejected: %v", err)
	}
	for _, p := range []string{"10.0.0.0/8", "192.168.7.0/30", "100.64.0.0/10"} {
		if err := ValidatePools(netip.MustParsePrefix(p), okV6); err != nil {
			t.Errorf("%s rejected: %v", p, err)
		}
	}
	for _, p := range []string{"fc00::/7", "fd00::/8", "fdff:1:2:3:4:5::/96"} {
		if err := ValidatePools(okV4, netip.MustParsePrefix(p)); err != nil {
			t.Errorf("%s rejected: %v", p, err)
		}
	}
	tests := []struct {
		v4, v6 string
		want   []string // substrings of the error
	}{
		{"10.0.0.1/24", "", []string{"--cidr 10.0.0.1/24 is not a network address", "did you mean 10.0.0.0/24?"}},
		{"10.0.0.0/7", "", []string{"--cidr 10.0.0.0/7 is too large", "/8"}},
		{"10.0.0.0/31", "", []string{"--cidr 10.0.0.0/31 is too small", "/30"}},
		{"10.0.0.0/32", "", []string{"too small"}},
		{"fd00::/64", "", []string{"--cidr fd00::/64 is not an IPv4 network"}},
		{"", "fd00::1/48", []string{"IPv6 pool fd00::1/48 is not a network address", "did you mean fd00::/48?"}},
		{"", "fd00::/100", []string{"IPv6 pool fd00::/100 is too small", "/96"}},
		{"", "2001:db8::/48", []string{"IPv6 pool 2001:db8::/48 is not a unique local (fc00::/7)"}},
		{"", "fc00::/6", []string{"not a unique local"}},
		{"", "10.0.0.0/8", []string{"IPv6 pool 10.0.0.0/8 is not an IPv6 network"}},
		{"", "::ffff:10.0.0.0/104", []string{"is not an IPv6 network"}},
		{"10.0.0.1/24", "fd00::1/48", []string{"--cidr 10.0.0.1/24", "IPv6 pool fd00::1/48"}}, // both reported
	}
	for _, tt := range tests {
		v4, v6 := okV4, okV6
		if tt.v4 != "" {
			v4 = netip.MustParsePrefix(tt.v4)
		}
		if tt.v6 != "" {
			v6 = netip.MustParsePrefix(tt.v6)
		}
		err := ValidatePools(v4, v6)
		if err == nil {
			t.Errorf("ValidatePools(%v, %v) = nil, want error", v4, v6)
			continue
		}
		for _, w := range tt.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("ValidatePools(%v, %v) = %q, want it to contain %q", v4, v6, err, w)
			}
		}
	}
	if err := ValidatePools(netip.Prefix{}, netip.Prefix{}); err == nil ||
		!strings.Contains(err.Error(), "--cidr is missing") || !strings.Contains(err.Error(), "IPv6 pool is missing") {
		t.Errorf("zero prefixes: got %v", err)
	}
}

func TestNewULA48(t *testing.T) {
	seen := map[netip.Prefix]bool{}
	for i := 0; i < 100; i++ {
		p := NewULA48(rand.Reader)
		if p.Bits() != 48 || p.Masked() != p {
			t.Fatalf("NewULA48 = %v, want a masked /48", p)
		}
		if b := p.Addr().As16(); b[0] != 0xfd {
			t.Fatalf("NewULA48 = %v, want fd00::/8", p)
		}
		if err := ValidatePools(netip.MustParsePrefix("10.0.0.0/24"), p); err != nil {
			t.Fatalf("NewULA48 = %v, rejected by ValidatePools: %v", p, err)
		}
		seen[p] = true
	}
	if len(seen) < 99 {
		t.Errorf("100 random /48s gave only %d distinct ones", len(seen))
	}

	// The 40 bits come from r, in order.
	p := NewULA48(bytes.NewReader([]byte{0x12, 0x34, 0x56, 0x78, 0x9a, 0xff}))
	if want := netip.MustParsePrefix("fd12:3456:789a::/48"); p != want {
		t.Errorf("NewULA48(fixed bytes) = %v, want %v", p, want)
	}
	// All 40 bits are used: the max global ID round-trips.
	p = NewULA48(bytes.NewReader(bytes.Repeat([]byte{0xff}, 5)))
	if want := netip.MustParsePrefix("fdff:ffff:ffff::/48"); p != want {
		t.Errorf("NewULA48(all ones) = %v, want %v", p, want)
	}

	defer func() {
		if recover() == nil {
			t.Error("NewULA48 with a failing reader did not panic")
		}
	}()
	NewULA48(iotest.ErrReader(errors.New("boom")))
}

func TestNextFrom(t *testing.T) {
	pool := netip.MustParsePrefix("10.0.0.0/29") // .1 to .6 usable
	used := map[netip.Addr]bool{netip.MustParseAddr("10.0.0.4"): true}
	var asked []netip.Addr
	isUsed := func(a netip.Addr) bool { asked = append(asked, a); return used[a] }
	for _, tt := range []struct{ from, want string }{
		{"", "10.0.0.1"},          // zero Addr: the start
		{"10.0.0.0", "10.0.0.1"},  // the network address is never handed out
		{"10.0.0.3", "10.0.0.3"},  // from itself if free
		{"10.0.0.4", "10.0.0.5"},  // skips the used one
		{"192.0.2.9", "10.0.0.1"}, // outside the pool: the start
		{"10.0.0.7", ""},          // the broadcast address: none left
	} {
		asked = nil
		var from netip.Addr
		if tt.from != "" {
			from = netip.MustParseAddr(tt.from)
		}
		got, ok := NextFrom(pool, from, isUsed)
		if (tt.want == "" && ok) || (tt.want != "" && (!ok || got != netip.MustParseAddr(tt.want))) {
			t.Errorf("NextFrom(%s) = %v, %t; want %q", tt.from, got, ok, tt.want)
		}
		for _, a := range asked {
			if from.Is4() && pool.Contains(from) && a.Less(from) {
				t.Errorf("NextFrom(%s) asked about %v, below from", tt.from, a)
			}
		}
	}
}
