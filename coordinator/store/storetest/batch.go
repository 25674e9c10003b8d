package storetest

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
)

// Concurrent enrollments (which a backend may commit together, in one
// transaction): every one that returns nil is whole and durable (its node,
// its token use and its audit row survive a reopen), every one that fails
// left nothing behind, and tokens are never overspent, whichever of them
// share a transaction.
func testConcurrentMixed(t *testing.T, h *harness) {
	h.token("many", 0)
	type attempt struct {
		p    store.EnrollParams
		want error // nil: must succeed; errAny: exactly one of its group succeeds
	}
	var attempts []attempt
	for i := range 20 { // distinct single-use tokens: all succeed
		id := fmt.Sprintf("solo%02d", i)
		h.token(id, 1)
		attempts = append(attempts, attempt{p: h.params(id, "solo-"+id)})
	}
	for i := range 10 { // two enrollers per single-use token: one wins
		id := fmt.Sprintf("duel%02d", i)
		h.token(id, 1)
		attempts = append(attempts, attempt{p: h.params(id, id+"-x"), want: errOneOf},
			attempt{p: h.params(id, id+"-y"), want: errOneOf})
	}
	for i := range 5 { // two enrollers per name, with the reusable token: one wins
		name := fmt.Sprintf("twin%d", i)
		attempts = append(attempts, attempt{p: h.params("many", name), want: errOneOf},
			attempt{p: h.params("many", name), want: errOneOf})
	}
	for i := range 5 { // wrong secret
		p := h.params("many", fmt.Sprintf("wrong%d", i))
		p.VerifyToken = verify("not the secret")
		attempts = append(attempts, attempt{p: p, want: store.ErrTokenInvalid})
	}
	var ps []store.EnrollParams
	for _, a := range attempts {
		ps = append(ps, a.p)
	}
	errs := h.enrollConcurrently(ps)

	ok := map[string]store.EnrollParams{} // node id -> params
	wins := map[string]int{}              // duel token or twin name -> successes
	for i, a := range attempts {
		err := errs[i]
		group := a.p.TokenID
		if group == "many" {
			group = a.p.Name
		}
		switch {
		case a.want == nil && err != nil:
			t.Errorf("%s: %v", a.p.Name, err)
		case a.want == errOneOf && err != nil && !errors.Is(err, store.ErrTokenInvalid) && !errors.Is(err, store.ErrNameTaken):
			t.Errorf("%s: unexpected error %v", a.p.Name, err)
		case a.want != nil && a.want != errOneOf && !errors.Is(err, a.want):
			t.Errorf("%s: %v, want %v", a.p.Name, err, a.want)
		}
		if err == nil {
			ok[a.p.NodeID] = a.p
			if a.want == errOneOf {
				wins[group]++
			}
		}
	}
	for i := range 10 {
		if id := fmt.Sprintf("duel%02d", i); wins[id] != 1 {
			t.Errorf("token %s: %d enrollments succeeded, want 1", id, wins[id])
		}
	}
	for i := range 5 {
		if name := fmt.Sprintf("twin%d", i); wins[name] != 1 {
			t.Errorf("name %s: %d enrollments succeeded, want 1", name, wins[name])
		}
	}

	h.reopen() // acknowledged means durable
	nodes := h.nodes()
	if len(nodes) != len(ok) {
		t.Errorf("%d nodes after reopen, %d enrollments succeeded", len(nodes), len(ok))
	}
	checkDistinct(t, nodes)
	audited := map[string]int{}
	for _, e := range h.audit() {
		if e.Action == "node.enroll" {
			id, _, _ := strings.Cut(strings.TrimPrefix(e.Detail, "id="), " ")
			audited[id]++
		}
	}
	for _, n := range nodes {
		p, found := ok[n.ID]
		if !found {
			t.Errorf("node %s (%s) is stored, but its enrollment failed", n.ID, n.Name)
			continue
		}
		if n.Name != p.Name || n.WireGuardKey != p.WireGuardKey || n.TokenID != p.TokenID {
			t.Errorf("node %s stored as %+v, enrolled as %s/%s/%s", n.ID, n, p.Name, p.WireGuardKey, p.TokenID)
		}
		if audited[n.ID] != 1 {
			t.Errorf("node %s has %d node.enroll audit rows, want 1", n.ID, audited[n.ID])
		}
	}
	if len(audited) != len(ok) {
		t.Errorf("%d node.enroll audit rows for %d enrollments", len(audited), len(ok))
	}
	uses := map[string]int{}
	for _, p := range ok {
		uses[p.TokenID]++
	}
	tokens, err := h.s.ListTokens(h.ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, tok := range tokens {
		if tok.Uses != uses[tok.ID] {
			t.Errorf("token %s: %d uses stored, %d enrollments with it succeeded", tok.ID, tok.Uses, uses[tok.ID])
		}
	}
}

// errOneOf marks an attempt that races others for one token or one name.
var errOneOf = errors.New("exactly one of the group succeeds")

// An enrollment whose context has ended either fails and leaves nothing,
// or succeeds whole.
func testEnrollCanceled(t *testing.T, h *harness) {
	h.token("t", 1)
	ctx, cancel := context.WithCancel(h.ctx)
	cancel()
	p := h.params("t", "late")
	n, err := h.s.Enroll(ctx, p)
	h.reopen()
	switch {
	case err != nil:
		if l := h.nodes(); len(l) != 0 {
			t.Errorf("canceled enrollment failed (%v) but left %d nodes", err, len(l))
		}
		if uses := h.getToken("t").Uses; uses != 0 {
			t.Errorf("canceled enrollment failed (%v) but used the token", err)
		}
		if l := filterAudit(h.audit(), "node.enroll"); len(l) != 0 {
			t.Errorf("canceled enrollment failed (%v) but left audit rows %+v", err, l)
		}
	default:
		if got := h.node(n.ID); got.Name != "late" || h.getToken("t").Uses != 1 {
			t.Errorf("canceled enrollment succeeded but is not whole: %+v", got)
		}
	}
}

// Addresses stay lowest-free and distinct when concurrent enrollments
// release quarantined addresses, with failing enrollments among them.
func testConcurrentAllocationWithRelease(t *testing.T, h *harness) {
	h.token("t", 0)
	for _, name := range []string{"a", "b", "c"} {
		h.enroll(h.params("t", name)) // .1, .2, .3
	}
	if _, err := h.s.RevokeNode(h.ctx, "b", t0, "admin:alice"); err != nil {
		t.Fatal(err)
	}
	later := t0.Add(quarantine + time.Hour) // b's .2 may go again
	var ps []store.EnrollParams
	for i := range 6 {
		p := h.params("t", fmt.Sprintf("new%d", i))
		p.Now = later
		ps = append(ps, p)
	}
	for i := range 6 { // fail: name taken, wrong secret
		p := h.params("t", "a")
		if i%2 == 1 {
			p = h.params("t", fmt.Sprintf("bad%d", i))
			p.VerifyToken = verify("wrong")
		}
		p.Now = later
		ps = append(ps, p)
	}
	var got []netip.Addr
	for i, err := range h.enrollConcurrently(ps) {
		if (i < 6) != (err == nil) {
			t.Errorf("enrollment %d (%s): %v", i, ps[i].Name, err)
		}
	}
	for _, n := range h.nodes() {
		if n.Name != "b" {
			got = append(got, n.IPv4)
		}
	}
	slices.SortFunc(got, netip.Addr.Compare)
	want := []netip.Addr{addr("10.77.0.1"), addr("10.77.0.2"), addr("10.77.0.3"), addr("10.77.0.4"),
		addr("10.77.0.5"), addr("10.77.0.6"), addr("10.77.0.7"), addr("10.77.0.8")}
	if !slices.Equal(got, want) {
		t.Errorf("addresses %v, want %v", got, want)
	}
	p := h.params("t", "next")
	p.Now = later
	if n := h.enroll(p); n.IPv4 != addr("10.77.0.9") {
		t.Errorf("next enrollment got %v, want 10.77.0.9", n.IPv4)
	}
	h.reopen()
	p = h.params("t", "after-reopen")
	p.Now = later
	if n := h.enroll(p); n.IPv4 != addr("10.77.0.10") {
		t.Errorf("enrollment after reopen got %v, want 10.77.0.10", n.IPv4)
	}
}
