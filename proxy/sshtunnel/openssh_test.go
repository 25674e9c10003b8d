package sshtunnel

import (
	"context"
	"encoding/pem"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/internal/syncbuf"
	"golang.org/x/crypto/ssh"
)

// sshBinary returns the stock OpenSSH client. It skips the test when there
// is none, except in CI as root, where the client is installed and its
// absence is a failure.
func sshBinary(t *testing.T) string {
	t.Helper()
	path := "/usr/bin/ssh"
	if _, err := os.Stat(path); err != nil {
		if p, err := exec.LookPath("ssh"); err == nil {
			return p
		}
		if os.Getenv("CI") == "true" && os.Geteuid() == 0 {
			t.Fatal("no OpenSSH client in CI (install openssh-client)")
		}
		t.Skip("no OpenSSH client")
	}
	return path
}

// syncBuffer is a log capture safe to read while it is written.
type syncBuffer = syncbuf.Buffer

// startOpenSSH runs "ssh -N -R remote" as node with a certificate from e's
// user CA, trusting host certificates of e's host CA. The returned channel
// yields the process's exit error once.
func startOpenSSH(t *testing.T, e *testEnv, node, remote string) (<-chan error, *syncBuffer) {
	t.Helper()
	bin := sshBinary(t)
	dir := t.TempDir()
	_, cert, priv := userCert(t, e.userCA, time.Now().Add(-time.Hour), time.Now().Add(time.Hour), node)
	block, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		t.Fatal(err)
	}
	key := filepath.Join(dir, "id_ed25519")
	kh := filepath.Join(dir, "known_hosts")
	files := map[string][]byte{
		key:               pem.EncodeToMemory(block),
		key + "-cert.pub": ssh.MarshalAuthorizedKey(cert),
		kh:                []byte("@cert-authority * " + string(ssh.MarshalAuthorizedKey(e.hostCA.PublicKey()))),
	}
	for name, b := range files {
		if err := os.WriteFile(name, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	host, port, _ := net.SplitHostPort(e.addr)
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, bin, "-F", "none",
		"-i", key, "-o", "CertificateFile="+key+"-cert.pub",
		"-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
		"-o", "UserKnownHostsFile="+kh, "-o", "GlobalKnownHostsFile=/dev/null",
		"-o", "StrictHostKeyChecking=yes", "-o", "UpdateHostKeys=no",
		"-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
		"-o", "ConnectTimeout=10",
		"-p", port, "-N", "-R", remote, node+"@"+host)
	stderr := &syncBuffer{}
	cmd.Stderr = stderr
	if err := cmd.Start(); err != nil {
		cancel()
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	done := make(chan struct{})
	go func() {
		exited <- cmd.Wait()
		close(done)
	}()
	t.Cleanup(func() {
		cancel() // kills ssh if still running
		<-done
	})
	return exited, stderr
}

func TestOpenSSHClient(t *testing.T) {
	sshBinary(t)
	e := newEnv(t, nil, nil)
	_, bport, _ := net.SplitHostPort(backend(t, "hello from pi1"))
	exited, stderr := startOpenSSH(t, e, "pi1", "pi1:80:127.0.0.1:"+bport)

	deadline := time.Now().Add(20 * time.Second)
	for !slices.Contains(e.srv.Forwards(), Forward{"pi1", "web"}) {
		select {
		case err := <-exited:
			t.Fatalf("ssh exited (%v) before forwarding:\n%s", err, stderr)
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("no forward from OpenSSH; ssh stderr:\n%s", stderr)
		}
		time.Sleep(10 * time.Millisecond)
	}
	e.wantForwards(Forward{"pi1", "web"})
	for range 2 {
		if body, err := httpGet(e.srv, "pi1", "web"); err != nil || body != "hello from pi1" {
			t.Fatalf("GET through OpenSSH = %q, %v; ssh stderr:\n%s", body, err, stderr)
		}
	}
}

func TestOpenSSHForwardFailure(t *testing.T) {
	sshBinary(t)
	e := newEnv(t, nil, nil)
	_, bport, _ := net.SplitHostPort(backend(t, "x"))
	for _, remote := range []string{"pi2:80", "other:80", "127.0.0.1:80", "localhost:80"} {
		exited, stderr := startOpenSSH(t, e, "pi1", remote+":127.0.0.1:"+bport)
		select {
		case err := <-exited:
			if err == nil {
				t.Errorf("-R %s: ssh exited 0, want a forward failure", remote)
			} else if !strings.Contains(stderr.String(), "forwarding failed") {
				t.Errorf("-R %s: ssh failed (%v) for another reason:\n%s", remote, err, stderr)
			}
		case <-time.After(20 * time.Second):
			t.Fatalf("-R %s: ssh still running: forward accepted?\n%s", remote, stderr)
		}
		e.wantForwards()
	}
}
