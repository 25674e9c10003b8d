package pathbind

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"io"
	"net/netip"

	"golang.org/x/crypto/curve25519"
	"golang.org/x/crypto/hkdf"
	"golang.org/x/crypto/nacl/box"
)

// Path probes ("disco", as Tailscale calls them) are UDP datagrams sent
// from the WireGuard socket itself, so that they take exactly the path
// WireGuard packets would take through every NAT:
//
//	8 bytes  magic "mcdisco1" (never a WireGuard header: those start
//	         with a type 1-4 followed by three zero bytes)
//	32 bytes the sender's disco public key
//	24 bytes nonce (random)
//	n bytes  nacl/box (X25519, XSalsa20-Poly1305) of the payload, from the
//	         sender's disco key to the receiver's
//
// Payload: 1 byte type (1 ping, 2 pong), 12 bytes transaction id, and for a
// pong the sender's source address as the answerer saw it (16 bytes IPv6
// or IPv4-mapped, 2 bytes port, big-endian). A pong from a proxy (public)
// is thus STUN: it tells a node behind NAT its public endpoint.
//
// Only peers whose disco keys the netmap lists can probe; the box makes a
// probe unforgeable and unreadable to anyone else on the path. The relay
// never carries probes: it forwards WireGuard messages only.

const (
	discoMagic     = "mcdisco1"
	discoHeaderLen = len(discoMagic) + 32 + 24
	discoPing      = 1
	discoPong      = 2
	txLen          = 12
	pingLen        = 1 + txLen
	pongLen        = 1 + txLen + 18
	// maxDiscoLen bounds a probe datagram (the largest is a pong).
	maxDiscoLen = discoHeaderLen + box.Overhead + pongLen
)

// DiscoKeyFromWireGuard derives the node's disco private key from its
// WireGuard private key with HKDF-SHA256 under its own label, so the two
// keys are cryptographically independent while the node needs no extra
// secret in its state (the disco key is as stable as the WireGuard key).
func DiscoKeyFromWireGuard(wgPrivate [32]byte) (priv, pub [32]byte) {
	r := hkdf.New(sha256.New, wgPrivate[:], nil, []byte("meshctl disco key v1"))
	if _, err := io.ReadFull(r, priv[:]); err != nil {
		panic(err) // HKDF-SHA256 yields up to 8160 bytes
	}
	priv[0] &= 248 // X25519 clamping
	priv[31] = priv[31]&127 | 64
	p, err := curve25519.X25519(priv[:], curve25519.Basepoint)
	if err != nil {
		panic(err) // only for low-order points, never the basepoint
	}
	copy(pub[:], p)
	return priv, pub
}

// isDisco reports whether a datagram claims to be a probe.
func isDisco(p []byte) bool {
	return len(p) >= discoHeaderLen+box.Overhead && string(p[:len(discoMagic)]) == discoMagic
}

// discoMsg is a decoded probe payload.
type discoMsg struct {
	typ      byte
	tx       [txLen]byte
	observed netip.AddrPort // pongs only
}

func (m discoMsg) marshal() []byte {
	out := make([]byte, 1+txLen, pongLen)
	out[0] = m.typ
	copy(out[1:], m.tx[:])
	if m.typ == discoPong {
		a := m.observed.Addr().As16()
		out = append(out, a[:]...)
		out = binary.BigEndian.AppendUint16(out, m.observed.Port())
	}
	return out
}

var errBadDisco = errors.New("malformed probe")

func parseDisco(p []byte) (discoMsg, error) {
	var m discoMsg
	if len(p) < pingLen {
		return m, errBadDisco
	}
	m.typ = p[0]
	copy(m.tx[:], p[1:1+txLen])
	switch {
	case m.typ == discoPing && len(p) == pingLen:
	case m.typ == discoPong && len(p) == pongLen:
		a := netip.AddrFrom16([16]byte(p[1+txLen : 1+txLen+16])).Unmap()
		m.observed = netip.AddrPortFrom(a, binary.BigEndian.Uint16(p[1+txLen+16:]))
	default:
		return m, errBadDisco
	}
	return m, nil
}

// sealDisco builds a probe datagram for the holder of shared (precomputed
// box key with the receiver).
func sealDisco(ourPub [32]byte, shared *[32]byte, m discoMsg) []byte {
	var nonce [24]byte
	if _, err := rand.Read(nonce[:]); err != nil {
		panic(err)
	}
	out := make([]byte, 0, maxDiscoLen)
	out = append(out, discoMagic...)
	out = append(out, ourPub[:]...)
	out = append(out, nonce[:]...)
	return box.SealAfterPrecomputation(out, m.marshal(), &nonce, shared)
}

// senderOf returns the disco public key a probe claims to come from.
func senderOf(p []byte) (k [32]byte) {
	copy(k[:], p[len(discoMagic):len(discoMagic)+32])
	return k
}

// openDisco authenticates and decodes a probe with the shared key of its
// claimed sender.
func openDisco(p []byte, shared *[32]byte) (discoMsg, error) {
	var nonce [24]byte
	copy(nonce[:], p[len(discoMagic)+32:discoHeaderLen])
	plain, ok := box.OpenAfterPrecomputation(nil, p[discoHeaderLen:], &nonce, shared)
	if !ok {
		return discoMsg{}, errors.New("probe does not authenticate")
	}
	return parseDisco(plain)
}

func newTx() (tx [txLen]byte) {
	if _, err := rand.Read(tx[:]); err != nil {
		panic(err)
	}
	return tx
}
