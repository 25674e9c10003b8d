package coordinator

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshctl/meshctl/wire"
)

func tpeer(id, name, role string) *wire.Peer {
	p := &wire.Peer{ID: id, Name: name, Role: role}
	if role != wire.RoleSSH {
		p.WireGuardKey, p.IPv4 = "key-"+id, "100.64.0."+fmt.Sprint(len(id)+len(name))
	}
	return p
}

func newTestState(peers ...*wire.Peer) *netmapState {
	s := newNetmapState(nil, nil, time.Unix(0, 1000))
	for _, p := range peers {
		s.apply(p.ID, p)
	}
	return s
}

func planString(p netmapPlan) string {
	switch {
	case p.wait:
		return "wait"
	case p.full:
		return "full"
	}
	var up []string
	for _, r := range p.upserts {
		up = append(up, r.ID+":"+r.Name)
	}
	return fmt.Sprintf("delta +[%s] -[%s]", strings.Join(up, " "), strings.Join(p.removed, " "))
}

func TestPlanForMesh(t *testing.T) {
	s := newTestState(tpeer("w", "watcher", wire.RoleNode), tpeer("a", "alpha", wire.RoleNode), tpeer("b", "bravo", wire.RoleNode))
	v0 := s.current().version
	alpha2 := tpeer("a", "alpha", wire.RoleNode)
	alpha2.Endpoints = []string{"192.0.2.7:51820"}
	s.apply("a", alpha2)
	s.apply("b", nil)
	s.apply("c", tpeer("c", "charlie", wire.RoleNode))
	s.apply("x", tpeer("x", "sshbox", wire.RoleSSH)) // SSH-only: no WireGuard peer
	snap := s.current()
	if snap.version != v0+4 {
		t.Fatalf("version %d, want %d", snap.version, v0+4)
	}
	w := snap.byID["w"]
	for _, tt := range []struct {
		name           string
		since, checked uint64
		wantDelta      bool
		want           string
	}{
		{"all changes", v0, v0, true, "delta +[a:alpha c:charlie] -[b]"},
		{"the last two", v0 + 2, v0 + 2, true, "delta +[c:charlie] -[]"},
		{"only what it sees changed since checked", v0 + 3, v0 + 3, true, "wait"},
		{"checked covers the rest", v0, v0 + 4, true, "wait"},
		{"relevant after checked: the whole delta since", v0, v0 + 2, true, "delta +[a:alpha c:charlie] -[b]"},
		{"no delta asked", v0, v0, false, "full"},
		{"older than the ring", 5, 5, true, "full"},
		{"zero", 0, 0, true, "full"},
		{"from the future", v0 + 9, v0 + 9, true, "full"},
	} {
		if got := planString(snap.planFor(w, tt.since, tt.checked, TopologyMesh, tt.wantDelta)); got != tt.want {
			t.Errorf("%s: %s, want %s", tt.name, got, tt.want)
		}
	}
	// The proxy sees the SSH-only node's arrival; a node does not.
	s.apply("p", tpeer("p", "proxy", wire.RoleProxy))
	v1 := s.current().version
	s.apply("y", tpeer("y", "sshbox2", wire.RoleSSH))
	snap = s.current()
	if got := planString(snap.planFor(snap.byID["p"], v1, v1, TopologyMesh, true)); got != "delta +[] -[]" {
		t.Errorf("proxy after an SSH-only node: %s", got)
	}
	if got := planString(snap.planFor(snap.byID["w"], v1, v1, TopologyMesh, true)); got != "wait" {
		t.Errorf("node after an SSH-only node: %s", got)
	}
}

func TestPlanForHub(t *testing.T) {
	s := newTestState(tpeer("a", "alpha", wire.RoleNode), tpeer("b", "bravo", wire.RoleNode), tpeer("p", "proxy", wire.RoleProxy))
	plan := func(id string, since uint64) string {
		snap := s.current()
		return planString(snap.planFor(snap.byID[id], since, since, TopologyHub, true))
	}
	v := s.current().version
	bravo2 := tpeer("b", "bravo", wire.RoleNode)
	bravo2.Endpoints = []string{"192.0.2.8:1"}
	s.apply("b", bravo2)
	if got := plan("a", v); got != "wait" {
		t.Errorf("node a after node b changed: %s, want wait", got)
	}
	if got := plan("p", v); got != "delta +[b:bravo] -[]" {
		t.Errorf("proxy after node b changed: %s", got)
	}
	if got := plan("b", v); got != "delta +[] -[]" {
		t.Errorf("node b after its own change: %s", got)
	}
	v = s.current().version
	s.apply("b", nil) // revoked
	if got := plan("a", v); got != "wait" {
		t.Errorf("node a after node b's revocation: %s, want wait", got)
	}
	if got := plan("p", v); got != "delta +[] -[b]" {
		t.Errorf("proxy after node b's revocation: %s", got)
	}
	v = s.current().version
	s.apply("q", tpeer("q", "proxy2", wire.RoleProxy))
	if got := plan("a", v); got != "delta +[q:proxy2] -[]" {
		t.Errorf("node a after a new proxy: %s", got)
	}
	v = s.current().version
	s.setAccessRevoked([]revokedAccess{{id: "k1", expires: time.Unix(1<<40, 0)}})
	if got := plan("a", v); got != "wait" {
		t.Errorf("node a after an access key revocation: %s, want wait", got)
	}
	if got := plan("p", v); got != "delta +[] -[]" {
		t.Errorf("proxy after an access key revocation: %s", got)
	}
	// A node whose role changes gets a full netmap.
	v = s.current().version
	s.apply("a", tpeer("a", "alpha", wire.RoleProxy))
	if got := plan("a", v); got != "full" {
		t.Errorf("node a after becoming a proxy: %s, want full", got)
	}
}

// In the tags topology a node sees the proxies and the nodes it shares a
// tag with, and only their changes wake it.
func TestPlanForTags(t *testing.T) {
	tagged := func(id, name string, tags ...string) *wire.Peer {
		p := tpeer(id, name, wire.RoleNode)
		p.Tags = tags
		return p
	}
	s := newTestState(
		tagged("a", "alpha", "lab", "cam"),
		tagged("b", "bravo", "cam"),
		tagged("c", "charlie", "office"),
		tagged("u", "untagged"),
		tpeer("p", "proxy", wire.RoleProxy),
	)
	names := func(id string) []string {
		snap := s.current()
		var out []string
		for _, p := range snap.visibleFor(snap.byID[id], TopologyTags) {
			if p.ID != id {
				out = append(out, p.Name)
			}
		}
		return out
	}
	for id, want := range map[string][]string{
		"a": {"bravo", "proxy"},
		"b": {"alpha", "proxy"},
		"c": {"proxy"},
		"u": {"proxy"},
		"p": {"alpha", "bravo", "charlie", "untagged"},
	} {
		if got := names(id); !slices.Equal(got, want) {
			t.Errorf("%s sees %v, want %v", id, got, want)
		}
	}
	// Symmetric, for every pair.
	snap := s.current()
	for _, x := range snap.sorted {
		for _, y := range snap.sorted {
			if visibleTo(x, y, TopologyTags) != visibleTo(y, x, TopologyTags) {
				t.Errorf("%s sees %s: %v, but %s sees %s: %v", x.Name, y.Name, visibleTo(x, y, TopologyTags), y.Name, x.Name, visibleTo(y, x, TopologyTags))
			}
		}
	}

	plan := func(id string, since uint64) string {
		snap := s.current()
		return planString(snap.planFor(snap.byID[id], since, since, TopologyTags, true))
	}
	v := s.current().version
	charlie2 := tagged("c", "charlie", "office")
	charlie2.Endpoints = []string{"192.0.2.8:1"}
	s.apply("c", charlie2)
	if got := plan("a", v); got != "wait" {
		t.Errorf("node a after node c (no shared tag) changed: %s, want wait", got)
	}
	if got := plan("p", v); got != "delta +[c:charlie] -[]" {
		t.Errorf("proxy after node c changed: %s", got)
	}
	v = s.current().version
	s.apply("d", tagged("d", "delta", "cam"))
	if got := plan("a", v); got != "delta +[d:delta] -[]" {
		t.Errorf("node a after a new node sharing its tag: %s", got)
	}
	if got := plan("c", v); got != "wait" {
		t.Errorf("node c after a new node sharing no tag: %s, want wait", got)
	}
	v = s.current().version
	s.apply("b", nil) // revoked
	if got := plan("a", v); got != "delta +[] -[b]" {
		t.Errorf("node a after node b's revocation: %s", got)
	}
	if got := plan("u", v); got != "wait" {
		t.Errorf("untagged node after node b's revocation: %s, want wait", got)
	}
}

func TestPlanForRingBounds(t *testing.T) {
	s := newTestState(tpeer("w", "watcher", wire.RoleNode), tpeer("a", "alpha", wire.RoleNode))
	v0 := s.current().version
	for i := range maxDiffs + 10 {
		p := tpeer("a", "alpha", wire.RoleNode)
		p.Endpoints = []string{fmt.Sprintf("192.0.2.1:%d", i+1)}
		s.apply("a", p)
	}
	snap := s.current()
	if len(snap.diffs) != maxDiffs {
		t.Errorf("ring holds %d diffs, want %d", len(snap.diffs), maxDiffs)
	}
	w := snap.byID["w"]
	if got := planString(snap.planFor(w, v0, v0, TopologyMesh, true)); got != "full" {
		t.Errorf("since before the ring: %s, want full", got)
	}
	oldest := snap.version - maxDiffs
	if got := planString(snap.planFor(w, oldest, oldest, TopologyMesh, true)); got != "delta +[a:alpha] -[]" {
		t.Errorf("since the ring's start: %s", got)
	}
	if got := planString(snap.planFor(w, oldest-1, oldest-1, TopologyMesh, true)); got != "full" {
		t.Errorf("since just before the ring: %s, want full", got)
	}
	// A delta as big as the netmap is sent as a full one.
	for i := range 100 {
		s.apply(fmt.Sprintf("n%d", i), tpeer(fmt.Sprintf("n%d", i), fmt.Sprintf("node%03d", i), wire.RoleNode))
	}
	snap = s.current()
	if got := planString(snap.planFor(w, snap.version-100, snap.version-100, TopologyMesh, true)); got != "full" {
		t.Errorf("100 new of 102: %s, want full", got)
	}
	// The change bound: one huge batch leaves only itself in the ring.
	var batch []*pendingChange
	for i := range maxDiffChanges + 1 {
		batch = append(batch, &pendingChange{id: fmt.Sprintf("m%d", i), p: tpeer(fmt.Sprintf("m%d", i), fmt.Sprintf("m%06d", i), wire.RoleNode)})
	}
	s.mu.Lock()
	s.publishChanges(batch)
	s.mu.Unlock()
	if d := s.current().diffs; len(d) != 1 || len(d[0].changes) != maxDiffChanges+1 {
		t.Errorf("after a batch over maxDiffChanges the ring holds %d diffs", len(d))
	}
}

func TestApplyCoalescesConcurrentChanges(t *testing.T) {
	s := newTestState()
	v0 := s.current().version
	var wg sync.WaitGroup
	for i := range 200 {
		wg.Go(func() {
			id := fmt.Sprintf("n%03d", i)
			s.apply(id, tpeer(id, "name-"+id, wire.RoleNode))
			if _, ok := s.current().byID[id]; !ok {
				t.Errorf("apply(%s) returned before its change was published", id)
			}
		})
	}
	wg.Wait()
	snap := s.current()
	if _, ok := snap.byNameLookup("name-n123"); len(snap.byID) != 200 || len(snap.sorted) != 200 || !ok {
		t.Fatalf("%d/%d nodes (name-n123 found: %t), want 200", len(snap.byID), len(snap.sorted), ok)
	}
	if !slices.IsSortedFunc(snap.sorted, byName) {
		t.Error("sorted is not sorted")
	}
	changes := 0
	for _, d := range snap.diffs {
		changes += len(d.changes)
	}
	if n := snap.version - v0; changes != 200 || n > 200 || int(n) != len(snap.diffs) {
		t.Errorf("%d versions, %d diffs with %d changes; want ≤200 versions, one diff each, 200 changes", n, len(snap.diffs), changes)
	}
	t.Logf("200 concurrent changes published in %d snapshots", snap.version-v0)
}

func TestApplyKeepsIndexes(t *testing.T) {
	s := newTestState(tpeer("a", "alpha", wire.RoleNode), tpeer("b", "bravo", wire.RoleProxy), tpeer("x", "box", wire.RoleSSH))
	s.apply("a", tpeer("a", "zulu", wire.RoleNode)) // renamed
	s.apply("x", nil)
	snap := s.current()
	if _, ok := snap.byNameLookup("alpha"); ok {
		t.Error("old name still indexed")
	}
	if p, ok := snap.lookup("zulu"); !ok || p.ID != "a" {
		t.Errorf("lookup(zulu) = %+v, %t", p, ok)
	}
	if _, ok := snap.lookup("box"); ok || len(snap.sshSorted) != 0 || len(snap.sshByID) != 0 {
		t.Error("removed SSH-only node still indexed")
	}
	if got := []string{snap.sorted[0].Name, snap.sorted[1].Name}; !slices.Equal(got, []string{"bravo", "zulu"}) {
		t.Errorf("sorted %v", got)
	}
	if len(snap.proxies) != 1 || snap.proxies[0].ID != "b" {
		t.Errorf("proxies %v", snap.proxies)
	}
}

// render: a full netmap and a delta decode to what wire.Netmap says, and
// the announced size is the size written.
func TestRenderNetmap(t *testing.T) {
	s := newTestState(tpeer("w", "watcher", wire.RoleNode), tpeer("a", "alpha", wire.RoleNode), tpeer("p", "proxy", wire.RoleProxy))
	o := &Options{Topology: TopologyMesh, IPv4Pool: DefaultIPv4Pool, WGEndpoint: "192.0.2.1:51820", Domain: "example.test", Now: time.Now}
	ula := netip.MustParsePrefix("fd00:1:2::/48")
	v0 := s.current().version
	s.apply("b", tpeer("b", "bravo", wire.RoleNode))
	s.apply("a", nil)
	snap := s.current()
	decode := func(nj *netmapJSON) wire.Netmap {
		t.Helper()
		var buf bytes.Buffer
		if err := nj.writeTo(&buf); err != nil {
			t.Fatal(err)
		}
		if buf.Len() != nj.size {
			t.Errorf("wrote %d bytes, announced %d", buf.Len(), nj.size)
		}
		var nm wire.Netmap
		if err := json.Unmarshal(buf.Bytes(), &nm); err != nil {
			t.Fatalf("%v: %s", err, buf.Bytes())
		}
		return nm
	}
	w := snap.byID["w"]
	got := decode(snap.render(w, v0, netmapPlan{full: true}, o, ula))
	want := wire.Netmap{Version: snap.version, Self: w.Peer, Peers: []wire.Peer{snap.byID["b"].Peer, snap.byID["p"].Peer},
		ProxyEndpoint: o.WGEndpoint, Domain: o.Domain, Topology: "mesh", IPv4Pool: "100.64.0.0/16", IPv6Pool: ula.String()}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("full netmap\n got %+v\nwant %+v", got, want)
	}
	d := decode(snap.render(w, v0, snap.planFor(w, v0, v0, TopologyMesh, true), o, ula))
	want.Delta, want.Base, want.Removed, want.Peers = true, v0, []string{"a"}, []wire.Peer{snap.byID["b"].Peer}
	if !reflect.DeepEqual(d, want) {
		t.Errorf("delta\n got %+v\nwant %+v", d, want)
	}
	// An empty netmap still has "peers": [].
	lone := newTestState(tpeer("l", "lone", wire.RoleNode)).current()
	if nm := decode(lone.render(lone.byID["l"], 0, netmapPlan{full: true}, o, ula)); nm.Peers == nil || len(nm.Peers) != 0 {
		t.Errorf("lone node's peers: %#v", nm.Peers)
	}
}

// mirrors fails unless head has every field of full (by name, type and
// JSON tag) except the ones skipped, and nothing else.
func mirrors(t *testing.T, head, full reflect.Type, skip string) {
	t.Helper()
	n := 0
	for i := range full.NumField() {
		f := full.Field(i)
		if f.Name == skip {
			continue
		}
		n++
		h, ok := head.FieldByName(f.Name)
		if !ok || h.Type != f.Type || h.Tag != f.Tag {
			t.Errorf("%s.%s (%v %s) is not mirrored in %s", full.Name(), f.Name, f.Type, f.Tag, head.Name())
		}
	}
	if head.NumField() != n {
		t.Errorf("%s has %d fields, %s has %d besides %s", head.Name(), head.NumField(), full.Name(), n, skip)
	}
}

func TestNetmapHeadMirrorsWire(t *testing.T) {
	mirrors(t, reflect.TypeFor[netmapHead](), reflect.TypeFor[wire.Netmap](), "Peers")
}

func TestEnrollHeadMirrorsWire(t *testing.T) {
	mirrors(t, reflect.TypeFor[enrollHead](), reflect.TypeFor[wire.EnrollResponse](), "Netmap")
}
