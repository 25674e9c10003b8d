package sqlite

import (
	"net/netip"
	"testing"
)

// The address index follows a transaction's allocations and releases and
// unwinds them to a savepoint exactly.
func TestAddrIndexRollback(t *testing.T) {
	a := netip.MustParseAddr
	ix := &addrIndex{pool4: netip.MustParsePrefix("10.9.0.0/24"), pool6: netip.MustParsePrefix("fd00:9::/48"),
		held: map[netip.Addr]bool{a("10.9.0.1"): true, a("fd00:9::a09:1"): true, a("10.9.0.2"): true, a("fd00:9::a09:2"): true}}
	alloc := func(want string) {
		t.Helper()
		v4, v6, err := ix.allocate()
		if err != nil || v4 != a(want) {
			t.Fatalf("allocate = %v, %v, %v; want %s", v4, v6, err, want)
		}
		if !ix.held[v4] || !ix.held[v6] {
			t.Fatalf("%v/%v not held after allocation", v4, v6)
		}
	}
	alloc("10.9.0.3")
	ix.committed()
	snapshot := func() (map[netip.Addr]bool, netip.Addr) {
		m := map[netip.Addr]bool{}
		for k, v := range ix.held {
			m[k] = v
		}
		return m, ix.low
	}
	held0, low0 := snapshot()
	mark := ix.mark()
	ix.release(a("10.9.0.1"), a("fd00:9::a09:1"))
	alloc("10.9.0.1") // the released one is lowest
	alloc("10.9.0.4")
	ix.release(a("10.9.0.2"), a("fd00:9::a09:2"))
	alloc("10.9.0.2")
	ix.rollbackTo(mark)
	held1, low1 := snapshot()
	if low1 != low0 || len(held1) != len(held0) {
		t.Fatalf("after rollback: low %v (was %v), %d held (was %d)", low1, low0, len(held1), len(held0))
	}
	for k := range held0 {
		if !held1[k] {
			t.Errorf("%v no longer held after rollback", k)
		}
	}
	alloc("10.9.0.4") // as if the rolled-back work never happened
}
