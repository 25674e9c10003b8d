package main

// Root-only end-to-end test of meshctl behind NAT (netnstest.NATLab): the
// server on a public segment, pi1 behind an endpoint-independent NAT
// (router pi1-nat), pi2 behind one that turns symmetric (pi2-nat), driven
// through the real binary: the proxy serves both, the nodes reach each
// other, paths are direct or relayed, UDP blocked falls back to SSH, a
// router restart and packet loss are survived, and the proxy's WireGuard
// peers are routed only to their own addresses.

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/internal/netnstest"
)

// natStatusJSON is `meshctl status --json` with the fields this test reads.
type natStatusJSON struct {
	Name       string `json:"name"`
	IPv4       string `json:"ipv4"`
	IPv6       string `json:"ipv6"`
	ListenPort int    `json:"listen_port"`
	UAPISocket string `json:"uapi_socket"`
	Peers      []struct {
		agentPeerJSON
		PathReason string `json:"path_reason"`
	} `json:"peers"`
	Fallback struct {
		Mode   string `json:"mode"`
		Active bool   `json:"active"`
		Reason string `json:"reason"`
	} `json:"fallback"`
}

func (s natStatusJSON) peer(name string) (agentPeerJSON, string, bool) {
	for _, p := range s.Peers {
		if p.Name == name {
			return p.agentPeerJSON, p.PathReason, true
		}
	}
	return agentPeerJSON{}, "", false
}

// tail is the end of a process's output, for failure messages.
func tail(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return "…" + s[len(s)-n:]
}

// TestNATLabEndToEnd: see the file comment. The steps build on each other.
func TestNATLabEndToEnd(t *testing.T) {
	needBinary(t)
	testStart := time.Now()
	lab := netnstest.NewNATLab(t,
		netnstest.SiteSpec{Name: "pi1", Mode: netnstest.EndpointIndependent},
		netnstest.SiteSpec{Name: "pi2", Mode: netnstest.EndpointIndependent})
	tools := labTools(t, "curl", "python3")
	nodes := []string{"pi1", "pi2"}
	ra, rb := lab.Sites["pi1"].Router, lab.Sites["pi2"].Router
	srvIP := lab.ServerAddr.String()
	const httpPort, webPort = "8080", "8081"

	base := meshtest.ShortTempDir(t)
	dataDir := filepath.Join(base, "d")
	proxyDir := filepath.Join(dataDir, "proxy") // where `meshctl server` keeps its proxy's identity
	stateDir := map[string]string{"pi1": filepath.Join(base, "pi1"), "pi2": filepath.Join(base, "pi2")}

	// UAPI sockets the agents made (in /var/run/wireguard as root): left
	// behind only by an agent killed with SIGKILL (a failure); removed
	// only when nothing answers on them. Registered first, so it runs
	// after the processes are gone.
	uapis := map[string]bool{}
	t.Cleanup(func() {
		for p := range uapis {
			if strings.HasPrefix(p, base) {
				continue
			}
			if c, err := net.Dial("unix", p); err == nil {
				c.Close()
				continue
			}
			os.Remove(p)
		}
	})

	srv := labProc(t, lab.Lab, lab.Server, "", "server", "--data-dir", dataDir, "--listen", srvIP+":7443",
		"--public-host", srvIP, "--domain", "localhost", "--http", srvIP+":"+httpPort,
		"--wg-listen", srvIP+":51830", "--ssh-listen", srvIP+":2222")
	stopGracefully(t, srv)
	eventually(t, agentDeadline, "the server's admin socket to answer", func() bool {
		if srv.exited() {
			t.Fatalf("meshctl server exited early (%v)\nstdout:\n%s\nstderr:\n%s", srv.err, srv.stdout, srv.stderr)
		}
		return meshctl(t, nil, "nodes", "list", "--data-dir", dataDir, "--json").code == 0
	})

	for _, n := range nodes {
		tc := createToken(t, dataDir)
		if tc.Coordinator != "https://"+srvIP+":7443" {
			t.Fatalf("token's coordinator = %q, want https://%s:7443", tc.Coordinator, srvIP)
		}
		if r := runInNS(t, lab.Lab, n, 30*time.Second, meshctlBin, "enroll", "--coordinator", tc.Coordinator, "--token", tc.Token,
			"--ca-pin", tc.CAPin, "--name", n, "--state-dir", stateDir[n]); r.code != 0 {
			t.Fatalf("enroll %s behind its NAT:\n%s", n, r)
		}
		// The backend: 127.0.0.1:8081 in the node's namespace.
		www := filepath.Join(base, "www-"+n)
		if err := os.Mkdir(www, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(www, "index.html"), []byte("hello from "+n), 0o644); err != nil {
			t.Fatal(err)
		}
		web := labProc(t, lab.Lab, n, tools["python3"], "-m", "http.server", webPort, "--bind", "127.0.0.1", "--directory", www)
		stopGracefully(t, web)
		waitFor(t, agentDeadline, "the backend in "+n+" to answer", func() (bool, string) {
			if web.exited() {
				t.Fatalf("python3 -m http.server in %s exited (%v)\nstderr:\n%s", n, web.err, web.stderr)
			}
			r := runInNS(t, lab.Lab, n, 10*time.Second, tools["curl"], "-s", "-m", "3", "http://127.0.0.1:"+webPort+"/")
			return r.stdout == "hello from "+n, r.String()
		})
	}

	agents := map[string]*proc{}
	startAgent := func(n string) {
		t.Helper()
		p := labProc(t, lab.Lab, n, "", "up", "--state-dir", stateDir[n], "--listen-port", "0",
			"--expose", "web=127.0.0.1:"+webPort+",public", "--fallback-timeout", "3s")
		stopGracefully(t, p)
		agents[n] = p
	}
	logs := func(t *testing.T) string {
		var b strings.Builder
		fmt.Fprintf(&b, "\nserver stderr:\n%s", tail(srv.stderr.String(), 6000))
		for _, n := range nodes {
			if p := agents[n]; p != nil {
				fmt.Fprintf(&b, "\n%s agent stderr:\n%s", n, tail(p.stderr.String(), 6000))
			}
		}
		for _, n := range nodes {
			fmt.Fprintf(&b, "\nrouter %s-nat mappings: %v", n, lab.Sites[n].Router.Mappings(t))
		}
		return b.String()
	}
	status := func(t *testing.T, n string) (natStatusJSON, result, bool) {
		t.Helper()
		r := meshctl(t, nil, "status", "--state-dir", stateDir[n], "--json")
		var st natStatusJSON
		if r.code != 0 {
			return st, r, false
		}
		decode(t, r, &st)
		if st.UAPISocket != "" {
			uapis[st.UAPISocket] = true
		}
		return st, r, true
	}
	checkAlive := func(t *testing.T) {
		t.Helper()
		if srv.exited() {
			t.Fatalf("meshctl server exited (%v)%s", srv.err, logs(t))
		}
		for n, p := range agents {
			if p.exited() {
				t.Fatalf("meshctl up of %s exited (%v)\nstdout:\n%s%s", n, p.err, p.stdout, logs(t))
			}
		}
	}
	// served fetches http://N.localhost:8080/ from the server's namespace
	// (curl --resolve, so the Host is the node's name).
	served := func(t *testing.T, n string, timeout string) result {
		host := n + ".localhost"
		return runInNS(t, lab.Lab, lab.Server, 30*time.Second, tools["curl"], "-s", "-S", "-m", timeout,
			"--resolve", host+":"+httpPort+":"+srvIP, "http://"+host+":"+httpPort+"/")
	}
	waitServed := func(t *testing.T, n string, within time.Duration, what string) time.Duration {
		t.Helper()
		start := time.Now()
		waitFor(t, within, what, func() (bool, string) {
			checkAlive(t)
			r := served(t, n, "3")
			return r.code == 0 && r.stdout == "hello from "+n, r.String() + logs(t)
		})
		return time.Since(start)
	}
	// reach fetches the peer's web service over the mesh with meshctl nc
	// from node from (one try, bounded).
	reach := func(from, to string, timeout time.Duration) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		defer cancel()
		cmd := exec.CommandContext(ctx, meshctlBin, "nc", "--state-dir", stateDir[from], to, webPort)
		cmd.Env = cleanEnv()
		cmd.Stdin = strings.NewReader("GET / HTTP/1.0\r\nHost: " + to + "\r\n\r\n")
		var stdout, stderr strings.Builder
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		if ctx.Err() != nil {
			err = fmt.Errorf("no answer within %v", timeout)
		}
		if err == nil && !strings.HasSuffix(stdout.String(), "hello from "+to) {
			err = fmt.Errorf("answered %q", stdout.String())
		}
		if err != nil {
			return stdout.String(), fmt.Errorf("meshctl nc %s %s from %s: %v: %s", to, webPort, from, err, strings.TrimSpace(stderr.String()))
		}
		return stdout.String(), nil
	}
	// waitReach polls reach until it works.
	waitReach := func(t *testing.T, from, to string, within time.Duration, what string) {
		t.Helper()
		var last error
		start := time.Now()
		waitFor(t, within, what, func() (bool, string) {
			checkAlive(t)
			_, last = reach(from, to, 5*time.Second)
			return last == nil, fmt.Sprint(last) + logs(t)
		})
		t.Logf("%s: works after %v", what, time.Since(start).Round(time.Millisecond))
	}
	// pathOf waits for from's status to report path want for peer to,
	// with a reason.
	pathOf := func(t *testing.T, from, to, want string, within time.Duration) time.Duration {
		t.Helper()
		start := time.Now()
		waitFor(t, within, fmt.Sprintf("%s's status to report path %q for peer %s", from, want, to), func() (bool, string) {
			checkAlive(t)
			st, r, ok := status(t, from)
			p, reason, found := st.peer(to)
			return ok && found && p.Path == want && reason != "", r.String() + logs(t)
		})
		st, _, _ := status(t, from)
		p, reason, _ := st.peer(to)
		t.Logf("%s → %s: path %q (%s), endpoint %q, after %v", from, to, p.Path, reason, p.Endpoint, time.Since(start).Round(time.Millisecond))
		return time.Since(start)
	}

	for _, n := range nodes {
		startAgent(n)
	}
	for _, n := range nodes {
		waitFor(t, agentDeadline, n+"'s agent to handshake with the proxy through its NAT", func() (bool, string) {
			checkAlive(t)
			st, r, ok := status(t, n)
			p, _, found := st.peer("proxy")
			return ok && found && p.LastHandshake != "", r.String() + logs(t)
		})
	}
	t.Logf("lab and mesh up after %v", time.Since(testStart).Round(time.Millisecond))

	// (a) The proxy serves both nodes by Host, through their NATs.
	step(t, "ServedThroughProxy", func(t *testing.T) {
		for _, n := range nodes {
			d := waitServed(t, n, agentDeadline, "http://"+n+".localhost:8080/ to serve "+n+"'s page")
			t.Logf("%s served through the proxy (%v)", n, d.Round(time.Millisecond))
		}
	})

	// (b) The nodes reach each other's service over the mesh (NAT
	// traversal or the relay).
	step(t, "NodesReachEachOther", func(t *testing.T) {
		waitReach(t, "pi1", "pi2", 30*time.Second, "pi1 reaching pi2's web over the mesh")
		waitReach(t, "pi2", "pi1", 30*time.Second, "pi2 reaching pi1's web over the mesh")
	})

	// (c) Paths: both NATs endpoint-independent → direct; pi2's turned
	// symmetric (and restarted, so its mappings are new) → relay.
	var relayAfter, servedAfterSymmetric time.Duration
	step(t, "PathDirect", func(t *testing.T) {
		pathOf(t, "pi1", "pi2", "direct", 30*time.Second)
		pathOf(t, "pi2", "pi1", "direct", 30*time.Second)
		waitReach(t, "pi1", "pi2", 20*time.Second, "pi1 reaching pi2 on the direct path")
	})
	step(t, "PathRelayBehindSymmetricNAT", func(t *testing.T) {
		rb.SetMode(t, netnstest.Symmetric)
		before := rb.Mappings(t)
		dropped := rb.Restart(t)
		t.Logf("router pi2-nat now symmetric; restart dropped %d tracked connections (mappings before: %v)", dropped, before)
		relayAfter = pathOf(t, "pi1", "pi2", "relay", 45*time.Second)
		waitReach(t, "pi1", "pi2", 30*time.Second, "pi1 reaching pi2 behind the symmetric NAT (relay)")
		// The proxy itself keeps serving pi2 through the symmetric NAT
		// (pi2's keepalive makes a new mapping; the proxy follows it).
		servedAfterSymmetric = waitServed(t, "pi2", 40*time.Second, "pi2 served through the proxy behind the symmetric NAT")
		t.Logf("pi2 served through the proxy %v after its router turned symmetric and restarted; mappings now %v",
			servedAfterSymmetric.Round(time.Millisecond), rb.Mappings(t))
	})

	// (d) UDP dropped at pi2's router: pi2 falls back to SSH and stays
	// served; then UDP works again and it returns to WireGuard.
	var fellBackAfter, sshServedAfter, backAfter time.Duration
	step(t, "SSHFallbackWhenUDPBlocked", func(t *testing.T) {
		rb.BlockUDP(t, true)
		blocked := time.Now()
		fallbackActive := func() (bool, string) {
			checkAlive(t)
			st, r, ok := status(t, "pi2")
			return ok && st.Fallback.Active, r.String() + logs(t)
		}
		waitFor(t, 45*time.Second, "pi2's status to show the SSH fallback active", fallbackActive)
		fellBackAfter = time.Since(blocked)
		st, _, _ := status(t, "pi2")
		if !strings.Contains(st.Fallback.Reason, "UDP") {
			t.Errorf("fallback.reason = %q, want it to mention UDP", st.Fallback.Reason)
		}
		waitServed(t, "pi2", 40*time.Second, "pi2 served through the proxy over SSH")
		sshServedAfter = time.Since(blocked)
		t.Logf("pi2 fell back to SSH %v after UDP was blocked; served through SSH after %v",
			fellBackAfter.Round(time.Millisecond), sshServedAfter.Round(time.Millisecond))
		if st, r, ok := status(t, "pi2"); !ok || !st.Fallback.Active {
			t.Errorf("the fallback is no longer active with UDP still blocked:\n%s", r)
		}
		waitReach(t, "pi1", "pi2", 30*time.Second, "pi1 reaching pi2 while pi2's UDP is blocked (relay)")

		rb.BlockUDP(t, false)
		unblocked := time.Now()
		waitFor(t, 60*time.Second, "pi2's fallback to end once UDP works again", func() (bool, string) {
			checkAlive(t)
			st, r, ok := status(t, "pi2")
			p, _, _ := st.peer("proxy")
			return ok && !st.Fallback.Active && p.LastHandshake != "", r.String() + logs(t)
		})
		backAfter = time.Since(unblocked)
		waitServed(t, "pi2", 20*time.Second, "pi2 served through the proxy over WireGuard again")
		t.Logf("pi2 back on WireGuard %v after UDP was unblocked", backAfter.Round(time.Millisecond))
	})

	// (e) Router A restarts: every mapping lost; the proxy serves pi1
	// again within 30 s.
	var recoveredAfter time.Duration
	step(t, "RouterRestart", func(t *testing.T) {
		waitServed(t, "pi1", 20*time.Second, "pi1 served before the restart")
		st, _, _ := status(t, "pi1")
		private := netip.AddrPortFrom(lab.Sites["pi1"].Addr, uint16(st.ListenPort))
		publicBefore := wgMapping(t, ra, private)
		dropped := ra.Restart(t)
		restarted := time.Now()
		justAfter := "none"
		if m := wgMapping(t, ra, private); m.IsValid() {
			justAfter = m.String()
		}
		first := served(t, "pi1", "3")
		waitServed(t, "pi1", 30*time.Second, "pi1 served through the proxy again after its router lost every mapping")
		recoveredAfter = time.Since(restarted)
		t.Logf("router pi1-nat restarted (%d tracked connections dropped; pi1's WireGuard port %d was mapped to %s, right after the restart to %s, now to %s); first request after it: exit %d; served again %v after the restart",
			dropped, private.Port(), publicBefore, justAfter, wgMapping(t, ra, private), first.code, recoveredAfter.Round(time.Millisecond))
	})

	// (f) 10% packet loss on pi1's private link: 50 sequential requests
	// through the proxy, no retries, all must succeed.
	var okUnderLoss int
	var lossTook time.Duration
	step(t, "PacketLoss", func(t *testing.T) {
		site := lab.Sites["pi1"]
		how := lab.Loss(t, "pi1", site.If, 10)
		defer lab.ClearLoss(t, "pi1", site.If)
		const n = 50
		var failures []string
		var slowest time.Duration
		start := time.Now()
		for i := 0; i < n; i++ {
			reqStart := time.Now()
			r := served(t, "pi1", "15")
			slowest = max(slowest, time.Since(reqStart))
			if r.code == 0 && r.stdout == "hello from pi1" {
				okUnderLoss++
			} else {
				failures = append(failures, fmt.Sprintf("request %d: exit %d, %q, %s", i+1, r.code, r.stdout, strings.TrimSpace(r.stderr)))
			}
		}
		lossTook = time.Since(start)
		t.Logf("10%% loss on pi1's %s (%s): %d/%d requests through the proxy succeeded in %v (slowest %v)",
			site.If, how, okUnderLoss, n, lossTook.Round(time.Millisecond), slowest.Round(time.Millisecond))
		if okUnderLoss != n {
			t.Errorf("%d/%d requests failed under 10%% loss (no retries):\n%s%s", n-okUnderLoss, n, strings.Join(failures, "\n"), logs(t))
		}
	})

	// (g) The proxy's WireGuard device routes to every peer exactly that
	// peer's own /32 and /128.
	step(t, "ProxyAllowedIPs", func(t *testing.T) {
		r := mustOK(t, nil, "wg", "show", "--state-dir", proxyDir)
		allowed := parseWGShowAllowedIPs(t, r.stdout)
		var proxySt natStatusJSON
		decode(t, mustOK(t, nil, "status", "--state-dir", proxyDir, "--json"), &proxySt)
		listed := listNodes(t, dataDir)
		var names []string
		for _, p := range proxySt.Peers {
			names = append(names, p.Name)
			want := []string{p.IPv4 + "/32", p.IPv6 + "/128"}
			got := allowed[p.PublicKey]
			slices.Sort(want)
			slices.Sort(got)
			if !slices.Equal(got, want) {
				t.Errorf("proxy peer %s: allowed ips %v, want exactly %v", p.Name, got, want)
			}
			if ln, ok := listed[p.Name]; !ok || ln.IPv4 != p.IPv4 || ln.IPv6 != p.IPv6 {
				t.Errorf("proxy peer %s has %s, %s; nodes list says %+v", p.Name, p.IPv4, p.IPv6, ln)
			}
		}
		slices.Sort(names)
		if !slices.Equal(names, nodes) {
			t.Errorf("proxy peers %v, want %v", names, nodes)
		}
		if len(allowed) != len(proxySt.Peers) {
			t.Errorf("wg show lists %d peers, status %d:\n%s", len(allowed), len(proxySt.Peers), r.stdout)
		}
	})

	step(t, "Shutdown", func(t *testing.T) {
		for _, n := range nodes {
			if code := sigterm(t, agents[n], 15*time.Second); code != 0 {
				t.Errorf("%s's agent exited %d on SIGTERM\nstderr:\n%s", n, code, agents[n].stderr)
			}
			mustNotExist(t, filepath.Join(stateDir[n], "agent.sock"))
		}
		if code := sigterm(t, srv, 15*time.Second); code != 0 {
			t.Errorf("meshctl server exited %d on SIGTERM\nstderr:\n%s", code, srv.stderr)
		}
	})
	t.Logf("summary: relay reported after %v; pi2 served behind the symmetric NAT after %v; SSH fallback after %v, served through SSH after %v, back on WireGuard %v after unblocking; pi1 served again %v after its router restarted; %d/50 requests under 10%% loss in %v; %v in all",
		relayAfter.Round(time.Millisecond), servedAfterSymmetric.Round(time.Millisecond),
		fellBackAfter.Round(time.Millisecond), sshServedAfter.Round(time.Millisecond), backAfter.Round(time.Millisecond),
		recoveredAfter.Round(time.Millisecond), okUnderLoss, lossTook.Round(time.Millisecond), time.Since(testStart).Round(time.Millisecond))
}

// wgMapping is the public address router r maps the private UDP source to
// (for the proxy's WireGuard port, 51830); invalid if none.
func wgMapping(t *testing.T, r *netnstest.Router, private netip.AddrPort) netip.AddrPort {
	t.Helper()
	for _, m := range r.Mappings(t) {
		if m.Proto == "udp" && m.Private == private && m.Remote.Port() == 51830 {
			return m.Public
		}
	}
	return netip.AddrPort{}
}

// parseWGShowAllowedIPs reads `meshctl wg show`: public key → allowed ips.
func parseWGShowAllowedIPs(t *testing.T, out string) map[string][]string {
	t.Helper()
	res := map[string][]string{}
	var peer string
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if k, ok := strings.CutPrefix(line, "peer: "); ok {
			peer = k
			res[peer] = nil
			continue
		}
		if v, ok := strings.CutPrefix(line, "allowed ips: "); ok && peer != "" {
			if v == "(none)" {
				continue
			}
			for _, s := range strings.Split(v, ", ") {
				if _, err := netip.ParsePrefix(s); err != nil {
					t.Fatalf("wg show: allowed ip %q: %v\n%s", s, err, out)
				}
				res[peer] = append(res[peer], s)
			}
		}
	}
	if len(res) == 0 {
		t.Fatalf("wg show lists no peers:\n%s", out)
	}
	return res
}
