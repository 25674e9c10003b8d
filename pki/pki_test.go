package pki

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base32"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

var now = time.Now()

func newTestCA(t *testing.T) (*CA, string) {
	t.Helper()
	dir := t.TempDir()
	ca, created, err := LoadOrCreateCA(dir, now)
	if err != nil || !created {
		t.Fatalf("LoadOrCreateCA: created=%v err=%v", created, err)
	}
	return ca, dir
}

func TestCAPersistsWithPrivateFiles(t *testing.T) {
	ca, dir := newTestCA(t)
	for _, f := range []string{CACertFile, CAKeyFile} {
		st, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %04o, want 0600", f, st.Mode().Perm())
		}
	}
	again, created, err := LoadOrCreateCA(dir, now)
	if err != nil || created {
		t.Fatalf("reload: created=%v err=%v", created, err)
	}
	if again.Pin() != ca.Pin() {
		t.Fatalf("pin changed across reload: %s vs %s", again.Pin(), ca.Pin())
	}
	// Losing the certificate must not make a new CA silently.
	os.Remove(filepath.Join(dir, CACertFile))
	if _, _, err := LoadOrCreateCA(dir, now); err == nil {
		t.Fatal("CA key without certificate: want an error, got a CA")
	}
}

// TestCACreationSurvivesCrash: a first start cut short at any step of
// making the CA (key written as ca.key.new, certificate, rename) is
// finished or started over by the next one; it never leaves a key without
// its certificate, which would stop every later start.
func TestCACreationSurvivesCrash(t *testing.T) {
	ca, dir := newTestCA(t)
	cert, key := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	// Killed after the certificate, before the rename: finished, same CA.
	if err := os.Rename(key, key+".new"); err != nil {
		t.Fatal(err)
	}
	again, created, err := LoadOrCreateCA(dir, now)
	if err != nil || created || again.Pin() != ca.Pin() {
		t.Fatalf("after a crash before the rename: created=%v err=%v", created, err)
	}
	if _, err := os.Stat(key + ".new"); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("ca.key.new left: %v", err)
	}
	// Killed (or out of space) after the key, before the certificate: a
	// new CA; no node can trust the old one, it never served.
	os.Remove(cert)
	if err := os.Rename(key, key+".new"); err != nil {
		t.Fatal(err)
	}
	fresh, created, err := LoadOrCreateCA(dir, now)
	if err != nil || !created || fresh.Pin() == ca.Pin() {
		t.Fatalf("after a crash before the certificate: created=%v err=%v", created, err)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 2 {
		t.Fatalf("files left: %v", entries)
	}
}

func TestReadPrivateFileRefusesWideModes(t *testing.T) {
	_, dir := newTestCA(t)
	key := filepath.Join(dir, CAKeyFile)
	if err := os.Chmod(key, 0o644); err != nil {
		t.Fatal(err)
	}
	_, _, err := LoadOrCreateCA(dir, now)
	if !errors.Is(err, ErrInsecurePermissions) || !strings.Contains(err.Error(), "chmod 600") {
		t.Fatalf("want ErrInsecurePermissions with a fix hint, got %v", err)
	}
}

func TestPinFormat(t *testing.T) {
	ca, _ := newTestCA(t)
	pin := ca.Pin()
	if !strings.HasPrefix(pin, "sha256:") || len(pin) != len("sha256:")+64 {
		t.Fatalf("pin %q", pin)
	}
	if _, err := ParsePin(pin); err != nil {
		t.Fatal(err)
	}
	if _, err := ParsePin(strings.ToUpper(pin[7:])); err == nil {
		t.Error("pin without prefix accepted")
	}
	for _, bad := range []string{"", "sha256:", "sha256:zz", "sha256:" + strings.Repeat("a", 63), "md5:" + pin[7:]} {
		if _, err := ParsePin(bad); err == nil {
			t.Errorf("ParsePin(%q) accepted", bad)
		}
	}
}

// TestPinnedTLS runs a real TLS server with a CA-issued certificate and
// checks that only the right pin connects.
func TestPinnedTLS(t *testing.T) {
	ca, dir := newTestCA(t)
	cert, err := LoadOrCreateServerCert(dir, ca, []string{"localhost", "127.0.0.1"}, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok")) }))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{cert}}
	srv.StartTLS()
	defer srv.Close()

	get := func(cfg *tls.Config) error {
		c := &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}, Timeout: 5 * time.Second}
		resp, err := c.Get(srv.URL)
		if err == nil {
			resp.Body.Close()
		}
		return err
	}
	good, _ := ParsePin(ca.Pin())
	if err := get(PinnedTLSConfig(good)); err != nil {
		t.Fatalf("right pin refused: %v", err)
	}
	if err := get(CATLSConfig(ca.Cert)); err != nil {
		t.Fatalf("CA config refused: %v", err)
	}
	other, _ := newTestCA(t)
	bad, _ := ParsePin(other.Pin())
	err = get(PinnedTLSConfig(bad))
	if err == nil || !errors.Is(err, ErrPinMismatch) {
		t.Fatalf("wrong pin: want ErrPinMismatch, got %v", err)
	}
	if err := get(CATLSConfig(other.Cert)); err == nil {
		t.Fatal("other CA accepted")
	}
}

// A node's client certificate chains to the CA but must not pass as a
// server certificate.
func TestClientCertCannotServe(t *testing.T) {
	ca, _ := newTestCA(t)
	key, _ := GenerateKey()
	csr, _ := NewCSR(key, "ignored")
	leaf, err := ca.SignClientCSR(csr, "abc123", time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if leaf.Subject.CommonName != "abc123" {
		t.Fatalf("CN %q, want node id", leaf.Subject.CommonName)
	}
	if err := verifyLeaf([]*x509.Certificate{leaf}, ca.Cert); err == nil {
		t.Fatal("client certificate verified for server auth")
	}
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		tc := tls.Server(c, &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{leaf.Raw, ca.Cert.Raw}, PrivateKey: key}}})
		tc.Handshake()
		tc.Close()
	}()
	pin, _ := ParsePin(ca.Pin())
	d := tls.Dialer{Config: PinnedTLSConfig(pin)}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if c, err := d.DialContext(ctx, "tcp", ln.Addr().String()); err == nil {
		c.Close()
		t.Fatal("client certificate accepted as a server certificate")
	}
}

func TestServerCertReissuedForNewHosts(t *testing.T) {
	ca, dir := newTestCA(t)
	c1, err := LoadOrCreateServerCert(dir, ca, []string{"localhost"}, now)
	if err != nil {
		t.Fatal(err)
	}
	c2, _ := LoadOrCreateServerCert(dir, ca, []string{"localhost"}, now)
	if c1.Leaf.SerialNumber.Cmp(c2.Leaf.SerialNumber) != 0 {
		t.Error("certificate reissued although hosts unchanged")
	}
	c3, _ := LoadOrCreateServerCert(dir, ca, []string{"localhost", "mesh.example.com", "192.0.2.7"}, now)
	if c3.Leaf.VerifyHostname("mesh.example.com") != nil || c3.Leaf.VerifyHostname("192.0.2.7") != nil {
		t.Errorf("new hosts not covered: %v %v", c3.Leaf.DNSNames, c3.Leaf.IPAddresses)
	}
	c4, _ := LoadOrCreateServerCert(dir, ca, []string{"localhost"}, c3.Leaf.NotAfter.Add(-time.Hour))
	if c4.Leaf.SerialNumber.Cmp(c3.Leaf.SerialNumber) == 0 {
		t.Error("certificate near expiry not reissued")
	}
}

func TestCSRKeyTypes(t *testing.T) {
	if _, err := ParseCSR([]byte("garbage")); err == nil {
		t.Error("garbage CSR accepted")
	}
	key, _ := GenerateKey()
	csr, _ := NewCSR(key, "n")
	tampered := []byte(strings.Replace(string(csr), "A", "B", 1))
	if _, err := ParseCSR(tampered); err == nil {
		t.Error("tampered CSR accepted")
	}
}

func TestSecrets(t *testing.T) {
	s, id, h, err := NewSecret(KindEnroll)
	if err != nil {
		t.Fatal(err)
	}
	gotID, gotH, err := ParseSecret(KindEnroll, " "+s+"\n")
	if err != nil || gotID != id || !HashEqual(gotH, h) {
		t.Fatalf("round trip: %v %q %q", err, gotID, id)
	}
	if _, _, err := ParseSecret(KindAdmin, s); !errors.Is(err, ErrMalformedSecret) {
		t.Error("enroll token accepted as admin key")
	}
	_, _, h2, _ := NewSecret(KindEnroll)
	if HashEqual(h, h2) {
		t.Error("two secrets hash equal")
	}
	for _, bad := range []string{"", "meshctl-enroll-", s[:len(s)-1], s + "a", strings.ToUpper(s), strings.Replace(s, id, "zzzzzzzzzzzz", 1)} {
		if _, _, err := ParseSecret(KindEnroll, bad); err == nil {
			t.Errorf("ParseSecret(%q) accepted", bad)
		}
	}
}

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state.json")
	for _, content := range []string{"one", "two"} {
		if err := WriteFileAtomic(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(p)
		st, _ := os.Stat(p)
		if string(b) != content || st.Mode().Perm() != 0o600 {
			t.Fatalf("got %q mode %04o", b, st.Mode().Perm())
		}
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("temp files left behind: %v", entries)
	}
}

// Temp files that earlier versions left when killed mid-write
// (".NAME.tmp-DIGITS", copies of what may be secrets) go with the next
// write of NAME; nothing else does.
func TestWriteFileAtomicRemovesOldTemps(t *testing.T) {
	dir := t.TempDir()
	stale := []string{".node.json.tmp-1234567", ".node.json.tmp-9"}
	kept := []string{"node.json.tmp-1", ".node.json.tmp-", ".node.json.tmp-12a", ".netmap.json.tmp-42", ".node.json.tmp-x"}
	for _, name := range append(append([]string{}, stale...), kept...) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte("old secret"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, ".node.json.tmp-77"), 0o700); err != nil {
		t.Fatal(err)
	}
	kept = append(kept, ".node.json.tmp-77") // a directory: not ours to remove
	if err := WriteFileAtomic(filepath.Join(dir, "node.json"), []byte("new"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, name := range stale {
		if _, err := os.Lstat(filepath.Join(dir, name)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left behind (err %v)", name, err)
		}
	}
	for _, name := range kept {
		if _, err := os.Lstat(filepath.Join(dir, name)); err != nil {
			t.Errorf("%s removed: %v", name, err)
		}
	}
}

// TestWriteFileAtomicConcurrent: writers of one file take turns on its
// one temp file; every write succeeds, the file holds one whole write, and
// nothing is left beside it. A temp file left by a killed writer is reused.
func TestWriteFileAtomicConcurrent(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "state.json")
	// What a writer killed mid-write leaves: the temp file, half written.
	if err := os.WriteFile(filepath.Join(dir, ".state.json.tmp"), []byte("half a"), 0o600); err != nil {
		t.Fatal(err)
	}
	const writers, rounds = 16, 20
	errs := make(chan error, writers)
	for w := range writers {
		go func() {
			content := []byte(strings.Repeat(string(rune('a'+w)), 1000+w))
			for range rounds {
				if err := WriteFileAtomic(p, content, 0o600); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range writers {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(b) < 1000 || strings.Count(string(b), string(b[:1])) != len(b) || len(b) != 1000+int(b[0]-'a') {
		t.Fatalf("torn file: %d bytes starting %q", len(b), b[:min(len(b), 10)])
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("temp files left behind: %v", entries)
	}
}

func TestEnsurePrivateDir(t *testing.T) {
	d := filepath.Join(t.TempDir(), "a", "state")
	if err := EnsurePrivateDir(d); err != nil {
		t.Fatal(err)
	}
	os.Chmod(d, 0o755)
	if err := EnsurePrivateDir(d); err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(d)
	if st.Mode().Perm() != 0o700 {
		t.Fatalf("mode %04o", st.Mode().Perm())
	}
	f := filepath.Join(t.TempDir(), "file")
	os.WriteFile(f, nil, 0o600)
	if err := EnsurePrivateDir(f); err == nil {
		t.Fatal("file accepted as directory")
	}
}

func TestSSHCA(t *testing.T) {
	dir := t.TempDir()
	s1, err := LoadOrCreateSSHCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	s2, err := LoadOrCreateSSHCA(dir)
	if err != nil {
		t.Fatal(err)
	}
	if string(s1.PublicKey().Marshal()) != string(s2.PublicKey().Marshal()) {
		t.Fatal("SSH CA changed across reload")
	}
	st, _ := os.Stat(filepath.Join(dir, SSHCAKeyFile))
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %04o", st.Mode().Perm())
	}
}

// Every kind of secret carries at least 128 bits drawn at random: its
// secret part decodes to ≥ 16 bytes, no two of 1000 draws are alike, and
// every bit of it takes both values across the draws (a constant or
// stuck byte would not).
func TestSecretEntropy(t *testing.T) {
	for _, kind := range []string{KindEnroll, KindAdmin, KindAccess} {
		const draws = 1000
		seen := map[string]bool{}
		ids := map[string]bool{}
		var ones, zeros []int
		for range draws {
			s, id, _, err := NewSecret(kind)
			if err != nil {
				t.Fatal(err)
			}
			i := strings.LastIndexByte(s, '-')
			raw, err := base32.StdEncoding.WithPadding(base32.NoPadding).DecodeString(strings.ToUpper(s[i+1:]))
			if err != nil {
				t.Fatalf("%s: secret part of %q: %v", kind, s, err)
			}
			if len(raw) < 16 {
				t.Fatalf("%s: secret part of %q is %d bytes, want ≥ 16 (128 bits)", kind, s, len(raw))
			}
			if ones == nil {
				ones, zeros = make([]int, 8*len(raw)), make([]int, 8*len(raw))
			}
			for b := range ones {
				if raw[b/8]>>(b%8)&1 == 1 {
					ones[b]++
				} else {
					zeros[b]++
				}
			}
			if seen[string(raw)] {
				t.Fatalf("%s: secret drawn twice in %d draws", kind, draws)
			}
			seen[string(raw)] = true
			ids[id] = true
		}
		for b := range ones {
			if ones[b] == 0 || zeros[b] == 0 {
				t.Errorf("%s: bit %d of the secret was the same in all %d draws", kind, b, draws)
			}
		}
		// 48-bit ids: a collision in 1000 draws has a chance of about 2e-9.
		if len(ids) != draws {
			t.Errorf("%s: %d distinct ids in %d draws", kind, len(ids), draws)
		}
	}
}
