package pathbind

import (
	"crypto/rand"
	"testing"

	"golang.org/x/crypto/nacl/box"
)

// discoPeers are three disco key pairs: a sender, us, and a third node.
type discoPeers struct {
	aPub, rPub, cPub [32]byte
	shared           map[[32]byte]*[32]byte // our shared key with each sender (= theirs with us)
}

func newDiscoPeers(tb testing.TB) *discoPeers {
	tb.Helper()
	var d discoPeers
	aPub, _, _ := box.GenerateKey(rand.Reader)
	rPub, rPriv, _ := box.GenerateKey(rand.Reader)
	cPub, _, _ := box.GenerateKey(rand.Reader)
	d.aPub, d.rPub, d.cPub = *aPub, *rPub, *cPub
	d.shared = map[[32]byte]*[32]byte{}
	for _, pub := range []*[32]byte{aPub, cPub} {
		var s [32]byte
		box.Precompute(&s, pub, rPriv)
		d.shared[*pub] = &s
	}
	return &d
}

// open is what the bind does with a datagram: a probe from a known sender,
// opened with that sender's shared key.
func (d *discoPeers) open(p []byte) (discoMsg, bool) {
	if !isDisco(p) {
		return discoMsg{}, false
	}
	s, ok := d.shared[senderOf(p)]
	if !ok {
		return discoMsg{}, false
	}
	m, err := openDisco(p, s)
	return m, err == nil
}

// FuzzDisco checks path probes. Invariants:
//   - a payload that parses marshals back to the same bytes (a fixed
//     point), and one sealed for us opens to the same message, claiming
//     its real sender;
//   - a sealed probe with any one byte changed never opens to anything
//     (the sender field included: the claimed sender's key cannot open
//     it);
//   - arbitrary datagrams never open (keys are fresh per process, so a
//     checked-in input cannot hold a real probe) and never panic.
//
// Seeds: f.Add below and testdata/fuzz/FuzzDisco.
func FuzzDisco(f *testing.F) {
	ping := discoMsg{typ: discoPing, tx: [txLen]byte{1, 2, 3}}
	pong := discoMsg{typ: discoPong, tx: [txLen]byte{4}}
	f.Add(ping.marshal(), []byte(discoMagic), uint16(0), byte(1))
	f.Add(pong.marshal(), make([]byte, maxDiscoLen), uint16(9), byte(0))
	mapped := append([]byte{discoPong}, make([]byte, txLen)...)
	mapped = append(mapped, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 0, 2, 1, 0x1f, 0x90)
	f.Add(mapped, append([]byte(discoMagic), make([]byte, 100)...), uint16(50), byte(0xff))
	f.Add([]byte{discoPing}, []byte{}, uint16(1), byte(2))
	f.Add(append(ping.marshal(), 0), []byte{1, 0, 0, 0}, uint16(70), byte(3))
	f.Add([]byte{3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}, []byte("mcdisco1"), uint16(100), byte(4))

	d := newDiscoPeers(f)
	f.Fuzz(func(t *testing.T, plain, datagram []byte, pos uint16, b byte) {
		if m, ok := d.open(datagram); ok {
			t.Fatalf("arbitrary datagram %x opened as %+v", datagram, m)
		}
		m, err := parseDisco(plain)
		if err != nil {
			return
		}
		if out := m.marshal(); string(out) != string(plain) {
			t.Fatalf("payload %x parses to %+v, which marshals to %x", plain, m, out)
		}
		p := sealDisco(d.aPub, d.shared[d.aPub], m)
		if len(p) > maxDiscoLen || !isDisco(p) || senderOf(p) != d.aPub {
			t.Fatalf("sealed probe of %d bytes is not a probe from its sender", len(p))
		}
		got, ok := d.open(p)
		if !ok || got != m {
			t.Fatalf("sealed %+v opens as %+v, %v", m, got, ok)
		}
		i := int(pos) % len(p)
		if p[i] == b {
			return
		}
		mut := append([]byte(nil), p...)
		mut[i] = b
		if got, ok := d.open(mut); ok {
			t.Fatalf("probe with byte %d changed to %#x opens as %+v", i, b, got)
		}
	})
}
