package main

// End-to-end tests of the node agent: `meshctl up` processes enrolled with a
// real `meshctl server`, driven through status, nc, ping, wg show and the
// SOCKS5 proxy. TestAgentEndToEnd runs on loopback without privileges;
// TestTUNModeInNetns needs root and runs two hosts in network namespaces.

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/internal/netnstest"
)

// agentDeadline bounds every wait for the mesh to converge: generous for
// -race on two cores, still far below the test timeout.
const agentDeadline = 20 * time.Second

// agentStatusJSON is `meshctl status --json` (node.Status).
type agentStatusJSON struct {
	Name                 string `json:"name"`
	PublicKey            string `json:"public_key"`
	IPv4                 string `json:"ipv4"`
	IPv6                 string `json:"ipv6"`
	Mode                 string `json:"mode"`
	Interface            string `json:"interface"`
	ListenPort           int    `json:"listen_port"`
	UAPISocket           string `json:"uapi_socket"`
	Coordinator          string `json:"coordinator"`
	CoordinatorReachable bool   `json:"coordinator_reachable"`
	CoordinatorError     string `json:"coordinator_error"`
	Services             []struct {
		Name   string `json:"name"`
		Port   int    `json:"port"`
		Target string `json:"target"`
		Public bool   `json:"public"`
	} `json:"services"`
	Peers []agentPeerJSON `json:"peers"`
}

type agentPeerJSON struct {
	Name          string `json:"name"`
	PublicKey     string `json:"public_key"`
	IPv4          string `json:"ipv4"`
	IPv6          string `json:"ipv6"`
	Endpoint      string `json:"endpoint"`
	LastHandshake string `json:"last_handshake"`
	RxBytes       int64  `json:"rx_bytes"`
	TxBytes       int64  `json:"tx_bytes"`
	Path          string `json:"path"`
}

func (s agentStatusJSON) peer(name string) (agentPeerJSON, bool) {
	for _, p := range s.Peers {
		if p.Name == name {
			return p, true
		}
	}
	return agentPeerJSON{}, false
}

// agentStatusOf runs `meshctl status --json`; ok is false when it failed
// (no agent yet, say).
func agentStatusOf(t *testing.T, stateDir string) (agentStatusJSON, result, bool) {
	t.Helper()
	r := meshctl(t, nil, "status", "--state-dir", stateDir, "--json")
	var st agentStatusJSON
	if r.code != 0 {
		return st, r, false
	}
	decode(t, r, &st)
	return st, r, true
}

// waitAgentUp waits until the agent of stateDir answers status, failing
// early if its process exited.
func waitAgentUp(t *testing.T, p *proc, stateDir string) agentStatusJSON {
	t.Helper()
	var st agentStatusJSON
	eventually(t, agentDeadline, "the agent of "+stateDir+" to answer status", func() bool {
		if p.exited() {
			t.Fatalf("meshctl up exited early (%v)\nstdout:\n%s\nstderr:\n%s", p.err, p.stdout, p.stderr)
		}
		var ok bool
		st, _, ok = agentStatusOf(t, stateDir)
		return ok
	})
	return st
}

// waitFor is eventually with the last attempt's details in the failure.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	var last string
	deadline := time.Now().Add(timeout)
	for {
		ok, detail := cond()
		if ok {
			return
		}
		last = detail
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s; last attempt:\n%s", timeout, what, last)
		}
		time.Sleep(20 * time.Millisecond) // poll interval, not synchronisation
	}
}

// enrollNode enrolls name into stateDir with a fresh token (enrollment runs
// in this network namespace).
func enrollNode(t *testing.T, dataDir, name, stateDir string) {
	t.Helper()
	tc := createToken(t, dataDir)
	mustOK(t, nil, "enroll", "--coordinator", tc.Coordinator, "--token", tc.Token, "--ca-pin", tc.CAPin,
		"--name", name, "--state-dir", stateDir)
}

// randHex returns n random bytes in hex.
func randHex(t *testing.T, n int) string {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(b)
}

// meshctlStdin is meshctl with stdin.
func meshctlStdin(t *testing.T, stdin string, args ...string) result {
	t.Helper()
	return runMeshctl(t, nil, strings.NewReader(stdin), args...)
}

// stopGracefully registers a cleanup that ends p with SIGTERM (so that an
// agent removes its sockets, also those in /var/run/wireguard) before the
// harness's SIGKILL. Register it after starting p: cleanups run last first.
func stopGracefully(t *testing.T, p *proc) {
	t.Cleanup(func() {
		if p.exited() {
			return
		}
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(10 * time.Second):
			t.Errorf("meshctl %s ignored SIGTERM for 10s; killing it", strings.Join(p.cmd.Args[1:], " "))
		}
	})
}

// sigterm sends SIGTERM to p and returns its exit code.
func sigterm(t *testing.T, p *proc, within time.Duration) int {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: %v", err)
	}
	return p.wait(t, within)
}

// socks5Fetch sends req to host:port through the SOCKS5 proxy at proxy,
// naming host as a domain (ATYP 3), and returns everything it answers.
func socks5Fetch(proxy, host string, port int, req string) (string, error) {
	c, err := net.DialTimeout("tcp", proxy, 5*time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(15 * time.Second))
	if _, err := c.Write([]byte{5, 1, 0}); err != nil {
		return "", err
	}
	var hello [2]byte
	if _, err := io.ReadFull(c, hello[:]); err != nil {
		return "", fmt.Errorf("method reply: %w", err)
	}
	if hello != [2]byte{5, 0} {
		return "", fmt.Errorf("method reply %v, want [5 0] (no authentication)", hello)
	}
	msg := append([]byte{5, 1, 0, 3, byte(len(host))}, host...)
	msg = binary.BigEndian.AppendUint16(msg, uint16(port))
	if _, err := c.Write(msg); err != nil {
		return "", err
	}
	var head [4]byte
	if _, err := io.ReadFull(c, head[:]); err != nil {
		return "", fmt.Errorf("connect reply: %w", err)
	}
	if head[0] != 5 || head[1] != 0 {
		return "", fmt.Errorf("connect reply %v: request refused (code %d)", head, head[1])
	}
	var skip int
	switch head[3] {
	case 1:
		skip = 4 + 2
	case 4:
		skip = 16 + 2
	case 3:
		var l [1]byte
		if _, err := io.ReadFull(c, l[:]); err != nil {
			return "", err
		}
		skip = int(l[0]) + 2
	default:
		return "", fmt.Errorf("connect reply has address type %d", head[3])
	}
	if _, err := io.ReadFull(c, make([]byte, skip)); err != nil {
		return "", err
	}
	if _, err := io.WriteString(c, req); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	return string(b), err
}

// TestAgentEndToEnd runs two `meshctl up` processes on the userspace network
// stack against a `meshctl server`, all on loopback.
func TestAgentEndToEnd(t *testing.T) {
	needBinary(t)
	base := meshtest.ShortTempDir(t)
	dataDir := filepath.Join(base, "d")
	srv := startServer(t, dataDir, freePort(t))
	stopGracefully(t, srv.proc)

	// Unique node names: as root the agents put their UAPI sockets at
	// /var/run/wireguard/mc-NAME.sock, shared by every test run here.
	sfx := randHex(t, 3)
	nameA, nameB := "a-"+sfx, "b-"+sfx
	sa, sb := filepath.Join(base, "a"), filepath.Join(base, "b")
	t.Cleanup(func() {
		// Left behind only by an agent killed with SIGKILL (a failure).
		for _, n := range []string{nameA, nameB} {
			os.Remove("/var/run/wireguard/mc-" + n + ".sock")
		}
	})
	enrollNode(t, dataDir, nameA, sa)
	enrollNode(t, dataDir, nameB, sb)

	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.WriteString(w, "hello from a")
	}))
	t.Cleanup(backend.Close)
	backendAP := netip.MustParseAddrPort(backend.Listener.Addr().String())
	port := strconv.Itoa(int(backendAP.Port()))
	socks := net.JoinHostPort("127.0.0.1", freePort(t))

	upA := start(t, nil, "up", "--state-dir", sa, "--listen-port", "0", "--expose", "web="+backendAP.String())
	stopGracefully(t, upA)
	upB := start(t, nil, "up", "--state-dir", sb, "--listen-port", "0", "--socks5", socks)
	stopGracefully(t, upB)
	stA := waitAgentUp(t, upA, sa)
	stB := waitAgentUp(t, upB, sb)

	step(t, "PeersConfigured", func(t *testing.T) {
		// Both have each other with an endpoint (known only once the other
		// reported it to the coordinator).
		waitFor(t, agentDeadline, "a and b to list each other with an endpoint", func() (bool, string) {
			a, ra, okA := agentStatusOf(t, sa)
			b, rb, okB := agentStatusOf(t, sb)
			pa, okPA := b.peer(nameA)
			pb, okPB := a.peer(nameB)
			detail := ra.String() + "\n" + rb.String() + "\nagent a:\n" + upA.stderr.String() + "\nagent b:\n" + upB.stderr.String()
			return okA && okB && okPA && okPB && pa.Endpoint != "" && pb.Endpoint != "", detail
		})
		if stA.Mode != "netstack" || stB.Mode != "netstack" {
			t.Errorf("modes %q and %q, want netstack without --tun", stA.Mode, stB.Mode)
		}
		if stA.ListenPort == 0 || stB.ListenPort == 0 || stA.ListenPort == stB.ListenPort {
			t.Errorf("listen ports %d and %d, want two distinct real ports for --listen-port 0", stA.ListenPort, stB.ListenPort)
		}
	})

	step(t, "NC", func(t *testing.T) {
		r := meshctlStdin(t, "GET / HTTP/1.0\r\n\r\n", "nc", "--state-dir", sb, nameA, port)
		if r.code != 0 {
			t.Fatalf("want exit 0:\n%s", r)
		}
		if !strings.HasPrefix(r.stdout, "HTTP/1.") || !strings.HasSuffix(r.stdout, "hello from a") {
			t.Errorf("nc did not print the backend's HTTP response ending in \"hello from a\":\n%s", r)
		}
		// Only published ports are open on a's overlay address.
		other := freePort(t)
		if r := meshctlStdin(t, "", "nc", "--state-dir", sb, nameA, other); r.code == 0 {
			t.Errorf("nc to a's unpublished port %s succeeded:\n%s", other, r)
		}
	})

	t.Run("StatusJSON", func(t *testing.T) {
		var st agentStatusJSON
		var r result
		eventually(t, agentDeadline, "b's status to show traffic with a", func() bool {
			var ok bool
			st, r, ok = agentStatusOf(t, sb)
			p, found := st.peer(nameA)
			return ok && found && p.LastHandshake != "" && p.RxBytes > 0
		})
		var raw map[string]json.RawMessage
		decode(t, r, &raw)
		for _, f := range []string{"name", "public_key", "ipv4", "ipv6", "services", "peers", "coordinator_reachable", "mode", "interface", "listen_port"} {
			if _, ok := raw[f]; !ok {
				t.Errorf("status --json lacks %q:\n%s", f, r.stdout)
			}
		}
		if s := string(raw["services"]); s != "[]" {
			t.Errorf("b publishes nothing, services = %s, want []", s)
		}
		if st.Name != nameB || st.PublicKey != stB.PublicKey || st.PublicKey == "" || st.IPv4 == "" || st.IPv6 == "" {
			t.Errorf("status names %q key %q ipv4 %q ipv6 %q; want %s with its key and addresses", st.Name, st.PublicKey, st.IPv4, st.IPv6, nameB)
		}
		if !st.CoordinatorReachable {
			t.Errorf("coordinator_reachable = false with the server running (error %q)", st.CoordinatorError)
		}
		for _, p := range st.Peers {
			if p.Name == "(unknown)" || p.Name == nameB || p.PublicKey == st.PublicKey {
				t.Errorf("b lists an unnamed peer or itself: %+v", p)
			}
		}
		p, _ := st.peer(nameA)
		if p.PublicKey != stA.PublicKey || p.IPv4 != stA.IPv4 || p.IPv6 != stA.IPv6 {
			t.Errorf("peer %s = %+v, want a's key %s and addresses %s, %s", nameA, p, stA.PublicKey, stA.IPv4, stA.IPv6)
		}
		if want := fmt.Sprintf("127.0.0.1:%d", stA.ListenPort); p.Endpoint != want {
			t.Errorf("peer %s endpoint = %q, want %q (a runs on this host: loopback)", nameA, p.Endpoint, want)
		}
		if p.Path != "direct" {
			t.Errorf("peer %s path = %q, want direct", nameA, p.Path)
		}
		if p.TxBytes <= 0 {
			t.Errorf("peer %s tx_bytes = %d after a request, want > 0", nameA, p.TxBytes)
		}
		if hs, err := time.Parse(time.RFC3339, p.LastHandshake); err != nil || time.Since(hs) > time.Minute || time.Until(hs) > time.Minute {
			t.Errorf("peer %s last_handshake = %q, want a recent RFC 3339 time", nameA, p.LastHandshake)
		}
	})

	t.Run("SOCKS5", func(t *testing.T) {
		body, err := socks5Fetch(socks, nameA, int(backendAP.Port()), "GET / HTTP/1.0\r\nHost: a\r\n\r\n")
		if err != nil || !strings.HasSuffix(body, "hello from a") {
			t.Errorf("GET http://%s:%s/ through SOCKS5 %s: %v\n%s", nameA, port, socks, err, body)
		}
		// A name that is not a peer is not resolved anywhere else.
		if body, err := socks5Fetch(socks, "localhost", int(backendAP.Port()), "GET / HTTP/1.0\r\n\r\n"); err == nil {
			t.Errorf("SOCKS5 reached localhost:%s, outside the mesh:\n%s", port, body)
		}
		curl, err := exec.LookPath("curl")
		if err != nil {
			netnstest.SkipOrFail(t, "curl not found: %v", err)
		}
		out, err := exec.Command(curl, "-sS", "-m", "10", "--socks5-hostname", socks, "http://"+nameA+":"+port+"/").CombinedOutput()
		if err != nil || string(out) != "hello from a" {
			t.Errorf("curl --socks5-hostname %s http://%s:%s/: %v\n%s", socks, nameA, port, err, out)
		}
	})

	t.Run("Ping", func(t *testing.T) {
		r := mustOK(t, nil, "ping", "--state-dir", sb, "-c", "1", nameA)
		if !strings.Contains(r.stdout, "pong from "+nameA) || !strings.Contains(r.stdout, stA.IPv4) {
			t.Errorf("ping output lacks \"pong from %s\" and its address %s:\n%s", nameA, stA.IPv4, r)
		}
		mustFail(t, nil, []string{"nosuchpeer"}, "ping", "--state-dir", sb, "-c", "1", "nosuchpeer")
	})

	t.Run("WGShow", func(t *testing.T) {
		r := mustOK(t, nil, "wg", "show", "--state-dir", sb)
		for _, w := range []string{
			"interface: mc-" + nameB,
			"peer: " + stA.PublicKey,
			"allowed ips: " + stA.IPv4 + "/32, " + stA.IPv6 + "/128",
			"latest handshake: ",
		} {
			if !strings.Contains(r.stdout, w) {
				t.Errorf("meshctl wg show lacks %q:\n%s", w, r)
			}
		}
		if os.Geteuid() != 0 {
			return
		}
		if want := "/var/run/wireguard/mc-" + nameB + ".sock"; stB.UAPISocket != want {
			t.Errorf("as root, b's uapi_socket = %q, want %q (for the stock wg)", stB.UAPISocket, want)
		}
		wg, err := exec.LookPath("wg")
		if err != nil {
			netnstest.SkipOrFail(t, "wg (wireguard-tools) not found: %v", err)
		}
		out, err := exec.Command(wg, "show", "mc-"+nameB).CombinedOutput()
		if err != nil || !strings.Contains(string(out), "peer: "+stA.PublicKey) {
			t.Errorf("wg show mc-%s: %v; want a's key %s in:\n%s", nameB, err, stA.PublicKey, out)
		}
	})

	t.Run("StatusText", func(t *testing.T) {
		r := mustOK(t, nil, "status", "--state-dir", sa)
		var line string
		for _, l := range strings.Split(r.stdout, "\n") {
			if strings.Contains(l, "web") {
				line = l
			}
		}
		if line == "" || !strings.Contains(line, port) {
			t.Errorf("status of a does not show the service web on port %s:\n%s", port, r)
		}
		if !strings.Contains(r.stdout, nameB) {
			t.Errorf("status of a does not list its peer %s:\n%s", nameB, r)
		}
	})

	step(t, "Revoke", func(t *testing.T) {
		mustOK(t, nil, "nodes", "revoke", "--data-dir", dataDir, nameA)
		if code := upA.wait(t, agentDeadline); code != 3 {
			t.Errorf("revoked agent exited %d, want 3\nstderr:\n%s", code, upA.stderr)
		}
		if !strings.Contains(upA.stderr.String(), "revoked") {
			t.Errorf("revoked agent's stderr does not say \"revoked\":\n%s", upA.stderr)
		}
		mustNotExist(t, filepath.Join(sa, "agent.sock"))
		if stA.UAPISocket != "" {
			mustNotExist(t, stA.UAPISocket)
		}
		eventually(t, 10*time.Second, "b to drop the revoked peer", func() bool {
			st, _, ok := agentStatusOf(t, sb)
			_, has := st.peer(nameA)
			return ok && !has
		})
	})

	step(t, "SIGTERM", func(t *testing.T) {
		if code := sigterm(t, upB, 10*time.Second); code != 0 {
			t.Errorf("meshctl up exited %d on SIGTERM, want 0\nstderr:\n%s", code, upB.stderr)
		}
		mustNotExist(t, filepath.Join(sb, "agent.sock"))
		if stB.UAPISocket != "" {
			mustNotExist(t, stB.UAPISocket)
		}
		mustFail(t, nil, []string{"no meshctl agent is running"}, "status", "--state-dir", sb)
	})

	step(t, "StopServer", func(t *testing.T) {
		if code := sigterm(t, srv.proc, 15*time.Second); code != 0 {
			t.Fatalf("server exited %d on SIGTERM\nstderr:\n%s", code, srv.stderr)
		}
	})

	// Started here, not in a subtest, so that it outlives the subtest.
	upB2 := start(t, nil, "up", "--state-dir", sb, "--listen-port", "0")
	stopGracefully(t, upB2)
	step(t, "RestartWithoutCoordinator", func(t *testing.T) {
		waitAgentUp(t, upB2, sb)
		var st agentStatusJSON
		eventually(t, agentDeadline, "b to report a failed attempt to reach the stopped coordinator", func() bool {
			var ok bool
			st, _, ok = agentStatusOf(t, sb)
			return ok && strings.Contains(st.CoordinatorError, srv.addr)
		})
		if st.CoordinatorReachable {
			t.Errorf("coordinator_reachable = true with the server stopped")
		}
		if _, has := st.peer(nameA); has {
			t.Errorf("b came up from its cached netmap with the revoked %s: %+v", nameA, st.Peers)
		}
		if upB2.exited() {
			t.Fatalf("meshctl up exited without a coordinator (%v)\nstderr:\n%s", upB2.err, upB2.stderr)
		}
	})

	t.Run("SecondAgentRefused", func(t *testing.T) {
		mustFail(t, nil, []string{"already running"}, "up", "--state-dir", sb, "--listen-port", "0")
		// The refused one did not take the running agent's socket away.
		if _, _, ok := agentStatusOf(t, sb); !ok || upB2.exited() {
			t.Errorf("the running agent no longer answers after a refused second `meshctl up`")
		}
	})

	t.Run("NoAgent", func(t *testing.T) {
		x := filepath.Join(base, "x")
		if err := os.Mkdir(x, 0o700); err != nil {
			t.Fatal(err)
		}
		mustFail(t, nil, []string{"no meshctl agent is running"}, "status", "--state-dir", x)
	})
}

// labProc starts meshctl (or another program, when name is not "") inside
// namespace ns as a *proc: output captured, killed at cleanup if still
// running (the lab kills it too, before deleting the namespaces).
func labProc(t *testing.T, lab *netnstest.Lab, ns, name string, args ...string) *proc {
	t.Helper()
	if name == "" {
		name = meshctlBin
	}
	p := &proc{cmd: lab.Command(ns, name, args...), stdout: &syncBuffer{}, stderr: &syncBuffer{}, done: make(chan struct{})}
	p.cmd.Env = cleanEnv()
	p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start %s %s in namespace %s: %v", name, strings.Join(args, " "), ns, err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		if !p.exited() {
			p.cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

// runInNS runs a command in namespace ns to completion (timeout at most)
// and returns its result (code -1: timed out).
func runInNS(t *testing.T, lab *netnstest.Lab, ns string, timeout time.Duration, name string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", lab.NS(ns), name}, args...)...)
	cmd.Env = cleanEnv()
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := result{args: append([]string{"(in " + ns + ")", name}, args...), stdout: stdout.String(), stderr: stderr.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case ctx.Err() != nil:
		r.code = -1
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	default:
		t.Fatalf("in namespace %s: %s: %v", ns, name, err)
	}
	return r
}

// TestTUNModeInNetns runs two nodes in TUN mode, each in its own network
// namespace, with the coordinator in the first: the kernel routes the
// overlay into the TUN, and the inbound filter lets only published ports in.
func TestTUNModeInNetns(t *testing.T) {
	needBinary(t)
	lab := netnstest.New(t, "a", "b")
	tools := labTools(t, "wg", "curl", "python3")
	needTUN(t)
	lab.Link("a", "b", netip.MustParsePrefix("198.18.0.1/24"), netip.MustParsePrefix("198.18.0.2/24"))

	base := meshtest.ShortTempDir(t)
	dataDir := filepath.Join(base, "d")
	sa, sb := filepath.Join(base, "a"), filepath.Join(base, "b")
	// The UAPI socket of a TUN is /var/run/wireguard/IFNAME.sock, shared by
	// all namespaces and test runs on this host: a unique name per run.
	tun := "mt" + randHex(t, 3)
	uapiA := "/var/run/wireguard/" + tun + ".sock"
	t.Logf("TUN interface %s in both namespaces", tun)

	srvArgs := []string{"server", "--data-dir", dataDir, "--listen", "198.18.0.1:7443", "--public-host", "198.18.0.1"}
	if help := meshctl(t, nil, "server", "--help"); strings.Contains(help.stdout+help.stderr, "--wg-listen") {
		// The server's embedded proxy runs a WireGuard endpoint, by
		// default on UDP 51820, which the agent in a uses here.
		srvArgs = append(srvArgs, "--wg-listen", ":51830")
	}
	srv := labProc(t, lab, "a", "", srvArgs...)
	stopGracefully(t, srv)
	eventually(t, agentDeadline, "the server's admin socket to answer", func() bool {
		if srv.exited() {
			t.Fatalf("meshctl server exited early (%v)\nstdout:\n%s\nstderr:\n%s", srv.err, srv.stdout, srv.stderr)
		}
		return meshctl(t, nil, "nodes", "list", "--data-dir", dataDir, "--json").code == 0
	})
	for _, n := range []struct{ ns, dir string }{{"a", sa}, {"b", sb}} {
		tc := createToken(t, dataDir)
		if tc.Coordinator != "https://198.18.0.1:7443" {
			t.Fatalf("token's coordinator = %q, want https://198.18.0.1:7443", tc.Coordinator)
		}
		r := runInNS(t, lab, n.ns, 30*time.Second, meshctlBin, "enroll", "--coordinator", tc.Coordinator, "--token", tc.Token,
			"--ca-pin", tc.CAPin, "--name", n.ns, "--state-dir", n.dir)
		if r.code != 0 {
			t.Fatalf("enroll %s:\n%s", n.ns, r)
		}
	}

	// Local web servers: 127.0.0.1:8080 in both (published as "web"), and
	// in a also 0.0.0.0:9999, which is not published.
	for _, ns := range []string{"a", "b"} {
		www := filepath.Join(base, "www"+ns)
		if err := os.Mkdir(www, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(www, "index.html"), []byte("hello from "+ns), 0o644); err != nil {
			t.Fatal(err)
		}
		labProc(t, lab, ns, tools["python3"], "-m", "http.server", "8080", "--bind", "127.0.0.1", "--directory", www)
		if ns == "a" {
			labProc(t, lab, ns, tools["python3"], "-m", "http.server", "9999", "--bind", "0.0.0.0", "--directory", www)
		}
	}
	curl := func(ns string, timeout int, url string) result {
		t.Helper()
		return runInNS(t, lab, ns, time.Duration(timeout+5)*time.Second, tools["curl"], "-sS", "-g", "-m", strconv.Itoa(timeout), url)
	}
	eventually(t, agentDeadline, "the web servers to answer", func() bool {
		return curl("a", 2, "http://127.0.0.1:8080/").stdout == "hello from a" &&
			curl("b", 2, "http://127.0.0.1:8080/").stdout == "hello from b" &&
			// Port 9999 is open on the underlay, from b.
			curl("b", 2, "http://198.18.0.1:9999/").stdout == "hello from a"
	})

	up := func(ns, dir string) *proc {
		p := labProc(t, lab, ns, "", "up", "--state-dir", dir, "--tun", tun, "--listen-port", "51820", "--expose", "web=127.0.0.1:8080")
		stopGracefully(t, p)
		return p
	}
	t.Cleanup(func() { os.Remove(uapiA) }) // only left behind by a SIGKILL
	// a first, so that it owns /var/run/wireguard/TUN.sock (b's agent, whose
	// interface has the same name in its own namespace, then falls back to
	// its state dir).
	upA := up("a", sa)
	stA := waitAgentUp(t, upA, sa)
	upB := up("b", sb)
	stB := waitAgentUp(t, upB, sb)

	step(t, "Status", func(t *testing.T) {
		if stA.Mode != "tun" || stA.Interface != tun || stA.ListenPort != 51820 {
			t.Errorf("a: mode %q interface %q port %d, want tun, %s, 51820", stA.Mode, stA.Interface, stA.ListenPort, tun)
		}
		if stA.UAPISocket != uapiA {
			t.Errorf("a: uapi_socket = %q, want %s", stA.UAPISocket, uapiA)
		}
		if stB.Mode != "tun" || stB.Interface != tun {
			t.Errorf("b: mode %q interface %q, want tun, %s", stB.Mode, stB.Interface, tun)
		}
		// The kernel has the interface with the overlay addresses in a.
		out := runInNS(t, lab, "a", 10*time.Second, "ip", "addr", "show", "dev", tun)
		if out.code != 0 || !strings.Contains(out.stdout, stA.IPv4+"/") || !strings.Contains(out.stdout, stA.IPv6+"/") {
			t.Errorf("ip addr show dev %s in a lacks %s and %s:\n%s", tun, stA.IPv4, stA.IPv6, out)
		}
	})

	step(t, "HTTPOverIPv4", func(t *testing.T) {
		url := "http://" + stA.IPv4 + ":8080/"
		waitFor(t, agentDeadline, "curl "+url+" from b", func() (bool, string) {
			r := curl("b", 3, url)
			return r.stdout == "hello from a", r.String()
		})
	})

	t.Run("HTTPOverIPv6", func(t *testing.T) {
		url := "http://[" + stA.IPv6 + "]:8080/"
		waitFor(t, agentDeadline, "curl "+url+" from b", func() (bool, string) {
			r := curl("b", 3, url)
			return r.stdout == "hello from a", r.String()
		})
	})

	t.Run("UnpublishedPortFiltered", func(t *testing.T) {
		r := curl("b", 3, "http://"+stA.IPv4+":9999/")
		if r.code == 0 || strings.Contains(r.stdout, "hello") {
			t.Errorf("a's unpublished port 9999 is reachable over the mesh:\n%s", r)
		}
		// …while it still answers on the underlay: the filter did it.
		if r := curl("b", 3, "http://198.18.0.1:9999/"); r.stdout != "hello from a" {
			t.Errorf("port 9999 on the underlay:\n%s", r)
		}
	})

	t.Run("BulkOverTUN", func(t *testing.T) {
		// 32 MiB through both kernel TUNs: with offloads on, the kernel
		// hands wireguard-go 64 KiB TSO segments, which must be split into
		// the read batch (wireguard-go drops a segment that does not fit).
		body := make([]byte, 32<<20)
		rand.Read(body)
		if err := os.WriteFile(filepath.Join(base, "wwwa", "bulk"), body, 0o644); err != nil {
			t.Fatal(err)
		}
		out := filepath.Join(base, "bulk.b")
		r := runInNS(t, lab, "b", 60*time.Second, tools["curl"], "-sS", "-m", "50", "-o", out, "http://"+stA.IPv4+":8080/bulk")
		if r.code != 0 {
			t.Fatalf("curl of 32 MiB over the mesh:\n%s", r)
		}
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, body) {
			t.Fatalf("received %d bytes, not the 32 MiB sent", len(got))
		}
	})

	t.Run("WGShow", func(t *testing.T) {
		r := runInNS(t, lab, "a", 10*time.Second, tools["wg"], "show", tun)
		if r.code != 0 || !strings.Contains(r.stdout, "peer: "+stB.PublicKey) || !strings.Contains(r.stdout, "latest handshake:") {
			t.Errorf("wg show %s in a: want b's key %s with a latest handshake:\n%s", tun, stB.PublicKey, r)
		}
	})

	t.Run("Ping", func(t *testing.T) {
		r := mustOK(t, nil, "ping", "--state-dir", sb, "-c", "1", "a")
		if !strings.Contains(r.stdout, "pong from a") {
			t.Errorf("ping output lacks \"pong from a\":\n%s", r)
		}
	})

	t.Run("SIGTERMRemovesTUN", func(t *testing.T) {
		if code := sigterm(t, upA, 10*time.Second); code != 0 {
			t.Errorf("meshctl up --tun exited %d on SIGTERM, want 0\nstderr:\n%s", code, upA.stderr)
		}
		if r := runInNS(t, lab, "a", 10*time.Second, "ip", "link", "show", "dev", tun); r.code == 0 {
			t.Errorf("%s still exists in a after the agent stopped:\n%s", tun, r)
		}
		mustNotExist(t, uapiA)
		mustNotExist(t, filepath.Join(sa, "agent.sock"))
		if stA.UAPISocket != "" {
			mustNotExist(t, stA.UAPISocket)
		}
	})
}
