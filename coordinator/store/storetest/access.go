package storetest

import (
	"errors"
	"maps"
	"reflect"
	"slices"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
)

func accessKeyEqual(a, b store.AccessKey) bool {
	return a.ID == b.ID && a.SecretHash == b.SecretHash && a.Node == b.Node && a.Service == b.Service &&
		a.Created.Equal(b.Created) && a.Expires.Equal(b.Expires) && a.RevokedAt.Equal(b.RevokedAt) && a.CreatedBy == b.CreatedBy
}

func (h *harness) accessKeys() []store.AccessKey {
	h.t.Helper()
	l, err := h.s.ListAccessKeys(h.ctx)
	if err != nil {
		h.t.Fatalf("ListAccessKeys: %v", err)
	}
	return l
}

func auditLines(l []store.AuditEntry) []string {
	var out []string
	for _, e := range l {
		out = append(out, e.Action+" "+e.Target+" by "+e.Actor)
	}
	return out
}

func testAccessKeys(t *testing.T, h *harness) {
	if l := h.accessKeys(); l == nil || len(l) != 0 {
		t.Errorf("ListAccessKeys on an empty store = %#v, want empty non-nil", l)
	}
	k1 := store.AccessKey{ID: "ak1", SecretHash: hashOf("a1"), Created: t0, Expires: t0.Add(24 * time.Hour), CreatedBy: "local"}
	k2 := store.AccessKey{ID: "ak2", SecretHash: hashOf("a2"), Node: "nd0001", Service: "web",
		Created: t0.Add(time.Second), Expires: t0.Add(time.Hour), CreatedBy: "admin-key:x"}
	k3 := store.AccessKey{ID: "ak3", SecretHash: hashOf("a3"), Service: "grafana",
		Created: t0.Add(2 * time.Second), Expires: t0.Add(time.Hour), CreatedBy: "local"}
	for _, k := range []store.AccessKey{k1, k2, k3} {
		if err := h.s.CreateAccessKey(h.ctx, k, k.CreatedBy); err != nil {
			t.Fatalf("CreateAccessKey(%s): %v", k.ID, err)
		}
	}

	// Refused creations write nothing.
	before := h.audit()
	noExpiry := store.AccessKey{ID: "ak4", SecretHash: hashOf("a4"), Created: t0}
	for _, bad := range []store.AccessKey{k1, noExpiry, {SecretHash: hashOf("x"), Created: t0, Expires: t0.Add(time.Hour)}} {
		if err := h.s.CreateAccessKey(h.ctx, bad, "local"); err == nil {
			t.Errorf("CreateAccessKey(%+v) succeeded; want an error (duplicate id, no expiry or no id)", bad)
		}
	}
	if after := h.audit(); len(after) != len(before) {
		t.Errorf("refused CreateAccessKey wrote audit rows: %v", auditLines(after[len(before):]))
	}
	if _, err := h.s.GetAccessKey(h.ctx, "ak4"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("a key without expiry was stored: %v", err)
	}

	for _, want := range []store.AccessKey{k1, k2, k3} {
		got, err := h.s.GetAccessKey(h.ctx, want.ID)
		if err != nil || !accessKeyEqual(got, want) {
			t.Errorf("GetAccessKey(%s) = %+v, %v; want %+v", want.ID, got, err, want)
		}
	}
	if _, err := h.s.GetAccessKey(h.ctx, "nosuch"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("GetAccessKey(unknown): %v, want ErrNotFound", err)
	}
	if l := h.accessKeys(); len(l) != 3 || !accessKeyEqual(l[0], k1) || !accessKeyEqual(l[1], k2) || !accessKeyEqual(l[2], k3) {
		t.Errorf("ListAccessKeys = %+v, want k1, k2, k3 in creation order", l)
	}

	revoked := t0.Add(time.Minute)
	if err := h.s.RevokeAccessKey(h.ctx, "ak2", revoked, "admin-key:y"); err != nil {
		t.Fatalf("RevokeAccessKey: %v", err)
	}
	// Again: succeeds, keeps the first time, no second audit row.
	if err := h.s.RevokeAccessKey(h.ctx, "ak2", revoked.Add(time.Minute), "local"); err != nil {
		t.Errorf("RevokeAccessKey of a revoked key: %v, want nil", err)
	}
	if got, err := h.s.GetAccessKey(h.ctx, "ak2"); err != nil || !got.RevokedAt.Equal(revoked) {
		t.Errorf("revoked key = %+v, %v; want RevokedAt %v", got, err, revoked)
	}
	for _, id := range []string{"ak1", "ak3"} {
		if got, _ := h.s.GetAccessKey(h.ctx, id); !got.RevokedAt.IsZero() {
			t.Errorf("key %s revoked too: %+v", id, got)
		}
	}
	before = h.audit()
	if err := h.s.RevokeAccessKey(h.ctx, "nosuch", revoked, "local"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("RevokeAccessKey(unknown): %v, want ErrNotFound", err)
	}
	if after := h.audit(); len(after) != len(before) {
		t.Errorf("refused RevokeAccessKey wrote audit rows: %v", auditLines(after[len(before):]))
	}

	want := []string{"accesskey.create ak1 by local", "accesskey.create ak2 by admin-key:x", "accesskey.create ak3 by local",
		"accesskey.revoke ak2 by admin-key:y"}
	l := h.audit()
	if got := auditLines(l); !slices.Equal(got, want) {
		t.Errorf("audit = %q, want %q", got, want)
	}
	if len(l) == 4 && (!l[0].Time.Equal(t0) || !l[3].Time.Equal(revoked)) {
		t.Errorf("audit times %v, %v; want %v, %v", l[0].Time, l[3].Time, t0, revoked)
	}
}

func testServiceVisibility(t *testing.T, h *harness) {
	h.token("t", 0)
	a := h.enroll(h.params("t", "alpha"))
	b := h.enroll(h.params("t", "beta"))
	if a.Visibility == nil || len(a.Visibility) != 0 {
		t.Errorf("Enroll returned Visibility %#v, want empty non-nil", a.Visibility)
	}
	t1 := t0.Add(time.Minute)

	got, err := h.s.SetServiceVisibility(h.ctx, "alpha", "web", true, t1, "admin:bob")
	if err != nil || got.ID != a.ID || !maps.Equal(got.Visibility, map[string]bool{"web": true}) {
		t.Fatalf("SetServiceVisibility by name = %+v, %v; want alpha with web public", got, err)
	}
	// By id; a service the node does not publish is fine; false overrides true.
	if got, err = h.s.SetServiceVisibility(h.ctx, a.ID, "db", false, t1, "admin:bob"); err != nil ||
		!maps.Equal(got.Visibility, map[string]bool{"web": true, "db": false}) {
		t.Fatalf("SetServiceVisibility by id = %+v, %v", got, err)
	}
	if got, err = h.s.SetServiceVisibility(h.ctx, "alpha", "web", false, t1, "admin:carol"); err != nil ||
		!maps.Equal(got.Visibility, map[string]bool{"web": false, "db": false}) {
		t.Fatalf("SetServiceVisibility again = %+v, %v; want web now private", got, err)
	}
	if n := h.node(a.ID); !maps.Equal(n.Visibility, map[string]bool{"web": false, "db": false}) {
		t.Errorf("GetNode Visibility = %v", n.Visibility)
	}
	if n := h.node(b.ID); n.Visibility == nil || len(n.Visibility) != 0 {
		t.Errorf("other node's Visibility = %#v, want empty non-nil", n.Visibility)
	}
	for _, n := range h.nodes() {
		want := map[string]bool{}
		if n.ID == a.ID {
			want = map[string]bool{"web": false, "db": false}
		}
		if n.Visibility == nil || !maps.Equal(n.Visibility, want) {
			t.Errorf("ListNodes: %s Visibility = %#v, want %v", n.Name, n.Visibility, want)
		}
	}

	// Every method that returns a node returns its overrides.
	svc := `[{"name":"web","port":80}]`
	if n, err := h.s.UpdateNode(h.ctx, a.ID, store.NodeUpdate{ServicesJSON: &svc}); err != nil || n.Visibility["web"] || len(n.Visibility) != 2 {
		t.Errorf("UpdateNode returned Visibility %v, %v", n.Visibility, err)
	}
	if n, err := h.s.RenameNode(h.ctx, "alpha", "alpha", t1, "admin:bob"); err != nil || len(n.Visibility) != 2 {
		t.Errorf("RenameNode (same name) returned Visibility %v, %v", n.Visibility, err)
	}
	if n, err := h.s.RenameNode(h.ctx, "alpha", "gamma", t1, "admin:bob"); err != nil || len(n.Visibility) != 2 {
		t.Errorf("RenameNode returned Visibility %v, %v", n.Visibility, err)
	}

	// Refusals write nothing.
	before := h.snapshot()
	if _, err := h.s.SetServiceVisibility(h.ctx, "nosuch", "web", true, t1, "admin:bob"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("SetServiceVisibility(unknown node): %v, want ErrNotFound", err)
	}
	if _, err := h.s.SetServiceVisibility(h.ctx, "gamma", "", true, t1, "admin:bob"); err == nil {
		t.Error("SetServiceVisibility with an empty service succeeded")
	}
	h.unchanged(before, "refused SetServiceVisibility")
	if n := h.node(a.ID); !maps.Equal(n.Visibility, map[string]bool{"web": false, "db": false}) {
		t.Errorf("refused calls changed Visibility: %v", n.Visibility)
	}

	// Revoked nodes cannot be changed, but keep their overrides.
	n, err := h.s.RevokeNode(h.ctx, "gamma", t1, "admin:bob")
	if err != nil || len(n.Visibility) != 2 {
		t.Fatalf("RevokeNode returned %v, %v; want the overrides", n.Visibility, err)
	}
	before = h.snapshot()
	if _, err := h.s.SetServiceVisibility(h.ctx, a.ID, "web", true, t1, "admin:bob"); !errors.Is(err, store.ErrNotFound) {
		t.Errorf("SetServiceVisibility(revoked node): %v, want ErrNotFound", err)
	}
	h.unchanged(before, "SetServiceVisibility of a revoked node")

	rows := filterAudit(h.audit(), "service.visibility")
	type row struct{ actor, target, detail string }
	var gotRows []row
	for _, e := range rows {
		gotRows = append(gotRows, row{e.Actor, e.Target, e.Detail})
		if !e.Time.Equal(t1) {
			t.Errorf("service.visibility row time %v, want %v", e.Time, t1)
		}
	}
	wantRows := []row{
		{"admin:bob", "alpha", "service=web public=true"},
		{"admin:bob", "alpha", "service=db public=false"},
		{"admin:carol", "alpha", "service=web public=false"},
	}
	if !slices.Equal(gotRows, wantRows) {
		t.Errorf("service.visibility audit rows\n got %v\nwant %v", gotRows, wantRows)
	}
}

// testAccessDurable checks that access keys and visibility overrides
// survive a close and reopen unchanged.
func testAccessDurable(t *testing.T, h *harness) {
	h.token("t", 0)
	a := h.enroll(h.params("t", "alpha"))
	for _, k := range []store.AccessKey{
		{ID: "ak1", SecretHash: hashOf("a1"), Created: t0, Expires: t0.Add(time.Hour), CreatedBy: "local"},
		{ID: "ak2", SecretHash: hashOf("a2"), Node: a.ID, Service: "web", Created: t0, Expires: t0.Add(2 * time.Hour), CreatedBy: "local"},
	} {
		if err := h.s.CreateAccessKey(h.ctx, k, "local"); err != nil {
			t.Fatal(err)
		}
	}
	if err := h.s.RevokeAccessKey(h.ctx, "ak1", t0.Add(time.Minute), "local"); err != nil {
		t.Fatal(err)
	}
	if _, err := h.s.SetServiceVisibility(h.ctx, "alpha", "web", true, t0, "local"); err != nil {
		t.Fatal(err)
	}
	keys, nodes, audit := h.accessKeys(), h.nodes(), h.audit()

	h.reopen()
	if keys2 := h.accessKeys(); !reflect.DeepEqual(keys, keys2) {
		t.Errorf("access keys changed across reopen:\nbefore %+v\n after %+v", keys, keys2)
	}
	if nodes2 := h.nodes(); !reflect.DeepEqual(nodes, nodes2) {
		t.Errorf("nodes changed across reopen:\nbefore %+v\n after %+v", nodes, nodes2)
	}
	if audit2 := h.audit(); !reflect.DeepEqual(audit, audit2) {
		t.Errorf("audit changed across reopen:\nbefore %v\n after %v", auditLines(audit), auditLines(audit2))
	}
	if n := h.node(a.ID); !maps.Equal(n.Visibility, map[string]bool{"web": true}) {
		t.Errorf("Visibility after reopen = %v", n.Visibility)
	}
	if k, err := h.s.GetAccessKey(h.ctx, "ak1"); err != nil || !k.RevokedAt.Equal(t0.Add(time.Minute)) {
		t.Errorf("revoked key after reopen = %+v, %v", k, err)
	}
}
