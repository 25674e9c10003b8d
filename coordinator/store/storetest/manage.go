package storetest

import (
	"errors"
	"fmt"
	"reflect"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
)

func testRevokeNode(t *testing.T, h *harness) {
	h.token("t", 0)
	a := h.enroll(h.params("t", "alpha"))
	b := h.enroll(h.params("t", "beta"))
	t1 := t0.Add(time.Hour)

	got, err := h.s.RevokeNode(h.ctx, "alpha", t1, "admin:bob")
	if err != nil {
		t.Fatalf("RevokeNode by name: %v", err)
	}
	if got.ID != a.ID || !got.Revoked() || !got.RevokedAt.Equal(t1) || got.IPv4 != a.IPv4 {
		t.Errorf("RevokeNode returned %+v, want alpha revoked at %v", got, t1)
	}
	if got, err = h.s.RevokeNode(h.ctx, b.ID, t1, "admin:carol"); err != nil || got.Name != "beta" || !got.Revoked() {
		t.Errorf("RevokeNode by id = %+v, %v; want beta revoked", got, err)
	}
	for _, again := range []string{"alpha", a.ID, "beta", b.ID, "nosuch"} {
		if _, err := h.s.RevokeNode(h.ctx, again, t1.Add(time.Hour), "admin:bob"); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("RevokeNode(%q) of a revoked or unknown node: %v, want ErrNotFound", again, err)
		}
	}
	nodes := h.nodes()
	if len(nodes) != 2 {
		t.Fatalf("%d nodes, want 2 (revoked nodes stay listed)", len(nodes))
	}
	for _, n := range nodes {
		if !n.RevokedAt.Equal(t1) {
			t.Errorf("node %s RevokedAt = %v, want %v (first revocation kept)", n.Name, n.RevokedAt, t1)
		}
	}
	if n := h.node(a.ID); !n.Revoked() {
		t.Error("GetNode of a revoked node: not revoked")
	}
	revokes := filterAudit(h.audit(), "node.revoke")
	if len(revokes) != 2 || revokes[0].Target != "alpha" || revokes[0].Actor != "admin:bob" ||
		revokes[1].Target != "beta" || revokes[1].Actor != "admin:carol" || !revokes[0].Time.Equal(t1) {
		t.Errorf("node.revoke audit rows = %+v", revokes)
	}
}

func filterAudit(l []store.AuditEntry, action string) []store.AuditEntry {
	var out []store.AuditEntry
	for _, e := range l {
		if e.Action == action {
			out = append(out, e)
		}
	}
	return out
}

func testRenameNode(t *testing.T, h *harness) {
	h.token("t", 0)
	a := h.enroll(h.params("t", "alpha"))
	b := h.enroll(h.params("t", "beta"))
	t1 := t0.Add(time.Hour)

	got, err := h.s.RenameNode(h.ctx, "alpha", "gamma", t1, "admin:bob")
	if err != nil || got.ID != a.ID || got.Name != "gamma" {
		t.Fatalf("RenameNode by name = %+v, %v; want alpha renamed gamma", got, err)
	}
	if n := h.node(a.ID); n.Name != "gamma" || n.IPv4 != a.IPv4 || n.WireGuardKey != a.WireGuardKey {
		t.Errorf("after rename GetNode = %+v", n)
	}
	if got, err = h.s.RenameNode(h.ctx, b.ID, "delta", t1, "admin:bob"); err != nil || got.Name != "delta" {
		t.Fatalf("RenameNode by id = %+v, %v", got, err)
	}

	before := h.node(a.ID)
	if _, err := h.s.RenameNode(h.ctx, "gamma", "delta", t1, "admin:bob"); !errors.Is(err, store.ErrNameTaken) {
		t.Errorf("rename onto an active name: %v, want ErrNameTaken", err)
	}
	if n := h.node(a.ID); !nodeEqual(n, before) {
		t.Errorf("failed rename changed the node: %+v", n)
	}
	if _, err := h.s.RenameNode(h.ctx, "alpha", "epsilon", t1, "admin:bob"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("rename by an old name: %v, want ErrNotFound", err)
	}

	// Revoked nodes cannot be renamed, and their names are free.
	if _, err := h.s.RevokeNode(h.ctx, "delta", t1, "admin:bob"); err != nil {
		t.Fatal(err)
	}
	if _, err := h.s.RenameNode(h.ctx, b.ID, "zeta", t1, "admin:bob"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("rename of a revoked node: %v, want ErrNotFound", err)
	}
	if got, err = h.s.RenameNode(h.ctx, "gamma", "delta", t1, "admin:bob"); err != nil || got.Name != "delta" {
		t.Errorf("rename onto a revoked node's name = %+v, %v; want ok", got, err)
	}

	renames := filterAudit(h.audit(), "node.rename")
	if len(renames) != 3 || renames[0].Target != "alpha" || !strings.Contains(renames[0].Detail, "new=gamma") ||
		renames[0].Actor != "admin:bob" || renames[2].Target != "gamma" || !strings.Contains(renames[2].Detail, "new=delta") {
		t.Errorf("node.rename audit rows = %+v", renames)
	}
}

func testSetNodeTags(t *testing.T, h *harness) {
	h.token("t", 0)
	a := h.enroll(h.params("t", "alpha"))
	t1 := t0.Add(time.Hour)

	got, err := h.s.SetNodeTags(h.ctx, "alpha", []string{"cam", "lab"}, t1, "admin:bob")
	if err != nil || got.ID != a.ID || !slices.Equal(got.Tags, []string{"cam", "lab"}) {
		t.Fatalf("SetNodeTags by name = %+v, %v", got, err)
	}
	if n := h.node(a.ID); !slices.Equal(n.Tags, []string{"cam", "lab"}) || n.Name != "alpha" || n.IPv4 != a.IPv4 {
		t.Errorf("after SetNodeTags GetNode = %+v", n)
	}
	if got, err = h.s.SetNodeTags(h.ctx, a.ID, nil, t1, "admin:bob"); err != nil || len(got.Tags) != 0 {
		t.Errorf("SetNodeTags(nil) by id = %+v, %v; want no tags", got, err)
	}
	if _, err := h.s.SetNodeTags(h.ctx, "nosuch", []string{"x"}, t1, "admin:bob"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("SetNodeTags of an unknown node: %v, want ErrNotFound", err)
	}
	if _, err := h.s.RevokeNode(h.ctx, "alpha", t1, "admin:bob"); err != nil {
		t.Fatal(err)
	}
	if _, err := h.s.SetNodeTags(h.ctx, a.ID, []string{"x"}, t1, "admin:bob"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("SetNodeTags of a revoked node: %v, want ErrNotFound", err)
	}
	rows := filterAudit(h.audit(), "node.tags")
	if len(rows) != 2 || rows[0].Target != "alpha" || rows[0].Actor != "admin:bob" ||
		!strings.Contains(rows[0].Detail, "tags=cam,lab") || !strings.Contains(rows[1].Detail, "old=cam,lab") {
		t.Errorf("node.tags audit rows = %+v", rows)
	}
}

func testUpdateNode(t *testing.T, h *harness) {
	h.token("t", 0)
	a := h.enroll(h.params("t", "alpha"))
	services := `[{"name":"web","port":8080,"proto":"tcp"}]`
	endpoints := []string{"198.51.100.7:51820", "[2001:db8::7]:51820"}

	got, err := h.s.UpdateNode(h.ctx, a.ID, store.NodeUpdate{ServicesJSON: &services, Endpoints: &endpoints})
	if err != nil || got.ServicesJSON != services || !slices.Equal(got.Endpoints, endpoints) {
		t.Fatalf("UpdateNode both = %+v, %v", got, err)
	}
	if n := h.node(a.ID); n.ServicesJSON != services || !slices.Equal(n.Endpoints, endpoints) {
		t.Errorf("GetNode after update = %q %v", n.ServicesJSON, n.Endpoints)
	}

	ep2 := []string{"203.0.113.9:51820"}
	if got, err = h.s.UpdateNode(h.ctx, a.ID, store.NodeUpdate{Endpoints: &ep2}); err != nil || got.ServicesJSON != services || !slices.Equal(got.Endpoints, ep2) {
		t.Errorf("UpdateNode endpoints only = %q %v, %v; want services kept", got.ServicesJSON, got.Endpoints, err)
	}
	svc2 := `[]`
	if got, err = h.s.UpdateNode(h.ctx, a.ID, store.NodeUpdate{ServicesJSON: &svc2}); err != nil || got.ServicesJSON != svc2 || !slices.Equal(got.Endpoints, ep2) {
		t.Errorf("UpdateNode services only = %q %v, %v; want endpoints kept", got.ServicesJSON, got.Endpoints, err)
	}
	if got, err = h.s.UpdateNode(h.ctx, a.ID, store.NodeUpdate{}); err != nil || got.ServicesJSON != svc2 || !slices.Equal(got.Endpoints, ep2) {
		t.Errorf("UpdateNode(nil, nil) = %q %v, %v; want unchanged", got.ServicesJSON, got.Endpoints, err)
	}
	var empty []string
	if got, err = h.s.UpdateNode(h.ctx, a.ID, store.NodeUpdate{Endpoints: &empty}); err != nil || got.Endpoints == nil || len(got.Endpoints) != 0 {
		t.Errorf("UpdateNode to no endpoints = %#v, %v; want empty non-nil", got.Endpoints, err)
	}
	if n := h.node(a.ID); n.Endpoints == nil || len(n.Endpoints) != 0 {
		t.Errorf("GetNode endpoints = %#v, want empty non-nil", n.Endpoints)
	}
	if n := h.node(a.ID); n.Name != a.Name || n.IPv4 != a.IPv4 || n.Revoked() {
		t.Errorf("UpdateNode changed other fields: %+v", n)
	}
	if _, err := h.s.UpdateNode(h.ctx, "nosuch", store.NodeUpdate{ServicesJSON: &services}); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("UpdateNode(unknown): %v, want ErrNotFound", err)
	}
	if _, err := h.s.RevokeNode(h.ctx, a.ID, t0, "admin:bob"); err != nil {
		t.Fatal(err)
	}
	if _, err := h.s.UpdateNode(h.ctx, a.ID, store.NodeUpdate{ServicesJSON: &services}); !errors.Is(err, store.ErrRevoked) {
		t.Errorf("UpdateNode(revoked): %v, want ErrRevoked", err)
	}
	if n := h.node(a.ID); n.ServicesJSON != svc2 {
		t.Errorf("update of a revoked node was written: %q", n.ServicesJSON)
	}
}

// testUpdateNodeDiscoKey: the disco key is set, read back by every way of
// loading nodes, and left alone by updates that do not carry it.
func testUpdateNodeDiscoKey(t *testing.T, h *harness) {
	h.token("t", 0)
	a := h.enroll(h.params("t", "alpha"))
	b := h.enroll(h.params("t", "beta"))
	if a.DiscoKey != "" || h.node(a.ID).DiscoKey != "" {
		t.Errorf("new node has disco key %q, want empty", a.DiscoKey)
	}
	k1 := "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="
	k2 := "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8="
	eps := []string{"198.51.100.7:51820"}
	got, err := h.s.UpdateNode(h.ctx, a.ID, store.NodeUpdate{Endpoints: &eps, DiscoKey: &k1})
	if err != nil || got.DiscoKey != k1 || !slices.Equal(got.Endpoints, eps) {
		t.Fatalf("UpdateNode disco key and endpoints = %q %v, %v", got.DiscoKey, got.Endpoints, err)
	}
	if n := h.node(a.ID); n.DiscoKey != k1 {
		t.Errorf("GetNode disco key = %q, want %q", n.DiscoKey, k1)
	}
	for _, n := range h.nodes() {
		if want := map[string]string{a.ID: k1, b.ID: ""}[n.ID]; n.DiscoKey != want {
			t.Errorf("ListNodes: %s has disco key %q, want %q", n.Name, n.DiscoKey, want)
		}
	}

	// Updates without a disco key leave it alone.
	svc := `[{"name":"web","port":80}]`
	ep2 := []string{"203.0.113.9:51820"}
	for _, u := range []store.NodeUpdate{{}, {ServicesJSON: &svc}, {Endpoints: &ep2}} {
		if got, err := h.s.UpdateNode(h.ctx, a.ID, u); err != nil || got.DiscoKey != k1 {
			t.Errorf("UpdateNode(%+v) = disco key %q, %v; want %q kept", u, got.DiscoKey, err, k1)
		}
	}
	// A disco-key-only update leaves the rest alone.
	got, err = h.s.UpdateNode(h.ctx, a.ID, store.NodeUpdate{DiscoKey: &k2})
	if err != nil || got.DiscoKey != k2 || got.ServicesJSON != svc || !slices.Equal(got.Endpoints, ep2) {
		t.Errorf("UpdateNode disco key only = %q %q %v, %v; want %q with services and endpoints kept",
			got.DiscoKey, got.ServicesJSON, got.Endpoints, err, k2)
	}
	if n := h.node(b.ID); n.DiscoKey != "" {
		t.Errorf("other node's disco key = %q, want empty", n.DiscoKey)
	}

	h.reopen()
	if n := h.node(a.ID); n.DiscoKey != k2 {
		t.Errorf("disco key after reopen = %q, want %q", n.DiscoKey, k2)
	}

	// Revoked nodes are not updated; their disco key stays readable.
	if _, err := h.s.RevokeNode(h.ctx, a.ID, t0, "admin:bob"); err != nil {
		t.Fatal(err)
	}
	if _, err := h.s.UpdateNode(h.ctx, a.ID, store.NodeUpdate{DiscoKey: &k1}); !errors.Is(err, store.ErrRevoked) {
		t.Errorf("UpdateNode(revoked) disco key: %v, want ErrRevoked", err)
	}
	if n := h.node(a.ID); n.DiscoKey != k2 {
		t.Errorf("disco key of a revoked node after a refused update = %q, want %q", n.DiscoKey, k2)
	}
}

func testTouchNode(t *testing.T, h *harness) {
	h.token("t", 0)
	a := h.enroll(h.params("t", "alpha"))
	seen := t0.Add(5 * time.Minute)
	if err := h.s.TouchNode(h.ctx, a.ID, seen); err != nil {
		t.Fatalf("TouchNode: %v", err)
	}
	if n := h.node(a.ID); !n.LastSeen.Equal(seen) {
		t.Errorf("LastSeen = %v, want %v", n.LastSeen, seen)
	}
	if err := h.s.TouchNode(h.ctx, "nosuch", seen); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("TouchNode(unknown): %v, want ErrNotFound", err)
	}
	if n := len(filterAudit(h.audit(), "node.touch")); n != 0 {
		t.Errorf("TouchNode wrote %d audit rows", n)
	}
}

func testTokens(t *testing.T, h *harness) {
	t1 := store.Token{
		ID: "tok1", SecretHash: hashOf("s1"), Role: "node", Tags: []string{"tag:x"}, MaxUses: 1,
		Created: t0, Expires: t0.Add(time.Hour), CreatedBy: "admin:alice",
	}
	t2 := store.Token{
		ID: "tok2", SecretHash: hashOf("s2"), Role: "proxy", Tags: []string{},
		Created: t0.Add(time.Second), Expires: t0.Add(48 * time.Hour), CreatedBy: "admin:bob",
	}
	for _, tok := range []store.Token{t1, t2} {
		if err := h.s.CreateToken(h.ctx, tok, tok.CreatedBy); err != nil {
			t.Fatalf("CreateToken(%s): %v", tok.ID, err)
		}
	}
	if err := h.s.CreateToken(h.ctx, t1, "admin:alice"); err == nil {
		t.Error("CreateToken with a duplicate id succeeded")
	}
	l, err := h.s.ListTokens(h.ctx)
	if err != nil || len(l) != 2 || !tokenEqual(l[0], t1) || !tokenEqual(l[1], t2) {
		t.Fatalf("ListTokens = %+v, %v; want %+v, %+v", l, err, t1, t2)
	}

	revoked := t0.Add(time.Minute)
	if err := h.s.RevokeToken(h.ctx, "tok1", revoked, "admin:carol"); err != nil {
		t.Fatalf("RevokeToken: %v", err)
	}
	if tok := h.getToken("tok1"); !tok.RevokedAt.Equal(revoked) {
		t.Errorf("revoked token RevokedAt = %v, want %v", tok.RevokedAt, revoked)
	}
	if tok := h.getToken("tok2"); !tok.RevokedAt.IsZero() {
		t.Errorf("other token revoked too: %v", tok.RevokedAt)
	}
	if err := h.s.RevokeToken(h.ctx, "nosuch", revoked, "admin:carol"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("RevokeToken(unknown): %v, want ErrNotFound", err)
	}

	var got []string
	for _, e := range h.audit() {
		got = append(got, e.Action+" "+e.Target+" by "+e.Actor)
	}
	want := []string{"token.create tok1 by admin:alice", "token.create tok2 by admin:bob", "token.revoke tok1 by admin:carol"}
	if !slices.Equal(got, want) {
		t.Errorf("audit = %q, want %q", got, want)
	}
}

func testAdminKeys(t *testing.T, h *harness) {
	k1 := store.AdminKey{ID: "ak1", SecretHash: hashOf("k1"), Created: t0, CreatedBy: "local"}
	k2 := store.AdminKey{ID: "ak2", SecretHash: hashOf("k2"), Created: t0.Add(time.Second), Expires: t0.Add(24 * time.Hour), CreatedBy: "admin:ak1"}
	if err := h.s.CreateAdminKey(h.ctx, k1, "local"); err != nil {
		t.Fatalf("CreateAdminKey: %v", err)
	}
	if err := h.s.CreateAdminKey(h.ctx, k2, "admin:ak1"); err != nil {
		t.Fatalf("CreateAdminKey: %v", err)
	}
	if err := h.s.CreateAdminKey(h.ctx, k1, "local"); err == nil {
		t.Error("CreateAdminKey with a duplicate id succeeded")
	}
	for _, want := range []store.AdminKey{k1, k2} {
		got, err := h.s.GetAdminKey(h.ctx, want.ID)
		if err != nil || !adminKeyEqual(got, want) {
			t.Errorf("GetAdminKey(%s) = %+v, %v; want %+v", want.ID, got, err, want)
		}
	}
	if _, err := h.s.GetAdminKey(h.ctx, "nosuch"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("GetAdminKey(unknown): %v, want ErrNotFound", err)
	}
	l, err := h.s.ListAdminKeys(h.ctx)
	if err != nil || len(l) != 2 || !adminKeyEqual(l[0], k1) || !adminKeyEqual(l[1], k2) {
		t.Errorf("ListAdminKeys = %+v, %v", l, err)
	}

	revoked := t0.Add(time.Hour)
	if err := h.s.RevokeAdminKey(h.ctx, "ak1", revoked, "admin:ak2"); err != nil {
		t.Fatalf("RevokeAdminKey: %v", err)
	}
	if got, err := h.s.GetAdminKey(h.ctx, "ak1"); err != nil || !got.RevokedAt.Equal(revoked) {
		t.Errorf("revoked key = %+v, %v; want RevokedAt %v", got, err, revoked)
	}
	if got, _ := h.s.GetAdminKey(h.ctx, "ak2"); !got.RevokedAt.IsZero() {
		t.Errorf("other key revoked too: %+v", got)
	}
	if err := h.s.RevokeAdminKey(h.ctx, "nosuch", revoked, "admin:ak2"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("RevokeAdminKey(unknown): %v, want ErrNotFound", err)
	}

	var got []string
	for _, e := range h.audit() {
		got = append(got, e.Action+" "+e.Target+" by "+e.Actor)
	}
	want := []string{"adminkey.create ak1 by local", "adminkey.create ak2 by admin:ak1", "adminkey.revoke ak1 by admin:ak2"}
	if !slices.Equal(got, want) {
		t.Errorf("audit = %q, want %q", got, want)
	}
}

func adminKeyEqual(a, b store.AdminKey) bool {
	return a.ID == b.ID && a.SecretHash == b.SecretHash && a.Created.Equal(b.Created) && a.Expires.Equal(b.Expires) &&
		a.RevokedAt.Equal(b.RevokedAt) && a.CreatedBy == b.CreatedBy
}

// testAudit checks the rows each operation writes, in order.
func testAudit(t *testing.T, h *harness) {
	h.token("t", 0)
	a := h.enroll(h.params("t", "alpha"))
	t1, t2, t3 := t0.Add(time.Minute), t0.Add(2*time.Minute), t0.Add(3*time.Minute)
	if _, err := h.s.RenameNode(h.ctx, "alpha", "beta", t1, "admin:bob"); err != nil {
		t.Fatal(err)
	}
	if _, err := h.s.RevokeNode(h.ctx, "beta", t2, "admin:carol"); err != nil {
		t.Fatal(err)
	}
	if err := h.s.RevokeToken(h.ctx, "t", t3, "admin:dave"); err != nil {
		t.Fatal(err)
	}
	custom := store.AuditEntry{Time: t3, Actor: "token:t", Action: "enroll.refused", Target: "gamma", Detail: "name invalid"}
	if err := h.s.Audit(h.ctx, custom); err != nil {
		t.Fatalf("Audit: %v", err)
	}

	type row struct{ actor, action, target string }
	want := []row{
		{"admin:alice", "token.create", "t"},
		{"token:t", "node.enroll", "alpha"},
		{"admin:bob", "node.rename", "alpha"},
		{"admin:carol", "node.revoke", "beta"},
		{"admin:dave", "token.revoke", "t"},
		{"token:t", "enroll.refused", "gamma"},
	}
	l := h.audit()
	var got []row
	for _, e := range l {
		got = append(got, row{e.Actor, e.Action, e.Target})
	}
	if !slices.Equal(got, want) {
		t.Fatalf("audit rows\n got %v\nwant %v", got, want)
	}
	for i := 1; i < len(l); i++ {
		if l[i].ID <= l[i-1].ID {
			t.Errorf("audit ids not increasing: %d then %d", l[i-1].ID, l[i].ID)
		}
	}
	if e := l[1]; !e.Time.Equal(t0) || !strings.Contains(e.Detail, a.ID) || !strings.Contains(e.Detail, a.IPv4.String()) {
		t.Errorf("node.enroll row = %+v, want time %v and detail naming %s and %v", e, t0, a.ID, a.IPv4)
	}
	if e := l[2]; !e.Time.Equal(t1) || !strings.Contains(e.Detail, "new=beta") {
		t.Errorf("node.rename row = %+v, want time %v and detail new=beta", e, t1)
	}
	if !l[3].Time.Equal(t2) || !l[4].Time.Equal(t3) {
		t.Errorf("revoke rows have times %v, %v; want %v, %v", l[3].Time, l[4].Time, t2, t3)
	}
	if e := l[5]; !e.Time.Equal(custom.Time) || e.Detail != custom.Detail {
		t.Errorf("custom row = %+v, want %+v", e, custom)
	}
}

func testListAuditLimit(t *testing.T, h *harness) {
	if l, err := h.s.ListAudit(h.ctx, 5); err != nil || len(l) != 0 {
		t.Errorf("ListAudit on an empty log = %v, %v", l, err)
	}
	for i := range 10 {
		e := store.AuditEntry{Time: t0.Add(time.Duration(i) * time.Second), Actor: "test", Action: fmt.Sprintf("test.%d", i)}
		if err := h.s.Audit(h.ctx, e); err != nil {
			t.Fatalf("Audit: %v", err)
		}
	}
	actions := func(limit int) []string {
		l, err := h.s.ListAudit(h.ctx, limit)
		if err != nil {
			t.Fatalf("ListAudit(%d): %v", limit, err)
		}
		var out []string
		for _, e := range l {
			out = append(out, e.Action)
		}
		return out
	}
	if got, want := actions(3), []string{"test.7", "test.8", "test.9"}; !slices.Equal(got, want) {
		t.Errorf("ListAudit(3) = %v, want %v (newest, oldest first)", got, want)
	}
	for _, limit := range []int{0, -1, 10, 100} {
		if got := actions(limit); len(got) != 10 || got[0] != "test.0" || got[9] != "test.9" {
			t.Errorf("ListAudit(%d) = %v, want all 10 in order", limit, got)
		}
	}
}

func testMeta(t *testing.T, h *harness) {
	if _, err := h.s.GetMeta(h.ctx, "ula"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("GetMeta(unset): %v, want ErrNotFound", err)
	}
	if v, err := h.s.SetMetaIfAbsent(h.ctx, "ula", "fd12:3456:789a::/48"); err != nil || v != "fd12:3456:789a::/48" {
		t.Fatalf("SetMetaIfAbsent first = %q, %v", v, err)
	}
	if v, err := h.s.SetMetaIfAbsent(h.ctx, "ula", "fdff:ffff:ffff::/48"); err != nil || v != "fd12:3456:789a::/48" {
		t.Errorf("SetMetaIfAbsent second = %q, %v; want the first value kept", v, err)
	}
	if v, err := h.s.SetMetaIfAbsent(h.ctx, "other", "x"); err != nil || v != "x" {
		t.Errorf("SetMetaIfAbsent(other) = %q, %v", v, err)
	}
	h.reopen()
	if v, err := h.s.GetMeta(h.ctx, "ula"); err != nil || v != "fd12:3456:789a::/48" {
		t.Errorf("GetMeta after reopen = %q, %v", v, err)
	}
}

// testDurable checks that everything survives a close and reopen unchanged.
func testDurable(t *testing.T, h *harness) {
	h.token("t", 0)
	a := h.enroll(h.params("t", "alpha"))
	h.enroll(h.params("t", "beta"))
	svc, eps, disco := `[{"name":"db"}]`, []string{"192.0.2.1:51820"}, "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="
	if _, err := h.s.UpdateNode(h.ctx, a.ID, store.NodeUpdate{ServicesJSON: &svc, Endpoints: &eps, DiscoKey: &disco}); err != nil {
		t.Fatal(err)
	}
	if err := h.s.TouchNode(h.ctx, a.ID, t0.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if _, err := h.s.RevokeNode(h.ctx, "beta", t0.Add(time.Hour), "admin:bob"); err != nil {
		t.Fatal(err)
	}
	if err := h.s.CreateAdminKey(h.ctx, store.AdminKey{ID: "ak", SecretHash: hashOf("k"), Created: t0}, "local"); err != nil {
		t.Fatal(err)
	}
	if err := h.s.RevokeToken(h.ctx, "t", t0.Add(2*time.Hour), "admin:bob"); err != nil {
		t.Fatal(err)
	}
	before := h.snapshot()
	keys, err := h.s.ListAdminKeys(h.ctx)
	if err != nil {
		t.Fatal(err)
	}

	h.reopen()
	after := h.snapshot()
	keys2, err := h.s.ListAdminKeys(h.ctx)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(before, after) {
		t.Errorf("state changed across reopen:\nbefore %+v\n after %+v", before, after)
	}
	if !reflect.DeepEqual(keys, keys2) {
		t.Errorf("admin keys changed across reopen:\nbefore %+v\n after %+v", keys, keys2)
	}
	if n := h.node(a.ID); n.ServicesJSON != svc || !slices.Equal(n.Endpoints, eps) || n.DiscoKey != disco || !n.LastSeen.Equal(t0.Add(time.Minute)) {
		t.Errorf("node after reopen = %+v", n)
	}
}
