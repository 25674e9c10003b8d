package coordinator_test

import (
	"crypto/tls"
	"errors"
	"net/http"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator"
	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
)

// rawNetmapAt fetches a node's netmap answer as sent, not merged: since
// and, if delta, a delta request. nil for 304.
func rawNetmapAt(t *testing.T, c *meshtest.Coordinator, st *node.State, since uint64, delta bool) *wire.Netmap {
	t.Helper()
	conf := pki.CATLSConfig(st.CACert())
	conf.Certificates = []tls.Certificate{st.ClientCert()}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: conf}}
	defer hc.CloseIdleConnections()
	q := "?since=" + strconv.FormatUint(since, 10)
	if delta {
		q += "&delta=1"
	}
	var nm wire.Netmap
	err := wire.Call(ctx(t), hc, http.MethodGet, c.URL()+wire.PathNetmap+q, nil, nil, &nm)
	if err == wire.ErrNotModified {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	return &nm
}

// A node's client keeps returning full netmaps while the coordinator sends
// it deltas: after every kind of change, what it returns is what a full
// fetch returns.
func TestNetmapDeltasEndToEnd(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	w := c.AddNode(t, "w")
	a := c.AddNode(t, "a")
	b := c.AddNode(t, "b")
	fresh, err := node.NewClient(w.Dir) // for full fetches
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fresh.Close)
	nm, err := w.Client.Netmap(ctx(t), 0)
	if err != nil {
		t.Fatal(err)
	}
	step := func(what string, change func(), wantPeers ...string) {
		t.Helper()
		before := nm.Version
		change()
		d := rawNetmapAt(t, c, w.State, before, true)
		if d == nil || !d.Delta || d.Base != before {
			t.Fatalf("%s: the coordinator's answer to since=%d&delta=1 is not a delta from it: %+v", what, before, d)
		}
		got, err := w.Client.Netmap(ctx(t), before)
		if err != nil || got == nil {
			t.Fatalf("%s: Netmap: %+v, %v", what, got, err)
		}
		full, err := fresh.Netmap(ctx(t), 0)
		if err != nil {
			t.Fatal(err)
		}
		if got.Delta || !reflect.DeepEqual(got, full) {
			t.Fatalf("%s: merged netmap\n%+v\nfull netmap\n%+v", what, got, full)
		}
		var names []string
		for _, p := range got.Peers {
			names = append(names, p.Name)
		}
		if !reflect.DeepEqual(names, wantPeers) {
			t.Errorf("%s: peers %v, want %v", what, names, wantPeers)
		}
		t.Logf("%s: delta of %d peers and %d removals", what, len(d.Peers), len(d.Removed))
		nm = got
	}
	step("services", func() {
		svcs := []wire.Service{{Name: "web", Port: 8080}}
		if err := a.Client.Update(ctx(t), wire.UpdateRequest{Services: &svcs}); err != nil {
			t.Fatal(err)
		}
	}, "a", "b")
	step("enrollment", func() { c.AddNode(t, "c") }, "a", "b", "c")
	step("rename", func() {
		if err := c.Admin(http.MethodPost, wire.PathAdminNodeRename, wire.NameRequest{Name: "b", NewName: "zed"}, nil); err != nil {
			t.Fatal(err)
		}
	}, "a", "c", "zed")
	step("revocation", func() {
		if err := c.Admin(http.MethodPost, wire.PathAdminNodeRevoke, wire.NameRequest{Name: "a"}, nil); err != nil {
			t.Fatal(err)
		}
	}, "c", "zed")
	step("own endpoints", func() {
		eps := []string{"192.0.2.10:41641"}
		if err := w.Client.Update(ctx(t), wire.UpdateRequest{Endpoints: &eps}); err != nil {
			t.Fatal(err)
		}
	}, "c", "zed")
	if len(nm.Self.Endpoints) != 1 {
		t.Errorf("Self after its own update: %+v", nm.Self)
	}
	_ = b
	// Several changes at once reach a node that was away as one delta.
	before := nm.Version
	c.AddNode(t, "d")
	c.AddNode(t, "e")
	if d := rawNetmapAt(t, c, w.State, before, true); d == nil || !d.Delta || len(d.Peers) != 2 {
		t.Fatalf("two enrollments as one delta: %+v", d)
	}
	// Without delta=1, and from a version the coordinator cannot account
	// for, a full netmap.
	if nm := rawNetmapAt(t, c, w.State, before, false); nm == nil || nm.Delta || len(nm.Peers) != 4 {
		t.Errorf("no delta asked: %+v", nm)
	}
	if nm := rawNetmapAt(t, c, w.State, 12345, true); nm == nil || nm.Delta || len(nm.Peers) != 4 {
		t.Errorf("unknown version: %+v", nm)
	}
}

// A new client (the agent's, at start) applies deltas to the netmap its
// node saved.
func TestNetmapDeltaFromSavedNetmap(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	w := c.AddNode(t, "w") // enrollment saved its netmap
	saved, err := node.LoadNetmap(w.Dir)
	if err != nil {
		t.Fatal(err)
	}
	c.AddNode(t, "a")
	got, err := w.Client.Netmap(ctx(t), saved.Version)
	if err != nil || got == nil || len(got.Peers) != 1 || got.Peers[0].Name != "a" {
		t.Fatalf("Netmap from the saved version: %+v, %v", got, err)
	}
	if d := rawNetmapAt(t, c, w.State, saved.Version, true); d == nil || !d.Delta {
		t.Errorf("the coordinator sent no delta from the saved version: %+v", d)
	}
}

// In the hub topology a change wakes only who sees it: the node itself and
// the proxies, not the other nodes, whose version stays valid.
func TestNetmapHubWakesOnlyWhoSees(t *testing.T) {
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) {
		o.Topology = coordinator.TopologyHub
		o.LongPoll = 30 * time.Second
	})
	a := c.AddNode(t, "a")
	b := c.AddNode(t, "b")
	px := addProxy(t, c, "px")
	nmA, nmP := netmapOf(t, a.Client), netmapOf(t, px)
	type result struct {
		nm  *wire.Netmap
		err error
	}
	pollA, pollP := make(chan result, 1), make(chan result, 1)
	go func() { nm, err := a.Client.Netmap(ctx(t), nmA.Version); pollA <- result{nm, err} }()
	go func() { nm, err := px.Netmap(ctx(t), nmP.Version); pollP <- result{nm, err} }()
	time.Sleep(100 * time.Millisecond)

	eps := []string{"192.0.2.20:41641"}
	if err := b.Client.Update(ctx(t), wire.UpdateRequest{Endpoints: &eps}); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-pollP:
		if p, ok := peerNamed(r.nm, "b"); r.err != nil || !ok || len(p.Endpoints) != 1 {
			t.Fatalf("proxy's netmap after b's update: %+v, %v", r.nm, r.err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the proxy's long-poll did not wake")
	}
	select {
	case r := <-pollA:
		t.Fatalf("node a woke on node b's change: %+v, %v", r.nm, r.err)
	case <-time.After(300 * time.Millisecond):
	}
	// A change to the proxy reaches a, as a delta against the version it
	// has had all along.
	if err := px.Update(ctx(t), wire.UpdateRequest{Endpoints: &eps}); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-pollA:
		if p, ok := peerNamed(r.nm, "px"); r.err != nil || !ok || len(p.Endpoints) != 1 || len(r.nm.Peers) != 1 {
			t.Fatalf("a's netmap after the proxy's update: %+v, %v", r.nm, r.err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("node a's long-poll did not wake on the proxy's change")
	}
	if d := rawNetmapAt(t, c, a.State, nmA.Version, true); d == nil || !d.Delta || len(d.Peers) != 1 {
		t.Errorf("a's delta: %+v", d)
	}
}

// In the tags topology, changing a node's tags changes whom it sees: the
// node gets a full netmap of its new view, the nodes that start or stop
// seeing it get the change, and the rest do not wake.
func TestSetNodeTagsChangesWhoSeesWhom(t *testing.T) {
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) { o.Topology = coordinator.TopologyTags })
	enroll := func(name string, tags ...string) *meshtest.Node {
		tok := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 1, Tags: tags})
		n, err := c.Enroll(t, name, tok.Token)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	a := enroll("a", "cam")
	b := enroll("b", "cam")
	o := enroll("o", "office")
	px := addProxy(t, c, "px")
	names := func(nm *wire.Netmap) []string {
		var out []string
		for _, p := range nm.Peers {
			out = append(out, p.Name)
		}
		return out
	}
	if got := names(netmapOf(t, a.Client)); !slices.Equal(got, []string{"b", "px"}) {
		t.Fatalf("a sees %v before, want b and px", got)
	}
	if got := names(netmapOf(t, o.Client)); !slices.Equal(got, []string{"px"}) {
		t.Fatalf("o sees %v before, want px", got)
	}
	vA, vB, vO := netmapOf(t, a.Client).Version, netmapOf(t, b.Client).Version, netmapOf(t, o.Client).Version

	var n wire.Node
	if err := c.Admin(http.MethodPost, wire.PathAdminNodeTags, wire.NodeTagsRequest{Name: "o", Tags: []string{"cam", "office"}}, &n); err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(n.Tags, []string{"cam", "office"}) {
		t.Fatalf("set-tags answered %+v", n)
	}
	// o's own view changed wholesale: a full netmap with a and b.
	if d := rawNetmapAt(t, c, o.State, vO, true); d == nil || d.Delta || !slices.Equal(names(d), []string{"a", "b", "px"}) {
		t.Errorf("o's netmap after its tags changed: %+v", d)
	}
	// a and b now see o: a delta adding it.
	for _, x := range []struct {
		n *meshtest.Node
		v uint64
	}{{a, vA}, {b, vB}} {
		d := rawNetmapAt(t, c, x.n.State, x.v, true)
		if d == nil || !d.Delta || !slices.Equal(names(d), []string{"o"}) {
			t.Errorf("%s's delta after o joined its tag: %+v", x.n.Name, d)
		}
	}
	if p, ok := peerNamed(netmapOf(t, px), "o"); !ok || !slices.Equal(p.Tags, []string{"cam", "office"}) {
		t.Errorf("the proxy's entry for o: %+v", p)
	}

	// Cleared: o sees only the proxy again, and a loses o.
	vA = netmapOf(t, a.Client).Version
	if err := c.Admin(http.MethodPost, wire.PathAdminNodeTags, wire.NodeTagsRequest{Name: "o"}, nil); err != nil {
		t.Fatal(err)
	}
	if got := names(netmapOf(t, o.Client)); !slices.Equal(got, []string{"px"}) {
		t.Errorf("o sees %v with no tags, want px", got)
	}
	if d := rawNetmapAt(t, c, a.State, vA, true); d == nil || !d.Delta || !slices.Equal(d.Removed, []string{o.State.NodeID}) {
		t.Errorf("a's delta after o left its tag: %+v", d)
	}

	// Bad requests change nothing.
	_, line := newSSHKey(t, "ed25519")
	addSSH(t, c, wire.AddSSHRequest{Name: "sshbox", SSHKey: line, Services: []string{"web"}})
	for _, bad := range []struct {
		req  wire.NodeTagsRequest
		code string
		want string
	}{
		{wire.NodeTagsRequest{Name: "a", Tags: []string{"Cam"}}, wire.CodeBadRequest, "tag"},
		{wire.NodeTagsRequest{Name: "a", Tags: []string{"cam", "cam"}}, wire.CodeBadRequest, "twice"},
		{wire.NodeTagsRequest{Name: "a", Tags: make([]string, 17)}, wire.CodeBadRequest, "at most 16"},
		{wire.NodeTagsRequest{Name: "nosuch", Tags: []string{"cam"}}, wire.CodeNotFound, "not found"},
		{wire.NodeTagsRequest{Name: "sshbox", Tags: []string{"cam"}}, wire.CodeBadRequest, "SSH-only"},
	} {
		err := c.Admin(http.MethodPost, wire.PathAdminNodeTags, bad.req, nil)
		var ae *wire.APIError
		if !errors.As(err, &ae) || ae.Code != bad.code || !strings.Contains(ae.Message, bad.want) {
			t.Errorf("set-tags %+v: %v; want code %s and %q", bad.req, err, bad.code, bad.want)
		}
	}
	if got := names(netmapOf(t, a.Client)); !slices.Equal(got, []string{"b", "px"}) {
		t.Errorf("a sees %v after the refused requests, want b and px", got)
	}
}
