package node_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
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
