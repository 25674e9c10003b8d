package main

// Outages and restarts, driven through the real binary on loopback (no
// root): a `meshctl server` (coordinator + embedded proxy), a standalone
// `meshctl proxy serve` ("edge") and three nodes. TestChaosLoopback kills
// the coordinator for a while (20 s here, 3 min with MESHCTL_SOAK=1) and
// checks that the data plane keeps working from the last netmap — the edge
// proxy serves every node, nodes reach each other, a proxy and a node
// restarted meanwhile come back from their caches — then brings it back
// and checks the resync without re-enrollment (identities unchanged, a
// revocation and a new node reach everyone). Then it restarts the proxies
// and a node with the coordinator up, and moves a node to another UDP
// port, timing each recovery. docs/reliability.md reports the figures.

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshctl/meshctl/internal/meshtest"
)

// soak reports whether the long versions of the chaos and load tests were
// asked for (MESHCTL_SOAK=1).
func soak() bool { return os.Getenv("MESHCTL_SOAK") == "1" }

// outageDuration is how long TestChaosLoopback keeps the coordinator down.
func outageDuration() time.Duration {
	if soak() {
		return 3 * time.Minute
	}
	return 20 * time.Second
}

// startServerAt runs `meshctl server` on fixed addresses (so that a restart
// comes back where the nodes expect it) and waits for its admin socket.
// The process belongs to owner (its cleanup ends it): a subtest that
// restarts the server passes its parent.
func startServerAt(owner, t *testing.T, env []string, dataDir, addr, httpAddr, sshAddr, wgAddr string) *server {
	t.Helper()
	p := start(owner, env, "server", "--data-dir", dataDir, "--listen", addr, "--public-host", "127.0.0.1",
		"--http", httpAddr, "--wg-listen", wgAddr, "--ssh-listen", sshAddr)
	stopGracefully(owner, p)
	eventually(t, agentDeadline, "the server's admin socket to answer", func() bool {
		if p.exited() {
			t.Fatalf("meshctl server exited early (%v)\nstdout:\n%s\nstderr:\n%s", p.err, p.stdout, p.stderr)
		}
		return meshctl(t, nil, "nodes", "list", "--data-dir", dataDir, "--json").code == 0
	})
	return &server{proc: p, dataDir: dataDir, addr: addr, http: httpAddr, ssh: sshAddr}
}

// ncFetch sends an HTTP/1.0 GET to peer's port over the mesh with `meshctl
// nc` from the agent of stateDir (one try, bounded) and checks the answer
// ends with want.
func ncFetch(stateDir, peer, port, want string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, meshctlBin, "nc", "--state-dir", stateDir, peer, port)
	cmd.Env = cleanEnv()
	cmd.Stdin = strings.NewReader("GET / HTTP/1.0\r\nHost: " + peer + "\r\n\r\n")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	switch {
	case ctx.Err() != nil:
		return fmt.Errorf("meshctl nc %s %s: no answer within %v", peer, port, timeout)
	case err != nil:
		return fmt.Errorf("meshctl nc %s %s: %v: %s", peer, port, err, strings.TrimSpace(stderr.String()))
	case !strings.HasSuffix(stdout.String(), want):
		return fmt.Errorf("meshctl nc %s %s: answered %q, want it to end with %q", peer, port, stdout.String(), want)
	}
	return nil
}

// chaosNode is one `meshctl up` of the chaos tests. Its processes belong
// to owner, the top-level test (subtests restart it).
type chaosNode struct {
	owner           *testing.T
	name, dir, port string // port: its fixed WireGuard UDP port
	backend         string // 127.0.0.1:PORT of its published "web"
	svcPort         string // the service's port on the mesh (the backend's)
	up              *proc
}

func (n *chaosNode) start(t *testing.T) {
	t.Helper()
	n.up = start(n.owner, nil, "up", "--state-dir", n.dir, "--listen-port", n.port, "--expose", "web="+n.backend+",public")
	stopGracefully(n.owner, n.up)
	waitAgentUp(t, n.up, n.dir)
}

// stop ends the agent with SIGTERM and checks it exited 0.
func (n *chaosNode) stop(t *testing.T) {
	t.Helper()
	if code := sigterm(t, n.up, 15*time.Second); code != 0 {
		t.Fatalf("%s's agent exited %d on SIGTERM\nstderr:\n%s", n.name, code, n.up.stderr)
	}
}

func newChaosNode(owner, t *testing.T, base, dataDir, name string) *chaosNode {
	t.Helper()
	b := startBackend(owner, "hello from "+name)
	_, svcPort, err := net.SplitHostPort(b)
	if err != nil {
		t.Fatal(err)
	}
	n := &chaosNode{owner: owner, name: name, dir: filepath.Join(base, name), port: freeUDPPort(t), backend: b, svcPort: svcPort}
	enrollNode(t, dataDir, name, n.dir)
	return n
}

// edgeProxy is a standalone `meshctl proxy serve`, owned by owner.
type edgeProxy struct {
	owner     *testing.T
	dir, http string
	args      []string
	p         *proc
}

func (e *edgeProxy) start(t *testing.T, extra ...string) {
	t.Helper()
	e.p = start(e.owner, nil, append(append([]string{"proxy", "serve"}, e.args...), extra...)...)
	stopGracefully(e.owner, e.p)
}

// chaosIdentity is what must not change across outages and restarts: the state
// file byte for byte, and the key and addresses the agent reports.
func chaosIdentity(t *testing.T, stateDir string) string {
	t.Helper()
	st, r, ok := agentStatusOf(t, stateDir)
	if !ok {
		t.Fatalf("status of %s:\n%s", stateDir, r)
	}
	return fmt.Sprintf("key %s, %s, %s, node.json %x", st.PublicKey, st.IPv4, st.IPv6, readFile(t, filepath.Join(stateDir, "node.json")))
}

func TestChaosLoopback(t *testing.T) {
	needBinary(t)
	testStart := time.Now()
	base := meshtest.ShortTempDir(t)
	dataDir := filepath.Join(base, "d")
	srvAddr := net.JoinHostPort("127.0.0.1", freePort(t))
	httpAddr := net.JoinHostPort("127.0.0.1", freePort(t))
	sshAddr := net.JoinHostPort("127.0.0.1", freePort(t))
	wgAddr := net.JoinHostPort("127.0.0.1", freeUDPPort(t))
	parent := t
	srv := startServerAt(parent, t, nil, dataDir, srvAddr, httpAddr, sshAddr, wgAddr)

	nodes := map[string]*chaosNode{}
	for _, name := range []string{"pi1", "pi2", "pi3"} {
		nodes[name] = newChaosNode(parent, t, base, dataDir, name)
	}
	for _, name := range []string{"pi1", "pi2", "pi3"} {
		nodes[name].start(t)
	}
	pi1, pi2, pi3 := nodes["pi1"], nodes["pi2"], nodes["pi3"]

	// The edge proxy: its own identity (a proxy token), no SSH server.
	tc := createToken(t, dataDir, "--role", "proxy")
	edge := &edgeProxy{owner: t, dir: filepath.Join(base, "edge"), http: net.JoinHostPort("127.0.0.1", freePort(t))}
	edge.args = []string{"--state-dir", edge.dir, "--domain", "localhost", "--http", edge.http,
		"--wg-listen", net.JoinHostPort("127.0.0.1", freeUDPPort(t)), "--ssh-listen", ""}
	edge.start(t, "--coordinator", tc.Coordinator, "--token", tc.Token, "--ca-pin", tc.CAPin, "--name", "edge")

	c := newProxyClient(t, nil)
	logs := func() string {
		var b strings.Builder
		fmt.Fprintf(&b, "\nserver stderr:\n%s\nedge stderr:\n%s", tail(srv.stderr.String(), 4000), tail(edge.p.stderr.String(), 4000))
		for _, name := range []string{"pi1", "pi2", "pi3"} {
			if n := nodes[name]; n.up != nil {
				fmt.Fprintf(&b, "\n%s stderr:\n%s", name, tail(n.up.stderr.String(), 3000))
			}
		}
		return b.String()
	}
	// page fetches http://NODE.localhost/ from proxy (HOST:PORT) once.
	page := func(proxyAddr, name string) error {
		_, port, _ := net.SplitHostPort(proxyAddr)
		st, body, err := get(c, "http://"+name+".localhost:"+port+"/", nil)
		if err != nil {
			return err
		}
		if st != 200 || body != "hello from "+name {
			return fmt.Errorf("%s via %s: %d %q", name, proxyAddr, st, body)
		}
		return nil
	}
	// waitServed polls page until it works and returns how long it took.
	waitServed := func(t *testing.T, proxyAddr, name string, within time.Duration, what string) time.Duration {
		t.Helper()
		start := time.Now()
		waitFor(t, within, what, func() (bool, string) {
			err := page(proxyAddr, name)
			if err != nil && time.Since(start) > within-time.Second {
				// Near the deadline: both ends' WireGuard devices too.
				r1 := meshctl(t, nil, "wg", "show", "--state-dir", filepath.Join(dataDir, "proxy"))
				r2 := meshctl(t, nil, "wg", "show", "--state-dir", nodes[name].dir)
				return false, fmt.Sprint(err) + "\n" + r1.stdout + r2.stdout + logs()
			}
			return err == nil, fmt.Sprint(err) + logs()
		})
		return time.Since(start)
	}
	waitReach := func(t *testing.T, from, to *chaosNode, within time.Duration) time.Duration {
		t.Helper()
		start := time.Now()
		waitFor(t, within, from.name+" to reach "+to.name+" over the mesh", func() (bool, string) {
			err := ncFetch(from.dir, to.name, to.svcPort, "hello from "+to.name, 5*time.Second)
			return err == nil, fmt.Sprint(err) + logs()
		})
		return time.Since(start)
	}
	reachable := func(t *testing.T, stateDir string) (bool, string) {
		st, r, ok := agentStatusOf(t, stateDir)
		return ok && st.CoordinatorReachable, r.String()
	}

	for _, name := range []string{"pi1", "pi2", "pi3"} {
		waitServed(t, edge.http, name, agentDeadline, "the edge proxy to serve "+name)
		waitServed(t, srv.http, name, agentDeadline, "the embedded proxy to serve "+name)
	}
	waitReach(t, pi1, pi2, agentDeadline)
	waitReach(t, pi2, pi1, agentDeadline)
	ids := map[string]string{}
	for _, dir := range []string{pi1.dir, pi2.dir, pi3.dir, edge.dir} {
		ids[dir] = chaosIdentity(t, dir)
	}
	t.Logf("mesh up after %v", time.Since(testStart).Round(time.Millisecond))

	// The embedded proxy's WireGuard UAPI socket (in /var/run/wireguard
	// as root) outlives a SIGKILL; removed at the end if nothing answers.
	var proxySt agentStatusJSON
	decode(t, mustOK(t, nil, "status", "--state-dir", filepath.Join(dataDir, "proxy"), "--json"), &proxySt)
	if u := proxySt.UAPISocket; u != "" && !strings.HasPrefix(u, base) {
		t.Cleanup(func() {
			if c, err := net.Dial("unix", u); err == nil {
				c.Close()
				return
			}
			os.Remove(u)
		})
	}

	// (a) The coordinator (and with it the embedded proxy) is killed.
	// For the whole outage: every node through the edge proxy, and pi1 →
	// pi2 over the mesh, paced at one round every 250 ms; nothing may fail.
	outage := outageDuration()
	var served, lost, meshOK, meshLost int
	step(t, "CoordinatorDown", func(t *testing.T) {
		if err := srv.cmd.Process.Signal(syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		<-srv.done
		waitFor(t, 2*agentDeadline, "pi1 and the edge proxy to notice the coordinator is gone", func() (bool, string) {
			a, ra := reachable(t, pi1.dir)
			b, rb := reachable(t, edge.dir)
			return !a && !b, ra + rb
		})
		var failures []string
		pace := time.NewTicker(250 * time.Millisecond)
		defer pace.Stop()
		for end := time.Now().Add(outage); time.Now().Before(end); <-pace.C {
			for _, name := range []string{"pi1", "pi2", "pi3"} {
				if err := page(edge.http, name); err != nil {
					lost++
					failures = append(failures, err.Error())
				} else {
					served++
				}
			}
			if err := ncFetch(pi1.dir, "pi2", pi2.svcPort, "hello from pi2", 5*time.Second); err != nil {
				meshLost++
				failures = append(failures, err.Error())
			} else {
				meshOK++
			}
		}
		t.Logf("coordinator down for %v: %d requests through the edge proxy served, %d failed; pi1 → pi2 over the mesh %d ok, %d failed",
			outage, served, lost, meshOK, meshLost)
		if lost+meshLost > 0 || served == 0 || meshOK == 0 {
			t.Errorf("with the coordinator down: %d/%d proxy requests and %d/%d mesh requests failed:\n%s%s",
				lost, served+lost, meshLost, meshOK+meshLost, strings.Join(failures[:min(len(failures), 20)], "\n"), logs())
		}
	})

	// (b) Still down: the edge proxy and pi2 restart and come back from
	// their cached netmaps.
	var edgeDownRestart, nodeDownRestart, nodeDownReach time.Duration
	step(t, "RestartsDuringOutage", func(t *testing.T) {
		if code := sigterm(t, edge.p, 15*time.Second); code != 0 {
			t.Fatalf("edge proxy exited %d on SIGTERM\nstderr:\n%s", code, edge.p.stderr)
		}
		restarted := time.Now()
		edge.start(t)
		waitFor(t, 30*time.Second, "the restarted edge proxy to serve pi1 with the coordinator down", func() (bool, string) {
			if edge.p.exited() {
				t.Fatalf("the edge proxy exited with the coordinator down (%v)\nstderr:\n%s", edge.p.err, edge.p.stderr)
			}
			err := page(edge.http, "pi1")
			return err == nil, fmt.Sprint(err) + logs()
		})
		edgeDownRestart = time.Since(restarted)
		for _, name := range []string{"pi2", "pi3"} {
			waitServed(t, edge.http, name, 10*time.Second, "the restarted edge proxy to serve "+name)
		}

		pi2.stop(t)
		restarted = time.Now()
		pi2.start(t)
		waitServed(t, edge.http, "pi2", 30*time.Second, "the edge proxy to serve pi2 after its agent restarted")
		nodeDownRestart = time.Since(restarted)
		// pi1 still holds its WireGuard session with pi2's old process;
		// pi2 handshakes as soon as pi1's data arrives under it
		// (node/pathbind/stale.go), where WireGuard alone would wait until
		// pi1's timers gave up on the session (~15 s).
		waitReach(t, pi1, pi2, 45*time.Second)
		nodeDownReach = time.Since(restarted)
		if ok, r := reachable(t, pi2.dir); ok {
			t.Errorf("pi2 reports the coordinator reachable while it is down:\n%s", r)
		}
		t.Logf("with the coordinator down: edge proxy restarted and serving again after %v; pi2 restarted, served after %v, reached by pi1 after %v",
			edgeDownRestart.Round(time.Millisecond), nodeDownRestart.Round(time.Millisecond), nodeDownReach.Round(time.Millisecond))
	})

	// (c) The coordinator comes back on the same data dir and addresses:
	// everyone reconnects with their old identity; a revocation and a new
	// node made now reach everyone.
	var resynced, embeddedBack, revokedGone, joined time.Duration
	step(t, "CoordinatorBack", func(t *testing.T) {
		restarted := time.Now()
		srv = startServerAt(parent, t, nil, dataDir, srvAddr, httpAddr, sshAddr, wgAddr)
		waitFor(t, 60*time.Second, "every agent and the edge proxy to reach the coordinator again", func() (bool, string) {
			var detail strings.Builder
			all := true
			for _, dir := range []string{pi1.dir, pi2.dir, pi3.dir, edge.dir} {
				ok, r := reachable(t, dir)
				all = all && ok
				detail.WriteString(r)
			}
			return all, detail.String() + logs()
		})
		resynced = time.Since(restarted)
		waitServed(t, srv.http, "pi1", 30*time.Second, "the embedded proxy to serve pi1 after the server restart")
		embeddedBack = time.Since(restarted)
		for dir, want := range ids {
			if got := chaosIdentity(t, dir); got != want {
				t.Errorf("%s changed across the outage:\nbefore %s\nafter  %s", dir, want, got)
			}
		}
		listed := listNodes(t, dataDir)
		if len(listed) != 3 {
			t.Errorf("nodes list after the outage: %d nodes, want the same 3 (no re-enrollment): %v", len(listed), listed)
		}

		mustOK(t, nil, "nodes", "revoke", "--data-dir", dataDir, "pi3")
		revoked := time.Now()
		waitFor(t, proxyDeadline, "pi3 to be 404 on both proxies and gone from pi1's peers", func() (bool, string) {
			s1, _, _ := get(c, "http://pi3.localhost:"+portOf(edge.http)+"/", nil)
			s2, _, _ := get(c, "http://pi3.localhost:"+portOf(srv.http)+"/", nil)
			st, r, ok := agentStatusOf(t, pi1.dir)
			_, has := st.peer("pi3")
			return s1 == 404 && s2 == 404 && ok && !has, fmt.Sprintf("edge %d, embedded %d\n%s", s1, s2, r)
		})
		revokedGone = time.Since(revoked)
		if code := pi3.up.wait(t, proxyDeadline); code != 3 {
			t.Errorf("pi3's agent exited %d after its revocation, want 3\nstderr:\n%s", code, pi3.up.stderr)
		}

		pi4 := newChaosNode(parent, t, base, dataDir, "pi4")
		enrolled := time.Now()
		pi4.start(t)
		nodes["pi4"] = pi4
		waitServed(t, edge.http, "pi4", 30*time.Second, "the edge proxy to serve the new node pi4")
		waitReach(t, pi1, pi4, 30*time.Second)
		joined = time.Since(enrolled)
		for _, dir := range []string{pi1.dir, pi2.dir, edge.dir} {
			if got := chaosIdentity(t, dir); got != ids[dir] {
				t.Errorf("%s changed after the resync:\nbefore %s\nafter  %s", dir, ids[dir], got)
			}
		}
		t.Logf("coordinator back: every member reconnected %v after the restart, embedded proxy serving after %v; revocation of pi3 applied everywhere after %v; new node pi4 served and reached %v after its agent started",
			resynced.Round(time.Millisecond), embeddedBack.Round(time.Millisecond), revokedGone.Round(time.Millisecond), joined.Round(time.Millisecond))
	})

	// (d) Restarts with the coordinator up: the edge proxy, the whole
	// server (its embedded proxy), and a node.
	var edgeRestart, serverRestart, nodeRestart time.Duration
	step(t, "Restarts", func(t *testing.T) {
		if code := sigterm(t, edge.p, 15*time.Second); code != 0 {
			t.Fatalf("edge proxy exited %d on SIGTERM\nstderr:\n%s", code, edge.p.stderr)
		}
		restarted := time.Now()
		edge.start(t)
		waitServed(t, edge.http, "pi1", 30*time.Second, "the edge proxy to serve pi1 after its restart")
		edgeRestart = time.Since(restarted)
		waitServed(t, edge.http, "pi2", 10*time.Second, "the edge proxy to serve pi2 after its restart")

		if code := sigterm(t, srv.proc, 15*time.Second); code != 0 {
			t.Fatalf("server exited %d on SIGTERM\nstderr:\n%s", code, srv.stderr)
		}
		restarted = time.Now()
		srv = startServerAt(parent, t, nil, dataDir, srvAddr, httpAddr, sshAddr, wgAddr)
		waitServed(t, srv.http, "pi1", 30*time.Second, "the embedded proxy to serve pi1 after the server restart")
		serverRestart = time.Since(restarted)
		waitServed(t, srv.http, "pi2", 10*time.Second, "the embedded proxy to serve pi2 after the server restart")

		pi1.stop(t)
		restarted = time.Now()
		pi1.start(t)
		waitServed(t, edge.http, "pi1", 30*time.Second, "the edge proxy to serve pi1 after its agent restarted")
		waitServed(t, srv.http, "pi1", 30*time.Second, "the embedded proxy to serve pi1 after its agent restarted")
		nodeRestart = time.Since(restarted)
		t.Logf("first successful request: edge proxy %v after it restarted, embedded proxy %v after the server restarted, both proxies %v after pi1's agent restarted",
			edgeRestart.Round(time.Millisecond), serverRestart.Round(time.Millisecond), nodeRestart.Round(time.Millisecond))
	})

	// (e) pi2 comes back on another UDP port (a new endpoint, as after a
	// NAT rebinding): both proxies and pi1 follow.
	var moved time.Duration
	step(t, "NodeChangesPort", func(t *testing.T) {
		old := pi2.port
		pi2.stop(t)
		pi2.port = freeUDPPort(t)
		restarted := time.Now()
		pi2.start(t)
		waitServed(t, edge.http, "pi2", 30*time.Second, "the edge proxy to serve pi2 on its new port")
		waitServed(t, srv.http, "pi2", 30*time.Second, "the embedded proxy to serve pi2 on its new port")
		waitReach(t, pi1, pi2, 45*time.Second)
		moved = time.Since(restarted)
		st, _, _ := agentStatusOf(t, pi1.dir)
		p, _ := st.peer("pi2")
		t.Logf("pi2 moved from UDP %s to %s: served by both proxies and reached by pi1 %v after its agent restarted (pi1 now has endpoint %q for it)",
			old, pi2.port, moved.Round(time.Millisecond), p.Endpoint)
		if !strings.HasSuffix(p.Endpoint, ":"+pi2.port) && p.Path != "relay" {
			t.Errorf("pi1's endpoint for pi2 is %q (path %q), want the new port %s or the relay", p.Endpoint, p.Path, pi2.port)
		}
	})

	t.Logf("summary: outage %v: %d/%d proxy requests and %d/%d mesh requests served; during it edge proxy back %v and pi2 back %v after restarts; resync %v, revocation everywhere %v, join %v; restarts (coordinator up): edge %v, server %v, node %v; port change %v; %v in all",
		outage, served, served+lost, meshOK, meshOK+meshLost, edgeDownRestart.Round(time.Millisecond), nodeDownReach.Round(time.Millisecond),
		resynced.Round(time.Millisecond), revokedGone.Round(time.Millisecond), joined.Round(time.Millisecond),
		edgeRestart.Round(time.Millisecond), serverRestart.Round(time.Millisecond), nodeRestart.Round(time.Millisecond), moved.Round(time.Millisecond),
		time.Since(testStart).Round(time.Millisecond))
}

// portOf is the port of HOST:PORT.
func portOf(hostPort string) string {
	_, p, _ := net.SplitHostPort(hostPort)
	return p
}
