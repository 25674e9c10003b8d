package coordinator_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
)

// FuzzEnrollKeySpelling enrolls through the real API (loopback, pinned
// TLS, SQLite) with WireGuard keys built from fuzz input, many of them
// other spellings of a key that node "a" already holds (padding bits, line
// breaks, anything the base64 decoder forgives). Invariants: a request
// whose key decodes to a registered key is refused and adds no node; an
// accepted one answers with exactly the key string it sent, in canonical
// base64, and adds exactly one node.
//
// Seeds: f.Add below and testdata/fuzz/FuzzEnrollKeySpelling (the
// spellings that enrolled a second node with node a's key before
// validateWireGuardKey required the canonical one).
func FuzzEnrollKeySpelling(f *testing.F) {
	c := meshtest.NewCoordinator(f)
	tok := c.CreateToken(f, wire.TokenCreateRequest{Reusable: true, TTL: wire.Duration(24 * time.Hour)})
	first, err := c.Enroll(f, "a", tok.Token)
	if err != nil {
		f.Fatal(err)
	}
	taken := first.State.WireGuardKey().PublicKey()
	registered := map[wgtypes.Key]bool{taken: true}
	k := taken.String()

	pin, _ := pki.ParsePin(c.CAPin())
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: pki.PinnedTLSConfig(pin)}}
	f.Cleanup(hc.CloseIdleConnections)
	csrKey, _ := pki.GenerateKey()
	nodes := len(c.Nodes(f))

	// mode 0: s is the key; 1: a's key with padding bits pos&3, then s;
	// 2: s is inserted into a's key at pos; 3: a fresh key's spelling with
	// s inserted at pos.
	f.Add("", uint8(0), uint8(0))
	f.Add("", uint8(1), uint8(0))
	f.Add("", uint8(1), uint8(1))
	f.Add("\n", uint8(2), uint8(20))
	f.Add("\r\n", uint8(2), uint8(44))
	f.Add("", uint8(3), uint8(0))
	f.Add("=", uint8(3), uint8(43))
	n := 0
	f.Fuzz(func(t *testing.T, s string, mode, pos uint8) {
		var key string
		switch mode % 4 {
		case 0:
			key = s
		case 1:
			const b64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
			last := strings.IndexByte(b64, k[42]) // 4 bits of the key, 2 padding bits
			key = k[:42] + string(b64[last&^3|int(pos)&3]) + "=" + s
		case 2:
			i := int(pos) % (len(k) + 1)
			key = k[:i] + s + k[i:]
		case 3:
			fresh, _ := wgtypes.GeneratePrivateKey()
			fk := fresh.PublicKey().String()
			i := int(pos) % (len(fk) + 1)
			key = fk[:i] + s + fk[i:]
		}
		n++
		name := fmt.Sprintf("n%d", n)
		csr, _ := pki.NewCSR(csrKey, name)
		body, _ := json.Marshal(wire.EnrollRequest{Token: tok.Token, Name: name, WireGuardKey: key, CSR: string(csr)})
		resp, err := hc.Post(c.URL()+wire.PathEnroll, "application/json", bytes.NewReader(body))
		if err != nil {
			t.Fatal(err)
		}
		var out wire.EnrollResponse
		json.NewDecoder(resp.Body).Decode(&out)
		resp.Body.Close()

		decoded, derr := wgtypes.ParseKey(key)
		now := len(c.Nodes(t))
		if resp.StatusCode != http.StatusOK {
			if now != nodes {
				t.Fatalf("refused enrollment (%d) with key %q changed the node count %d -> %d", resp.StatusCode, key, nodes, now)
			}
			return
		}
		nodes++
		if derr == nil && registered[decoded] {
			t.Fatalf("key %q, a spelling of registered key %s, enrolled node %s", key, decoded, out.Node.ID)
		}
		if derr != nil || decoded.String() != key || out.Node.WireGuardKey != key || now != nodes {
			t.Fatalf("enrolled with key %q (answer %q, canonical %q, %v); %d nodes, want %d", key, out.Node.WireGuardKey, decoded, derr, now, nodes)
		}
		registered[decoded] = true
	})
}
