package main

// Root-only end-to-end test of the SSH fallback: a node whose UDP is blocked
// (nftables in its network namespace) serves its public service through an
// SSH reverse tunnel to the server's proxy, and returns to WireGuard once
// UDP works again.

import (
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/internal/netnstest"
)

// fallbackStatusJSON is `meshctl status --json` with the fallback state.
type fallbackStatusJSON struct {
	agentStatusJSON
	Fallback struct {
		Mode   string `json:"mode"`
		Active bool   `json:"active"`
		Since  string `json:"since"`
		Reason string `json:"reason"`
	} `json:"fallback"`
}

// TestSSHFallbackWhenUDPBlockedInNetns runs `meshctl server` in namespace a
// and a node (pi1) in namespace b whose outgoing UDP is dropped: the node
// falls back to SSH, the proxy serves pi1.localhost through the tunnel, and
// when the drop rule goes the node is back on WireGuard.
func TestSSHFallbackWhenUDPBlockedInNetns(t *testing.T) {
	needBinary(t)
	lab := netnstest.New(t, "a", "b")
	tools := labTools(t, "nft", "curl", "python3")
	if r := runInNS(t, lab, "b", 10*time.Second, tools["nft"], "list", "tables"); r.code != 0 {
		netnstest.SkipOrFail(t, "nftables does not work in a network namespace here:\n%s", r)
	}
	lab.Link("a", "b", netip.MustParsePrefix("198.18.0.1/24"), netip.MustParsePrefix("198.18.0.2/24"))
	testStart := time.Now()

	base := meshtest.ShortTempDir(t)
	dataDir := filepath.Join(base, "d")
	sb := filepath.Join(base, "pi1")
	const node = "pi1"

	srv := labProc(t, lab, "a", "", "server", "--data-dir", dataDir, "--listen", "198.18.0.1:7443",
		"--public-host", "198.18.0.1", "--domain", "localhost", "--http", "198.18.0.1:8080",
		"--wg-listen", ":51830", "--ssh-listen", "198.18.0.1:2222")
	stopGracefully(t, srv)
	eventually(t, agentDeadline, "the server's admin socket to answer", func() bool {
		if srv.exited() {
			t.Fatalf("meshctl server exited early (%v)\nstdout:\n%s\nstderr:\n%s", srv.err, srv.stdout, srv.stderr)
		}
		return meshctl(t, nil, "nodes", "list", "--data-dir", dataDir, "--json").code == 0
	})
	tc := createToken(t, dataDir)
	if tc.Coordinator != "https://198.18.0.1:7443" {
		t.Fatalf("token's coordinator = %q, want https://198.18.0.1:7443", tc.Coordinator)
	}
	if r := runInNS(t, lab, "b", 30*time.Second, meshctlBin, "enroll", "--coordinator", tc.Coordinator, "--token", tc.Token,
		"--ca-pin", tc.CAPin, "--name", node, "--state-dir", sb); r.code != 0 {
		t.Fatalf("enroll %s in b:\n%s", node, r)
	}

	// The backend: 127.0.0.1:8081 in b, published as the public "web".
	www := filepath.Join(base, "www")
	if err := os.Mkdir(www, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(www, "index.html"), []byte("hello from b"), 0o644); err != nil {
		t.Fatal(err)
	}
	web := labProc(t, lab, "b", tools["python3"], "-m", "http.server", "8081", "--bind", "127.0.0.1", "--directory", www)
	stopGracefully(t, web)
	curl := func(ns string, args ...string) result {
		t.Helper()
		return runInNS(t, lab, ns, 10*time.Second, tools["curl"], append([]string{"-s", "-m", "3"}, args...)...)
	}
	waitFor(t, agentDeadline, "the backend in b to answer", func() (bool, string) {
		if web.exited() {
			t.Fatalf("python3 -m http.server exited (%v)\nstderr:\n%s", web.err, web.stderr)
		}
		r := curl("b", "http://127.0.0.1:8081/")
		return r.stdout == "hello from b", r.String()
	})

	// Block every UDP packet leaving b (WireGuard to the proxy, and its
	// answers to the proxy's handshakes). TCP (API, SSH) still works.
	lab.Run(t, "b", tools["nft"], "add", "table", "inet", "mt")
	lab.Run(t, "b", tools["nft"], "add", "chain", "inet", "mt", "out", "{ type filter hook output priority 0; }")
	lab.Run(t, "b", tools["nft"], "add", "rule", "inet", "mt", "out", "meta", "l4proto", "udp", "drop")

	upStart := time.Now()
	up := labProc(t, lab, "b", "", "up", "--state-dir", sb, "--listen-port", "0",
		"--expose", "web=127.0.0.1:8081,public", "--fallback-timeout", "2s")
	stopGracefully(t, up)

	status := func() (fallbackStatusJSON, result, bool) {
		t.Helper()
		r := runInNS(t, lab, "b", 30*time.Second, meshctlBin, "status", "--state-dir", sb, "--json")
		var st fallbackStatusJSON
		if r.code != 0 {
			return st, r, false
		}
		decode(t, r, &st)
		return st, r, true
	}
	detail := func(r result) string {
		return r.String() + "\nagent:\n" + up.stderr.String() + "\nserver:\n" + srv.stderr.String()
	}
	var uapi string
	t.Cleanup(func() {
		// Left behind only by an agent killed with SIGKILL (a failure);
		// removed only when nothing answers on it.
		if uapi == "" || uapi == filepath.Join(sb, "wg.sock") {
			return
		}
		if c, err := net.Dial("unix", uapi); err == nil {
			c.Close()
			return
		}
		os.Remove(uapi)
	})

	var fellBackAfter, servedAfter time.Duration
	step(t, "FallBackToSSH", func(t *testing.T) {
		var st fallbackStatusJSON
		waitFor(t, 40*time.Second, "b's status to show the SSH fallback active", func() (bool, string) {
			if up.exited() {
				t.Fatalf("meshctl up exited (%v)\nstdout:\n%s\nstderr:\n%s", up.err, up.stdout, up.stderr)
			}
			var r result
			var ok bool
			st, r, ok = status()
			if ok {
				uapi = st.UAPISocket
			}
			return ok && st.Fallback.Active, detail(r)
		})
		fellBackAfter = time.Since(upStart)
		if st.Fallback.Mode != "auto" {
			t.Errorf("fallback.mode = %q, want auto (the default)", st.Fallback.Mode)
		}
		if !strings.Contains(st.Fallback.Reason, "UDP") {
			t.Errorf("fallback.reason = %q, want it to mention UDP", st.Fallback.Reason)
		}
		if since, err := time.Parse(time.RFC3339Nano, st.Fallback.Since); err != nil || since.Before(upStart.Add(-time.Minute)) || time.Until(since) > time.Minute {
			t.Errorf("fallback.since = %q, want the recent time it became active", st.Fallback.Since)
		}
		p, ok := st.peer("proxy")
		if !ok {
			t.Fatalf("b's status lists no peer named proxy: %+v", st.Peers)
		}
		// WireGuard to the proxy still works, through the relay on the
		// SSH connection.
		if p.Path != "relay" {
			t.Errorf("proxy peer path = %q while the fallback is active, want relay", p.Path)
		}
		if r := mustOK(t, nil, "status", "--state-dir", sb); !strings.Contains(r.stdout, "SSH fallback") {
			t.Errorf("status text does not mention the SSH fallback:\n%s", r)
		}
	})

	page := func(t *testing.T, within time.Duration, what string) {
		t.Helper()
		waitFor(t, within, what, func() (bool, string) {
			r := curl("a", "-H", "Host: "+node+".localhost", "http://198.18.0.1:8080/")
			return r.stdout == "hello from b", detail(r)
		})
	}
	step(t, "ServedThroughSSH", func(t *testing.T) {
		page(t, 40*time.Second, "http://pi1.localhost:8080/ (via 198.18.0.1) to serve b's page through SSH")
		servedAfter = time.Since(upStart)
		// Still on SSH: UDP has stayed blocked.
		if st, r, ok := status(); !ok || !st.Fallback.Active {
			t.Errorf("the fallback is no longer active with UDP still blocked:\n%s", detail(r))
		}
	})

	var recoveredAfter time.Duration
	step(t, "BackToWireGuard", func(t *testing.T) {
		lab.Run(t, "b", tools["nft"], "delete", "table", "inet", "mt")
		if out := lab.Run(t, "b", tools["nft"], "list", "tables"); strings.Contains(out, "mt") {
			t.Fatalf("table inet mt still present in b after delete:\n%s", out)
		}
		unblocked := time.Now()
		var st fallbackStatusJSON
		waitFor(t, 60*time.Second, "b's status to show the fallback inactive after UDP was unblocked", func() (bool, string) {
			if up.exited() {
				t.Fatalf("meshctl up exited (%v)\nstdout:\n%s\nstderr:\n%s", up.err, up.stdout, up.stderr)
			}
			var r result
			var ok bool
			st, r, ok = status()
			return ok && !st.Fallback.Active, detail(r)
		})
		recoveredAfter = time.Since(unblocked)
		if strings.Contains(st.Fallback.Reason, "blocked") {
			t.Errorf("fallback inactive with reason %q, want a WireGuard handshake", st.Fallback.Reason)
		}
		p, _ := st.peer("proxy")
		if p.Path != "direct" {
			t.Errorf("proxy peer path %q, want direct (a UDP probe answered)", p.Path)
		}
		if r := mustOK(t, nil, "status", "--state-dir", sb); strings.Contains(r.stdout, "SSH fallback") {
			t.Errorf("status text still mentions the SSH fallback:\n%s", r)
		}
		page(t, 20*time.Second, "http://pi1.localhost:8080/ to serve b's page over WireGuard")
		waitFor(t, 20*time.Second, "a WireGuard handshake with the proxy on the direct path", func() (bool, string) {
			st, r, ok := status()
			p, _ := st.peer("proxy")
			return ok && p.Path == "direct" && p.LastHandshake != "", detail(r)
		})
	})

	step(t, "Shutdown", func(t *testing.T) {
		if code := sigterm(t, up, 10*time.Second); code != 0 {
			t.Errorf("meshctl up exited %d on SIGTERM, want 0\nstderr:\n%s", code, up.stderr)
		}
		mustNotExist(t, filepath.Join(sb, "agent.sock"))
		if uapi != "" {
			mustNotExist(t, uapi)
		}
		if code := sigterm(t, srv, 15*time.Second); code != 0 {
			t.Errorf("meshctl server exited %d on SIGTERM, want 0\nstderr:\n%s", code, srv.stderr)
		}
	})
	t.Logf("fallback active %v after meshctl up, page through SSH after %v; back on WireGuard %v after UDP was unblocked; %v in all",
		fellBackAfter.Round(time.Millisecond), servedAfter.Round(time.Millisecond), recoveredAfter.Round(time.Millisecond), time.Since(testStart).Round(time.Millisecond))
}
