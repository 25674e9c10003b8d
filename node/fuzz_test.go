package node

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"encoding/pem"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
)

// cloneNetmap is a deep copy of nm (through JSON).
func cloneNetmap(t *testing.T, nm *wire.Netmap) *wire.Netmap {
	t.Helper()
	b, err := json.Marshal(nm)
	if err != nil {
		t.Fatal(err)
	}
	var out wire.Netmap
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	return &out
}

func netmapJSON(nm *wire.Netmap) []byte {
	b, _ := json.Marshal(nm)
	return b
}

// checkMerged checks the full netmap that delta d made of base.
func checkMerged(t *testing.T, base, d, out *wire.Netmap) {
	t.Helper()
	if out.Delta || out.Base != 0 || out.Removed != nil || out.Version != d.Version || !reflect.DeepEqual(out.Self, d.Self) {
		t.Fatalf("merged netmap is a delta, or not at the delta's version and self: %+v", out)
	}
	changed := map[string]bool{}
	for _, id := range d.Removed {
		changed[id] = true
	}
	for _, p := range d.Peers {
		changed[p.ID] = true
	}
	want := 0
	for _, p := range base.Peers {
		if !changed[p.ID] {
			want++
			if !slices.ContainsFunc(out.Peers, func(q wire.Peer) bool { return reflect.DeepEqual(p, q) }) {
				t.Fatalf("unchanged peer %q (%q) lost", p.ID, p.Name)
			}
		}
	}
	for _, p := range d.Peers {
		want++
		if !slices.ContainsFunc(out.Peers, func(q wire.Peer) bool { return reflect.DeepEqual(p, q) }) {
			t.Fatalf("peer %q (%q) of the delta missing", p.ID, p.Name)
		}
	}
	if len(out.Peers) != want {
		t.Fatalf("%d peers after the delta, want %d", len(out.Peers), want)
	}
	ids := map[string]bool{}
	for i, p := range out.Peers {
		if p.ID == "" || p.ID == out.Self.ID || ids[p.ID] || i > 0 && out.Peers[i-1].Name >= p.Name {
			t.Fatalf("merged netmap: peer %q (%q) has no id, is self, is listed twice or out of name order", p.ID, p.Name)
		}
		ids[p.ID] = true
	}
}

// FuzzApplyDelta applies arbitrary deltas to arbitrary netmaps (both as
// JSON). Invariants:
//   - the base netmap is never modified, accepted or not;
//   - a refused delta yields nothing;
//   - an accepted one yields a full netmap at the delta's version holding
//     exactly the base's peers the delta did not remove or replace plus the
//     delta's peers, none of them the node itself, no id twice, no name
//     twice, sorted by name;
//   - fixed point: an empty delta on the result changes no peer, and the
//     result survives JSON unchanged.
//
// Seeds: f.Add below and testdata/fuzz/FuzzApplyDelta.
func FuzzApplyDelta(f *testing.F) {
	b2 := peer("b2", "bravo")
	b2.Endpoints = []string{"192.0.2.2:1"}
	for _, d := range []*wire.Netmap{
		delta(10, 11, []string{"a1"}, peer("d4", "delta")),
		delta(10, 11, nil, b2),
		delta(10, 11, []string{"b2"}, b2),
		delta(10, 11, nil, peer("s1", "self")),
		delta(10, 11, nil, peer("d4", "alpha")),
		delta(10, 11, nil, peer("d4", "x"), peer("d4", "y")),
		delta(9, 11, nil),
		delta(10, 10, nil),
		{Version: 11, Delta: true, Base: 10, Self: peer("s9", "other")},
		{Version: 11, Delta: true, Base: 10, Self: peer("s1", "self"), Peers: []wire.Peer{{Name: "noid"}}},
	} {
		f.Add(netmapJSON(baseNetmap()), netmapJSON(d))
	}
	f.Fuzz(func(t *testing.T, baseJSON, deltaJSON []byte) {
		var base, d wire.Netmap
		if json.Unmarshal(baseJSON, &base) != nil || json.Unmarshal(deltaJSON, &d) != nil {
			return
		}
		before := netmapJSON(&base)
		out, err := applyDelta(&base, &d)
		if string(netmapJSON(&base)) != string(before) {
			t.Fatal("applyDelta modified the base netmap")
		}
		if err != nil {
			if out != nil {
				t.Fatalf("refused delta (%v) yielded a netmap", err)
			}
			return
		}
		checkMerged(t, &base, &d, out)
		if again := cloneNetmap(t, out); !reflect.DeepEqual(netmapJSON(again), netmapJSON(out)) {
			t.Fatal("merged netmap changes through JSON")
		}
		empty := &wire.Netmap{Version: out.Version + 1, Delta: true, Base: out.Version, Self: out.Self}
		if out.Version+1 == 0 {
			return
		}
		same, err := applyDelta(out, empty)
		if err != nil || !reflect.DeepEqual(same.Peers, out.Peers) {
			t.Fatalf("an empty delta on the merged netmap: %v", err)
		}
	})
}

// FuzzClientNetmap drives Client.Netmap against a scripted coordinator
// that answers the long-poll with an arbitrary netmap or delta (as JSON on
// the wire), then the full fetch with a good netmap or an error.
// Invariants: a delta that applies is what the caller gets and what the
// next delta applies to; a delta that does not apply leaves the client's
// netmap as it was until a full netmap replaces it (and if the full fetch
// fails, the caller gets an error and the client keeps the old one); a
// full netmap is taken as sent.
func FuzzClientNetmap(f *testing.F) {
	for _, d := range []*wire.Netmap{
		delta(10, 11, []string{"a1"}, peer("d4", "delta")),
		delta(10, 11, nil, peer("s1", "self")),
		delta(7, 11, nil),
		{Version: 12, Self: peer("s1", "self"), Peers: []wire.Peer{peer("e5", "echo")}},
	} {
		f.Add(netmapJSON(d), true)
		f.Add(netmapJSON(d), false)
	}
	ctx := context.Background()
	f.Fuzz(func(t *testing.T, answer []byte, fullOK bool) {
		var sent wire.Netmap
		if json.Unmarshal(answer, &sent) != nil {
			return
		}
		c, fc := newFakeClient()
		base := baseNetmap()
		c.netmap = cloneNetmap(t, base)
		full := &wire.Netmap{Version: 99, Self: peer("s1", "self"), Peers: []wire.Peer{peer("f6", "foxtrot")}}
		second := fakeAnswer{status: http.StatusServiceUnavailable}
		if fullOK {
			second = fakeAnswer{nm: full}
		}
		fc.script(fakeAnswer{nm: &sent}, second)
		got, err := c.Netmap(ctx, base.Version)

		onWire := cloneNetmap(t, &sent) // what the client decoded
		var want *wire.Netmap
		switch merged, derr := applyDelta(base, onWire); {
		case !onWire.Delta:
			want = onWire
		case derr == nil:
			want = merged
		case fullOK:
			want = full
		}
		if want == nil {
			if err == nil {
				t.Fatalf("unusable delta and failed full fetch gave %+v, want an error", got)
			}
			if !reflect.DeepEqual(netmapJSON(c.netmap), netmapJSON(base)) {
				t.Fatal("a refused delta changed the client's netmap")
			}
			return
		}
		if err != nil {
			t.Fatalf("Netmap: %v, want version %d", err, want.Version)
		}
		if string(netmapJSON(got)) != string(netmapJSON(want)) || string(netmapJSON(c.netmap)) != string(netmapJSON(want)) {
			t.Fatalf("got netmap %s (client keeps %s), want %s", netmapJSON(got), netmapJSON(c.netmap), netmapJSON(want))
		}
	})
}

// testState makes a complete, valid identity (with the SSH fallback).
func testState(tb testing.TB) *State {
	tb.Helper()
	now := time.Now()
	ca, _, err := pki.LoadOrCreateCA(tb.TempDir(), now)
	if err != nil {
		tb.Fatal(err)
	}
	key, _ := pki.GenerateKey()
	csr, _ := pki.NewCSR(key, "pi1")
	cert, err := ca.SignClientCSR(csr, "0123456789ab", now, time.Hour)
	if err != nil {
		tb.Fatal(err)
	}
	keyPEM, _ := pki.MarshalKeyPEM(key)
	wg, _ := wgtypes.GeneratePrivateKey()
	_, sshPriv, _ := ed25519.GenerateKey(rand.Reader)
	block, _ := ssh.MarshalPrivateKey(sshPriv, "")
	signer, _ := ssh.NewSignerFromKey(sshPriv)
	sshCA, err := pki.LoadOrCreateSSHCA(tb.TempDir())
	if err != nil {
		tb.Fatal(err)
	}
	sshCert, err := pki.SignSSHUserCert(sshCA, string(ssh.MarshalAuthorizedKey(signer.PublicKey())), "pi1", "node:0123456789ab", now, time.Hour)
	if err != nil {
		tb.Fatal(err)
	}
	st := &State{Format: stateFormat, NodeID: "0123456789ab", Name: "pi1", Coordinator: "https://192.0.2.1:7443",
		CAPin: ca.Pin(), CA: string(ca.CertPEM()), Certificate: string(pki.CertPEM(cert)), TLSKey: string(keyPEM),
		WireGuard: wg.String(), IPv4: "100.64.0.2", IPv6: "fd00::2", Enrolled: now.UTC().Truncate(time.Second),
		SSHKey: string(pem.EncodeToMemory(block)), SSHCertificate: sshCert, SSHCA: string(ssh.MarshalAuthorizedKey(sshCA.PublicKey()))}
	if err := st.validate(); err != nil {
		tb.Fatal(err)
	}
	return st
}

// FuzzLoadState loads arbitrary bytes as the state file. Invariants: a
// file that does not load yields an error naming the file as corrupt and
// no state at all (never a half-loaded one); one that loads saves and
// loads back to the same identity (load(save(x)) == x, parsed keys and
// certificates included), and the saved file is a fixed point (saving the
// state loaded from it writes the same bytes).
//
// Seeds: a complete identity made at start-up (not checked in: it holds
// private keys), variants of it, and testdata/fuzz/FuzzLoadState.
func FuzzLoadState(f *testing.F) {
	st := testState(f)
	good, _ := json.MarshalIndent(st, "", "  ")
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add([]byte(strings.Replace(string(good), `"format": 1`, `"format": 2`, 1)))
	f.Add([]byte(strings.Replace(string(good), `"tls_key"`, `"tls_key_old"`, 1)))
	f.Add([]byte(strings.Replace(string(good), `"ssh_certificate"`, `"ssh_certificate_old"`, 1)))
	noSSH := *st
	noSSH.SSHKey, noSSH.SSHCertificate, noSSH.SSHCA = "", "", ""
	b, _ := json.Marshal(&noSSH)
	f.Add(b)
	f.Fuzz(func(t *testing.T, data []byte) {
		dir := t.TempDir()
		path := filepath.Join(dir, StateFile)
		if err := os.WriteFile(path, data, 0o600); err != nil {
			t.Fatal(err)
		}
		st, err := LoadState(dir)
		if err != nil {
			if st != nil || !strings.Contains(err.Error(), "corrupt") || !strings.Contains(err.Error(), path) {
				t.Fatalf("refused state file: state %v, error %v (want none, and 'corrupt' naming the file)", st != nil, err)
			}
			return
		}
		dir2 := t.TempDir()
		if err := st.Save(dir2); err != nil {
			t.Fatalf("a loaded state does not save: %v", err)
		}
		st2, err := LoadState(dir2)
		if err != nil {
			t.Fatalf("a saved state does not load: %v", err)
		}
		if string(mustJSON(t, st)) != string(mustJSON(t, st2)) || st2.WireGuardKey() != st.WireGuardKey() ||
			!st2.CACert().Equal(st.CACert()) || !st2.ClientCert().Leaf.Equal(st.ClientCert().Leaf) ||
			!reflect.DeepEqual(st2.ClientCert().PrivateKey, st.ClientCert().PrivateKey) {
			t.Fatal("load(save(x)) != x")
		}
		saved, _ := os.ReadFile(filepath.Join(dir2, StateFile))
		dir3 := t.TempDir()
		if err := st2.Save(dir3); err != nil {
			t.Fatal(err)
		}
		if again, _ := os.ReadFile(filepath.Join(dir3, StateFile)); string(again) != string(saved) {
			t.Fatal("saving a loaded state file is not a fixed point")
		}
	})
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// FuzzParseExpose checks --expose parsing: an accepted value has a valid
// service name (a lower-case DNS label without "--"), a non-empty host and
// a port 1-65535 that is the target's, and re-formats to a value that
// parses to the same service (a fixed point).
func FuzzParseExpose(f *testing.F) {
	for _, s := range []string{"web=127.0.0.1:3000", "ssh=[::1]:22,public", "web=localhost:080", "Web=h:1",
		"a--b=h:1", "web=:80", "web=h:0", "web=h:65536", "web=h:1,public,private", "web", "web=h:1,,public", "-x=h:1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		svc, err := ParseExpose(s)
		if err != nil {
			if svc != (Service{}) {
				t.Fatalf("refused %q but returned %+v", s, svc)
			}
			return
		}
		if validLabel(svc.Name) != nil || svc.Port == 0 {
			t.Fatalf("%q accepted as %+v", s, svc)
		}
		host, port, err := splitTarget(svc.Target)
		if err != nil || host == "" || port != svc.Port {
			t.Fatalf("%q: target %q does not name port %d", s, svc.Target, svc.Port)
		}
		again := svc.Name + "=" + svc.Target
		if svc.Public {
			again += ",public"
		}
		if svc2, err := ParseExpose(again); err != nil || svc2 != svc {
			t.Fatalf("%q re-formatted as %q parses to %+v, %v", s, again, svc2, err)
		}
	})
}

// FuzzParseCoordinatorURL checks that an accepted coordinator URL is
// https://HOST[:PORT] with nothing else, never http, and that parsing the
// result gives it back (a fixed point).
func FuzzParseCoordinatorURL(f *testing.F) {
	for _, s := range []string{"https://10.0.0.5:7443", "https://coord.example.com/", "http://10.0.0.5:7443",
		"HTTPS://X:1", "https://u:p@h:1", "https://h:1/api", "https://h:1?x", "https://h:1#f", "https://[::1]:443",
		"10.0.0.5:7443", "https://", "https:///x", "https://%41:1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		out, err := ParseCoordinatorURL(s)
		if err != nil {
			if out != "" {
				t.Fatalf("refused %q but returned %q", s, out)
			}
			return
		}
		u, perr := url.Parse(out)
		if perr != nil || u.Scheme != "https" || u.Host == "" || u.User != nil || u.Path != "" || u.RawQuery != "" || u.Fragment != "" {
			t.Fatalf("%q accepted as %q", s, out)
		}
		if again, err := ParseCoordinatorURL(out); err != nil || again != out {
			t.Fatalf("%q accepted as %q, which parses to %q, %v", s, out, again, err)
		}
	})
}

// splitTarget splits a HOST:PORT target and parses its port.
func splitTarget(target string) (string, uint16, error) {
	host, port, err := net.SplitHostPort(target)
	if err != nil {
		return "", 0, err
	}
	p, err := strconv.ParseUint(port, 10, 16)
	return host, uint16(p), err
}
