package coordinator_test

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"strings"
	"testing"

	"github.com/meshctl/meshctl/coordinator"
	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/wire"
)

// discoKey returns the standard base64 of 32 bytes starting at first.
func discoKey(first byte) string {
	b := make([]byte, 32)
	for i := range b {
		b[i] = first + byte(i)
	}
	return base64.StdEncoding.EncodeToString(b)
}

// paddingBitsSet encodes b (32 bytes) with a non-zero unused low bit in
// the last data character: it decodes to b, but is not b's canonical form.
func paddingBitsSet(b []byte) string {
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
	e := []byte(base64.StdEncoding.EncodeToString(b)) // 43 characters and "="
	e[42] = alphabet[strings.IndexByte(alphabet, e[42])|1]
	return string(e)
}

func netmapOf(t *testing.T, cl *node.Client) *wire.Netmap {
	t.Helper()
	nm, err := cl.Netmap(ctx(t), 0)
	if err != nil {
		t.Fatal(err)
	}
	return nm
}

func peerNamed(nm *wire.Netmap, name string) (wire.Peer, bool) {
	for _, p := range nm.Peers {
		if p.Name == name {
			return p, true
		}
	}
	return wire.Peer{}, false
}

// A node's disco key appears in its own Self and in every other node's
// entry for it; re-reporting it does not move the netmap version, a new
// key does.
func TestDiscoKeyPublished(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	a, b := c.AddNode(t, "a"), c.AddNode(t, "b")
	if nm := netmapOf(t, b.Client); nm.Self.DiscoKey != "" {
		t.Fatalf("fresh node has disco key %q", nm.Self.DiscoKey)
	}
	v0 := netmapOf(t, b.Client).Version

	k1 := discoKey(1)
	eps := []string{"192.0.2.1:51820"}
	if err := a.Client.Update(ctx(t), wire.UpdateRequest{Endpoints: &eps, DiscoKey: &k1}); err != nil {
		t.Fatal(err)
	}
	nmB := netmapOf(t, b.Client)
	if p, ok := peerNamed(nmB, "a"); !ok || p.DiscoKey != k1 || len(p.Endpoints) != 1 {
		t.Fatalf("a in b's netmap = %+v (found %t); want disco key %q and its endpoint", p, ok, k1)
	}
	if nmB.Version == v0 {
		t.Error("netmap version unchanged after a disco key was reported")
	}
	if nmB.Self.DiscoKey != "" {
		t.Errorf("b's Self has disco key %q; b reported none", nmB.Self.DiscoKey)
	}
	nmA := netmapOf(t, a.Client)
	if nmA.Self.DiscoKey != k1 {
		t.Errorf("a's Self disco key = %q, want %q", nmA.Self.DiscoKey, k1)
	}
	if p, _ := peerNamed(nmA, "b"); p.DiscoKey != "" {
		t.Errorf("b in a's netmap has disco key %q; b reported none", p.DiscoKey)
	}
	// On the wire: disco_key for a, no field at all for b (omitempty).
	raw := rawNetmap(t, c, b.State)
	var generic struct {
		Self  map[string]any   `json:"self"`
		Peers []map[string]any `json:"peers"`
	}
	if err := json.Unmarshal([]byte(raw), &generic); err != nil {
		t.Fatal(err)
	}
	if _, has := generic.Self["disco_key"]; has || len(generic.Peers) != 1 || generic.Peers[0]["disco_key"] != k1 {
		t.Errorf("b's raw netmap: want disco_key %q for a and no field for b: %s", k1, raw)
	}

	// Identical re-reports (alone, or with unchanged endpoints) change nothing.
	for _, req := range []wire.UpdateRequest{{DiscoKey: &k1}, {Endpoints: &eps, DiscoKey: &k1}} {
		if err := a.Client.Update(ctx(t), req); err != nil {
			t.Fatal(err)
		}
		if v := netmapOf(t, b.Client).Version; v != nmB.Version {
			t.Errorf("re-reporting the same disco key moved the version %d -> %d", nmB.Version, v)
		}
	}
	// An update without a disco key keeps it.
	svcs := []wire.Service{{Name: "web", Port: 80}}
	if err := a.Client.Update(ctx(t), wire.UpdateRequest{Services: &svcs}); err != nil {
		t.Fatal(err)
	}
	nmB2 := netmapOf(t, b.Client)
	if p, _ := peerNamed(nmB2, "a"); p.DiscoKey != k1 || len(p.Services) != 1 {
		t.Errorf("a after a services-only update = %+v; want disco key %q kept", p, k1)
	}

	// A new key moves the version and replaces the old one.
	k2 := discoKey(100)
	if err := a.Client.Update(ctx(t), wire.UpdateRequest{DiscoKey: &k2}); err != nil {
		t.Fatal(err)
	}
	nmB3 := netmapOf(t, b.Client)
	if p, _ := peerNamed(nmB3, "a"); p.DiscoKey != k2 || nmB3.Version == nmB2.Version {
		t.Errorf("after a key change: a = %+v at version %d (was %d); want %q and a new version", p, nmB3.Version, nmB2.Version, k2)
	}
}

// Malformed disco keys are refused with 400 bad_request naming the field,
// and nothing of the request is stored.
func TestDiscoKeyValidates(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	a, b := c.AddNode(t, "a"), c.AddNode(t, "b")
	good := discoKey(7)
	if err := a.Client.Update(ctx(t), wire.UpdateRequest{DiscoKey: &good}); err != nil {
		t.Fatal(err)
	}
	before := netmapOf(t, b.Client)

	b31 := make([]byte, 31)
	b33 := make([]byte, 33)
	b32 := make([]byte, 32)
	for i := range b32 {
		b31[i%31], b32[i], b33[i] = 0xfb, 0xfb, 0xfb
	}
	bad := map[string]string{
		"not base64":       "not a base64 key!",
		"empty":            "",
		"31 bytes":         base64.StdEncoding.EncodeToString(b31),
		"33 bytes":         base64.StdEncoding.EncodeToString(b33),
		"all zeros":        base64.StdEncoding.EncodeToString(make([]byte, 32)),
		"unpadded":         base64.RawStdEncoding.EncodeToString(b32),
		"URL alphabet":     base64.URLEncoding.EncodeToString(b32),
		"trailing newline": base64.StdEncoding.EncodeToString(b32) + "\n",
		"hex":              strings.Repeat("ab", 32),
		"padding bits set": paddingBitsSet(b32),
	}
	for what, k := range bad {
		eps := []string{"198.51.100.1:51820"}
		err := a.Client.Update(ctx(t), wire.UpdateRequest{Endpoints: &eps, DiscoKey: &k})
		var ae *wire.APIError
		if !errors.As(err, &ae) || ae.Status != http.StatusBadRequest || ae.Code != wire.CodeBadRequest ||
			!strings.Contains(ae.Message, "disco_key") || !strings.Contains(ae.Message, "base64 of 32 bytes") {
			t.Errorf("disco key %s (%q): %v; want 400 bad_request naming disco_key and the expected form", what, k, err)
		}
	}
	after := netmapOf(t, b.Client)
	if after.Version != before.Version {
		t.Errorf("refused updates moved the netmap version %d -> %d", before.Version, after.Version)
	}
	p, _ := peerNamed(after, "a")
	if p.DiscoKey != good || len(p.Endpoints) != 0 {
		t.Errorf("a after refused updates = %+v; want disco key %q and no endpoints", p, good)
	}
	if nm := netmapOf(t, a.Client); nm.Self.DiscoKey != good {
		t.Errorf("a's Self disco key after refused updates = %q, want %q", nm.Self.DiscoKey, good)
	}
	// A fresh node whose only report is refused has none stored.
	z := base64.StdEncoding.EncodeToString(make([]byte, 32))
	if err := b.Client.Update(ctx(t), wire.UpdateRequest{DiscoKey: &z}); !wire.IsCode(err, wire.CodeBadRequest) {
		t.Errorf("all-zero key: %v, want bad_request", err)
	}
	if nm := netmapOf(t, b.Client); nm.Self.DiscoKey != "" {
		t.Errorf("b's Self disco key after a refused report = %q, want empty", nm.Self.DiscoKey)
	}
}

// In the hub topology nodes see only the proxies: those entries carry the
// proxies' disco keys, and proxies see the nodes' keys.
func TestDiscoKeyHubTopology(t *testing.T) {
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) { o.Topology = coordinator.TopologyHub })
	a := c.AddNode(t, "a")
	px := addProxy(t, c, "px")
	kp, ka := discoKey(40), discoKey(80)
	if err := px.Update(ctx(t), wire.UpdateRequest{DiscoKey: &kp}); err != nil {
		t.Fatal(err)
	}
	if err := a.Client.Update(ctx(t), wire.UpdateRequest{DiscoKey: &ka}); err != nil {
		t.Fatal(err)
	}
	nmA := netmapOf(t, a.Client)
	if len(nmA.Peers) != 1 || nmA.Peers[0].Name != "px" || nmA.Peers[0].DiscoKey != kp {
		t.Errorf("a's hub netmap peers = %+v; want only px with disco key %q", nmA.Peers, kp)
	}
	if nmA.Self.DiscoKey != ka {
		t.Errorf("a's Self disco key = %q, want %q", nmA.Self.DiscoKey, ka)
	}
	nmP := netmapOf(t, px)
	if p, ok := peerNamed(nmP, "a"); !ok || p.DiscoKey != ka {
		t.Errorf("a in the proxy's netmap = %+v (found %t); want disco key %q", p, ok, ka)
	}
	if nmP.Self.DiscoKey != kp {
		t.Errorf("proxy's Self disco key = %q, want %q", nmP.Self.DiscoKey, kp)
	}
}
