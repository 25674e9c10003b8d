// Package storetest is the conformance suite every store.Store backend must
// pass. A backend's test calls Run with a function that opens its store in
// a directory:
//
//	func TestConformance(t *testing.T) {
//		storetest.Run(t, func(t *testing.T, dir string) store.Store {
//			s, err := mybackend.Open(filepath.Join(dir, "db"))
//			if err != nil {
//				t.Fatal(err)
//			}
//			t.Cleanup(func() { s.Close() })
//			return s
//		})
//	}
//
// Opening the same directory twice must reopen the same data. The suite may
// Close a store and open the directory again, so Close must be idempotent.
// All times are fixed, fake ones; nothing sleeps.
package storetest

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
)

// OpenFunc opens the store kept in dir, registering its Close with
// t.Cleanup.
type OpenFunc func(t *testing.T, dir string) store.Store

// Run runs the conformance suite against the backend open opens.
func Run(t *testing.T, open OpenFunc) {
	tests := []struct {
		name string
		fn   func(*testing.T, *harness)
	}{
		// Tokens and enrollment.
		{"SingleUseToken", testSingleUseToken},
		{"MaxUses", testMaxUses},
		{"ReusableTokenUntilExpiry", testReusableUntilExpiry},
		{"UnknownToken", testUnknownToken},
		{"ExpiredToken", testExpiredToken},
		{"RevokedToken", testRevokedToken},
		{"VerifyTokenError", testVerifyTokenError},
		{"VerifyTokenSeesStoredToken", testVerifySeesToken},
		{"ConcurrentSingleUse", testConcurrentSingleUse},
		{"ConcurrentReusable", testConcurrentReusable},
		{"NameCollision", testNameCollision},
		{"KeyCollision", testKeyCollision},
		{"PoolExhaustion", testPoolExhaustion},
		{"ReopenResumesAllocation", testReopenResumes},
		{"Quarantine", testQuarantine},
		{"IPv6FromIPv4", testIPv6FromIPv4},
		{"RoleAndTagsFromToken", testRoleAndTags},
		{"FailedEnrollmentWritesNothing", testFailedEnrollNoAudit},
		{"ConcurrentMixedEnrollments", testConcurrentMixed},
		{"CanceledEnrollment", testEnrollCanceled},
		{"ConcurrentAllocationWithRelease", testConcurrentAllocationWithRelease},

		// Node management, keys, audit, meta.
		{"RevokeNode", testRevokeNode},
		{"RenameNode", testRenameNode},
		{"SetNodeTags", testSetNodeTags},
		{"UpdateNode", testUpdateNode},
		{"UpdateNodeDiscoKey", testUpdateNodeDiscoKey},
		{"TouchNode", testTouchNode},
		{"Tokens", testTokens},
		{"AdminKeys", testAdminKeys},
		{"Audit", testAudit},
		{"ListAuditLimit", testListAuditLimit},
		{"Meta", testMeta},
		{"DurableAcrossReopen", testDurable},

		// Access keys and service visibility.
		{"AccessKeys", testAccessKeys},
		{"ServiceVisibility", testServiceVisibility},
		{"AccessDurableAcrossReopen", testAccessDurable},

		// SSH-only nodes.
		{"AddSSHNode", testAddSSHNode},
		{"FailedAddSSHNodeWritesNothing", testFailedAddSSHWritesNothing},
		{"SSHNodesDurableAcrossReopen", testSSHDurable},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.fn(t, newHarness(t, open))
		})
	}
}

// Fixed test parameters.
var (
	t0         = time.Date(2031, time.March, 14, 15, 9, 26, 0, time.UTC)
	pool4      = netip.MustParsePrefix("10.77.0.0/24")
	pool6      = netip.MustParsePrefix("fd12:3456:789a::/48")
	quarantine = 24 * time.Hour
)

var errWrongSecret = errors.New("wrong secret")

// harness holds one store under test and helpers around it.
type harness struct {
	t    *testing.T
	ctx  context.Context
	open OpenFunc
	dir  string
	s    store.Store
	seq  atomic.Int64
}

func newHarness(t *testing.T, open OpenFunc) *harness {
	h := &harness{t: t, ctx: t.Context(), open: open, dir: t.TempDir()}
	h.s = open(t, h.dir)
	return h
}

// reopen closes the store and opens the same directory again.
func (h *harness) reopen() {
	h.t.Helper()
	if err := h.s.Close(); err != nil {
		h.t.Fatalf("Close: %v", err)
	}
	h.s = h.open(h.t, h.dir)
}

func secretFor(tokenID string) string { return "secret-of-" + tokenID }

func hashOf(secret string) [32]byte { return sha256.Sum256([]byte(secret)) }

// verify returns a VerifyToken that only checks the secret, as a minimal
// coordinator would; expiry, revocation and use counts are left to the
// store's own checks.
func verify(secret string) func(store.Token) error {
	want := hashOf(secret)
	return func(tok store.Token) error {
		if tok.SecretHash != want {
			return errWrongSecret
		}
		return nil
	}
}

func acceptAll(store.Token) error { return nil }

// token creates a token valid for a week from t0 with maxUses uses.
func (h *harness) token(id string, maxUses int) store.Token {
	h.t.Helper()
	tok := store.Token{
		ID:         id,
		SecretHash: hashOf(secretFor(id)),
		Role:       "node",
		Tags:       []string{},
		MaxUses:    maxUses,
		Created:    t0.Add(-time.Hour),
		Expires:    t0.Add(7 * 24 * time.Hour),
		CreatedBy:  "admin:alice",
	}
	if err := h.s.CreateToken(h.ctx, tok, "admin:alice"); err != nil {
		h.t.Fatalf("CreateToken(%s): %v", id, err)
	}
	return tok
}

// wgKey is a distinct, well-formed fake WireGuard public key.
func wgKey(seed string) string {
	k := sha256.Sum256([]byte("wg:" + seed))
	return base64.StdEncoding.EncodeToString(k[:])
}

// params returns enrollment parameters for a fresh node id and key.
func (h *harness) params(tokenID, name string) store.EnrollParams {
	n := h.seq.Add(1)
	return store.EnrollParams{
		TokenID:      tokenID,
		VerifyToken:  verify(secretFor(tokenID)),
		NodeID:       fmt.Sprintf("nd%04d", n),
		Name:         name,
		WireGuardKey: wgKey(fmt.Sprintf("%s-%d", name, n)),
		Now:          t0,
		IPv4Pool:     pool4,
		IPv6Pool:     pool6,
		Quarantine:   quarantine,
		Actor:        "token:" + tokenID,
	}
}

// enroll enrolls and fails the test on error.
func (h *harness) enroll(p store.EnrollParams) store.Node {
	h.t.Helper()
	n, err := h.s.Enroll(h.ctx, p)
	if err != nil {
		h.t.Fatalf("Enroll(%s): %v", p.Name, err)
	}
	return n
}

// enrollErr enrolls expecting an error wrapping want.
func (h *harness) enrollErr(p store.EnrollParams, want error) {
	h.t.Helper()
	n, err := h.s.Enroll(h.ctx, p)
	if !errors.Is(err, want) {
		h.t.Fatalf("Enroll(%s) = %+v, %v; want error %v", p.Name, n, err, want)
	}
}

func (h *harness) nodes() []store.Node {
	h.t.Helper()
	l, err := h.s.ListNodes(h.ctx)
	if err != nil {
		h.t.Fatalf("ListNodes: %v", err)
	}
	return l
}

func (h *harness) node(id string) store.Node {
	h.t.Helper()
	n, err := h.s.GetNode(h.ctx, id)
	if err != nil {
		h.t.Fatalf("GetNode(%s): %v", id, err)
	}
	return n
}

func (h *harness) getToken(id string) store.Token {
	h.t.Helper()
	l, err := h.s.ListTokens(h.ctx)
	if err != nil {
		h.t.Fatalf("ListTokens: %v", err)
	}
	for _, tok := range l {
		if tok.ID == id {
			return tok
		}
	}
	h.t.Fatalf("token %s not in ListTokens", id)
	return store.Token{}
}

func (h *harness) audit() []store.AuditEntry {
	h.t.Helper()
	l, err := h.s.ListAudit(h.ctx, 0)
	if err != nil {
		h.t.Fatalf("ListAudit: %v", err)
	}
	return l
}

// snapshot is everything an enrollment may change.
type snapshot struct {
	nodes  []store.Node
	tokens []store.Token
	audit  []store.AuditEntry
}

func (h *harness) snapshot() snapshot {
	h.t.Helper()
	tokens, err := h.s.ListTokens(h.ctx)
	if err != nil {
		h.t.Fatalf("ListTokens: %v", err)
	}
	return snapshot{nodes: h.nodes(), tokens: tokens, audit: h.audit()}
}

// unchanged fails the test if the store differs from before.
func (h *harness) unchanged(before snapshot, what string) {
	h.t.Helper()
	after := h.snapshot()
	if len(after.nodes) != len(before.nodes) {
		h.t.Errorf("%s: %d nodes, want %d", what, len(after.nodes), len(before.nodes))
	}
	if len(after.audit) != len(before.audit) {
		h.t.Errorf("%s: %d audit rows, want %d: %+v", what, len(after.audit), len(before.audit), after.audit)
	}
	for i := range min(len(before.tokens), len(after.tokens)) {
		if b, a := before.tokens[i], after.tokens[i]; b.ID != a.ID || b.Uses != a.Uses || !b.RevokedAt.Equal(a.RevokedAt) {
			h.t.Errorf("%s: token %s changed: uses %d -> %d, revoked %v -> %v", what, b.ID, b.Uses, a.Uses, b.RevokedAt, a.RevokedAt)
		}
	}
}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

// checkDistinct fails unless the nodes' addresses are pairwise distinct and
// inside the pools.
func checkDistinct(t *testing.T, nodes []store.Node) {
	t.Helper()
	seen4 := map[netip.Addr]string{}
	seen6 := map[netip.Addr]string{}
	for _, n := range nodes {
		if !pool4.Contains(n.IPv4) || n.IPv4 == pool4.Addr() || n.IPv4 == addr("10.77.0.255") {
			t.Errorf("node %s: IPv4 %v not a usable address of %v", n.Name, n.IPv4, pool4)
		}
		if !pool6.Contains(n.IPv6) {
			t.Errorf("node %s: IPv6 %v outside %v", n.Name, n.IPv6, pool6)
		}
		if other, dup := seen4[n.IPv4]; dup {
			t.Errorf("nodes %s and %s share IPv4 %v", other, n.Name, n.IPv4)
		}
		if other, dup := seen6[n.IPv6]; dup {
			t.Errorf("nodes %s and %s share IPv6 %v", other, n.Name, n.IPv6)
		}
		seen4[n.IPv4], seen6[n.IPv6] = n.Name, n.Name
	}
}
