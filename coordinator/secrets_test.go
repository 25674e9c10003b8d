package coordinator_test

import (
	"bytes"
	"context"
	"encoding/base32"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator"
	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/internal/netnstest"
	"github.com/meshctl/meshctl/internal/syncbuf"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
)

// syncBuffer is a log capture safe to read while it is written.
type syncBuffer = syncbuf.Buffer

// secretPart is the part of a meshctl-<kind>-<id>-<secret> string after
// the id: what must never be logged or stored.
func secretPart(t *testing.T, s string) string {
	t.Helper()
	i := strings.LastIndexByte(s, '-')
	if i < 0 || len(s)-i-1 != 32 {
		t.Fatalf("%q does not end in a 32-character secret", s)
	}
	return s[i+1:]
}

// Tokens, admin keys and access keys are never logged, at debug level,
// whatever happens to them; their ids are (so a leak would be seen here).
func TestSecretsNeverLogged(t *testing.T) {
	var buf syncBuffer
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) {
		o.Logger = slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug}))
	})
	good := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 1})
	expiring := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 1, TTL: wire.Duration(time.Minute)})
	revoked := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 1})
	if err := c.Admin(http.MethodPost, wire.PathAdminTokenRevoke, wire.IDRequest{ID: revoked.ID}, nil); err != nil {
		t.Fatal(err)
	}
	wrong := "meshctl-enroll-" + good.ID + "-" + strings.Repeat("q", 32)
	secrets := []string{good.Token, expiring.Token, revoked.Token, wrong}
	ids := []string{good.ID, expiring.ID, revoked.ID}

	if code, e, _ := postJSON(t, c, enrollBody(t, good.Token, "a")); code != http.StatusOK {
		t.Fatalf("good token: %d %+v", code, e)
	}
	refusals := []struct{ what, token string }{
		{"wrong secret", wrong},
		{"used", good.Token},
		{"revoked", revoked.Token},
	}
	for _, r := range refusals {
		if code, _, _ := postJSON(t, c, enrollBody(t, r.token, "b")); code != http.StatusUnauthorized {
			t.Fatalf("%s token: %d, want 401", r.what, code)
		}
	}
	c.Clock.Advance(2 * time.Minute)
	if code, _, _ := postJSON(t, c, enrollBody(t, expiring.Token, "b")); code != http.StatusUnauthorized {
		t.Fatalf("expired token: %d, want 401", code)
	}

	// Admin keys: created, used, presented with a wrong secret.
	var k wire.AdminKeyCreateResponse
	if err := c.Admin(http.MethodPost, wire.PathAdminKeys, wire.AdminKeyCreateRequest{}, &k); err != nil {
		t.Fatal(err)
	}
	wrongKey := "meshctl-admin-" + k.ID + "-" + strings.Repeat("r", 32)
	secrets = append(secrets, k.Key, wrongKey)
	ids = append(ids, k.ID)
	if err := remoteAdmin(t, c, k.Key); err != nil {
		t.Fatalf("valid admin key: %v", err)
	}
	if err := remoteAdmin(t, c, wrongKey); !wire.IsCode(err, wire.CodeUnauthorized) {
		t.Fatalf("wrong admin key: %v", err)
	}
	// Access keys: created.
	var ak wire.AccessKeyCreateResponse
	if err := c.Admin(http.MethodPost, wire.PathAdminAccessKeys, wire.AccessKeyCreateRequest{}, &ak); err != nil {
		t.Fatal(err)
	}
	secrets = append(secrets, ak.Key)
	ids = append(ids, ak.ID)

	log := buf.String()
	for _, s := range secrets {
		if sp := secretPart(t, s); strings.Contains(log, sp) {
			t.Errorf("the log contains the secret part %s of %s:\n%s", sp, s, log)
		}
	}
	for _, id := range ids {
		if !strings.Contains(log, id) {
			t.Errorf("the log never names id %s (the test could not see a leak beside it):\n%s", id, log)
		}
	}
	if !strings.Contains(log, "request refused") {
		t.Errorf("no refusal was logged:\n%s", log)
	}
}

// remoteAdmin lists nodes over the API with an admin key.
func remoteAdmin(t *testing.T, c *meshtest.Coordinator, key string) error {
	pin, _ := pki.ParsePin(c.CAPin())
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: pki.PinnedTLSConfig(pin)}}
	defer hc.CloseIdleConnections()
	var nodes []wire.Node
	return wire.Call(ctx(t), hc, http.MethodGet, c.URL()+wire.PathAdminNodes, http.Header{"Authorization": {"Bearer " + key}}, nil, &nodes)
}

// Only hashes of secrets reach the database: after a clean close, no
// SQLite file holds a token's, admin key's or access key's secret part
// (as text, upper-case text or decoded bytes).
func TestSecretsStoredHashed(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	tok := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 2})
	used := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 1})
	if _, err := c.Enroll(t, "a", used.Token); err != nil {
		t.Fatal(err)
	}
	var k wire.AdminKeyCreateResponse
	if err := c.Admin(http.MethodPost, wire.PathAdminKeys, wire.AdminKeyCreateRequest{}, &k); err != nil {
		t.Fatal(err)
	}
	var ak wire.AccessKeyCreateResponse
	if err := c.Admin(http.MethodPost, wire.PathAdminAccessKeys, wire.AccessKeyCreateRequest{}, &ak); err != nil {
		t.Fatal(err)
	}
	dir := c.Dir
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	var all []byte
	for _, f := range []string{coordinator.DBFile, coordinator.DBFile + "-wal", coordinator.DBFile + "-shm"} {
		b, err := os.ReadFile(filepath.Join(dir, f))
		if os.IsNotExist(err) && f != coordinator.DBFile {
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, b...)
	}
	for _, s := range []string{tok.Token, used.Token, k.Key, ak.Key} {
		sp := secretPart(t, s)
		raw, err := b32dec(sp)
		if err != nil {
			t.Fatal(err)
		}
		for _, needle := range [][]byte{[]byte(sp), []byte(strings.ToUpper(sp)), raw} {
			if bytes.Contains(all, needle) {
				t.Errorf("the database files hold the secret of %s (%q)", s, needle)
			}
		}
	}
	// The files read are the ones that hold the rows: the ids are there.
	for _, id := range []string{tok.ID, used.ID, k.ID, ak.ID} {
		if !bytes.Contains(all, []byte(id)) {
			t.Errorf("id %s not found in the database files: the test reads the wrong files", id)
		}
	}
}

// Every refused token gets the same status, code and message — used,
// expired, revoked, unknown id, wrong secret, garbage — and none adds a
// node or consumes an address: the next good enrollment gets the next
// address in sequence.
func TestRefusedTokensLookAlike(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	used := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 1})
	first, err := c.Enroll(t, "first", used.Token)
	if err != nil {
		t.Fatal(err)
	}
	if first.State.IPv4 != "100.64.0.1" {
		t.Fatalf("first node got %s, want 100.64.0.1", first.State.IPv4)
	}
	expired := c.CreateToken(t, wire.TokenCreateRequest{Reusable: true, TTL: wire.Duration(time.Minute)})
	revoked := c.CreateToken(t, wire.TokenCreateRequest{Reusable: true})
	if err := c.Admin(http.MethodPost, wire.PathAdminTokenRevoke, wire.IDRequest{ID: revoked.ID}, nil); err != nil {
		t.Fatal(err)
	}
	c.Clock.Advance(2 * time.Minute)
	unknown, _, _, _ := pki.NewSecret(pki.KindEnroll)
	good := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 1})
	cases := []struct{ what, token string }{
		{"used", used.Token},
		{"expired", expired.Token},
		{"revoked", revoked.Token},
		{"unknown id", unknown},
		{"wrong secret", "meshctl-enroll-" + good.ID + "-" + strings.Repeat("z", 32)},
		{"garbage", "meshctl-enroll-%%%"},
	}
	var ref wire.Error
	refCode := 0
	for i, tc := range cases {
		code, e, _ := postJSON(t, c, enrollBody(t, tc.token, "x"+strconv.Itoa(i)))
		if code != http.StatusUnauthorized || e.Code != wire.CodeUnauthorized || e.Message == "" {
			t.Errorf("%s token: %d %+v, want 401 %s with a message", tc.what, code, e, wire.CodeUnauthorized)
		}
		if i == 0 {
			ref, refCode = e, code
			continue
		}
		if code != refCode || e != ref {
			t.Errorf("%s token answered %d %+v, the used token %d %+v: a caller can tell them apart", tc.what, code, e, refCode, ref)
		}
	}
	if nodes := c.Nodes(t); len(nodes) != 1 {
		t.Fatalf("refused tokens changed the node list: %+v", nodes)
	}
	var ts []wire.Token
	if err := c.Admin(http.MethodGet, wire.PathAdminTokens, nil, &ts); err != nil {
		t.Fatal(err)
	}
	for _, tk := range ts {
		want := 0
		if tk.ID == used.ID {
			want = 1
		}
		if tk.Uses != want {
			t.Errorf("token %s has %d uses after refusals, want %d", tk.ID, tk.Uses, want)
		}
	}
	n, err := c.Enroll(t, "second", good.Token)
	if err != nil {
		t.Fatal(err)
	}
	if n.State.IPv4 != "100.64.0.2" {
		t.Fatalf("next good enrollment got %s, want 100.64.0.2: a refused attempt used an address", n.State.IPv4)
	}
}

// A full pool is a 503 that names the problem and the fix, and costs the
// token nothing.
func TestPoolExhaustedIs503(t *testing.T) {
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) { o.IPv4Pool = netip.MustParsePrefix("10.99.0.0/30") })
	tok := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 5})
	for i, want := range []string{"10.99.0.1", "10.99.0.2"} {
		n, err := c.Enroll(t, "n"+strconv.Itoa(i), tok.Token)
		if err != nil {
			t.Fatalf("enrollment %d in a /30: %v", i, err)
		}
		if n.State.IPv4 != want {
			t.Fatalf("enrollment %d got %s, want %s", i, n.State.IPv4, want)
		}
	}
	code, e, _ := postJSON(t, c, enrollBody(t, tok.Token, "full"))
	if code != http.StatusServiceUnavailable || e.Code != wire.CodePoolExhausted || !strings.Contains(e.Message, "--cidr") {
		t.Fatalf("enrollment into a full pool: %d %+v, want 503 %s mentioning --cidr", code, e, wire.CodePoolExhausted)
	}
	var ts []wire.Token
	if err := c.Admin(http.MethodGet, wire.PathAdminTokens, nil, &ts); err != nil {
		t.Fatal(err)
	}
	if len(ts) != 1 || ts[0].Uses != 2 {
		t.Fatalf("token after the refused enrollment: %+v, want 2 uses", ts)
	}
	if nodes := c.Nodes(t); len(nodes) != 2 {
		t.Fatalf("%d nodes, want 2", len(nodes))
	}
}

// Wrong admin keys are rate-limited per source: 429 with Retry-After; once
// the bucket refills, a valid key works again.
func TestAdminKeyFailuresRateLimited(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	var k wire.AdminKeyCreateResponse
	if err := c.Admin(http.MethodPost, wire.PathAdminKeys, wire.AdminKeyCreateRequest{}, &k); err != nil {
		t.Fatal(err)
	}
	pin, _ := pki.ParsePin(c.CAPin())
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: pki.PinnedTLSConfig(pin)}}
	defer hc.CloseIdleConnections()
	get := func(key string) (int, http.Header) {
		req, _ := http.NewRequest(http.MethodGet, c.URL()+wire.PathAdminNodes, nil)
		req.Header.Set("Authorization", "Bearer "+key)
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		return resp.StatusCode, resp.Header
	}
	wrong := "meshctl-admin-" + k.ID + "-" + strings.Repeat("b", 32)
	var code, tries int
	var hdr http.Header
	for tries = 1; tries <= 30; tries++ {
		if code, hdr = get(wrong); code != http.StatusUnauthorized {
			break
		}
	}
	if code != http.StatusTooManyRequests {
		t.Fatalf("after %d wrong admin keys: %d, want 429", tries, code)
	}
	if tries < 2 {
		t.Fatalf("limited after %d attempts; the first failures should be answered 401", tries)
	}
	if ra, err := strconv.Atoi(hdr.Get("Retry-After")); err != nil || ra < 1 {
		t.Fatalf("429 with Retry-After %q", hdr.Get("Retry-After"))
	}
	if code, _ := get(k.Key); code != http.StatusTooManyRequests {
		t.Fatalf("valid key from a limited source: %d, want 429", code)
	}
	c.Clock.Advance(time.Minute)
	if code, _ := get(k.Key); code != http.StatusOK {
		t.Fatalf("valid key after the refill: %d, want 200", code)
	}
}

const adminSockRoleEnv = "MESHCTL_TEST_ADMIN_SOCK_ROLE"

// TestAdminSocketRefusesOtherUsers: with the modes loosened so that user
// nobody can reach the socket, SO_PEERCRED still keeps it out.
func TestAdminSocketRefusesOtherUsers(t *testing.T) {
	if os.Getenv(adminSockRoleEnv) != "" {
		t.Skip("helper process")
	}
	if os.Geteuid() != 0 {
		netnstest.SkipOrFail(t, "needs root to run a child as uid 65534")
	}
	c := meshtest.NewCoordinator(t)
	// Open the way that the file modes normally bar.
	for _, p := range []string{filepath.Dir(c.Dir), c.Dir} {
		if err := os.Chmod(p, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Chmod(c.AdminSocket(), 0o666); err != nil {
		t.Fatal(err)
	}
	// go test's build dir is private to root: nobody gets a copy.
	dir, err := os.MkdirTemp("", "sockcred")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "coordinator.test")
	src, err := os.ReadFile(os.Args[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, src, 0o755); err != nil {
		t.Fatal(err)
	}
	run := func(cred *syscall.Credential) string {
		cmd := exec.Command(bin, "-test.run=^TestAdminSocketHelper$", "-test.v", "-test.timeout=45s")
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0", adminSockRoleEnv+"="+c.AdminSocket())
		if cred != nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
		}
		out, err := cmd.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "--- PASS: TestAdminSocketHelper") {
			t.Fatalf("child: %v\n%s", err, out)
		}
		i := strings.Index(string(out), "ANSWER ")
		if i < 0 {
			t.Fatalf("child gave no answer:\n%s", out)
		}
		ans, _, _ := strings.Cut(string(out)[i+len("ANSWER "):], "\n")
		return ans
	}
	if got := run(&syscall.Credential{Uid: 65534, Gid: 65534}); got != "403 "+wire.CodeForbidden {
		t.Fatalf("uid 65534 creating a token on the admin socket: %q, want 403 %s", got, wire.CodeForbidden)
	}
	var ts []wire.Token
	if err := c.Admin(http.MethodGet, wire.PathAdminTokens, nil, &ts); err != nil {
		t.Fatal(err)
	}
	if len(ts) != 0 {
		t.Fatalf("uid 65534 created tokens: %+v", ts)
	}
	// The same child as root is let in: the refusal was the uid's.
	if got := run(nil); got != "200 " {
		t.Fatalf("root child creating a token: %q, want 200", got)
	}
	if err := c.Admin(http.MethodGet, wire.PathAdminTokens, nil, &ts); err != nil || len(ts) != 1 {
		t.Fatalf("tokens after root's child: %v %+v", err, ts)
	}
}

// TestAdminSocketHelper is the child of TestAdminSocketRefusesOtherUsers:
// it asks the admin socket for a token and prints the answer.
func TestAdminSocketHelper(t *testing.T) {
	sock := os.Getenv(adminSockRoleEnv)
	if sock == "" {
		t.Skip("runs only as the child of TestAdminSocketRefusesOtherUsers")
	}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	resp, err := hc.Post("http://admin"+wire.PathAdminTokens, "application/json", strings.NewReader(`{"max_uses":1}`))
	if err != nil {
		t.Fatalf("uid %d: %v", os.Geteuid(), err)
	}
	defer resp.Body.Close()
	var e wire.Error
	if resp.StatusCode != http.StatusOK {
		json.NewDecoder(resp.Body).Decode(&e)
	}
	fmt.Printf("ANSWER %d %s\n", resp.StatusCode, e.Code)
}

// b32dec decodes a secret part (lower-case base32, no padding).
func b32dec(s string) ([]byte, error) {
	return base32.StdEncoding.WithPadding(base32.NoPadding).DecodeString(strings.ToUpper(s))
}
