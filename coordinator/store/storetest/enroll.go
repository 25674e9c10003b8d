package storetest

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
)

func testSingleUseToken(t *testing.T, h *harness) {
	h.token("t1", 1)
	n := h.enroll(h.params("t1", "alpha"))
	if n.Name != "alpha" || n.TokenID != "t1" || n.Role != "node" || n.Revoked() || !n.Created.Equal(t0) {
		t.Errorf("enrolled node = %+v", n)
	}
	if n.IPv4 != addr("10.77.0.1") {
		t.Errorf("first node IPv4 = %v, want 10.77.0.1 (lowest usable)", n.IPv4)
	}
	if n.ServicesJSON != "[]" || n.Endpoints == nil || len(n.Endpoints) != 0 || n.Tags == nil || !n.LastSeen.IsZero() {
		t.Errorf("new node: services %q, endpoints %#v, tags %#v, last seen %v; want \"[]\", empty non-nil slices, zero", n.ServicesJSON, n.Endpoints, n.Tags, n.LastSeen)
	}
	if got := h.node(n.ID); got.Name != "alpha" || got.IPv4 != n.IPv4 || got.WireGuardKey != n.WireGuardKey {
		t.Errorf("GetNode = %+v, want the enrolled node %+v", got, n)
	}

	before := h.snapshot()
	h.enrollErr(h.params("t1", "beta"), store.ErrTokenInvalid)
	h.unchanged(before, "second use of a single-use token")
	if uses := h.getToken("t1").Uses; uses != 1 {
		t.Errorf("token uses = %d, want 1", uses)
	}
	if l := h.nodes(); len(l) != 1 {
		t.Errorf("%d nodes, want 1", len(l))
	}
}

func testMaxUses(t *testing.T, h *harness) {
	h.token("t3", 3)
	for i := range 3 {
		h.enroll(h.params("t3", fmt.Sprintf("n%d", i)))
	}
	before := h.snapshot()
	h.enrollErr(h.params("t3", "n3"), store.ErrTokenInvalid)
	h.unchanged(before, "fourth use of a 3-use token")
	if uses := h.getToken("t3").Uses; uses != 3 {
		t.Errorf("token uses = %d, want 3", uses)
	}
	if l := h.nodes(); len(l) != 3 {
		t.Errorf("%d nodes, want 3", len(l))
	}
}

func testReusableUntilExpiry(t *testing.T, h *harness) {
	tok := h.token("t0", 0)
	for i := range 20 {
		h.enroll(h.params("t0", fmt.Sprintf("n%d", i)))
	}
	p := h.params("t0", "last-moment")
	p.Now = tok.Expires.Add(-time.Nanosecond)
	h.enroll(p)

	// At the expiry instant the token is dead, even for a VerifyToken that
	// does not look at the time.
	p = h.params("t0", "too-late")
	p.Now = tok.Expires
	p.VerifyToken = acceptAll
	before := h.snapshot()
	h.enrollErr(p, store.ErrTokenInvalid)
	h.unchanged(before, "enrollment at expiry")
	if uses := h.getToken("t0").Uses; uses != 21 {
		t.Errorf("token uses = %d, want 21", uses)
	}
}

func testUnknownToken(t *testing.T, h *harness) {
	h.token("t1", 0)
	before := h.snapshot()
	p := h.params("nope", "alpha")
	p.VerifyToken = acceptAll
	h.enrollErr(p, store.ErrTokenInvalid)
	h.unchanged(before, "unknown token")
}

func testExpiredToken(t *testing.T, h *harness) {
	tok := h.token("t1", 0)
	p := h.params("t1", "alpha")
	p.Now = tok.Expires.Add(time.Second)
	p.VerifyToken = acceptAll // the store must check expiry itself
	before := h.snapshot()
	h.enrollErr(p, store.ErrTokenInvalid)
	h.unchanged(before, "expired token")
	if uses := h.getToken("t1").Uses; uses != 0 {
		t.Errorf("token uses = %d, want 0", uses)
	}
}

func testRevokedToken(t *testing.T, h *harness) {
	h.token("t1", 0)
	h.enroll(h.params("t1", "alpha"))
	if err := h.s.RevokeToken(h.ctx, "t1", t0.Add(time.Hour), "admin:bob"); err != nil {
		t.Fatalf("RevokeToken: %v", err)
	}
	// Enrolling at a time before the revocation does not help: revoked is
	// revoked.
	p := h.params("t1", "beta")
	p.VerifyToken = acceptAll
	before := h.snapshot()
	h.enrollErr(p, store.ErrTokenInvalid)
	h.unchanged(before, "revoked token")
	if uses := h.getToken("t1").Uses; uses != 1 {
		t.Errorf("token uses = %d, want 1", uses)
	}
}

func testVerifyTokenError(t *testing.T, h *harness) {
	h.token("t1", 0)
	p := h.params("t1", "alpha")
	p.VerifyToken = verify("not the secret")
	before := h.snapshot()
	h.enrollErr(p, store.ErrTokenInvalid)
	h.unchanged(before, "VerifyToken error")

	p = h.params("t1", "alpha")
	p.VerifyToken = func(store.Token) error { return errors.New("any error at all") }
	h.enrollErr(p, store.ErrTokenInvalid)
	h.unchanged(before, "VerifyToken error")
	if uses := h.getToken("t1").Uses; uses != 0 {
		t.Errorf("token uses = %d, want 0", uses)
	}
}

func testVerifySeesToken(t *testing.T, h *harness) {
	want := store.Token{
		ID: "t2", SecretHash: hashOf(secretFor("t2")), Role: "proxy", Tags: []string{"tag:a", "tag:b"},
		MaxUses: 5, Created: t0.Add(-time.Minute), Expires: t0.Add(time.Hour), CreatedBy: "admin:alice",
	}
	if err := h.s.CreateToken(h.ctx, want, "admin:alice"); err != nil {
		t.Fatalf("CreateToken: %v", err)
	}
	h.enroll(h.params("t2", "alpha"))
	var seen store.Token
	p := h.params("t2", "beta")
	p.VerifyToken = func(tok store.Token) error { seen = tok; return verify(secretFor("t2"))(tok) }
	h.enroll(p)
	want.Uses = 1 // as stored before this enrollment
	if !tokenEqual(seen, want) {
		t.Errorf("VerifyToken got %+v, want %+v", seen, want)
	}
}

func tokenEqual(a, b store.Token) bool {
	return a.ID == b.ID && a.SecretHash == b.SecretHash && a.Role == b.Role && slices.Equal(a.Tags, b.Tags) &&
		a.MaxUses == b.MaxUses && a.Uses == b.Uses && a.Created.Equal(b.Created) && a.Expires.Equal(b.Expires) &&
		a.RevokedAt.Equal(b.RevokedAt) && a.CreatedBy == b.CreatedBy
}

// enrollConcurrently runs the enrollments at once and returns their errors.
func (h *harness) enrollConcurrently(ps []store.EnrollParams) []error {
	errs := make([]error, len(ps))
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i, p := range ps {
		wg.Go(func() {
			<-start
			_, errs[i] = h.s.Enroll(h.ctx, p)
		})
	}
	close(start)
	wg.Wait()
	return errs
}

func testConcurrentSingleUse(t *testing.T, h *harness) {
	h.token("once", 1)
	var ps []store.EnrollParams
	for i := range 50 {
		ps = append(ps, h.params("once", fmt.Sprintf("racer%02d", i)))
	}
	ok, invalid := 0, 0
	for i, err := range h.enrollConcurrently(ps) {
		switch {
		case err == nil:
			ok++
		case errors.Is(err, store.ErrTokenInvalid):
			invalid++
		default:
			t.Errorf("enrollment %d: unexpected error %v", i, err)
		}
	}
	if ok != 1 || invalid != 49 {
		t.Errorf("%d succeeded and %d got ErrTokenInvalid, want 1 and 49", ok, invalid)
	}
	if l := h.nodes(); len(l) != 1 {
		t.Errorf("%d nodes, want 1", len(l))
	}
	if uses := h.getToken("once").Uses; uses != 1 {
		t.Errorf("token uses = %d, want 1", uses)
	}
	enrolls := 0
	for _, e := range h.audit() {
		if e.Action == "node.enroll" {
			enrolls++
		}
	}
	if enrolls != 1 {
		t.Errorf("%d node.enroll audit rows, want 1", enrolls)
	}
}

func testConcurrentReusable(t *testing.T, h *harness) {
	h.token("many", 0)
	var ps []store.EnrollParams
	for i := range 50 {
		ps = append(ps, h.params("many", fmt.Sprintf("n%02d", i)))
	}
	for i, err := range h.enrollConcurrently(ps) {
		if err != nil {
			t.Errorf("enrollment %d: %v", i, err)
		}
	}
	nodes := h.nodes()
	if len(nodes) != 50 {
		t.Fatalf("%d nodes, want 50", len(nodes))
	}
	checkDistinct(t, nodes)
	// Allocation is lowest-free, so 50 enrollments fill .1 to .50.
	var got []netip.Addr
	for _, n := range nodes {
		got = append(got, n.IPv4)
	}
	slices.SortFunc(got, netip.Addr.Compare)
	for i, a := range got {
		if want := netip.AddrFrom4([4]byte{10, 77, 0, byte(i + 1)}); a != want {
			t.Fatalf("sorted addresses[%d] = %v, want %v", i, a, want)
		}
	}
	if uses := h.getToken("many").Uses; uses != 50 {
		t.Errorf("token uses = %d, want 50", uses)
	}
}

func testNameCollision(t *testing.T, h *harness) {
	h.token("t", 0)
	a := h.enroll(h.params("t", "alpha"))
	before := h.snapshot()
	h.enrollErr(h.params("t", "alpha"), store.ErrNameTaken)
	h.unchanged(before, "name collision")
	if got := h.node(a.ID); !nodeEqual(got, a) {
		t.Errorf("existing node changed: %+v, was %+v", got, a)
	}

	if _, err := h.s.RevokeNode(h.ctx, "alpha", t0.Add(time.Minute), "admin:bob"); err != nil {
		t.Fatalf("RevokeNode: %v", err)
	}
	p := h.params("t", "alpha")
	p.Now = t0.Add(2 * time.Minute)
	b := h.enroll(p)
	if b.ID == a.ID || b.Name != "alpha" || b.IPv4 == a.IPv4 {
		t.Errorf("re-enrolled alpha = %+v; want a new id and (quarantine) a new address, old %+v", b, a)
	}
	if l := h.nodes(); len(l) != 2 || !l[0].Revoked() || l[1].Revoked() {
		t.Errorf("ListNodes = %+v, want revoked old alpha then active new alpha", l)
	}
}

func nodeEqual(a, b store.Node) bool {
	return a.ID == b.ID && a.Name == b.Name && a.Role == b.Role && a.IPv4 == b.IPv4 && a.IPv6 == b.IPv6 &&
		a.WireGuardKey == b.WireGuardKey && slices.Equal(a.Tags, b.Tags) && a.ServicesJSON == b.ServicesJSON &&
		slices.Equal(a.Endpoints, b.Endpoints) && a.TokenID == b.TokenID && a.Created.Equal(b.Created) &&
		a.LastSeen.Equal(b.LastSeen) && a.RevokedAt.Equal(b.RevokedAt) && maps.Equal(a.Visibility, b.Visibility)
}

func testKeyCollision(t *testing.T, h *harness) {
	h.token("t", 0)
	a := h.enroll(h.params("t", "alpha"))
	p := h.params("t", "beta")
	p.WireGuardKey = a.WireGuardKey
	before := h.snapshot()
	h.enrollErr(p, store.ErrKeyTaken)
	h.unchanged(before, "key collision")

	// A revoked node's key never comes back, even after quarantine.
	if _, err := h.s.RevokeNode(h.ctx, a.ID, t0, "admin:bob"); err != nil {
		t.Fatalf("RevokeNode: %v", err)
	}
	p = h.params("t", "gamma")
	p.WireGuardKey = a.WireGuardKey
	p.Now = t0.Add(2 * quarantine)
	before = h.snapshot()
	h.enrollErr(p, store.ErrKeyTaken)
	h.unchanged(before, "key of a revoked node")
}

func testPoolExhaustion(t *testing.T, h *harness) {
	h.token("t", 0)
	small := netip.MustParsePrefix("10.99.0.0/30") // .1 and .2 usable
	enroll := func(name string, now time.Time) (store.Node, error) {
		p := h.params("t", name)
		p.IPv4Pool, p.Now = small, now
		return h.s.Enroll(h.ctx, p)
	}
	for i, want := range []string{"10.99.0.1", "10.99.0.2"} {
		n, err := enroll(fmt.Sprintf("n%d", i), t0)
		if err != nil || n.IPv4 != addr(want) {
			t.Fatalf("enrollment %d = %v, %v; want %s", i, n.IPv4, err, want)
		}
	}
	before := h.snapshot()
	if _, err := enroll("n2", t0); !errors.Is(err, store.ErrPoolExhausted) {
		t.Fatalf("third enrollment in a /30: %v, want ErrPoolExhausted", err)
	}
	h.unchanged(before, "pool exhausted")
	if uses := h.getToken("t").Uses; uses != 2 {
		t.Errorf("token uses = %d, want 2 (failed enrollment must not consume)", uses)
	}

	// A revoked node's address stays held during quarantine.
	if _, err := h.s.RevokeNode(h.ctx, "n0", t0, "admin:bob"); err != nil {
		t.Fatalf("RevokeNode: %v", err)
	}
	if _, err := enroll("n3", t0.Add(time.Hour)); !errors.Is(err, store.ErrPoolExhausted) {
		t.Fatalf("enrollment during quarantine: %v, want ErrPoolExhausted", err)
	}
	n, err := enroll("n4", t0.Add(quarantine))
	if err != nil || n.IPv4 != addr("10.99.0.1") {
		t.Fatalf("enrollment after quarantine = %v, %v; want 10.99.0.1", n.IPv4, err)
	}
}

func testReopenResumes(t *testing.T, h *harness) {
	h.token("t", 0)
	for _, name := range []string{"a", "b", "c"} {
		h.enroll(h.params("t", name))
	}
	if _, err := h.s.RevokeNode(h.ctx, "b", t0, "admin:bob"); err != nil {
		t.Fatalf("RevokeNode: %v", err)
	}
	h.reopen()
	var got []netip.Addr
	for _, name := range []string{"d", "e"} {
		p := h.params("t", name)
		p.Now = t0.Add(time.Hour)
		got = append(got, h.enroll(p).IPv4)
	}
	// b's .2 is still in quarantine after the reopen.
	if want := []netip.Addr{addr("10.77.0.4"), addr("10.77.0.5")}; !slices.Equal(got, want) {
		t.Errorf("after reopen allocated %v, want %v", got, want)
	}
	nodes := h.nodes()
	if len(nodes) != 5 {
		t.Fatalf("%d nodes after reopen, want 5", len(nodes))
	}
	checkDistinct(t, nodes)
}

func testQuarantine(t *testing.T, h *harness) {
	h.token("t", 0)
	enrollAt := func(name string, now time.Time) store.Node {
		t.Helper()
		p := h.params("t", name)
		p.Now = now
		return h.enroll(p)
	}
	a := enrollAt("a", t0)
	enrollAt("b", t0)
	revokedAt := t0.Add(time.Minute)
	if _, err := h.s.RevokeNode(h.ctx, "a", revokedAt, "admin:bob"); err != nil {
		t.Fatalf("RevokeNode: %v", err)
	}
	if c := enrollAt("c", revokedAt.Add(time.Hour)); c.IPv4 != addr("10.77.0.3") {
		t.Errorf("within quarantine got %v, want 10.77.0.3 (a's %v is held)", c.IPv4, a.IPv4)
	}
	if d := enrollAt("d", revokedAt.Add(quarantine-time.Nanosecond)); d.IPv4 != addr("10.77.0.4") {
		t.Errorf("just before quarantine ends got %v, want 10.77.0.4", d.IPv4)
	}
	e := enrollAt("e", revokedAt.Add(quarantine))
	if e.IPv4 != a.IPv4 || e.IPv6 != a.IPv6 {
		t.Errorf("after quarantine got %v %v, want a's %v %v (lowest free)", e.IPv4, e.IPv6, a.IPv4, a.IPv6)
	}
	if f := enrollAt("f", revokedAt.Add(quarantine)); f.IPv4 != addr("10.77.0.5") {
		t.Errorf("next got %v, want 10.77.0.5", f.IPv4)
	}
	// The revoked node keeps its record.
	if got := h.node(a.ID); got.IPv4 != a.IPv4 || !got.RevokedAt.Equal(revokedAt) {
		t.Errorf("revoked node = %+v, want address %v and revocation %v kept", got, a.IPv4, revokedAt)
	}
}

func testIPv6FromIPv4(t *testing.T, h *harness) {
	h.token("t", 0)
	for i := range 3 {
		n := h.enroll(h.params("t", fmt.Sprintf("n%d", i)))
		want := netip.MustParseAddr("fd12:3456:789a::" + n.IPv4.String()) // embedded dotted quad
		if n.IPv6 != want {
			t.Errorf("node %s: IPv6 %v, want %v", n.Name, n.IPv6, want)
		}
	}
	p := h.params("t", "other-pool")
	p.IPv6Pool = netip.MustParsePrefix("fd00:1:2:3::/64")
	if n := h.enroll(p); n.IPv6 != addr("fd00:1:2:3::a4d:4") {
		t.Errorf("IPv6 in a /64 pool = %v, want fd00:1:2:3::a4d:4", n.IPv6)
	}
}

func testRoleAndTags(t *testing.T, h *harness) {
	tok := store.Token{
		ID: "px", SecretHash: hashOf(secretFor("px")), Role: "proxy", Tags: []string{"tag:web", "tag:prod"},
		Created: t0, Expires: t0.Add(time.Hour),
	}
	if err := h.s.CreateToken(h.ctx, tok, "admin:alice"); err != nil {
		t.Fatalf("CreateToken: %v", err)
	}
	bare := store.Token{ID: "bare", SecretHash: hashOf(secretFor("bare")), Role: "node", Created: t0, Expires: t0.Add(time.Hour)}
	if err := h.s.CreateToken(h.ctx, bare, "admin:alice"); err != nil { // nil Tags
		t.Fatalf("CreateToken: %v", err)
	}
	n := h.enroll(h.params("px", "web1"))
	if n.Role != "proxy" || !slices.Equal(n.Tags, tok.Tags) {
		t.Errorf("node role %q tags %v, want the token's %q %v", n.Role, n.Tags, tok.Role, tok.Tags)
	}
	m := h.enroll(h.params("bare", "plain"))
	if m.Role != "node" || m.Tags == nil || len(m.Tags) != 0 || m.Endpoints == nil {
		t.Errorf("node from untagged token: role %q tags %#v endpoints %#v; want node, empty non-nil slices", m.Role, m.Tags, m.Endpoints)
	}
	if bt := h.getToken("bare"); bt.Tags == nil {
		t.Error("token created with nil tags lists nil Tags, want empty slice")
	}
	for _, l := range h.nodes() {
		if l.Tags == nil || l.Endpoints == nil {
			t.Errorf("ListNodes: node %s has nil tags or endpoints", l.Name)
		}
	}
}

// testFailedEnrollNoAudit runs every kind of refused enrollment and checks
// that none leaves a trace.
func testFailedEnrollNoAudit(t *testing.T, h *harness) {
	tok := h.token("t", 2)
	a := h.enroll(h.params("t", "alpha"))
	bad := map[string]func(*store.EnrollParams) error{
		"unknown token": func(p *store.EnrollParams) error { p.TokenID = "nope"; return store.ErrTokenInvalid },
		"wrong secret":  func(p *store.EnrollParams) error { p.VerifyToken = verify("x"); return store.ErrTokenInvalid },
		"expired": func(p *store.EnrollParams) error {
			p.Now = tok.Expires.Add(time.Minute)
			return store.ErrTokenInvalid
		},
		"name taken": func(p *store.EnrollParams) error { p.Name = "alpha"; return store.ErrNameTaken },
		"key taken":  func(p *store.EnrollParams) error { p.WireGuardKey = a.WireGuardKey; return store.ErrKeyTaken },
		"pool exhausted": func(p *store.EnrollParams) error {
			p.IPv4Pool = netip.MustParsePrefix("10.77.0.0/31")
			return store.ErrPoolExhausted
		},
	}
	before := h.snapshot()
	for what, mod := range bad {
		p := h.params("t", "beta")
		want := mod(&p)
		h.enrollErr(p, want)
		h.unchanged(before, what)
	}
	var actions []string
	for _, e := range h.audit() {
		actions = append(actions, e.Action)
	}
	if want := []string{"token.create", "node.enroll"}; !slices.Equal(actions, want) {
		t.Errorf("audit actions %v, want %v", actions, want)
	}
	// The token's second use is still there.
	h.enroll(h.params("t", "beta"))
}
