// Package pathbind is the node's WireGuard conn.Bind. It wraps the stock
// UDP bind (so direct traffic keeps its sendmmsg/recvmmsg batching and UDP
// GSO/GRO) and chooses, for each peer, between a direct UDP path and the
// relay in the proxy, which carries still-encrypted WireGuard messages
// addressed by the peer's public key.
//
// Each peer's UAPI endpoint is a per-peer Endpoint object (EndpointID, the
// peer's key in hex, parsed by ParseEndpoint), and packets received from a
// peer, directly or through the relay, are handed to WireGuard with that
// same object; so WireGuard's roaming can never replace the path choice
// with a raw address. Datagrams from addresses that no peer is known at
// (neither a netmap endpoint nor the source of one of its authenticated
// probes) are dropped.
//
// Path choice per peer: probes (see disco.go) go to every candidate
// endpoint of the peers in use (and of proxies, always); a candidate that
// answers is trusted for TrustWindow after its last answer and carries the
// traffic (the lowest round trip wins). Without a trusted candidate,
// traffic goes through the relay; with no relay connected either, to the
// best guess (the candidate that answered last, else the first one).
// Traffic thus stays on the relay until a direct probe succeeds, switches
// to direct, and returns to the relay when direct probes stop answering.
package pathbind

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/curve25519"
	"golang.zx2c4.com/wireguard/conn"
)

// Defaults for zero Options fields.
const (
	DefaultProbeInterval = 2 * time.Second         // probing a peer with no direct path
	DefaultDirectProbe   = 2500 * time.Millisecond // re-confirming a direct path
	DefaultTrustWindow   = 6500 * time.Millisecond // a direct path stays trusted this long after its last answer (two probes missed)
	DefaultActiveTimeout = 2 * time.Minute         // a peer without traffic this long is no longer probed
	DefaultRelayLinger   = time.Minute             // the relay stays connected this long after it was last needed
	maxLearned           = 4                       // learned (probe source) candidates kept per peer
)

// RelayConn is a connection to the relay (package proxy/relay's Client).
type RelayConn interface {
	Send(dst [32]byte, pkt []byte) error
	Recv() (src [32]byte, pkt []byte, err error)
	Close() error
}

// Options configure a Bind.
type Options struct {
	// Inner is the bind that does the UDP work (conn.NewDefaultBind() in
	// production; tests put a lossy path here). Required.
	Inner conn.Bind
	// DiscoPrivate is this node's disco private key (DiscoKeyFromWireGuard).
	DiscoPrivate [32]byte
	// RelayDial opens a connection to the relay; nil = no relay.
	RelayDial func(ctx context.Context) (RelayConn, error)
	// OnPublicEndpoint is called (never under locks) when a proxy's answer
	// tells a different public endpoint of ours (STUN).
	OnPublicEndpoint func(netip.AddrPort)
	// OnStaleSession is called, in a goroutine of its own and at most once
	// per 5 s per peer, when a peer sends transport data under a session
	// this process never made (it restarted): the callee should start a
	// WireGuard handshake with the peer (see stale.go).
	OnStaleSession func(peer [32]byte)
	Logger         *slog.Logger

	ProbeInterval, DirectProbe, TrustWindow, ActiveTimeout, RelayLinger time.Duration
}

// PeerConfig is what the Bind knows of a peer, from the netmap.
type PeerConfig struct {
	Key  [32]byte // WireGuard public key
	Name string
	// DiscoKey is the peer's disco public key; zero = unknown (the peer is
	// then only reached through the relay, or at its first candidate).
	DiscoKey [32]byte
	// Candidates are the peer's direct endpoints in preference order.
	Candidates []netip.AddrPort
	// Proxy marks the proxy: always probed (its answers tell our public
	// endpoint), so its path is known before traffic needs it.
	Proxy bool
}

// Bind is a conn.Bind choosing per-peer paths. Create it with New, hand it
// to device.NewDevice, give it peers with SetPeers and run Run.
type Bind struct {
	o        Options
	inner    conn.Bind
	log      *slog.Logger
	discoPub [32]byte

	mu      sync.RWMutex
	peers   map[[32]byte]*Peer
	byDisco map[[32]byte]*Peer
	addrs   atomic.Pointer[map[netip.AddrPort]*Peer] // receive attribution
	public  netip.AddrPort

	openMu sync.Mutex
	closed chan struct{} // closed by Close; replaced by Open

	relayRx   chan relayPacket
	relay     atomic.Pointer[relayLink]
	relayWant atomic.Int64 // unix nanos of the last send that wanted the relay
	relayAddr atomic.Pointer[netip.AddrPort]
	relayKick chan struct{} // wakes relayLoop (peers or relay changed)
	// strangerOurs are the session indexes our handshake messages to
	// strangers handed out: the peer is not known yet (see stale.go).
	strangerOurs indexRing
	stats        Stats
}

// Stats count what the Bind did (for tests and status).
type Stats struct {
	DirectSent, RelaySent, GuessSent atomic.Uint64 // packets
	RelayRecv, UnknownDropped        atomic.Uint64
	ProbesSent, PongsReceived        atomic.Uint64
	BadProbes                        atomic.Uint64
	StaleSessions                    atomic.Uint64 // OnStaleSession reports
}

type relayPacket struct {
	src [32]byte
	pkt []byte
}

type relayLink struct {
	c RelayConn
}

// New makes a Bind around o.Inner.
func New(o Options) (*Bind, error) {
	if o.Inner == nil {
		return nil, errors.New("pathbind: Inner bind is required")
	}
	if o.ProbeInterval <= 0 {
		o.ProbeInterval = DefaultProbeInterval
	}
	if o.DirectProbe <= 0 {
		o.DirectProbe = DefaultDirectProbe
	}
	if o.TrustWindow <= 0 {
		o.TrustWindow = DefaultTrustWindow
	}
	if o.ActiveTimeout <= 0 {
		o.ActiveTimeout = DefaultActiveTimeout
	}
	if o.RelayLinger <= 0 {
		o.RelayLinger = DefaultRelayLinger
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	b := &Bind{o: o, inner: o.Inner, log: o.Logger, peers: map[[32]byte]*Peer{}, byDisco: map[[32]byte]*Peer{},
		closed: make(chan struct{}), relayRx: make(chan relayPacket, 512), relayKick: make(chan struct{}, 1)}
	close(b.closed)
	p, err := pubFromPriv(o.DiscoPrivate)
	if err != nil {
		return nil, err
	}
	b.discoPub = p
	b.strangerOurs.idx = make([]atomic.Uint32, strangerOursLen)
	empty := map[netip.AddrPort]*Peer{}
	b.addrs.Store(&empty)
	return b, nil
}

// DiscoPublic is this node's disco public key (reported to the coordinator).
func (b *Bind) DiscoPublic() [32]byte { return b.discoPub }

// Stats returns the Bind's counters.
func (b *Bind) Stats() *Stats { return &b.stats }

// EndpointID is the UAPI endpoint value of a peer: its key in hex.
func EndpointID(key [32]byte) string { return hex.EncodeToString(key[:]) }

// SetPeers replaces the peer set. Peers keep their probe state across
// calls; new peers are probed at once.
func (b *Bind) SetPeers(cfgs []PeerConfig) {
	b.mu.Lock()
	keep := make(map[[32]byte]bool, len(cfgs))
	var fresh []*Peer
	for _, c := range cfgs {
		keep[c.Key] = true
		p := b.peers[c.Key]
		if p == nil {
			p = b.newPeerLocked(c.Key)
			fresh = append(fresh, p)
		}
		p.configure(c, b.discoPriv())
	}
	for k, p := range b.peers {
		if !keep[k] {
			p.mu.Lock()
			p.removed = true
			p.mu.Unlock()
			delete(b.peers, k)
		}
	}
	clear(b.byDisco)
	for _, p := range b.peers {
		if p.hasDisco {
			b.byDisco[p.disco] = p
		}
	}
	b.rebuildAddrsLocked()
	b.mu.Unlock()
	b.kickRelay()
	for _, p := range fresh {
		if p.proxy {
			b.probe(p, time.Now())
		}
	}
}

func (b *Bind) discoPriv() *[32]byte { return &b.o.DiscoPrivate }

func (b *Bind) newPeerLocked(key [32]byte) *Peer {
	p := &Peer{b: b, key: key}
	p.ours.idx = make([]atomic.Uint32, oursLen)
	p.path.Store(&pathState{})
	b.peers[key] = p
	return p
}

// rebuildAddrsLocked recomputes which source address belongs to which
// peer: netmap candidates first, learned ones override (they are proven).
func (b *Bind) rebuildAddrsLocked() {
	m := make(map[netip.AddrPort]*Peer)
	for _, p := range b.peers {
		p.mu.Lock()
		for _, c := range p.cands {
			if !c.learned {
				m[c.addr] = p
			}
		}
		p.mu.Unlock()
	}
	for _, p := range b.peers {
		p.mu.Lock()
		for _, c := range p.cands {
			if c.learned {
				m[c.addr] = p
			}
		}
		p.mu.Unlock()
	}
	b.addrs.Store(&m)
}

// peerByKey finds a peer by WireGuard key.
func (b *Bind) peerByKey(k [32]byte) *Peer {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.peers[k]
}

// Open implements conn.Bind: the inner bind's receive functions, wrapped,
// plus one for packets from the relay.
func (b *Bind) Open(port uint16) ([]conn.ReceiveFunc, uint16, error) {
	fns, actual, err := b.inner.Open(port)
	if err != nil {
		return nil, 0, err
	}
	b.openMu.Lock()
	closed := make(chan struct{})
	b.closed = closed
	b.openMu.Unlock()
	out := make([]conn.ReceiveFunc, 0, len(fns)+1)
	for _, fn := range fns {
		out = append(out, b.wrapReceive(fn))
	}
	out = append(out, b.relayReceive(closed))
	return out, actual, nil
}

// Close implements conn.Bind.
func (b *Bind) Close() error {
	b.openMu.Lock()
	select {
	case <-b.closed:
	default:
		close(b.closed)
	}
	b.openMu.Unlock()
	return b.inner.Close()
}

// SetMark implements conn.Bind.
func (b *Bind) SetMark(mark uint32) error { return b.inner.SetMark(mark) }

// BatchSize implements conn.Bind.
func (b *Bind) BatchSize() int { return b.inner.BatchSize() }

// ParseEndpoint implements conn.Bind: an EndpointID names a peer's
// Endpoint; anything else is a plain address for the inner bind.
func (b *Bind) ParseEndpoint(s string) (conn.Endpoint, error) {
	if len(s) == 64 {
		if raw, err := hex.DecodeString(s); err == nil {
			key := [32]byte(raw)
			b.mu.Lock()
			p := b.peers[key]
			if p == nil {
				p = b.newPeerLocked(key)
			}
			b.mu.Unlock()
			return p, nil
		}
	}
	return b.inner.ParseEndpoint(s)
}

// stranger is the endpoint of a handshake from an address no peer was
// known at. If WireGuard authenticates it, the peer roams to it; once the
// address is attributed (the peer's probe arrived), sends to it follow
// that peer's path, and its next attributed packet gives WireGuard back
// the peer's own Endpoint.
type stranger struct {
	conn.Endpoint // the inner bind's
	addr          netip.AddrPort
}

// Send implements conn.Bind.
func (b *Bind) Send(bufs [][]byte, ep conn.Endpoint) error {
	if s, ok := ep.(*stranger); ok {
		if p := (*b.addrs.Load())[s.addr]; p != nil {
			ep = p
		} else {
			b.strangerOurs.note(bufs)
			return b.inner.Send(bufs, s.Endpoint)
		}
	}
	p, ok := ep.(*Peer)
	if !ok {
		return b.inner.Send(bufs, ep)
	}
	now := time.Now()
	p.active.Store(now.UnixNano())
	p.noteSent(bufs)
	if now.UnixNano() >= p.nextProbe.Load() {
		b.probe(p, now) // before the packet, so the peer knows our address when it arrives
	}
	ps := p.path.Load()
	if ps.direct != nil && now.Before(ps.until) {
		b.stats.DirectSent.Add(uint64(len(bufs)))
		if ps.challenger != nil && now.Before(ps.challengerUntil) {
			b.inner.Send(bufs, ps.challenger)
		}
		return b.inner.Send(bufs, ps.direct)
	}
	b.relayWant.Store(now.UnixNano())
	if l := b.relay.Load(); l != nil {
		var err error
		for _, buf := range bufs {
			if err = l.c.Send(p.key, buf); err != nil {
				break
			}
		}
		if err == nil {
			b.stats.RelaySent.Add(uint64(len(bufs)))
			// Handshake messages also go to the best guess: small and
			// rare, they let a session come up over whichever path works
			// first; data stays on the relay until a probe answers.
			if ps.guess != nil {
				if hs := handshakes(bufs); len(hs) > 0 {
					b.inner.Send(hs, ps.guess)
				}
			}
			return nil
		}
		b.dropRelay(l, err)
	}
	if ps.guess != nil {
		b.stats.GuessSent.Add(uint64(len(bufs)))
		return b.inner.Send(bufs, ps.guess)
	}
	return fmt.Errorf("no path to peer %s: no endpoint known and no relay connected", p.label())
}

// handshakes returns the WireGuard handshake messages among bufs
// (initiation, response, cookie reply: types 1-3).
func handshakes(bufs [][]byte) [][]byte {
	var out [][]byte
	for _, b := range bufs {
		if len(b) >= 4 && b[0] >= 1 && b[0] <= 3 && b[1] == 0 && b[2] == 0 && b[3] == 0 {
			out = append(out, b)
		}
	}
	return out
}

// addrOf returns the source address of a received packet.
func addrOf(ep conn.Endpoint) netip.AddrPort {
	if s, ok := ep.(*conn.StdNetEndpoint); ok {
		return s.AddrPort
	}
	ap, _ := netip.ParseAddrPort(ep.DstToString())
	return ap
}

// wrapReceive attributes each datagram to its peer (or drops it) and
// consumes probes. Dropped and consumed datagrams get size 0, which
// WireGuard skips.
func (b *Bind) wrapReceive(fn conn.ReceiveFunc) conn.ReceiveFunc {
	return func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		n, err := fn(packets, sizes, eps)
		if n == 0 {
			return n, err
		}
		addrs := *b.addrs.Load()
		now := time.Now().UnixNano()
		for i := 0; i < n; i++ {
			pkt := packets[i][:sizes[i]]
			src := addrOf(eps[i])
			if isDisco(pkt) {
				b.handleDisco(pkt, src, eps[i])
				sizes[i] = 0
				addrs = *b.addrs.Load() // it may have taught us src
				continue
			}
			p := addrs[src]
			if p == nil {
				// A handshake message from an unknown address goes to
				// WireGuard as it came (it authenticates it; a peer whose
				// probes we cannot read yet, e.g. before the netmap brought
				// its probe key, still connects, and its first attributed
				// packet hands the peer back to its Endpoint). Anything
				// else from a stranger is dropped.
				if len(handshakes([][]byte{pkt})) == 0 {
					b.stats.UnknownDropped.Add(1)
					sizes[i] = 0
				} else {
					eps[i] = &stranger{Endpoint: eps[i], addr: src}
				}
				continue
			}
			p.active.Store(now)
			p.noteRecv(src, eps[i])
			b.checkSession(p, pkt, now)
			eps[i] = p
		}
		return n, err
	}
}

// relayReceive delivers packets that came through the relay, attributed by
// their authenticated source key.
func (b *Bind) relayReceive(closed chan struct{}) conn.ReceiveFunc {
	return func(packets [][]byte, sizes []int, eps []conn.Endpoint) (int, error) {
		var rp relayPacket
		select {
		case rp = <-b.relayRx:
		case <-closed:
			return 0, net.ErrClosed
		}
		n := 0
		for {
			if p := b.peerByKey(rp.src); p != nil && len(rp.pkt) <= len(packets[n]) {
				sizes[n] = copy(packets[n], rp.pkt)
				eps[n] = p
				now := time.Now().UnixNano()
				p.active.Store(now)
				b.checkSession(p, rp.pkt, now)
				n++
				b.stats.RelayRecv.Add(1)
			} else {
				b.stats.UnknownDropped.Add(1)
			}
			if n == len(packets) {
				return n, nil
			}
			select {
			case rp = <-b.relayRx:
			default:
				return n, nil
			}
		}
	}
}

// handleDisco answers pings and records pongs.
func (b *Bind) handleDisco(pkt []byte, src netip.AddrPort, ep conn.Endpoint) {
	b.mu.RLock()
	p := b.byDisco[senderOf(pkt)]
	b.mu.RUnlock()
	if p == nil {
		b.stats.BadProbes.Add(1)
		return
	}
	p.mu.Lock()
	shared := p.shared
	p.mu.Unlock()
	m, err := openDisco(pkt, &shared)
	if err != nil {
		b.stats.BadProbes.Add(1)
		return
	}
	now := time.Now()
	switch m.typ {
	case discoPing:
		reply := sealDisco(b.discoPub, &shared, discoMsg{typ: discoPong, tx: m.tx, observed: src})
		b.inner.Send([][]byte{reply}, ep)
		isNew := p.learn(src, ep, now)
		if isNew {
			b.mu.Lock()
			b.rebuildAddrsLocked()
			b.mu.Unlock()
		}
		// The peer is trying to reach us: probe back at once (both sides
		// sending is what opens endpoint-independent NATs; a new source
		// means the peer moved, and its old address may be dead).
		p.active.Store(now.UnixNano())
		if isNew || !p.directTrusted(now) || p.path.Load().directAddr != src {
			p.challenge(src, ep, now)
			b.probe(p, now)
		}
	case discoPong:
		b.stats.PongsReceived.Add(1)
		if !p.pong(src, m.tx, now) {
			return
		}
		p.unanswered.Store(0)
		if p.proxy && m.observed.IsValid() {
			b.setPublic(m.observed)
		}
	}
}

func (b *Bind) setPublic(ap netip.AddrPort) {
	b.mu.Lock()
	changed := b.public != ap
	b.public = ap
	b.mu.Unlock()
	if changed {
		b.log.Info("public endpoint discovered", "endpoint", ap.String())
		if b.o.OnPublicEndpoint != nil {
			b.o.OnPublicEndpoint(ap)
		}
	}
}

// PublicEndpoint is our endpoint as the proxy last saw it (zero if none).
func (b *Bind) PublicEndpoint() netip.AddrPort {
	b.mu.RLock()
	defer b.mu.RUnlock()
	return b.public
}

// probe sends a ping to every candidate of p (at most once per 200 ms per
// candidate).
func (b *Bind) probe(p *Peer, now time.Time) {
	type out struct {
		pkt []byte
		ep  conn.Endpoint
	}
	var msgs []out
	// Unanswered probes are repeated quickly at first (250 ms, doubling
	// up to ProbeInterval): the peer may just not know our probe key yet.
	interval := min(b.o.ProbeInterval, 250*time.Millisecond<<min(p.unanswered.Add(1)-1, 8))
	if p.directTrusted(now) {
		interval = b.o.DirectProbe
	}
	p.nextProbe.Store(now.Add(interval).UnixNano())
	p.mu.Lock()
	if !p.hasDisco || p.removed {
		p.mu.Unlock()
		return
	}
	p.lastProbe = now
	for _, c := range p.cands {
		if now.Sub(c.pingAt) < 200*time.Millisecond {
			continue
		}
		if c.ep == nil {
			ep, err := b.inner.ParseEndpoint(c.addr.String())
			if err != nil {
				continue
			}
			c.ep = ep
		}
		c.tx, c.pingAt = newTx(), now
		msgs = append(msgs, out{sealDisco(b.discoPub, &p.shared, discoMsg{typ: discoPing, tx: c.tx}), c.ep})
	}
	p.mu.Unlock()
	for _, m := range msgs {
		if err := b.inner.Send([][]byte{m.pkt}, m.ep); err == nil {
			b.stats.ProbesSent.Add(1)
		}
	}
}

// Run probes peers and keeps the relay connection until ctx ends.
func (b *Bind) Run(ctx context.Context) {
	tick := min(b.o.ProbeInterval/4, 500*time.Millisecond)
	t := time.NewTicker(tick)
	defer t.Stop()
	relayDone := make(chan struct{})
	go func() {
		defer close(relayDone)
		b.relayLoop(ctx)
	}()
	defer func() { <-relayDone }()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		now := time.Now()
		b.mu.RLock()
		peers := make([]*Peer, 0, len(b.peers))
		for _, p := range b.peers {
			peers = append(peers, p)
		}
		b.mu.RUnlock()
		for _, p := range peers {
			if p.probeDue(now) {
				b.probe(p, now)
			}
			p.refresh(now)
		}
	}
}

// relayWanted: a send needed it recently, or some peer has no
// trusted direct path (the relay must be up for peers to reach us too).
func (b *Bind) relayWanted(now time.Time) bool {
	if b.relayAddr.Load() == nil {
		return false // no relay in this mesh
	}
	if now.Sub(time.Unix(0, b.relayWant.Load())) < b.o.RelayLinger {
		return true
	}
	b.mu.RLock()
	defer b.mu.RUnlock()
	for _, p := range b.peers {
		if !p.proxy && !p.directTrusted(now) {
			return true
		}
	}
	return false
}

// RelayConnected reports whether the relay connection is up.
func (b *Bind) RelayConnected() bool { return b.relay.Load() != nil }

func (b *Bind) dropRelay(l *relayLink, err error) {
	if b.relay.CompareAndSwap(l, nil) {
		l.c.Close()
		b.log.Warn("relay connection lost", "err", err)
	}
}

func (b *Bind) relayLoop(ctx context.Context) {
	if b.o.RelayDial == nil {
		return
	}
	backoff := 500 * time.Millisecond
	var idleSince time.Time
	for ctx.Err() == nil {
		now := time.Now()
		l := b.relay.Load()
		wanted := b.relayWanted(now)
		switch {
		case l != nil && wanted:
			idleSince = time.Time{}
		case l != nil:
			if idleSince.IsZero() {
				idleSince = now
			} else if now.Sub(idleSince) > b.o.RelayLinger {
				b.log.Info("relay no longer needed; disconnecting")
				b.dropRelay(l, errors.New("idle"))
			}
		case wanted:
			dctx, cancel := context.WithTimeout(ctx, 15*time.Second)
			c, err := b.o.RelayDial(dctx)
			cancel()
			if err != nil {
				if ctx.Err() == nil {
					b.log.Warn("relay connection failed", "err", err, "retry_in", backoff)
				}
				sleepCtx(ctx, backoff/2+rand.N(backoff/2+1))
				backoff = min(backoff*2, 30*time.Second)
				continue
			}
			backoff = 500 * time.Millisecond
			nl := &relayLink{c: c}
			b.relay.Store(nl)
			b.log.Info("relay connected")
			go b.relayRead(ctx, nl)
		}
		t := time.NewTimer(250 * time.Millisecond)
		select {
		case <-ctx.Done():
		case <-b.relayKick:
		case <-t.C:
		}
		t.Stop()
	}
	if l := b.relay.Load(); l != nil {
		b.dropRelay(l, ctx.Err())
	}
}

func (b *Bind) relayRead(ctx context.Context, l *relayLink) {
	for {
		src, pkt, err := l.c.Recv()
		if err != nil {
			if ctx.Err() == nil {
				b.dropRelay(l, err)
			}
			return
		}
		select {
		case b.relayRx <- relayPacket{src: src, pkt: slices.Clone(pkt)}:
		default: // WireGuard is behind: drop, it retransmits
		}
	}
}

// SetRelay says whether the mesh has a relay, and its address for display
// (status, the endpoint WireGuard shows for relayed peers; zero if it is
// not a literal address). Without a relay, the Bind never dials one.
func (b *Bind) SetRelay(available bool, addr netip.AddrPort) {
	if !available {
		b.relayAddr.Store(nil)
		return
	}
	b.relayAddr.Store(&addr)
	b.kickRelay()
}

func (b *Bind) kickRelay() {
	select {
	case b.relayKick <- struct{}{}:
	default:
	}
}

func sleepCtx(ctx context.Context, d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

func pubFromPriv(priv [32]byte) ([32]byte, error) {
	var pub [32]byte
	if priv == ([32]byte{}) {
		return pub, errors.New("pathbind: disco private key is not set")
	}
	p, err := curve25519.X25519(priv[:], curve25519.Basepoint)
	if err != nil {
		return pub, fmt.Errorf("pathbind: disco private key: %w", err)
	}
	return [32]byte(p), nil
}
