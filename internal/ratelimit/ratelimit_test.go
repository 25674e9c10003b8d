package ratelimit

import (
	"net/netip"
	"testing"
	"time"
)

type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func TestBurstThenRefill(t *testing.T) {
	c := &clock{t: time.Unix(1000, 0)}
	l := New(3, 10*time.Second, c.now)
	src := netip.MustParseAddr("192.0.2.1")
	for i := range 3 {
		if ok, _ := l.Allow(src); !ok {
			t.Fatalf("attempt %d refused inside the burst", i)
		}
		l.Fail(src)
	}
	ok, wait := l.Allow(src)
	if ok || wait <= 0 || wait > 10*time.Second {
		t.Fatalf("after the burst: ok=%v wait=%v", ok, wait)
	}
	if ok, _ := l.Allow(netip.MustParseAddr("192.0.2.2")); !ok {
		t.Fatal("another source was limited too")
	}
	c.t = c.t.Add(wait)
	if ok, _ := l.Allow(src); !ok {
		t.Fatal("still limited after the announced wait")
	}
}

func TestIPv6GroupedBy64(t *testing.T) {
	c := &clock{t: time.Unix(1000, 0)}
	l := New(1, time.Minute, c.now)
	l.Fail(netip.MustParseAddr("2001:db8:1:2::1"))
	if ok, _ := l.Allow(netip.MustParseAddr("2001:db8:1:2::ffff")); ok {
		t.Fatal("same /64, different address: not limited")
	}
	if ok, _ := l.Allow(netip.MustParseAddr("2001:db8:1:3::1")); !ok {
		t.Fatal("another /64 limited")
	}
	if ok, _ := l.Allow(netip.MustParseAddr("::ffff:192.0.2.9")); !ok {
		t.Fatal("unrelated IPv4-mapped source limited")
	}
}

func TestMemoryBounded(t *testing.T) {
	c := &clock{t: time.Unix(1000, 0)}
	l := New(2, time.Minute, c.now)
	l.maxKeys = 100
	for i := range 1000 {
		l.Fail(netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}))
	}
	if n := len(l.buckets); n > 100 {
		t.Fatalf("%d buckets kept, bound is 100", n)
	}
}
