// Package ratelimit limits failed attempts (bad tokens, keys, passwords) per
// source address.
package ratelimit

import (
	"math"
	"net/netip"
	"sync"
	"time"
)

// FailLimiter rate-limits failed attempts per source: a token bucket of
// burst failures refilled at one per interval. Successful attempts cost
// nothing. IPv6 sources are grouped by /64, since one host usually owns one.
type FailLimiter struct {
	burst    float64
	interval time.Duration
	now      func() time.Time
	maxKeys  int

	mu      sync.Mutex
	buckets map[netip.Addr]*bucket
}

type bucket struct {
	tokens float64
	at     time.Time
}

func New(burst int, interval time.Duration, now func() time.Time) *FailLimiter {
	return &FailLimiter{burst: float64(burst), interval: interval, now: now, maxKeys: 100_000, buckets: map[netip.Addr]*bucket{}}
}

func limiterKey(a netip.Addr) netip.Addr {
	a = a.Unmap()
	if a.Is6() {
		p, _ := a.Prefix(64)
		return p.Addr()
	}
	return a
}

// refill brings b up to date; the caller holds mu.
func (l *FailLimiter) refill(b *bucket, now time.Time) {
	b.tokens = math.Min(l.burst, b.tokens+float64(now.Sub(b.at))/float64(l.interval))
	b.at = now
}

// Allow reports whether src may try again now and, if not, how long it
// must wait.
func (l *FailLimiter) Allow(src netip.Addr) (bool, time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	b, ok := l.buckets[limiterKey(src)]
	if !ok {
		return true, 0
	}
	now := l.now()
	l.refill(b, now)
	if b.tokens >= 1 {
		return true, 0
	}
	return false, time.Duration((1 - b.tokens) * float64(l.interval))
}

// Fail records a failed attempt from src.
func (l *FailLimiter) Fail(src netip.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	k, now := limiterKey(src), l.now()
	b, ok := l.buckets[k]
	if !ok {
		if len(l.buckets) >= l.maxKeys {
			l.evictFull(now)
		}
		b = &bucket{tokens: l.burst, at: now}
		l.buckets[k] = b
	}
	l.refill(b, now)
	b.tokens = math.Max(0, b.tokens-1)
}

// evictFull drops buckets that have refilled completely (they carry no
// state); if none has, it drops an arbitrary half, so memory stays bounded
// under a flood of distinct sources.
func (l *FailLimiter) evictFull(now time.Time) {
	for k, b := range l.buckets {
		l.refill(b, now)
		if b.tokens >= l.burst {
			delete(l.buckets, k)
		}
	}
	if len(l.buckets) < l.maxKeys {
		return
	}
	n := 0
	for k := range l.buckets {
		if n%2 == 0 {
			delete(l.buckets, k)
		}
		n++
	}
}
