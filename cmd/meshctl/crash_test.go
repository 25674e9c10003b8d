package main

// Crash safety: an enrollment storm (and revocations) against the real
// `meshctl server`, SIGKILLed at random moments and restarted on the same
// data dir; afterwards everything a client was told must be true, and
// nothing half-written may exist.

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"database/sql"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
	"golang.org/x/crypto/ssh"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	_ "modernc.org/sqlite"
)

// adminAPI calls a server's admin API over its Unix socket, as the CLI
// does, without a process per call.
type adminAPI struct{ hc *http.Client }

func newAdminAPI(dataDir string) *adminAPI {
	sock := filepath.Join(dataDir, "admin.sock")
	tr := &http.Transport{DisableKeepAlives: true, DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}
	return &adminAPI{hc: &http.Client{Transport: tr, Timeout: 20 * time.Second}}
}

func (a *adminAPI) call(method, path string, in, out any) error {
	return wire.Call(context.Background(), a.hc, method, "http://meshctl-admin"+path, nil, in, out)
}

// notSent reports whether err means the request never reached a server:
// nothing listens (a killed server's socket is still there, refusing) or
// the socket is not there yet.
func notSent(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT)
}

// identity is what a device makes before it enrolls: keys, CSR, SSH key.
type identity struct {
	name, wgPub, csr, ssh string
}

func newIdentity(t *testing.T, name string) identity {
	t.Helper()
	key, err := pki.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	csr, err := pki.NewCSR(key, name)
	if err != nil {
		t.Fatal(err)
	}
	wg, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		t.Fatal(err)
	}
	pub, _, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	sp, err := ssh.NewPublicKey(pub)
	if err != nil {
		t.Fatal(err)
	}
	return identity{name: name, wgPub: wg.PublicKey().String(), csr: string(csr), ssh: string(ssh.MarshalAuthorizedKey(sp))}
}

// enrollAnswer is the part of wire.EnrollResponse the storm checks (the
// netmap is skipped: decoding hundreds of them would only cost time).
type enrollAnswer struct {
	Node        wire.Node `json:"node"`
	Certificate string    `json:"certificate"`
}

// enrollOnce sends one real enrollment request from a random 127.0.0.0/8
// source address (the failure rate limit is per address, and a storm that
// overspends tokens on purpose must not be limited as one client).
func enrollOnce(tc wire.TokenCreateResponse, token string, id identity) (enrollAnswer, error) {
	pin, err := pki.ParsePin(tc.CAPin)
	if err != nil {
		return enrollAnswer{}, err
	}
	src := netip.AddrFrom4([4]byte{127, byte(1 + mrand.IntN(250)), byte(mrand.IntN(256)), byte(1 + mrand.IntN(250))})
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: src.AsSlice()}, Timeout: 5 * time.Second}
	tr := &http.Transport{TLSClientConfig: pki.PinnedTLSConfig(pin), DisableKeepAlives: true, DialContext: d.DialContext}
	defer tr.CloseIdleConnections()
	var ans enrollAnswer
	err = wire.Call(context.Background(), &http.Client{Transport: tr, Timeout: 20 * time.Second}, http.MethodPost,
		tc.Coordinator+wire.PathEnroll, nil,
		wire.EnrollRequest{Token: token, Name: id.name, WireGuardKey: id.wgPub, CSR: id.csr, SSHKey: id.ssh}, &ans)
	return ans, err
}

// outcome is what a client was told.
type outcome int

const (
	pending  outcome = iota
	acked            // 200 with a node
	refused          // an API error: nothing may have been written
	noAnswer         // the connection broke: all or nothing, either way
)

// stormAttempt is one enrollment of the storm and what its client heard.
type stormAttempt struct {
	id      identity
	tok     *wire.TokenCreateResponse
	out     outcome
	status  int // for refused
	code    string
	ans     enrollAnswer
	lastErr error
}

type stormConfig struct {
	singles, doubled   int // single-use tokens presented once / twice (concurrently)
	reusable, maxUses  int // reusable tokens and their max_uses
	reusablePresented  int // times each reusable token is presented (> maxUses: overspent)
	concurrency, kills int
	revokes            int // revocations attempted while the kills go on
	maxKillDelay       time.Duration
	deadline           time.Duration
}

// TestCrashSafetySmall is the storm at a size that always runs.
func TestCrashSafetySmall(t *testing.T) {
	runCrashStorm(t, stormConfig{singles: 50, doubled: 8, reusable: 2, maxUses: 5, reusablePresented: 7,
		concurrency: 16, kills: 3, revokes: 10, maxKillDelay: 5 * time.Millisecond, deadline: 60 * time.Second})
}

// TestCrashSafetyStorm is the full storm: 300 enrollments, 32 at a time,
// 8 SIGKILLs, revocations meanwhile.
func TestCrashSafetyStorm(t *testing.T) {
	if testing.Short() {
		t.Skip("the full enrollment storm; TestCrashSafetySmall runs under -short")
	}
	runCrashStorm(t, stormConfig{singles: 200, doubled: 26, reusable: 4, maxUses: 10, reusablePresented: 12,
		concurrency: 32, kills: 8, revokes: 40, maxKillDelay: 5 * time.Millisecond, deadline: 120 * time.Second})
}

func runCrashStorm(t *testing.T, cfg stormConfig) {
	needBinary(t)
	began := time.Now()
	dataDir := filepath.Join(t.TempDir(), "data")
	port := freePort(t)
	srv := startServer(t, dataDir, port)
	servers := []*server{srv}
	defer func() {
		if t.Failed() {
			for i, s := range servers {
				t.Logf("server run %d stderr (tail):\n%s", i, tail(s.stderr.String(), 4000))
			}
		}
	}()
	admin := newAdminAPI(dataDir)

	// Tokens: single-use ones (some presented twice, by two devices at
	// once) and reusable ones presented more often than they allow.
	newToken := func(maxUses int) *wire.TokenCreateResponse {
		var tc wire.TokenCreateResponse
		if err := admin.call(http.MethodPost, wire.PathAdminTokens, wire.TokenCreateRequest{MaxUses: maxUses}, &tc); err != nil {
			t.Fatalf("create token: %v", err)
		}
		return &tc
	}
	var groups [][]*stormAttempt
	n := 0
	attempt := func(tok *wire.TokenCreateResponse) *stormAttempt {
		n++
		return &stormAttempt{id: newIdentity(t, fmt.Sprintf("storm-%d", n)), tok: tok}
	}
	for range cfg.singles {
		groups = append(groups, []*stormAttempt{attempt(newToken(1))})
	}
	for range cfg.doubled {
		tok := newToken(1)
		groups = append(groups, []*stormAttempt{attempt(tok), attempt(tok)})
	}
	for range cfg.reusable {
		tok := newToken(cfg.maxUses)
		for range cfg.reusablePresented {
			groups = append(groups, []*stormAttempt{attempt(tok)})
		}
	}
	mrand.Shuffle(len(groups), func(i, j int) { groups[i], groups[j] = groups[j], groups[i] })
	var all []*stormAttempt
	for _, g := range groups {
		all = append(all, g...) // a doubled token's two attempts next to each other: they run at once
	}
	t.Logf("%d tokens and %d enrollment attempts prepared in %v", len(groups)-cfg.reusable*cfg.reusablePresented+cfg.reusable, len(all), time.Since(began).Round(time.Millisecond))

	deadline := time.Now().Add(cfg.deadline)
	var ackedCount, finished atomic.Int64
	var ackedMu sync.Mutex
	var ackedNodes []string // names, for the revoker

	// The storm: cfg.concurrency workers. A request that never reached a
	// server (connection refused while it is down) is sent again; any other
	// failure is what the client heard.
	queue := make(chan *stormAttempt)
	var wg sync.WaitGroup
	for range cfg.concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for a := range queue {
				for {
					ans, err := enrollOnce(*a.tok, a.tok.Token, a.id)
					var ae *wire.APIError
					switch {
					case err == nil:
						a.out, a.ans = acked, ans
						ackedCount.Add(1)
						ackedMu.Lock()
						ackedNodes = append(ackedNodes, ans.Node.Name)
						ackedMu.Unlock()
					case errors.As(err, &ae):
						a.out, a.status, a.code = refused, ae.Status, ae.Code
					case notSent(err) && time.Now().Before(deadline):
						time.Sleep(20 * time.Millisecond) // poll interval while the server is down
						continue
					default:
						a.out, a.lastErr = noAnswer, err
					}
					break
				}
				finished.Add(1)
			}
		}()
	}
	// The storm is released in shares, one per server run, so that every
	// run (and so every kill) meets enrollments however fast they go.
	share := len(all) / (cfg.kills + 1)
	var released atomic.Int64
	released.Store(int64(share))
	go func() {
		defer close(queue)
		for i, a := range all {
			for int64(i) >= released.Load() && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond) // poll interval: waits for the next server run
			}
			queue <- a
		}
	}()

	// Revocations of acknowledged nodes, one at a time, meanwhile.
	type revokeAttempt struct {
		name string
		out  outcome
		id   string
		err  error
	}
	var revokes []*revokeAttempt
	stormDone := make(chan struct{})
	revokerDone := make(chan struct{})
	go func() {
		defer close(revokerDone)
		picked := map[string]bool{}
		for len(revokes) < cfg.revokes && time.Now().Before(deadline) {
			select {
			case <-stormDone:
				return
			case <-time.After(time.Duration(2+mrand.IntN(10)) * time.Millisecond): // pace, not synchronisation
			}
			ackedMu.Lock()
			var name string
			if len(ackedNodes) > 0 {
				name = ackedNodes[mrand.IntN(len(ackedNodes))]
			}
			ackedMu.Unlock()
			if name == "" || picked[name] {
				continue
			}
			picked[name] = true
			r := &revokeAttempt{name: name}
			revokes = append(revokes, r)
			for {
				var nd wire.Node
				err := admin.call(http.MethodPost, wire.PathAdminNodeRevoke, wire.NameRequest{Name: name}, &nd)
				var ae *wire.APIError
				switch {
				case err == nil:
					r.out, r.id = acked, nd.ID
				case errors.As(err, &ae):
					r.out, r.err = refused, err
				case notSent(err) && time.Now().Before(deadline):
					time.Sleep(20 * time.Millisecond) // poll interval while the server is down
					continue
				default:
					r.out, r.err = noAnswer, err
				}
				break
			}
		}
	}()

	// The kills: each server run gets its share of the storm and is
	// SIGKILLed at a random point of it (a random number of its
	// enrollments finished, then a random delay), with enrollments and
	// revocations in flight; then it is restarted on the same data dir and
	// port.
	var killedAt []int64
	for k := range cfg.kills {
		target := int64(k*share + 1 + mrand.IntN(share/2))
		eventually(t, time.Until(deadline), "the storm to reach a kill point", func() bool {
			return finished.Load() >= target
		})
		time.Sleep(time.Duration(mrand.Int64N(int64(cfg.maxKillDelay)))) // a random moment of the storm
		if err := srv.cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatalf("kill %d: %v", k, err)
		}
		<-srv.done
		killedAt = append(killedAt, ackedCount.Load())
		if k == cfg.kills-1 {
			released.Store(int64(len(all)))
		} else {
			released.Store(int64((k + 2) * share))
		}
		srv = startServer(t, dataDir, port)
		servers = append(servers, srv)
	}
	wg.Wait()
	close(stormDone)
	<-revokerDone
	stormTime := time.Since(began)

	// What the clients heard.
	var nAcked, nRefused, nNoAnswer int
	refusedBy := map[string]int{}
	for _, a := range all {
		switch a.out {
		case acked:
			nAcked++
		case refused:
			nRefused++
			refusedBy[fmt.Sprintf("%d %s", a.status, a.code)]++
		case noAnswer:
			nNoAnswer++
		default:
			t.Fatalf("attempt %s never ran", a.id.name)
		}
	}

	// What the restarted server says: nodes and audit through the CLI.
	var nodes []wire.Node
	decode(t, mustOK(t, nil, "nodes", "list", "--data-dir", dataDir, "--json"), &nodes)
	var audit []wire.AuditEntry
	decode(t, mustOK(t, nil, "audit", "--data-dir", dataDir, "--json", "--limit", "0"), &audit)
	if code := sigterm(t, srv.proc, 20*time.Second); code != 0 {
		t.Errorf("server exited %d on SIGTERM", code)
	}
	db := readDB(t, filepath.Join(dataDir, "meshctl.db"))

	byKey := map[string]wire.Node{}
	byID := map[string]wire.Node{}
	for _, nd := range nodes {
		if nd.Role == wire.RoleProxy {
			continue // the embedded proxy
		}
		if _, dup := byKey[nd.WireGuardKey]; dup {
			t.Errorf("two nodes with WireGuard key %s", nd.WireGuardKey)
		}
		byKey[nd.WireGuardKey] = nd
		byID[nd.ID] = nd
	}
	enrollAudit := map[string]wire.AuditEntry{} // node id → its node.enroll entry
	revokeAudit := map[string]bool{}
	for _, e := range audit {
		id := auditNodeID(e.Detail)
		switch e.Action {
		case "node.enroll":
			if _, dup := enrollAudit[id]; dup {
				t.Errorf("two node.enroll audit entries for node %s", id)
			}
			enrollAudit[id] = e
		case "node.revoke":
			revokeAudit[id] = true
		}
	}

	// Every acknowledged enrollment exists whole, as the client was told.
	attemptByKey := map[string]*stormAttempt{}
	ackedPerToken := map[string]int{}
	nUnknownExists := 0
	for _, a := range all {
		attemptByKey[a.id.wgPub] = a
		nd, exists := byKey[a.id.wgPub]
		switch a.out {
		case acked:
			ackedPerToken[a.tok.ID]++
			want := a.ans.Node
			if !exists {
				t.Errorf("%s was acknowledged (node %s, %s) but does not exist after the kills", a.id.name, want.ID, want.IPv4)
				continue
			}
			if nd.ID != want.ID || nd.Name != a.id.name || nd.IPv4 != want.IPv4 || nd.IPv6 != want.IPv6 || want.WireGuardKey != a.id.wgPub {
				t.Errorf("%s: told %+v, found %+v", a.id.name, want, nd)
			}
			cert, err := pki.ParseCertPEM([]byte(a.ans.Certificate))
			if err != nil || cert.Subject.CommonName != want.ID {
				t.Errorf("%s: certificate for %q (%v), want CN %s", a.id.name, cert.Subject.CommonName, err, want.ID)
			}
		case refused:
			if exists {
				t.Errorf("%s was refused (%d %s) but node %s exists", a.id.name, a.status, a.code, nd.ID)
			}
		case noAnswer:
			if exists {
				nUnknownExists++
				if nd.Name != a.id.name {
					t.Errorf("%s (no answer) exists as %q", a.id.name, nd.Name)
				}
			}
		}
		if exists {
			if _, ok := enrollAudit[nd.ID]; !ok {
				t.Errorf("node %s (%s) has no node.enroll audit entry", nd.Name, nd.ID)
			}
			if got := db.nodes[nd.ID].tokenID; got != a.tok.ID {
				t.Errorf("node %s enrolled with token %q, the client sent %q", nd.Name, got, a.tok.ID)
			}
		}
	}
	// Nothing exists that no client asked for; the audit names no node that
	// does not exist.
	for key, nd := range byKey {
		if attemptByKey[key] == nil {
			t.Errorf("node %s (%s) exists but no client enrolled it", nd.Name, nd.ID)
		}
	}
	for id, e := range enrollAudit {
		if _, ok := db.nodes[id]; !ok {
			t.Errorf("audit says node %s (%s) enrolled, but it does not exist", e.Target, id)
		}
	}
	// No half-enrolled rows, no shared addresses or keys, in the database
	// itself.
	seen4, seen6, seenKey := map[string]string{}, map[string]string{}, map[string]string{}
	for id, r := range db.nodes {
		if r.name == "" || r.wgKey == "" || !netip.MustParseAddr(r.ipv4).Is4() || !netip.MustParseAddr(r.ipv6).Is6() {
			t.Errorf("half-written node row %s: %+v", id, r)
		}
		for _, m := range []struct {
			seen map[string]string
			v    string
		}{{seen4, r.ipv4}, {seen6, r.ipv6}, {seenKey, r.wgKey}} {
			if other, dup := m.seen[m.v]; dup {
				t.Errorf("nodes %s and %s share %s", other, id, m.v)
			}
			m.seen[m.v] = id
		}
	}
	if len(db.nodes) != len(nodes) {
		t.Errorf("database has %d node rows, the API listed %d", len(db.nodes), len(nodes))
	}
	// Tokens: never spent beyond max_uses; the uses counter is exactly the
	// nodes enrolled with it (a consumed use without its node would be half
	// an enrollment).
	perToken := map[string]int{}
	for _, r := range db.nodes {
		if r.tokenID != "" {
			perToken[r.tokenID]++
		}
	}
	for _, g := range groups {
		tok := g[0].tok
		dbt := db.tokens[tok.ID]
		if ackedPerToken[tok.ID] > tok.MaxUses {
			t.Errorf("token %s (max_uses %d) was acknowledged %d times", tok.ID, tok.MaxUses, ackedPerToken[tok.ID])
		}
		if dbt.uses > dbt.maxUses || perToken[tok.ID] != dbt.uses {
			t.Errorf("token %s: uses %d, max_uses %d, nodes enrolled with it %d", tok.ID, dbt.uses, dbt.maxUses, perToken[tok.ID])
		}
	}

	// Revocations: an acknowledged one survived; none happened that was
	// not asked for; the audit agrees.
	var rAcked, rNoAnswer, rRefused, rDone int
	asked := map[string]bool{}
	for _, r := range revokes {
		asked[r.name] = true
		var nd wire.Node
		for _, x := range byID {
			if x.Name == r.name {
				nd = x
			}
		}
		switch r.out {
		case acked:
			rAcked++
			if !nd.Revoked || nd.ID != r.id {
				t.Errorf("revocation of %s (%s) was acknowledged but it is not revoked after the kills: %+v", r.name, r.id, nd)
			}
		case refused:
			rRefused++
			t.Errorf("revocation of %s refused: %v", r.name, r.err)
		case noAnswer:
			rNoAnswer++
		}
	}
	for id, nd := range byID {
		if nd.Revoked {
			rDone++
			if !asked[nd.Name] {
				t.Errorf("node %s is revoked but nobody asked", nd.Name)
			}
			if !revokeAudit[id] {
				t.Errorf("node %s is revoked but the audit has no node.revoke for it", nd.Name)
			}
			if db.nodes[id].revokedAt == 0 {
				t.Errorf("node %s: the API says revoked, the database does not", nd.Name)
			}
		}
	}
	for id := range revokeAudit {
		if nd, ok := byID[id]; ok && !nd.Revoked {
			t.Errorf("audit says node %s was revoked, but it is active", nd.Name)
		}
	}

	t.Logf("%d SIGKILLs (acknowledged enrollments at each kill: %v); storm %v, whole test %v",
		len(killedAt), killedAt, stormTime.Round(time.Millisecond), time.Since(began).Round(time.Millisecond))
	t.Logf("enrollments: %d attempted, %d acknowledged (all %d found whole), %d refused %v (none found), %d without an answer (%d of them exist, whole)",
		len(all), nAcked, nAcked, nRefused, refusedBy, nNoAnswer, nUnknownExists)
	t.Logf("revocations: %d attempted, %d acknowledged (all revoked after the kills), %d without an answer; %d nodes revoked in all; database integrity_check: %s",
		len(revokes), rAcked, rNoAnswer, rDone, db.integrity)
	if nAcked == 0 || len(killedAt) != cfg.kills {
		t.Errorf("the storm did not run: %d acknowledged, %d kills", nAcked, len(killedAt))
	}
}

// auditNodeID is the id=… of an audit entry's detail.
func auditNodeID(detail string) string {
	for _, f := range strings.Fields(detail) {
		if v, ok := strings.CutPrefix(f, "id="); ok {
			return v
		}
	}
	return ""
}

// dbNode and dbToken are rows read straight from the database.
type dbNode struct {
	name, role, ipv4, ipv6, wgKey, tokenID string
	revokedAt                              int64
}

type dbToken struct{ uses, maxUses int }

type dbSnapshot struct {
	nodes     map[string]dbNode
	tokens    map[string]dbToken
	integrity string
}

// readDB reads a stopped server's database, read-only, and fails the test
// unless SQLite's integrity check passes.
func readDB(t *testing.T, path string) dbSnapshot {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+path+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	s := dbSnapshot{nodes: map[string]dbNode{}, tokens: map[string]dbToken{}}
	if err := db.QueryRow(`PRAGMA integrity_check`).Scan(&s.integrity); err != nil || s.integrity != "ok" {
		t.Fatalf("integrity_check: %q, %v", s.integrity, err)
	}
	rows, err := db.Query(`SELECT id, name, role, ipv4, ipv6, wg_key, coalesce(token_id, ''), coalesce(revoked_at, 0) FROM nodes`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id string
		var r dbNode
		if err := rows.Scan(&id, &r.name, &r.role, &r.ipv4, &r.ipv6, &r.wgKey, &r.tokenID, &r.revokedAt); err != nil {
			t.Fatal(err)
		}
		s.nodes[id] = r
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	rows, err = db.Query(`SELECT id, uses, max_uses FROM tokens`)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id string
		var r dbToken
		if err := rows.Scan(&id, &r.uses, &r.maxUses); err != nil {
			t.Fatal(err)
		}
		s.tokens[id] = r
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return s
}

// TestFirstStartSurvivesSIGKILL: a first start of `meshctl server` (CA,
// SSH CA, database, the embedded proxy's enrollment) killed at any moment
// is finished by the next start. The state that a kill between the proxy's
// enrollment and the saving of its identity leaves is made on purpose
// first: it used to stop every later start ("that node name is already in
// use"), with no running server to revoke the orphan through.
func TestFirstStartSurvivesSIGKILL(t *testing.T) {
	needBinary(t)
	base := t.TempDir()
	activeProxies := func(dataDir string) int {
		var nodes []wire.Node
		decode(t, mustOK(t, nil, "nodes", "list", "--data-dir", dataDir, "--json"), &nodes)
		n := 0
		for _, nd := range nodes {
			if nd.Role == wire.RoleProxy && !nd.Revoked {
				n++
			}
		}
		return n
	}

	// The proxy enrolled, its identity not saved.
	dataDir := filepath.Join(base, "orphan")
	t0 := time.Now()
	srv := startServer(t, dataDir, freePort(t))
	eventually(t, 20*time.Second, "the embedded proxy to enroll and save its identity", func() bool {
		_, err := os.Stat(filepath.Join(dataDir, "proxy", "node.json"))
		return err == nil && activeProxies(dataDir) == 1
	})
	firstStart := time.Since(t0)
	if err := srv.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-srv.done
	for _, f := range []string{"node.json", "netmap.json"} {
		if err := os.Remove(filepath.Join(dataDir, "proxy", f)); err != nil {
			t.Fatal(err)
		}
	}
	srv = startServer(t, dataDir, freePort(t))
	waitFor(t, 20*time.Second, "one active proxy after the restart", func() (bool, string) {
		n := activeProxies(dataDir)
		return n == 1, fmt.Sprintf("%d active proxies\n%s", n, srv.stderr)
	})
	if !strings.Contains(srv.stderr.String(), "revoked a proxy whose identity was never saved") {
		t.Errorf("the restart does not say it retired the orphaned proxy:\n%s", srv.stderr)
	}
	stopGracefully(t, srv.proc)

	// First starts killed at random moments (within the time a whole first
	// start took above), then started again.
	const kills = 8
	exitedFirst := 0
	for i := range kills {
		dataDir := filepath.Join(base, fmt.Sprintf("first-%d", i))
		p := start(t, nil, "server", "--data-dir", dataDir, "--listen", net.JoinHostPort("127.0.0.1", freePort(t)),
			"--public-host", "127.0.0.1", "--http", net.JoinHostPort("127.0.0.1", freePort(t)),
			"--wg-listen", net.JoinHostPort("127.0.0.1", freeUDPPort(t)), "--ssh-listen", net.JoinHostPort("127.0.0.1", freePort(t)))
		time.Sleep(time.Duration(mrand.Int64N(int64(firstStart)))) // a random moment of the first start
		if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
			exitedFirst++ // it had exited already: the restart below still has to work
		}
		<-p.done
		srv := startServer(t, dataDir, freePort(t))
		waitFor(t, 20*time.Second, fmt.Sprintf("kill %d: one active proxy after the restart", i), func() (bool, string) {
			n := activeProxies(dataDir)
			return n == 1, fmt.Sprintf("%d active proxies\n%s", n, srv.stderr)
		})
		if err := srv.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		<-srv.done
	}
	t.Logf("first start took %v; %d first starts SIGKILLed at random moments within that, all restarted whole", firstStart.Round(time.Millisecond), kills-exitedFirst)
}
