package node_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
	"golang.org/x/crypto/ssh"
)

func TestParseCoordinatorURL(t *testing.T) {
	good := map[string]string{
		"https://127.0.0.1:7443": "https://127.0.0.1:7443",
		"https://mesh.example/":  "https://mesh.example",
		"https://[::1]:7443":     "https://[::1]:7443",
	}
	for in, want := range good {
		if got, err := node.ParseCoordinatorURL(in); err != nil || got != want {
			t.Errorf("%q: got %q, %v", in, got, err)
		}
	}
	bad := map[string]string{
		"":                       "no coordinator URL",
		"http://127.0.0.1:7443":  "plain http",
		"ftp://x":                "https://HOST:PORT",
		"127.0.0.1:7443":         "https://HOST:PORT",
		"https://u:p@host:1":     "no path",
		"https://host:1/api?x=1": "no path",
	}
	for in, want := range bad {
		if _, err := node.ParseCoordinatorURL(in); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q: want error containing %q, got %v", in, want, err)
		}
	}
}

func TestStateFilesArePrivate(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	n := c.AddNode(t, "a")
	st, err := os.Stat(n.Dir)
	if err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("state dir: %v mode %04o, want 0700", err, st.Mode().Perm())
	}
	for _, f := range []string{node.StateFile, node.NetmapFile} {
		st, err := os.Stat(filepath.Join(n.Dir, f))
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v mode %04o, want 0600", f, err, st.Mode().Perm())
		}
	}
	b, _ := os.ReadFile(filepath.Join(n.Dir, node.StateFile))
	if strings.Contains(string(b), "meshctl-enroll-") {
		t.Fatal("the enrollment token was written to the state file")
	}
}

// TestAgentSocketsArePrivate: the control socket (in the 0700 state dir)
// and the WireGuard UAPI socket are 0600 even under a permissive umask;
// the UAPI socket is checked in a 0755 directory of its own, as
// /var/run/wireguard, where the directory does not protect it.
func TestAgentSocketsArePrivate(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	n := c.AddNode(t, "a")
	uapiDir := filepath.Join(t.TempDir(), "wireguard")
	if err := os.Mkdir(uapiDir, 0o755); err != nil {
		t.Fatal(err)
	}
	old := syscall.Umask(0o002) // a group-writable default, as on many desktops
	a := n.StartAgent(t, func(o *node.AgentOptions) { o.UAPIDir = uapiDir })
	syscall.Umask(old)
	st, err := os.Stat(n.Dir)
	if err != nil || st.Mode().Perm() != 0o700 {
		t.Fatalf("state dir: %v mode %04o, want 0700", err, st.Mode().Perm())
	}
	uapi, _ := filepath.Glob(filepath.Join(uapiDir, "*.sock"))
	if len(uapi) != 1 {
		t.Fatalf("UAPI sockets in %s: %q, want one", uapiDir, uapi)
	}
	for _, path := range []string{filepath.Join(n.Dir, node.ControlSocket), uapi[0]} {
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode()&os.ModeSocket == 0 || st.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want a socket with 0600", path, st.Mode())
		}
	}
	if _, err := a.Status(); err != nil { // the sockets are the live ones
		t.Fatal(err)
	}
}

// recordingFront is an HTTPS front for a coordinator, with a server
// certificate from the coordinator's own CA (which the pin accepts), that
// records every request as it arrived, body included, and forwards it.
// Upstream it presents the client certificate saved in stateDir (the
// node's current one), as the coordinator checks mTLS itself.
type recordingFront struct {
	srv  *httptest.Server
	mu   sync.Mutex
	reqs [][]byte // each request's dump: request line, headers, body
	seen []string // "METHOD path" of each
}

func newRecordingFront(t *testing.T, c *meshtest.Coordinator, stateDir string) *recordingFront {
	t.Helper()
	cert, err := c.CA().IssueServerCert([]string{"127.0.0.1"}, time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	target, err := url.Parse(c.URL())
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(c.CA().Cert)
	upstream := &http.Transport{
		DisableKeepAlives: true, // each request presents the certificate saved at that moment
		TLSClientConfig: &tls.Config{RootCAs: roots, GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			st, err := node.LoadState(stateDir)
			if err != nil {
				return &tls.Certificate{}, nil // enrolling: no identity yet
			}
			cert := st.ClientCert()
			return &cert, nil
		}},
	}
	rp := &httputil.ReverseProxy{
		Rewrite:   func(pr *httputil.ProxyRequest) { pr.SetURL(target) },
		Transport: upstream, FlushInterval: -1,
		ErrorLog: log.New(io.Discard, "", 0), // long-polls cut at the end
	}
	f := &recordingFront{}
	f.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		dump, err := httputil.DumpRequest(r, true) // reads the body and puts it back
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		f.mu.Lock()
		f.reqs = append(f.reqs, dump)
		f.seen = append(f.seen, r.Method+" "+r.URL.Path)
		f.mu.Unlock()
		rp.ServeHTTP(w, r)
	}))
	f.srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequestClientCert}
	f.srv.StartTLS()
	t.Cleanup(f.srv.Close)
	return f
}

func (f *recordingFront) saw(methodPath string) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Contains(f.seen, methodPath)
}

// secretsOf lists a state's private keys in the encodings a leak could
// take: the WireGuard key raw, base64 and hex; the TLS key as PEM, DER,
// base64 DER and raw scalar; the SSH key as PEM and raw seed.
func secretsOf(t *testing.T, st *node.State) map[string][]byte {
	t.Helper()
	wg := st.WireGuardKey()
	out := map[string][]byte{
		"WireGuard key (raw)":    wg[:],
		"WireGuard key (base64)": []byte(st.WireGuard),
		"WireGuard key (hex)":    []byte(hex.EncodeToString(wg[:])),
		"TLS key (PEM)":          []byte(st.TLSKey),
		"SSH key (PEM)":          []byte(st.SSHKey),
	}
	blk, _ := pem.Decode([]byte(st.TLSKey))
	if blk == nil {
		t.Fatal("TLS key: no PEM block")
	}
	out["TLS key (DER)"] = blk.Bytes
	out["TLS key (base64 DER)"] = []byte(base64.StdEncoding.EncodeToString(blk.Bytes))
	key, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	ec, ok := key.(*ecdsa.PrivateKey)
	if !ok {
		t.Fatalf("TLS key is %T", key)
	}
	scalar, err := ec.Bytes()
	if err != nil {
		t.Fatal(err)
	}
	out["TLS key (scalar)"] = scalar
	raw, err := ssh.ParseRawPrivateKey([]byte(st.SSHKey))
	if err != nil {
		t.Fatal(err)
	}
	ed, ok := raw.(*ed25519.PrivateKey)
	if !ok {
		t.Fatalf("SSH key is %T", raw)
	}
	out["SSH key (seed)"] = ed.Seed()
	out["SSH key (base64 seed)"] = []byte(base64.StdEncoding.EncodeToString(ed.Seed()))
	return out
}

// TestPrivateKeysNeverLeaveTheDevice (P1) puts a recording HTTPS front
// between a node and the coordinator for enrollment, a certificate
// renewal and an agent's netmap and update calls: no request carries a
// private key of the node, neither the enrollment's nor the renewed one.
func TestPrivateKeysNeverLeaveTheDevice(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	dir := filepath.Join(t.TempDir(), "a")
	f := newRecordingFront(t, c, dir)
	tok := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 1})
	enrolled, _, err := node.Enroll(t.Context(), node.EnrollOptions{
		Coordinator: f.srv.URL, Token: tok.Token, CAPin: c.CAPin(), Name: "a", StateDir: dir,
	})
	if err != nil {
		t.Fatalf("enroll through the front: %v", err)
	}
	cl, err := node.NewClient(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	if renewed, err := cl.RenewIfDue(t.Context(), time.Now(), true); err != nil || !renewed {
		t.Fatalf("renew through the front: %v %v", renewed, err)
	}
	a := (&meshtest.Node{Name: "a", Dir: dir}).StartAgent(t)
	meshtest.WaitFor(t, 10*time.Second, func() bool {
		st, err := a.Status()
		return err == nil && st.CoordinatorReachable && st.NetmapVersion > 0 && f.saw("POST "+wire.PathUpdate)
	}, "the agent to fetch a netmap and report through the front")
	for _, want := range []string{"POST " + wire.PathEnroll, "POST " + wire.PathRenew, "GET " + wire.PathNetmap} {
		if !f.saw(want) {
			t.Fatalf("the front never saw %s (it saw %q)", want, f.seen)
		}
	}
	final, err := node.LoadState(dir)
	if err != nil {
		t.Fatal(err)
	}
	if final.TLSKey == enrolled.TLSKey {
		t.Fatal("renewal kept the TLS key")
	}
	secrets := secretsOf(t, enrolled)
	for k, v := range secretsOf(t, final) {
		secrets["renewed "+k] = v
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	// The front sees the real bytes: the enrollment carries the public key.
	if pub := enrolled.WireGuardKey().PublicKey().String(); !bytes.Contains(f.reqs[0], []byte(pub)) {
		t.Fatalf("enrollment request without the WireGuard public key %s:\n%s", pub, f.reqs[0])
	}
	for i, req := range f.reqs {
		for what, secret := range secrets {
			if bytes.Contains(req, secret) {
				t.Errorf("request %d (%s) carries the %s", i, f.seen[i], what)
			}
		}
	}
	t.Logf("%d requests checked: %q", len(f.reqs), f.seen)
}

func TestCorruptOrExposedStateRefused(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	n := c.AddNode(t, "a")
	path := filepath.Join(n.Dir, node.StateFile)
	orig, _ := os.ReadFile(path)

	os.Chmod(path, 0o644)
	if _, err := node.LoadState(n.Dir); !errors.Is(err, pki.ErrInsecurePermissions) || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("0644 state file: %v", err)
	}
	os.Chmod(path, 0o600)

	for name, content := range map[string][]byte{
		"truncated":    orig[:len(orig)/2],
		"empty":        {},
		"not json":     []byte("hello"),
		"wrong format": []byte(strings.Replace(string(orig), `"format": 1`, `"format": 9`, 1)),
		"key mismatch": []byte(strings.Replace(string(orig), "tls_key", "tls_key_old", 1)),
	} {
		os.WriteFile(path, content, 0o600)
		_, err := node.LoadState(n.Dir)
		if err == nil || !strings.Contains(err.Error(), "corrupt") || !strings.Contains(err.Error(), path) {
			t.Errorf("%s state file: want a 'corrupt' error naming the file, got %v", name, err)
		}
	}
	// The identity was not replaced behind the user's back.
	os.WriteFile(path, orig[:10], 0o600)
	tok := c.CreateToken(t, wire.TokenCreateRequest{})
	_, _, err := node.Enroll(context.Background(), node.EnrollOptions{
		Coordinator: c.URL(), Token: tok.Token, CAPin: c.CAPin(), Name: "a2", StateDir: n.Dir,
	})
	if err == nil || !strings.Contains(err.Error(), "--force") {
		t.Fatalf("enroll over a corrupt state without --force: %v", err)
	}
}

func TestReenrollNeedsForce(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	n := c.AddNode(t, "a")
	tok := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 2})
	opts := node.EnrollOptions{Coordinator: c.URL(), Token: tok.Token, CAPin: c.CAPin(), Name: "b", StateDir: n.Dir}
	_, _, err := node.Enroll(context.Background(), opts)
	if err == nil || !strings.Contains(err.Error(), "already enrolled") {
		t.Fatalf("re-enroll without --force: %v", err)
	}
	opts.Force = true
	st, _, err := node.Enroll(context.Background(), opts)
	if err != nil {
		t.Fatal(err)
	}
	again, err := node.LoadState(n.Dir)
	if err != nil || again.Name != "b" || again.NodeID == n.State.NodeID || again.WireGuard == n.State.WireGuard {
		t.Fatalf("forced re-enroll did not replace the identity: %+v %v (new %s)", again, err, st.Name)
	}
}

func TestMissingPinRefusedForPrivateCA(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	tok := c.CreateToken(t, wire.TokenCreateRequest{})
	dir := filepath.Join(t.TempDir(), "n")
	_, _, err := node.Enroll(context.Background(), node.EnrollOptions{Coordinator: c.URL(), Token: tok.Token, Name: "a", StateDir: dir})
	if err == nil || !strings.Contains(err.Error(), "--ca-pin") {
		t.Fatalf("no pin against a private CA: %v", err)
	}
	if _, err := node.LoadState(dir); !errors.Is(err, node.ErrNotEnrolled) {
		t.Fatalf("a refused enrollment left state behind: %v", err)
	}
}

func TestSSHIdentityFiles(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	n := c.AddNode(t, "a")
	for _, f := range []string{"id_ed25519", "id_ed25519-cert.pub", "ssh_ca.pub"} {
		st, err := os.Stat(filepath.Join(n.Dir, node.SSHDir, f))
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v mode %v", f, err, st)
		}
	}
	key, _ := os.ReadFile(filepath.Join(n.Dir, node.SSHDir, "id_ed25519"))
	signer, err := ssh.ParsePrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	certText, _ := os.ReadFile(filepath.Join(n.Dir, node.SSHDir, "id_ed25519-cert.pub"))
	pub, _, _, _, err := ssh.ParseAuthorizedKey(certText)
	if err != nil || string(pub.(*ssh.Certificate).Key.Marshal()) != string(signer.PublicKey().Marshal()) {
		t.Fatalf("the certificate file does not certify the key file: %v", err)
	}
	// Renewal renews the SSH certificate with the TLS one.
	before := pub.(*ssh.Certificate).ValidBefore
	c.Clock.Advance(time.Hour)
	if _, err := n.Client.RenewIfDue(context.Background(), c.Clock.Now(), true); err != nil {
		t.Fatal(err)
	}
	certText, _ = os.ReadFile(filepath.Join(n.Dir, node.SSHDir, "id_ed25519-cert.pub"))
	pub, _, _, _, _ = ssh.ParseAuthorizedKey(certText)
	if pub.(*ssh.Certificate).ValidBefore <= before {
		t.Fatal("SSH certificate not renewed with the TLS certificate")
	}
}
