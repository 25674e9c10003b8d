//go:build linux

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"
)

// benchCIDR is the overlay pool of the bench's server: not the default
// 100.64.0.0/16, so that the TUN node's routes cannot collide with another
// meshctl on this host.
const benchCIDR = "100.99.0.0/16"

// mesh is a `meshctl server` and its nodes, driven through the CLI as a
// user would.
type mesh struct {
	bin, dir string
	ps       *procs
	server   *proc
	data     string // the server's data dir
	httpAddr string // the server's proxy, plain HTTP
	token    tokenJSON
	cmds     []string // the commands run, for the report
	enrolled bool     // the enroll command is in cmds
}

// node is one `meshctl up` agent.
type node struct {
	name    string
	state   string // its state dir
	proc    *proc
	ipv4    string
	noLimit bool // runs with --memory-limit 0, not the default budget
}

type tokenJSON struct {
	Token       string `json:"token"`
	Coordinator string `json:"coordinator"`
	CAPin       string `json:"ca_pin"`
}

// statusJSON is the part of `meshctl status --json` the bench reads.
type statusJSON struct {
	IPv4     string `json:"ipv4"`
	Fallback struct {
		Active bool   `json:"active"`
		Reason string `json:"reason"`
	} `json:"fallback"`
	Peers []struct {
		Name       string `json:"name"`
		RxBytes    int64  `json:"rx_bytes"`
		TxBytes    int64  `json:"tx_bytes"`
		Path       string `json:"path"`
		PathReason string `json:"path_reason"`
	} `json:"peers"`
}

// startMesh starts `meshctl server` on loopback ports and makes a reusable
// enrollment token.
func startMesh(ctx context.Context, ps *procs, bin, dir string) (*mesh, error) {
	m := &mesh{bin: bin, dir: dir, ps: ps, data: filepath.Join(dir, "data")}
	var ports [4]int
	for i := range ports {
		network := "tcp"
		if i == 2 {
			network = "udp"
		}
		p, err := freePort(network)
		if err != nil {
			return nil, err
		}
		ports[i] = p
	}
	api := "127.0.0.1:" + strconv.Itoa(ports[0])
	m.httpAddr = "127.0.0.1:" + strconv.Itoa(ports[1])
	args := []string{"server", "--data-dir", m.data, "--listen", api, "--public-host", "127.0.0.1",
		"--domain", "localhost", "--http", m.httpAddr, "--wg-listen", "127.0.0.1:" + strconv.Itoa(ports[2]),
		"--ssh-listen", "127.0.0.1:" + strconv.Itoa(ports[3]), "--cidr", benchCIDR}
	m.note(args)
	srv, err := ps.start("meshctl server", filepath.Join(dir, "server.log"), nil, nil, bin, args...)
	if err != nil {
		return nil, err
	}
	m.server = srv
	for _, addr := range []string{api, m.httpAddr} {
		err := waitFor(ctx, 30*time.Second, func() error {
			if srv.exited() {
				return srv.failure("exited")
			}
			c, err := net.DialTimeout("tcp", addr, time.Second)
			if err == nil {
				c.Close()
			}
			return err
		})
		if err != nil {
			return nil, fmt.Errorf("meshctl server does not listen on %s: %w\n%s", addr, err, tail(srv.log, 15))
		}
	}
	tokenArgs := []string{"token", "create", "--data-dir", m.data, "--reusable", "--json"}
	m.note(tokenArgs)
	out, err := m.cli(ctx, tokenArgs...)
	if err != nil {
		return nil, err
	}
	if err := json.Unmarshal(out, &m.token); err != nil || m.token.Token == "" {
		return nil, fmt.Errorf("meshctl token create --json printed %q: %v", out, err)
	}
	return m, nil
}

// note records a command line for the report.
func (m *mesh) note(args []string) {
	m.cmds = append(m.cmds, "meshctl "+strings.Join(args, " "))
}

// cli runs a meshctl command to completion and returns its stdout.
func (m *mesh) cli(ctx context.Context, args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, m.bin, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("meshctl %s: %w\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return out, nil
}

// addNode enrolls a node called name and starts `meshctl up` for it with
// the extra flags; it waits until the agent answers `meshctl status`.
func (m *mesh) addNode(ctx context.Context, name string, flags ...string) (*node, error) {
	n := &node{name: name, state: filepath.Join(m.dir, name), noLimit: slices.Contains(flags, "--memory-limit")}
	enroll := []string{"enroll", "--coordinator", m.token.Coordinator, "--ca-pin", m.token.CAPin,
		"--name", name, "--state-dir", n.state}
	if !m.enrolled {
		m.cmds = append(m.cmds, "MESHCTL_TOKEN=… meshctl "+strings.Join(enroll, " ")+"   # and so for each node")
		m.enrolled = true
	}
	cmd := exec.CommandContext(ctx, m.bin, enroll...)
	cmd.Env = append(os.Environ(), "MESHCTL_TOKEN="+m.token.Token)
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("meshctl enroll %s: %w\n%s", name, err, out)
	}
	args := append([]string{"up", "--state-dir", n.state}, flags...)
	if !hasFlag(flags, "--listen-port") {
		args = append(args, "--listen-port", "0")
	}
	m.note(args)
	p, err := m.ps.start("meshctl up "+name, filepath.Join(m.dir, name+".log"), nil, nil, m.bin, args...)
	if err != nil {
		return nil, err
	}
	n.proc = p
	var st statusJSON
	err = waitFor(ctx, 30*time.Second, func() error {
		if p.exited() {
			return p.failure("exited")
		}
		st, err = m.status(ctx, n)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("node %s: %w", name, err)
	}
	n.ipv4 = st.IPv4
	return n, nil
}

func hasFlag(args []string, f string) bool {
	for _, a := range args {
		if a == f || strings.HasPrefix(a, f+"=") {
			return true
		}
	}
	return false
}

// status is `meshctl status --json` of node n.
func (m *mesh) status(ctx context.Context, n *node) (statusJSON, error) {
	var st statusJSON
	out, err := m.cli(ctx, "status", "--state-dir", n.state, "--json")
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal(out, &st); err != nil {
		return st, fmt.Errorf("meshctl status --json of %s: %w", n.name, err)
	}
	return st, nil
}

// wgBytes is the sum of WireGuard bytes received and sent by node n, over
// all its peers: what went through the tunnel, as opposed to an SSH
// forward.
func (m *mesh) wgBytes(ctx context.Context, n *node) (int64, error) {
	st, err := m.status(ctx, n)
	if err != nil {
		return 0, err
	}
	var sum int64
	for _, p := range st.Peers {
		sum += p.RxBytes + p.TxBytes
	}
	return sum, nil
}

// peerPath is how node n's WireGuard reaches peer, as its status says:
// "direct" or "relay", and why.
func (m *mesh) peerPath(ctx context.Context, n *node, peer string) string {
	st, err := m.status(ctx, n)
	if err != nil {
		return err.Error()
	}
	for _, p := range st.Peers {
		if p.Name == peer {
			return fmt.Sprintf("%s → %s: %s (%s)", n.name, peer, p.Path, p.PathReason)
		}
	}
	return fmt.Sprintf("%s → %s: no such peer", n.name, peer)
}

// blockUDP drops every UDP packet to or from port on this host (the
// loopback traffic of one node's WireGuard socket) with an nftables
// table of its own; the returned function deletes the table.
func blockUDP(ctx context.Context, port int) (func(), error) {
	if _, err := exec.LookPath("nft"); err != nil {
		return nil, fmt.Errorf("nft not found (Debian: apt-get install nftables)")
	}
	const table = "meshctl_bench"
	rules := fmt.Sprintf(`table inet %[1]s
delete table inet %[1]s
table inet %[1]s {
	chain out {
		type filter hook output priority 0; policy accept;
		udp sport %[2]d drop
		udp dport %[2]d drop
	}
}
`, table, port)
	cmd := exec.CommandContext(ctx, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("nft: %w\n%s", err, out)
	}
	return func() { exec.Command("nft", "delete", "table", "inet", table).Run() }, nil
}
