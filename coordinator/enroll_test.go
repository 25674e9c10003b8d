package coordinator_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator"
	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
	"golang.org/x/crypto/ssh"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// enrollBody builds a well-formed enrollment request with fresh keys.
func enrollBody(t *testing.T, token, name string) wire.EnrollRequest {
	t.Helper()
	wg, _ := wgtypes.GeneratePrivateKey()
	key, _ := pki.GenerateKey()
	csr, err := pki.NewCSR(key, name)
	if err != nil {
		t.Fatal(err)
	}
	return wire.EnrollRequest{Token: token, Name: name, WireGuardKey: wg.PublicKey().String(), CSR: string(csr)}
}

// post sends raw bytes to the API over pinned TLS and returns the status,
// the decoded error body (if any) and the headers.
func post(t *testing.T, c *meshtest.Coordinator, path, contentType string, body []byte) (int, wire.Error, http.Header) {
	t.Helper()
	pin, _ := pki.ParsePin(c.CAPin())
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: pki.PinnedTLSConfig(pin)}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Post(c.URL()+path, contentType, bytes.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var e wire.Error
	json.NewDecoder(resp.Body).Decode(&e)
	return resp.StatusCode, e, resp.Header
}

func postJSON(t *testing.T, c *meshtest.Coordinator, v any) (int, wire.Error, http.Header) {
	b, _ := json.Marshal(v)
	return post(t, c, wire.PathEnroll, "application/json", b)
}

func TestTokenSingleUseByDefault(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	tok := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 1})
	if _, err := c.Enroll(t, "a", tok.Token); err != nil {
		t.Fatal(err)
	}
	_, err := c.Enroll(t, "b", tok.Token)
	if !wire.IsCode(err, wire.CodeUnauthorized) {
		t.Fatalf("second use: want 401 unauthorized, got %v", err)
	}
	if n := len(c.Nodes(t)); n != 1 {
		t.Fatalf("%d nodes, want 1", n)
	}
}

func TestTokenDefaultsAreOneUseOneHour(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	tok := c.CreateToken(t, wire.TokenCreateRequest{}) // nothing said: one use, one hour
	if got := tok.Expires.Sub(c.Clock.Now()); got < 59*time.Minute || got > time.Hour {
		t.Errorf("default TTL %s, want 1h", got)
	}
	if !strings.HasPrefix(tok.EnrollCommand, "meshctl enroll --coordinator https://127.0.0.1:") ||
		!strings.Contains(tok.EnrollCommand, "--token "+tok.Token) || !strings.Contains(tok.EnrollCommand, "--ca-pin "+c.CAPin()) {
		t.Errorf("enroll command %q", tok.EnrollCommand)
	}
	if _, err := c.Enroll(t, "a", tok.Token); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Enroll(t, "b", tok.Token); !wire.IsCode(err, wire.CodeUnauthorized) {
		t.Fatalf("second use of a default token: want 401, got %v", err)
	}
	var ts []wire.Token
	if err := c.Admin(http.MethodGet, wire.PathAdminTokens, nil, &ts); err != nil {
		t.Fatal(err)
	}
	if len(ts) != 1 || ts[0].Uses != 1 {
		t.Fatalf("tokens after one enrollment: %+v", ts)
	}
}

func TestTokenUsesN(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	tok := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 3, Tags: []string{"lab"}})
	for _, name := range []string{"a", "b", "c"} {
		n, err := c.Enroll(t, name, tok.Token)
		if err != nil {
			t.Fatalf("enroll %s: %v", name, err)
		}
		if len(n.Enroll.Node.Tags) != 1 || n.Enroll.Node.Tags[0] != "lab" {
			t.Errorf("node %s tags %v, want [lab] from the token", name, n.Enroll.Node.Tags)
		}
	}
	if _, err := c.Enroll(t, "d", tok.Token); !wire.IsCode(err, wire.CodeUnauthorized) {
		t.Fatalf("fourth use: want 401, got %v", err)
	}
}

func TestTokenExpiresWithClock(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	tok := c.CreateToken(t, wire.TokenCreateRequest{Reusable: true, TTL: wire.Duration(time.Hour)})
	if _, err := c.Enroll(t, "a", tok.Token); err != nil {
		t.Fatal(err)
	}
	c.Clock.Advance(59 * time.Minute)
	if _, err := c.Enroll(t, "b", tok.Token); err != nil {
		t.Fatalf("within TTL: %v", err)
	}
	c.Clock.Advance(2 * time.Minute)
	if _, err := c.Enroll(t, "c", tok.Token); !wire.IsCode(err, wire.CodeUnauthorized) {
		t.Fatalf("after TTL: want 401, got %v", err)
	}
}

func TestRevokedTokenRefused(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	tok := c.CreateToken(t, wire.TokenCreateRequest{Reusable: true})
	if err := c.Admin(http.MethodPost, wire.PathAdminTokenRevoke, wire.IDRequest{ID: tok.ID}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Enroll(t, "a", tok.Token); !wire.IsCode(err, wire.CodeUnauthorized) {
		t.Fatalf("revoked token: want 401, got %v", err)
	}
	if err := c.Admin(http.MethodPost, wire.PathAdminTokenRevoke, wire.IDRequest{ID: "000000000000"}, nil); !wire.IsCode(err, wire.CodeNotFound) {
		t.Fatalf("revoke unknown token: want 404, got %v", err)
	}
}

// Fifty devices race with one single-use token: exactly one wins.
func TestConcurrentEnrollmentsOneToken(t *testing.T) {
	// All 50 come from 127.0.0.1: lift the failure limit so that every
	// request reaches the store and the race is real.
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) { o.FailureBurst = 1000 })
	tok := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 1})
	const n = 50
	bodies := make([][]byte, n)
	for i := range bodies {
		bodies[i], _ = json.Marshal(enrollBody(t, tok.Token, "n"+string(rune('a'+i%26))+string(rune('a'+i/26))))
	}
	var wg sync.WaitGroup
	codes := make([]int, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			codes[i], _, _ = post(t, c, wire.PathEnroll, "application/json", bodies[i])
		}()
	}
	wg.Wait()
	ok := 0
	for _, code := range codes {
		switch code {
		case http.StatusOK:
			ok++
		case http.StatusUnauthorized:
		default:
			t.Errorf("unexpected status %d", code)
		}
	}
	if ok != 1 {
		t.Fatalf("%d enrollments succeeded with a single-use token, want exactly 1", ok)
	}
	if nodes := c.Nodes(t); len(nodes) != 1 {
		t.Fatalf("%d node rows, want 1", len(nodes))
	}
}

// Every kind of bad token gets the same 401, leaves no node and uses no
// address: the next good enrollment gets the first address of the pool.
func TestBadTokensLeaveNoTrace(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	good := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 1})
	id, _, _ := pki.ParseSecret(pki.KindEnroll, good.Token)
	unknown, _, _, _ := pki.NewSecret(pki.KindEnroll)
	wrongSecret := "meshctl-enroll-" + id + "-" + strings.Repeat("a", 32)
	var msgs []string
	for _, tok := range []string{"", "garbage", "meshctl-admin-" + good.Token[len("meshctl-enroll-"):], unknown, wrongSecret} {
		code, e, _ := postJSON(t, c, enrollBody(t, tok, "x"))
		if code != http.StatusUnauthorized {
			t.Errorf("token %q: status %d, want 401", tok, code)
		}
		msgs = append(msgs, e.Message)
	}
	for _, m := range msgs[1:] {
		if m != msgs[0] {
			t.Errorf("responses differ by kind of bad token: %q vs %q", m, msgs[0])
		}
	}
	if nodes := c.Nodes(t); len(nodes) != 0 {
		t.Fatalf("bad tokens created nodes: %+v", nodes)
	}
	n, err := c.Enroll(t, "x", good.Token)
	if err != nil {
		t.Fatal(err)
	}
	if n.State.IPv4 != "100.64.0.1" {
		t.Fatalf("first good enrollment got %s; a failed attempt used an address", n.State.IPv4)
	}
}

func TestFailedAttemptsRateLimited(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	var last int
	var hdr http.Header
	for i := 0; i < 20 && last != http.StatusTooManyRequests; i++ {
		last, _, hdr = postJSON(t, c, enrollBody(t, "meshctl-enroll-000000000000-"+strings.Repeat("a", 32), "x"))
	}
	if last != http.StatusTooManyRequests {
		t.Fatalf("20 failures from one address: last status %d, want 429", last)
	}
	if hdr.Get("Retry-After") == "" {
		t.Fatal("429 without Retry-After")
	}
	// A good token is also held back while limited: the limiter is checked first.
	good := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 1})
	if code, _, _ := postJSON(t, c, enrollBody(t, good.Token, "y")); code != http.StatusTooManyRequests {
		t.Fatalf("limited source with a good token: %d, want 429", code)
	}
	c.Clock.Advance(time.Minute) // the bucket refills
	if code, e, _ := postJSON(t, c, enrollBody(t, good.Token, "y")); code != http.StatusOK {
		t.Fatalf("after the wait: %d %s", code, e.Message)
	}
}

func TestEnrollRejectsBadRequests(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	tok := c.CreateToken(t, wire.TokenCreateRequest{Reusable: true})
	good := enrollBody(t, tok.Token, "ok")
	mut := func(f func(*wire.EnrollRequest)) wire.EnrollRequest { r := good; f(&r); return r }
	cases := []struct {
		name string
		req  wire.EnrollRequest
		want int
	}{
		{"upper-case name", mut(func(r *wire.EnrollRequest) { r.Name = "Pi1" }), 400},
		{"double hyphen", mut(func(r *wire.EnrollRequest) { r.Name = "web--pi1" }), 400},
		{"punycode", mut(func(r *wire.EnrollRequest) { r.Name = "xn--bcher-kva" }), 400},
		{"reserved", mut(func(r *wire.EnrollRequest) { r.Name = "admin" }), 400},
		{"too long", mut(func(r *wire.EnrollRequest) { r.Name = strings.Repeat("a", 64) }), 400},
		{"dot", mut(func(r *wire.EnrollRequest) { r.Name = "a.b" }), 400},
		{"empty name", mut(func(r *wire.EnrollRequest) { r.Name = "" }), 400},
		{"key not base64", mut(func(r *wire.EnrollRequest) { r.WireGuardKey = "not a key!" }), 400},
		{"key wrong length", mut(func(r *wire.EnrollRequest) { r.WireGuardKey = "AAAA" }), 400},
		{"key all zeros", mut(func(r *wire.EnrollRequest) { r.WireGuardKey = wgtypes.Key{}.String() }), 400},
		{"csr garbage", mut(func(r *wire.EnrollRequest) {
			r.CSR = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
		}), 400},
	}
	for _, tc := range cases {
		if code, e, _ := postJSON(t, c, tc.req); code != tc.want || e.Message == "" {
			t.Errorf("%s: status %d (%q), want %d with a message", tc.name, code, e.Message, tc.want)
		}
	}
	raw := func(ct string, body []byte) int { code, _, _ := post(t, c, wire.PathEnroll, ct, body); return code }
	if code := raw("text/plain", []byte("{}")); code != http.StatusUnsupportedMediaType {
		t.Errorf("wrong content type: %d, want 415", code)
	}
	if code := raw("application/json", []byte(`{"token":"x","bogus":1}`)); code != http.StatusBadRequest {
		t.Errorf("unknown field: %d, want 400", code)
	}
	if code := raw("application/json", append([]byte(`{"token":"`), bytes.Repeat([]byte("a"), 100<<10)...)); code != http.StatusRequestEntityTooLarge {
		t.Errorf("huge body: %d, want 413", code)
	}
	if nodes := c.Nodes(t); len(nodes) != 0 {
		t.Fatalf("bad requests created nodes: %+v", nodes)
	}
}

func TestNameAndKeyCollisions(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	tok := c.CreateToken(t, wire.TokenCreateRequest{Reusable: true})
	first := enrollBody(t, tok.Token, "pi1")
	if code, e, _ := postJSON(t, c, first); code != 200 {
		t.Fatal(code, e)
	}
	if code, e, _ := postJSON(t, c, enrollBody(t, tok.Token, "pi1")); code != http.StatusConflict || e.Code != wire.CodeNameTaken {
		t.Fatalf("name collision: %d %+v", code, e)
	}
	sameKey := enrollBody(t, tok.Token, "pi2")
	sameKey.WireGuardKey = first.WireGuardKey
	if code, e, _ := postJSON(t, c, sameKey); code != http.StatusConflict || e.Code != wire.CodeKeyTaken {
		t.Fatalf("key collision: %d %+v", code, e)
	}
	nodes := c.Nodes(t)
	if len(nodes) != 1 || nodes[0].Name != "pi1" || nodes[0].WireGuardKey != first.WireGuardKey {
		t.Fatalf("collisions changed the registry: %+v", nodes)
	}
}

// Addresses are unique, inside the pool, and come back after a restart.
func TestAddressesUniqueAcrossRestart(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	seen := map[string]bool{}
	for _, n := range []string{"a", "b", "c"} {
		seen[c.AddNode(t, n).State.IPv4] = true
	}
	dir := c.Dir
	c.Close()
	c2 := meshtest.NewCoordinator(t, func(o *coordinator.Options) { o.DataDir = dir })
	for _, n := range []string{"d", "e"} {
		ip := c2.AddNode(t, n).State.IPv4
		if seen[ip] {
			t.Fatalf("address %s handed out twice across a restart", ip)
		}
		seen[ip] = true
	}
	pool := netip.MustParsePrefix("100.64.0.0/16")
	for ip := range seen {
		if !pool.Contains(netip.MustParseAddr(ip)) {
			t.Errorf("%s outside the pool", ip)
		}
	}
}

func TestEnrollVerifiesPin(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	other := meshtest.NewCoordinator(t)
	tok := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 1})
	dir := t.TempDir() + "/n"
	_, _, err := node.Enroll(context.Background(), node.EnrollOptions{
		Coordinator: c.URL(), Token: tok.Token, CAPin: other.CAPin(), Name: "a", StateDir: dir,
	})
	if !errors.Is(err, pki.ErrPinMismatch) {
		t.Fatalf("wrong pin: want ErrPinMismatch, got %v", err)
	}
	// The token never reached the coordinator: it still works.
	if _, err := c.Enroll(t, "a", tok.Token); err != nil {
		t.Fatalf("token after a refused pin: %v", err)
	}
}

// Enrollment certifies the device's SSH key for the SSH fallback: a user
// certificate for exactly the node's name, from the coordinator's SSH CA,
// that permits port forwarding and nothing else.
func TestEnrollCertifiesSSHKey(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	n := c.AddNode(t, "pi1")
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(n.Enroll.SSHCertificate))
	if err != nil {
		t.Fatalf("ssh certificate: %v", err)
	}
	cert, ok := pub.(*ssh.Certificate)
	if !ok {
		t.Fatalf("not a certificate: %T", pub)
	}
	caKey, _, _, _, err := ssh.ParseAuthorizedKey([]byte(n.Enroll.SSHCA))
	if err != nil {
		t.Fatal(err)
	}
	checker := ssh.CertChecker{IsUserAuthority: func(k ssh.PublicKey) bool { return bytes.Equal(k.Marshal(), caKey.Marshal()) }}
	if err := checker.CheckCert("pi1", cert); err != nil {
		t.Fatalf("certificate does not check out for pi1: %v", err)
	}
	if err := checker.CheckCert("pi2", cert); err == nil {
		t.Fatal("certificate valid for another principal")
	}
	if cert.CertType != ssh.UserCert || len(cert.Extensions) != 1 || len(cert.CriticalOptions) != 0 {
		t.Fatalf("certificate type %d extensions %v options %v", cert.CertType, cert.Extensions, cert.CriticalOptions)
	}
	if _, ok := cert.Extensions["permit-port-forwarding"]; !ok {
		t.Fatal("certificate does not permit port forwarding")
	}
	if life := time.Duration(cert.ValidBefore-cert.ValidAfter) * time.Second; life > 25*time.Hour {
		t.Fatalf("ssh certificate lives %s; it should be as short as the TLS one", life)
	}
	// A bad SSH key is a clear 400 and no node.
	tok := c.CreateToken(t, wire.TokenCreateRequest{})
	req := enrollBody(t, tok.Token, "pi2")
	req.SSHKey = "ssh-rsa AAAA nope"
	if code, e, _ := postJSON(t, c, req); code != http.StatusBadRequest || !strings.Contains(e.Message, "ssh key") {
		t.Fatalf("bad ssh key: %d %+v", code, e)
	}
}
