package pathbind

import (
	"encoding/binary"
	"sync/atomic"
	"time"
)

// Stale sessions.
//
// When this node restarts, a peer that held a WireGuard session with the
// old process keeps sending transport data under it. The new process has
// no such receiver index, so WireGuard drops every packet silently, and
// the peer starts a new handshake only when its own timers give up on the
// session (REKEY_TIMEOUT + KEEPALIVE_TIMEOUT: 15 s), while this node,
// with nothing to send, starts none. Connections toward the restarted node
// stall for those 15 s.
//
// The Bind sees every handshake message WireGuard sends, and a receiver
// index of ours first appears as the sender index of our initiation or
// response. So it keeps, per peer, the indexes it saw us hand out;
// transport data from the peer under any other index means the peer holds
// a session we do not, and Options.OnStaleSession asks WireGuard to
// handshake with the peer now. The peer answers, and its next packets use
// the new session. This is lazy: only peers that actually send to us get
// a handshake, so a restart in a large mesh sends none to idle peers.

const (
	// oursLen is how many of our recent receiver indexes are kept per
	// peer. WireGuard holds at most three keypairs and one handshake per
	// peer; the rest of the room covers retried initiations (a new index
	// each). Forgetting an index in use costs one extra handshake.
	oursLen = 16
	// strangerOursLen is the same for the handshake responses we sent to
	// addresses no peer was known at (one ring for all of them): room for
	// that many nodes starting at once before their endpoints reach us.
	strangerOursLen = 256
	// staleEvery is the least time between two reports for one peer:
	// WireGuard's REKEY_TIMEOUT, within which it sends no new initiation
	// anyway.
	staleEvery = 5 * time.Second
)

// WireGuard message types and the offset of the index that names the
// receiver's session (transport data) or the sender's new one (handshake
// initiation and response).
const (
	msgInitiation = 1
	msgResponse   = 2
	msgTransport  = 4
	indexOff      = 4
)

// wgType is the WireGuard message type of pkt, or 0 if pkt is too short
// to carry an index or its reserved bytes are not zero.
func wgType(pkt []byte) byte {
	if len(pkt) < indexOff+4 || pkt[1] != 0 || pkt[2] != 0 || pkt[3] != 0 {
		return 0
	}
	return pkt[0]
}

// indexRing holds the last len(idx) session indexes that handshake
// messages we sent handed out (set idx's length before use).
type indexRing struct {
	idx  []atomic.Uint32
	next atomic.Uint32
}

// note records the indexes that the initiations and responses among bufs
// hand out.
func (r *indexRing) note(bufs [][]byte) {
	for _, buf := range bufs {
		if t := wgType(buf); t == msgInitiation || t == msgResponse {
			i := r.next.Add(1) - 1
			r.idx[int(i)%len(r.idx)].Store(binary.LittleEndian.Uint32(buf[indexOff:]))
		}
	}
}

// has reports whether idx is in the ring.
func (r *indexRing) has(idx uint32) bool {
	for i := range r.idx {
		if r.idx[i].Load() == idx {
			return true
		}
	}
	return false
}

// noteSent records the session indexes our handshake messages to p hand
// out.
func (p *Peer) noteSent(bufs [][]byte) { p.ours.note(bufs) }

// isOurs reports whether idx is one of our recent indexes for p.
func (p *Peer) isOurs(idx uint32) bool { return p.ours.has(idx) }

// checkSession reports p (at most once per staleEvery) when pkt, received
// from p, is transport data under a session index that is not ours. An
// index we handed out answering a handshake from an address no peer was
// known at yet (a node that just started; its endpoint came later) is
// ours too, though not recorded with p.
func (b *Bind) checkSession(p *Peer, pkt []byte, now int64) {
	if wgType(pkt) != msgTransport {
		return
	}
	if idx := binary.LittleEndian.Uint32(pkt[indexOff:]); p.isOurs(idx) || b.strangerOurs.has(idx) {
		return
	}
	last := p.staleAt.Load()
	if now-last < int64(staleEvery) || !p.staleAt.CompareAndSwap(last, now) {
		return
	}
	b.stats.StaleSessions.Add(1)
	b.log.Info("peer sends under a session we do not have (we restarted?); starting a handshake", "peer", p.label())
	if f := b.o.OnStaleSession; f != nil {
		go f(p.key)
	}
}
