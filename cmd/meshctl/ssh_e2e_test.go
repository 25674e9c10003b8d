package main

import (
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/internal/meshtest"
)

// TestStockOpenSSHFallback: a device with only OpenSSH (here: an enrolled
// node that runs no agent) is reachable through the proxy with the command
// `meshctl ssh-config` prints, verified through the coordinator's SSH CA.
func TestStockOpenSSHFallback(t *testing.T) {
	needBinary(t)
	if _, err := exec.LookPath("ssh"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("ssh (openssh-client) is missing; .ci/run installs it")
		}
		t.Skip("ssh (openssh-client) not installed")
	}
	dir := meshtest.ShortTempDir(t)
	srv := startServer(t, filepath.Join(dir, "d"), freePort(t))
	state := filepath.Join(dir, "pi1")
	enrollNode(t, srv.dataDir, "pi1", state)
	backend := strings.TrimPrefix(startBackend(t, "hello through ssh"), "http://")

	out := mustOK(t, nil, "ssh-config", "--state-dir", state, "--expose", "web="+backend+",public").stdout
	var cmdline string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "ssh ") {
			cmdline = l
		}
	}
	if cmdline == "" || !strings.Contains(out, "@cert-authority [127.0.0.1]:") || !strings.Contains(cmdline, "-R pi1:80:"+backend) {
		t.Fatalf("ssh-config output:\n%s", out)
	}
	ssh := startSSH(t, "", cmdline)
	eventually(t, 20*time.Second, "pi1 served through the stock ssh tunnel", func() bool {
		code, body := proxyGet(srv, "pi1.localhost")
		return code == 200 && body == "hello through ssh"
	})

	// Revoking the node closes the tunnel: ssh exits, the page is 404.
	mustOK(t, nil, "nodes", "revoke", "--data-dir", srv.dataDir, "pi1")
	ssh.waitExit(t, 10*time.Second)
	if code, _ := proxyGet(srv, "pi1.localhost"); code != http.StatusNotFound {
		t.Fatalf("revoked node: %d, want 404", code)
	}
}

// sshProc is a stock ssh client running a printed command.
type sshProc struct {
	cmd    *exec.Cmd
	stderr *strings.Builder
}

// startSSH runs a printed `ssh …` command line (in dir, if set) with no
// user config and no prompts; it is killed at cleanup.
func startSSH(t *testing.T, dir, cmdline string) *sshProc {
	t.Helper()
	args := append([]string{"-F", "none", "-o", "BatchMode=yes"}, strings.Fields(cmdline)[1:]...)
	p := &sshProc{cmd: exec.Command("ssh", args...), stderr: &strings.Builder{}}
	p.cmd.Dir = dir
	p.cmd.Stderr = p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.cmd.Process.Kill(); p.cmd.Wait() })
	return p
}

// waitExit fails the test unless ssh exits within d.
func (p *sshProc) waitExit(t *testing.T, d time.Duration) {
	t.Helper()
	exited := make(chan error, 1)
	go func() { exited <- p.cmd.Wait() }()
	select {
	case <-exited:
	case <-time.After(d):
		t.Fatalf("ssh still connected; stderr:\n%s", p.stderr.String())
	}
}

// proxyGet fetches / from the server's proxy with the Host header host.
func proxyGet(srv *server, host string) (int, string) {
	client := &http.Client{Timeout: 5 * time.Second}
	req, _ := http.NewRequest(http.MethodGet, "http://"+srv.http+"/", nil)
	req.Host = host
	resp, err := client.Do(req)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestSSHOnlyNode: a device with only OpenSSH (no meshctl at all) is added
// by an admin with `meshctl nodes add-ssh`, and reachable through the proxy
// with the command it prints; revocation ends it.
func TestSSHOnlyNode(t *testing.T) {
	needBinary(t)
	for _, tool := range []string{"ssh", "ssh-keygen"} {
		if _, err := exec.LookPath(tool); err != nil {
			if os.Getenv("CI") == "true" {
				t.Fatalf("%s (openssh-client) is missing; .ci/run installs it", tool)
			}
			t.Skipf("%s not installed", tool)
		}
	}
	dir := meshtest.ShortTempDir(t)
	srv := startServer(t, filepath.Join(dir, "d"), freePort(t))
	dev := filepath.Join(dir, "dev")
	os.MkdirAll(dev, 0o700)
	key := filepath.Join(dev, "id_ed25519")
	if out, err := exec.Command("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "cam1", "-f", key).CombinedOutput(); err != nil {
		t.Fatalf("ssh-keygen: %v\n%s", err, out)
	}
	out := mustOK(t, nil, "nodes", "add-ssh", "--data-dir", srv.dataDir, "--ssh-pubkey", key+".pub", "--service", "web", "cam1").stdout
	lines := strings.Split(out, "\n")
	var cert, kh, cmdline string
	for _, l := range lines {
		switch {
		case strings.HasPrefix(l, "ssh-ed25519-cert-v01@openssh.com "):
			cert = l
		case strings.HasPrefix(l, "@cert-authority "):
			kh = l
		case strings.HasPrefix(strings.TrimSpace(l), "ssh -i "):
			cmdline = strings.TrimSpace(l)
		}
	}
	if cert == "" || kh == "" || cmdline == "" {
		t.Fatalf("add-ssh output lacks the certificate, known_hosts line or command:\n%s", out)
	}
	os.WriteFile(key+"-cert.pub", []byte(cert+"\n"), 0o600)
	os.WriteFile(filepath.Join(dev, "known_hosts"), []byte(kh+"\n"), 0o600)
	mustOK(t, nil, "nodes", "set-public", "--data-dir", srv.dataDir, "cam1", "web")
	list := mustOK(t, nil, "nodes", "list", "--data-dir", srv.dataDir, "--json").stdout
	if !strings.Contains(list, `"cam1"`) || !strings.Contains(list, `"ssh"`) {
		t.Fatalf("nodes list lacks the SSH-only node:\n%s", list)
	}

	backend := strings.TrimPrefix(startBackend(t, "hello from cam1"), "http://")
	cmdline = strings.Replace(cmdline, "localhost:80 ", backend+" ", 1)
	ssh := startSSH(t, dev, cmdline) // the command names known_hosts relative to the device's directory
	eventually(t, 20*time.Second, "cam1 served through stock ssh", func() bool {
		code, body := proxyGet(srv, "cam1.localhost")
		return code == 200 && body == "hello from cam1"
	})
	mustOK(t, nil, "nodes", "revoke", "--data-dir", srv.dataDir, "cam1")
	ssh.waitExit(t, 10*time.Second)
	if code, _ := proxyGet(srv, "cam1.localhost"); code != http.StatusNotFound {
		t.Fatalf("revoked SSH-only node: %d, want 404", code)
	}
}
