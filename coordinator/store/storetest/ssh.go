package storetest

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
)

// SSH-only nodes (AddSSHNode).

const (
	sshKeyA = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA a@host"
	sshKeyB = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB b@host"
	svcWeb  = `[{"name":"web","port":80}]`
	svcBoth = `[{"name":"web","port":80},{"name":"cam","port":80}]`
)

func (h *harness) sshParams(name, key, services string, now time.Time) store.SSHNodeParams {
	return store.SSHNodeParams{
		NodeID: fmt.Sprintf("ss%04d", h.seq.Add(1)), Name: name, ServicesJSON: services,
		SSHKey: key, Now: now, Actor: "admin:alice",
	}
}

func (h *harness) addSSH(p store.SSHNodeParams) (store.Node, bool) {
	h.t.Helper()
	n, created, err := h.s.AddSSHNode(h.ctx, p)
	if err != nil {
		h.t.Fatalf("AddSSHNode(%s): %v", p.Name, err)
	}
	return n, created
}

// checkSSHNode fails unless n is an SSH-only node as AddSSHNode describes.
func checkSSHNode(t *testing.T, what string, n store.Node, id, name, key, services string, created time.Time) {
	t.Helper()
	if n.ID != id || n.Name != name || n.Role != store.RoleSSH || n.SSHKey != key || n.ServicesJSON != services ||
		n.IPv4 != (netip.Addr{}) || n.IPv6 != (netip.Addr{}) || n.WireGuardKey != "" || n.TokenID != "" ||
		n.Tags == nil || len(n.Tags) != 0 || n.Endpoints == nil || len(n.Endpoints) != 0 ||
		n.Visibility == nil || len(n.Visibility) != 0 || !n.Created.Equal(created) || !n.LastSeen.IsZero() {
		t.Errorf("%s = %+v; want SSH-only node %s (%s) key %q services %s created %v", what, n, name, id, key, services, created)
	}
}

func testAddSSHNode(t *testing.T, h *harness) {
	h.token("t", 0)
	a := h.enroll(h.params("t", "alpha"))
	t1, t2, t3 := t0.Add(time.Minute), t0.Add(2*time.Minute), t0.Add(3*time.Minute)

	p := h.sshParams("cam", sshKeyA, svcWeb, t1)
	c, created := h.addSSH(p)
	if !created {
		t.Error("first AddSSHNode: created = false")
	}
	checkSSHNode(t, "AddSSHNode", c, p.NodeID, "cam", sshKeyA, svcWeb, t1)
	checkSSHNode(t, "GetNode", h.node(c.ID), p.NodeID, "cam", sshKeyA, svcWeb, t1)
	if c.Revoked() {
		t.Error("new SSH-only node is revoked")
	}

	// Listed with the others, by creation.
	b := h.params("t", "beta")
	b.Now = t2
	bn := h.enroll(b)
	if l := h.nodes(); len(l) != 3 || l[0].ID != a.ID || l[1].ID != c.ID || l[2].ID != bn.ID {
		t.Errorf("ListNodes = %+v; want alpha, cam, beta", l)
	} else {
		checkSSHNode(t, "ListNodes", l[1], c.ID, "cam", sshKeyA, svcWeb, t1)
	}

	// Again: re-certified, same node, new key and services.
	p2 := h.sshParams("cam", sshKeyB, svcBoth, t3)
	c2, created := h.addSSH(p2)
	if created {
		t.Error("AddSSHNode of an active SSH-only name: created = true, want re-certified")
	}
	checkSSHNode(t, "re-certified", c2, c.ID, "cam", sshKeyB, svcBoth, t1)
	if len(h.nodes()) != 3 {
		t.Errorf("re-certifying added a node: %+v", h.nodes())
	}
	if l := filterAudit(h.audit(), "node.add-ssh"); len(l) != 1 || l[0].Target != "cam" || l[0].Actor != "admin:alice" ||
		!l[0].Time.Equal(t1) || !strings.Contains(l[0].Detail, "id="+c.ID) {
		t.Errorf("node.add-ssh audit rows = %+v", l)
	}
	if l := filterAudit(h.audit(), "node.ssh-recertify"); len(l) != 1 || l[0].Target != "cam" || !l[0].Time.Equal(t3) ||
		!strings.Contains(l[0].Detail, "id="+c.ID) {
		t.Errorf("node.ssh-recertify audit rows = %+v", l)
	}

	// Names are unique across enrolled and SSH-only nodes, both ways.
	if _, _, err := h.s.AddSSHNode(h.ctx, h.sshParams("alpha", sshKeyA, svcWeb, t3)); !errors.Is(err, store.ErrNameTaken) {
		t.Errorf("AddSSHNode with an enrolled node's name: %v, want ErrNameTaken", err)
	}
	h.enrollErr(h.params("t", "cam"), store.ErrNameTaken)
	if _, err := h.s.RenameNode(h.ctx, "alpha", "cam", t3, "admin:bob"); !errors.Is(err, store.ErrNameTaken) {
		t.Errorf("rename onto an SSH-only node's name: %v, want ErrNameTaken", err)
	}

	// What SSH-only nodes do not support.
	if _, err := h.s.RenameNode(h.ctx, "cam", "cam2", t3, "admin:bob"); !errors.Is(err, store.ErrSSHOnly) {
		t.Errorf("RenameNode of an SSH-only node: %v, want ErrSSHOnly", err)
	}
	svcs := `[{"name":"x","port":1}]`
	if _, err := h.s.UpdateNode(h.ctx, c.ID, store.NodeUpdate{ServicesJSON: &svcs}); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("UpdateNode of an SSH-only node: %v, want ErrNotFound", err)
	}
	if err := h.s.TouchNode(h.ctx, c.ID, t3); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("TouchNode of an SSH-only node: %v, want ErrNotFound", err)
	}

	// Visibility is the public flag in its services; re-certifying keeps it.
	v, err := h.s.SetServiceVisibility(h.ctx, "cam", "cam", true, t3, "admin:bob")
	want := `[{"name":"web","port":80},{"name":"cam","port":80,"public":true}]`
	if err != nil || v.ServicesJSON != want || len(v.Visibility) != 0 {
		t.Errorf("SetServiceVisibility on an SSH-only node = %+v, %v; want services %s", v, err, want)
	}
	if _, err := h.s.SetServiceVisibility(h.ctx, c.ID, "db", true, t3, "admin:bob"); !errors.Is(err, store.ErrSSHOnly) {
		t.Errorf("SetServiceVisibility of a service the SSH-only node lacks: %v, want ErrSSHOnly", err)
	}
	c3, _ := h.addSSH(h.sshParams("cam", sshKeyB, `[{"name":"cam","port":80},{"name":"db","port":80}]`, t3))
	if want := `[{"name":"cam","port":80,"public":true},{"name":"db","port":80}]`; c3.ServicesJSON != want {
		t.Errorf("re-certified services = %s; want %s (public flag kept)", c3.ServicesJSON, want)
	}
	if v, err = h.s.SetServiceVisibility(h.ctx, "cam", "cam", false, t3, "admin:bob"); err != nil ||
		v.ServicesJSON != `[{"name":"cam","port":80},{"name":"db","port":80}]` {
		t.Errorf("SetServiceVisibility false = %+v, %v", v, err)
	}

	// Ambiguity spans both tables.
	amb, _ := h.addSSH(h.sshParams(a.ID, sshKeyA, svcWeb, t3))
	if _, err := h.s.RevokeNode(h.ctx, a.ID, t3, "admin:bob"); !errors.Is(err, store.ErrAmbiguous) {
		t.Errorf("RevokeNode of a string that is an SSH-only name and an enrolled id: %v, want ErrAmbiguous", err)
	}
	if _, err := h.s.RevokeNode(h.ctx, amb.ID, t3, "admin:bob"); err != nil {
		t.Fatal(err)
	}

	// Revocation.
	r, err := h.s.RevokeNode(h.ctx, "cam", t3, "admin:carol")
	if err != nil || r.ID != c.ID || !r.RevokedAt.Equal(t3) || r.Role != store.RoleSSH {
		t.Fatalf("RevokeNode of an SSH-only node = %+v, %v", r, err)
	}
	if n := h.node(c.ID); !n.Revoked() {
		t.Error("GetNode after revocation: not revoked")
	}
	if _, err := h.s.RevokeNode(h.ctx, c.ID, t3, "admin:carol"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("revoking again: %v, want ErrNotFound", err)
	}
	if _, err := h.s.SetServiceVisibility(h.ctx, "cam", "cam", true, t3, "admin:bob"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("SetServiceVisibility of a revoked SSH-only node: %v, want ErrNotFound", err)
	}
	if l := filterAudit(h.audit(), "node.revoke"); len(l) != 2 || l[1].Target != "cam" || l[1].Actor != "admin:carol" ||
		!strings.Contains(l[1].Detail, "id="+c.ID) {
		t.Errorf("node.revoke audit rows = %+v", l)
	}

	// Its name is free again, for either kind; a new SSH-only node gets a new id.
	c4, created := h.addSSH(h.sshParams("cam", sshKeyA, svcWeb, t3))
	if !created || c4.ID == c.ID {
		t.Errorf("AddSSHNode after revocation = %+v, created %t; want a new node", c4, created)
	}
	if _, err := h.s.RevokeNode(h.ctx, "cam", t3, "admin:carol"); err != nil {
		t.Fatal(err)
	}
	h.enroll(h.params("t", "cam"))
	if l := h.nodes(); len(l) != 6 {
		t.Errorf("%d nodes listed, want 6 (alpha, cam, beta, ambiguous, cam, cam)", len(l))
	}
}

func testFailedAddSSHWritesNothing(t *testing.T, h *harness) {
	h.token("t", 0)
	h.enroll(h.params("t", "alpha"))
	h.addSSH(h.sshParams("cam", sshKeyA, svcWeb, t0))
	before := h.snapshot()
	for _, tc := range []struct {
		what string
		p    store.SSHNodeParams
		want error
	}{
		{"enrolled node's name", h.sshParams("alpha", sshKeyA, svcWeb, t0), store.ErrNameTaken},
		{"services not an array", h.sshParams("dog", sshKeyA, `{"name":"web"}`, t0), nil},
		{"empty key", h.sshParams("dog", " ", svcWeb, t0), nil},
		{"empty name", h.sshParams("", sshKeyA, svcWeb, t0), nil},
		{"zero time", h.sshParams("dog", sshKeyA, svcWeb, time.Time{}), nil},
		{"empty id", store.SSHNodeParams{Name: "dog", ServicesJSON: svcWeb, SSHKey: sshKeyA, Now: t0}, nil},
		{"id of an enrolled node", store.SSHNodeParams{NodeID: before.nodes[0].ID, Name: "dog", ServicesJSON: svcWeb, SSHKey: sshKeyA, Now: t0}, nil},
		{"re-certify with bad services", h.sshParams("cam", sshKeyB, `[1]`, t0), nil},
	} {
		n, _, err := h.s.AddSSHNode(h.ctx, tc.p)
		if err == nil || (tc.want != nil && !errors.Is(err, tc.want)) {
			t.Errorf("AddSSHNode (%s) = %+v, %v; want an error (%v)", tc.what, n, err, tc.want)
		}
		h.unchanged(before, "failed AddSSHNode ("+tc.what+")")
	}
	if n := h.nodes()[1]; n.SSHKey != sshKeyA || n.ServicesJSON != svcWeb {
		t.Errorf("failed re-certification changed the node: %+v", n)
	}
}

func testSSHDurable(t *testing.T, h *harness) {
	c, _ := h.addSSH(h.sshParams("cam", sshKeyA, svcWeb, t0))
	h.addSSH(h.sshParams("cam", sshKeyB, svcBoth, t0.Add(time.Minute)))
	h.reopen()
	checkSSHNode(t, "after reopen", h.node(c.ID), c.ID, "cam", sshKeyB, svcBoth, t0)
	if _, err := h.s.RevokeNode(h.ctx, "cam", t0.Add(time.Hour), "admin:bob"); err != nil {
		t.Fatal(err)
	}
	h.reopen()
	if n := h.node(c.ID); !n.RevokedAt.Equal(t0.Add(time.Hour)) {
		t.Errorf("revocation lost across reopen: %+v", n)
	}
	if l := h.nodes(); len(l) != 1 || !l[0].Revoked() {
		t.Errorf("ListNodes after reopen = %+v", l)
	}
	if len(filterAudit(h.audit(), "node.add-ssh")) != 1 || len(filterAudit(h.audit(), "node.ssh-recertify")) != 1 {
		t.Errorf("audit after reopen = %+v", h.audit())
	}
}
