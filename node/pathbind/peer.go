package pathbind

import (
	"encoding/base64"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/nacl/box"
	"golang.zx2c4.com/wireguard/conn"
)

// Peer is a peer's WireGuard endpoint: WireGuard holds it as the peer's
// endpoint, and Send looks at its current path.
type Peer struct {
	b      *Bind
	key    [32]byte
	path   atomic.Pointer[pathState]
	active atomic.Int64 // unix nanos of the last packet sent or received
	// nextProbe (unix nanos) is when the peer is due for probes again;
	// Send checks it without a lock, so the first packet to a peer goes
	// out right behind its probes.
	nextProbe  atomic.Int64
	unanswered atomic.Int32 // probe rounds since the last answer
	// Our recent session indexes with this peer and the last stale
	// session report (see stale.go).
	ours    indexRing
	staleAt atomic.Int64

	mu        sync.Mutex
	name      string
	proxy     bool
	disco     [32]byte
	hasDisco  bool
	shared    [32]byte // box key with the peer's disco key
	cands     []*cand
	lastProbe time.Time
	removed   bool
	lastPath  string // for logging changes
}

// pathState is what Send reads: a trusted direct endpoint (until the
// trust runs out), else the relay, else guess.
type pathState struct {
	direct     conn.Endpoint
	directAddr netip.AddrPort
	until      time.Time
	guess      conn.Endpoint
	guessAddr  netip.AddrPort
	// challenger: an address the peer just sent an authenticated probe
	// from while we use another; until its own probe answers, packets go
	// to both for a moment (duplicates are harmless to WireGuard), so a
	// peer that moved gets our handshake answer at once.
	challenger      conn.Endpoint
	challengerUntil time.Time
}

// cand is a candidate direct endpoint.
type cand struct {
	addr    netip.AddrPort
	ep      conn.Endpoint // the inner bind's endpoint
	learned bool          // from an authenticated probe's source, not the netmap
	seen    time.Time     // last authenticated probe from it
	tx      [txLen]byte
	pingAt  time.Time
	pongAt  time.Time
	rtt     time.Duration
}

func (p *Peer) label() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.name != "" {
		return p.name
	}
	return base64.StdEncoding.EncodeToString(p.key[:])
}

// configure applies the netmap's view of the peer, keeping the probe state
// of candidates that stay.
func (p *Peer) configure(c PeerConfig, ourPriv *[32]byte) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.name, p.proxy = c.Name, c.Proxy
	if c.DiscoKey != p.disco || !p.hasDisco {
		p.disco = c.DiscoKey
		p.hasDisco = c.DiscoKey != [32]byte{}
		if p.hasDisco {
			box.Precompute(&p.shared, &p.disco, ourPriv)
		}
	}
	old := p.cands
	p.cands = make([]*cand, 0, len(c.Candidates)+maxLearned)
	for _, ap := range c.Candidates {
		i := slices.IndexFunc(old, func(o *cand) bool { return o.addr == ap })
		if i >= 0 {
			o := old[i]
			o.learned = false
			p.cands = append(p.cands, o)
		} else {
			p.cands = append(p.cands, &cand{addr: ap})
		}
	}
	for _, o := range old {
		if o.learned && !slices.ContainsFunc(p.cands, func(n *cand) bool { return n.addr == o.addr }) {
			p.cands = append(p.cands, o)
		}
	}
	p.recomputeLocked(time.Now())
}

// learn records an authenticated probe's source as a candidate; it reports
// whether the candidate is new (the address map must be rebuilt).
func (p *Peer) learn(src netip.AddrPort, ep conn.Endpoint, now time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	defer p.recomputeLocked(now)
	for _, c := range p.cands {
		if c.addr == src {
			c.ep, c.seen = ep, now
			return false
		}
	}
	p.cands = append(p.cands, &cand{addr: src, ep: ep, learned: true, seen: now})
	// Keep at most maxLearned learned candidates: drop the stalest.
	var learned []*cand
	for _, c := range p.cands {
		if c.learned {
			learned = append(learned, c)
		}
	}
	if len(learned) > maxLearned {
		oldest := slices.MinFunc(learned, func(a, b *cand) int { return a.seen.Compare(b.seen) })
		p.cands = slices.DeleteFunc(p.cands, func(c *cand) bool { return c == oldest })
	}
	return true
}

// challenge records that the peer probed us from src (see pathState).
func (p *Peer) challenge(src netip.AddrPort, ep conn.Endpoint, now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	cur := p.path.Load()
	if cur.direct == nil || cur.directAddr == src || !now.Before(cur.until) {
		return
	}
	next := *cur
	next.challenger, next.challengerUntil = ep, now.Add(time.Second)
	p.path.Store(&next)
}

// noteRecv keeps the inner endpoint of the candidate a packet came from
// (it carries the sticky source address for replies).
func (p *Peer) noteRecv(src netip.AddrPort, ep conn.Endpoint) {
	ps := p.path.Load()
	if ps.directAddr == src && ps.direct == ep {
		return
	}
	p.mu.Lock()
	for _, c := range p.cands {
		if c.addr == src {
			c.ep = ep
		}
	}
	p.mu.Unlock()
}

// pong records an answer; false if it answers no outstanding ping from
// that candidate.
func (p *Peer) pong(src netip.AddrPort, tx [txLen]byte, now time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.cands {
		if c.addr == src && c.tx == tx && !c.pingAt.IsZero() && now.Sub(c.pingAt) < 10*time.Second {
			c.pongAt, c.rtt = now, now.Sub(c.pingAt)
			c.tx = [txLen]byte{}
			p.recomputeLocked(now)
			return true
		}
	}
	return false
}

// directTrusted reports whether a direct path is trusted now.
func (p *Peer) directTrusted(now time.Time) bool {
	ps := p.path.Load()
	return ps.direct != nil && now.Before(ps.until)
}

// probeDue reports whether p should be probed now: it is due, has a
// probe key and candidates, and is the proxy or in use.
func (p *Peer) probeDue(now time.Time) bool {
	if now.UnixNano() < p.nextProbe.Load() {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.hasDisco || len(p.cands) == 0 {
		return false
	}
	return p.proxy || now.Sub(time.Unix(0, p.active.Load())) <= p.b.o.ActiveTimeout
}

// refresh recomputes the path (trust runs out with time).
func (p *Peer) refresh(now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.recomputeLocked(now)
}

// recomputeLocked picks the path among the trusted candidates (answered
// within TrustWindow): those that answered their latest probe come first
// (a peer that moved leaves its old address unanswered), then the lowest
// round trip; the current path keeps its place unless another is 20%
// faster, and while a probe round is in flight (nobody has answered it
// yet) the current trusted path stays.
func (p *Peer) recomputeLocked(now time.Time) {
	trust := p.b.o.TrustWindow
	cur := p.path.Load()
	trusted := func(c *cand) bool { return c.ep != nil && !c.pongAt.IsZero() && now.Sub(c.pongAt) < trust }
	fresh := func(c *cand) bool { return trusted(c) && !c.pongAt.Before(c.pingAt) }
	var best, current *cand
	for _, c := range p.cands {
		if c.addr == cur.directAddr && trusted(c) {
			current = c
		}
		if !fresh(c) {
			continue
		}
		switch {
		case best == nil:
			best = c
		case c == current && c.rtt < best.rtt*5/4:
			best = c
		case best != current && c.rtt < best.rtt:
			best = c
		}
	}
	if best == nil {
		best = current
	}
	if best == nil {
		for _, c := range p.cands {
			if trusted(c) && (best == nil || c.rtt < best.rtt) {
				best = c
			}
		}
	}
	next := &pathState{}
	if best != nil {
		next.direct, next.directAddr, next.until = best.ep, best.addr, best.pongAt.Add(trust)
	}
	// Best guess without a relay: the candidate we last heard from (an
	// answer, or an authenticated probe from it), else the first one.
	heard := func(c *cand) time.Time {
		if c.seen.After(c.pongAt) {
			return c.seen
		}
		return c.pongAt
	}
	var g *cand
	for _, c := range p.cands {
		if !heard(c).IsZero() && (g == nil || heard(c).After(heard(g))) {
			g = c
		}
	}
	if g == nil && len(p.cands) > 0 {
		g = p.cands[0]
	}
	if g != nil {
		if g.ep == nil {
			if ep, err := p.b.inner.ParseEndpoint(g.addr.String()); err == nil {
				g.ep = ep
			}
		}
		next.guess, next.guessAddr = g.ep, g.addr
	}
	p.path.Store(next)
	desc := "relay"
	if best != nil {
		desc = "direct " + best.addr.String()
	}
	if desc != p.lastPath {
		if p.lastPath != "" || best != nil {
			p.b.log.Info("path changed", "peer", p.name, "from", p.lastPath, "to", desc)
		}
		p.lastPath = desc
	}
}

// PathInfo says how a peer is reached now, and why.
type PathInfo struct {
	// Path is "direct" (UDP to Endpoint), "relay" (through the proxy's
	// relay) or "none" (no relay connected and no endpoint known).
	Path string
	// Confirmed: a direct path whose probe answered (not a guess).
	Confirmed bool
	Endpoint  netip.AddrPort // direct: the endpoint used; relay: the relay's address if known
	RTT       time.Duration  // direct: the last probe's round trip
	Reason    string
}

// PathOf reports how the peer with WireGuard key k is reached.
func (b *Bind) PathOf(k [32]byte) (PathInfo, bool) {
	p := b.peerByKey(k)
	if p == nil {
		return PathInfo{}, false
	}
	return p.info(time.Now()), true
}

func (p *Peer) info(now time.Time) PathInfo {
	p.mu.Lock()
	defer p.mu.Unlock()
	ps := p.path.Load()
	if ps.direct != nil && now.Before(ps.until) {
		var rtt time.Duration
		for _, c := range p.cands {
			if c.addr == ps.directAddr {
				rtt = c.rtt
			}
		}
		return PathInfo{Path: "direct", Confirmed: true, Endpoint: ps.directAddr, RTT: rtt,
			Reason: fmt.Sprintf("probe to %s answered in %s", ps.directAddr, rtt.Round(10*time.Microsecond))}
	}
	why := p.noDirectReasonLocked(now)
	if p.b.relay.Load() != nil {
		var ap netip.AddrPort
		if a := p.b.relayAddr.Load(); a != nil {
			ap = *a
		}
		return PathInfo{Path: "relay", Endpoint: ap, Reason: why}
	}
	if ps.guess != nil {
		return PathInfo{Path: "direct", Endpoint: ps.guessAddr, Reason: why + "; no relay connected, sending to " + ps.guessAddr.String() + " unconfirmed"}
	}
	return PathInfo{Path: "none", Reason: why + "; no relay connected"}
}

func (p *Peer) noDirectReasonLocked(now time.Time) string {
	switch {
	case !p.hasDisco:
		return "peer has no probe key yet"
	case len(p.cands) == 0:
		return "peer has no direct endpoint"
	}
	var lastPong time.Time
	var at netip.AddrPort
	probed := 0
	for _, c := range p.cands {
		if !c.pingAt.IsZero() {
			probed++
		}
		if c.pongAt.After(lastPong) {
			lastPong, at = c.pongAt, c.addr
		}
	}
	switch {
	case probed == 0:
		return "not probed yet (no traffic)"
	case lastPong.IsZero():
		return fmt.Sprintf("no direct probe answered (%d endpoints tried)", probed)
	}
	return fmt.Sprintf("direct path %s stopped answering %s ago", at, now.Sub(lastPong).Round(time.Second))
}

// Endpoint interface: WireGuard calls these on the peer's endpoint.

// ClearSrc implements conn.Endpoint (the inner endpoints keep their own
// sticky sources).
func (p *Peer) ClearSrc() {}

// SrcToString implements conn.Endpoint.
func (p *Peer) SrcToString() string { return "" }

// DstToString implements conn.Endpoint: the address in use (the relay's
// when relayed, if known).
func (p *Peer) DstToString() string { return p.dst().String() }

// DstToBytes implements conn.Endpoint (used for WireGuard's cookie MACs).
func (p *Peer) DstToBytes() []byte {
	b, _ := p.dst().MarshalBinary()
	return b
}

// DstIP implements conn.Endpoint.
func (p *Peer) DstIP() netip.Addr { return p.dst().Addr() }

// SrcIP implements conn.Endpoint.
func (p *Peer) SrcIP() netip.Addr { return netip.Addr{} }

func (p *Peer) dst() netip.AddrPort {
	ps := p.path.Load()
	if ps.direct != nil && time.Now().Before(ps.until) {
		return ps.directAddr
	}
	if p.b.relay.Load() != nil {
		if a := p.b.relayAddr.Load(); a != nil && a.IsValid() {
			return *a
		}
	}
	if ps.guessAddr.IsValid() {
		return ps.guessAddr
	}
	return netip.AddrPortFrom(netip.IPv4Unspecified(), 0)
}
