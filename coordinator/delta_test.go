package coordinator_test

import (
	"crypto/tls"
	"net/http"
	"reflect"
	"strconv"
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
