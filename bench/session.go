//go:build linux

package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// tunName is the TUN interface of the TUN node.
const tunName = "mbench0"

// session is one benchmark: the processes, the paths and the results.
type session struct {
	o    options
	w    *wrk
	ps   *procs
	self string // this binary, re-executed in the helper roles
	dir  string

	backend backendReady
	backPID int
	mesh    *mesh
	nodes   []*node // every meshctl up, in start order
	http    []*httpTarget
	bulk    []*bulkPath
	notes   []string // skipped rows and other remarks, for the report
	unblock func()   // removes the nftables rule, if any

	// The last phase (root): a standalone proxy on a kernel TUN, and the
	// rows measured beside it (see tunproxy.go).
	tunProxy *proc
	tunPhase []*httpTarget

	res     results
	mem     *memory
	coord   *coordResult // the coordinator at scale (nil = not run)
	elapsed time.Duration
}

// httpTarget is one HTTP path to the backend.
type httpTarget struct {
	key, label string
	url        string // http://HOST:PORT, without the body's path
	host       string // the Host header ("" = wrk's own)
	node       *node  // the node behind the proxy; nil for the baselines
	want       string // the path the proxy must take (pathWG, pathSSH; "" = any)
	fallback   bool   // the node runs --fallback always: wait for its SSH forwards
	seen       map[string]int
	wgPath     string // the node's WireGuard path to the proxy, from its status
	cmd        string // one wrk command line, for the report
}

// bulkPath is one way for the bulk client to reach the byte source.
type bulkPath struct {
	key, label string
	args       []string // the bulk client's -addr/-socks flags
	via        *node    // a node whose WireGuard must carry the bytes (nil = none)
	peer       string   // the node via reaches (its source): pi1 or pi7
	seen       map[string]int
	wgPath     string // via's WireGuard path to peer, from its status
}

// The paths the proxy can take to a node, as observed from the node's
// WireGuard byte counters.
const (
	pathWG  = "WireGuard"
	pathSSH = "SSH forward"
)

// bodySize is one body of the HTTP rows.
type bodySize struct {
	key, label, path string
	n                int
}

var sizes = []bodySize{
	{"1k", "1 KiB", path1K, 1 << 10},
	{"1m", "1 MiB", path1M, 1 << 20},
}

// setUp starts the backend, the reverse proxy, the server and the nodes,
// and checks that every path serves what it should.
func (s *session) setUp(ctx context.Context, bin string) error {
	var line string
	be, err := s.ps.start("backend", filepath.Join(s.dir, "backend.log"), []string{roleEnv + "=" + roleBackend}, &line, s.self)
	if err != nil {
		return err
	}
	if err := json.Unmarshal([]byte(line), &s.backend); err != nil {
		return fmt.Errorf("backend said %q: %w", line, err)
	}
	s.backPID = be.pid()
	if _, err := s.ps.start("reverse proxy", filepath.Join(s.dir, "revproxy.log"), []string{roleEnv + "=" + roleRevProxy},
		&line, s.self, "-backend", s.backend.HTTP); err != nil {
		return err
	}
	var rp struct{ HTTP string }
	if err := json.Unmarshal([]byte(line), &rp); err != nil {
		return fmt.Errorf("reverse proxy said %q: %w", line, err)
	}
	s.http = append(s.http,
		&httpTarget{key: "direct", label: "direct (baseline)", url: "http://" + s.backend.HTTP},
		&httpTarget{key: "revproxy", label: "reverse proxy (baseline)", url: "http://" + rp.HTTP})

	fmt.Fprintln(s.o.log, "starting meshctl server and nodes …")
	m, err := startMesh(ctx, s.ps, bin, s.dir)
	if err != nil {
		return err
	}
	s.mesh = m
	proxyURL := "http://" + m.httpAddr
	web := "web=" + s.backend.HTTP + ",public"
	_, sourcePort, _ := strings.Cut(s.backend.Source, ":")

	pi1, err := s.addNode(ctx, "pi1", "--expose", web, "--expose", "bulk="+s.backend.Source)
	if err != nil {
		return err
	}
	s.http = append(s.http, &httpTarget{key: "mesh", label: "mesh: proxy → pi1 (netstack)", url: proxyURL, host: "pi1.localhost", node: pi1, want: pathWG})

	socksPort, err := freePort("tcp")
	if err != nil {
		return err
	}
	socks := "127.0.0.1:" + strconv.Itoa(socksPort)
	pi2, err := s.addNode(ctx, "pi2", "--socks5", socks)
	if err != nil {
		return err
	}
	pi1Source := pi1.ipv4 + ":" + sourcePort
	s.bulk = append(s.bulk,
		&bulkPath{key: "loopback", label: "loopback (baseline)", args: []string{"-addr", s.backend.Source}},
		&bulkPath{key: "mesh", label: "mesh: pi2 SOCKS5 → pi1 (netstack both ends)", args: []string{"-socks", socks, "-addr", pi1Source}, via: pi2, peer: "pi1"})

	pi3, err := s.addNode(ctx, "pi3", "--fallback", "always", "--expose", web)
	if err != nil {
		return err
	}
	s.http = append(s.http, &httpTarget{key: "fallback", label: "SSH fallback: proxy → pi3 (--fallback always, UDP open)", url: proxyURL, host: "pi3.localhost", node: pi3, fallback: true})

	// The same mesh paths without the agents' memory limit, to show what
	// the default 64 MiB limit costs in speed and saves in memory.
	pi7, err := s.addNode(ctx, "pi7", "--memory-limit", "0", "--expose", web, "--expose", "bulk="+s.backend.Source)
	if err != nil {
		return err
	}
	s.http = append(s.http, &httpTarget{key: "mesh-nolimit", label: "mesh: proxy → pi7 (netstack, --memory-limit 0)", url: proxyURL, host: "pi7.localhost", node: pi7, want: pathWG})
	socks6Port, err := freePort("tcp")
	if err != nil {
		return err
	}
	socks6 := "127.0.0.1:" + strconv.Itoa(socks6Port)
	pi6, err := s.addNode(ctx, "pi6", "--memory-limit", "0", "--socks5", socks6)
	if err != nil {
		return err
	}
	s.bulk = append(s.bulk, &bulkPath{key: "mesh-nolimit", label: "mesh: pi6 SOCKS5 → pi7 (--memory-limit 0 both ends)",
		args: []string{"-socks", socks6, "-addr", pi7.ipv4 + ":" + sourcePort}, via: pi6, peer: "pi7"})

	if os.Geteuid() != 0 {
		s.notes = append(s.notes, "Not run as root: the TUN rows and the SSH fallback with UDP blocked were skipped.")
	} else {
		if err := s.addRootNodes(ctx, proxyURL, web, pi1Source); err != nil {
			return err
		}
	}
	return s.check(ctx)
}

// addRootNodes adds pi4 (SSH fallback with its UDP dropped) and pi5 (TUN).
func (s *session) addRootNodes(ctx context.Context, proxyURL, web, pi1Source string) error {
	port, err := freePort("udp")
	if err != nil {
		return err
	}
	unblock, err := blockUDP(ctx, port)
	if err != nil {
		s.notes = append(s.notes, "SSH fallback with UDP blocked skipped: "+err.Error())
	} else {
		s.unblock = unblock
		pi4, err := s.addNode(ctx, "pi4", "--fallback", "always", "--listen-port", strconv.Itoa(port), "--expose", web)
		if err != nil {
			return err
		}
		s.http = append(s.http, &httpTarget{key: "fallback-ssh", label: "SSH fallback: proxy → pi4 (--fallback always, UDP blocked)",
			url: proxyURL, host: "pi4.localhost", node: pi4, want: pathSSH, fallback: true})
	}
	pi5, err := s.addNode(ctx, "pi5", "--tun", tunName, "--expose", web)
	if err != nil {
		return err
	}
	s.http = append(s.http, &httpTarget{key: "tun", label: "TUN: proxy (netstack) → pi5 (--tun)", url: proxyURL, host: "pi5.localhost", node: pi5, want: pathWG})
	s.bulk = append(s.bulk, &bulkPath{key: "tun", label: "TUN: host → pi5 TUN → pi1 (netstack)", args: []string{"-addr", pi1Source}, via: pi5, peer: "pi1"})
	return nil
}

func (s *session) addNode(ctx context.Context, name string, flags ...string) (*node, error) {
	n, err := s.mesh.addNode(ctx, name, flags...)
	if err != nil {
		return nil, err
	}
	s.nodes = append(s.nodes, n)
	return n, nil
}

// tearDown stops every process and removes the nftables rule, if any.
func (s *session) tearDown() {
	s.ps.stopAll()
	if s.unblock != nil {
		s.unblock()
		s.unblock = nil
	}
}

// meshProcs are the meshctl processes: the server and every node.
func (s *session) meshProcs() []*proc {
	out := []*proc{s.mesh.server}
	for _, n := range s.nodes {
		out = append(out, n.proc)
	}
	return out
}

// check waits (up to a minute each) until every path serves the expected
// bytes, through the expected way.
func (s *session) check(ctx context.Context) error {
	fmt.Fprintln(s.o.log, "checking that every path serves the expected bytes …")
	for _, t := range s.http {
		if t.fallback {
			err := waitFor(ctx, time.Minute, func() error {
				st, err := s.mesh.status(ctx, t.node)
				if err == nil && !st.Fallback.Active {
					err = fmt.Errorf("node %s: SSH fallback not active (%s)", t.node.name, st.Fallback.Reason)
				}
				return err
			})
			if err != nil {
				return err
			}
		}
		err := waitFor(ctx, time.Minute, func() error {
			for _, sz := range sizes {
				before, err := s.wgBytes(ctx, t)
				if err != nil {
					return err
				}
				if err := fetch(ctx, t.url+sz.path, t.host, pattern(sz.n)); err != nil {
					return fmt.Errorf("%s: %w", t.label, err)
				}
				if sz.n < 1<<20 || t.node == nil {
					continue
				}
				after, err := s.wgBytes(ctx, t)
				if err != nil {
					return err
				}
				if got := pathOf(after-before, int64(sz.n)); t.want != "" && got != t.want {
					return fmt.Errorf("%s: the proxy reached %s by %s, want %s", t.label, t.node.name, got, t.want)
				}
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	for _, b := range s.bulk {
		err := waitFor(ctx, time.Minute, func() error {
			return s.runBulkClient(ctx, append([]string{"-check"}, b.args...), nil)
		})
		if err != nil {
			return fmt.Errorf("bulk path %s: %w", b.label, err)
		}
	}
	for _, t := range s.http {
		if t.node != nil {
			t.wgPath = s.mesh.peerPath(ctx, t.node, "proxy")
		}
	}
	for _, b := range s.bulk {
		if b.via != nil {
			b.wgPath = s.mesh.peerPath(ctx, b.via, b.peer)
		}
	}
	return nil
}

// wgBytes is the WireGuard byte count of t's node (0 for the baselines).
func (s *session) wgBytes(ctx context.Context, t *httpTarget) (int64, error) {
	if t.node == nil {
		return 0, nil
	}
	return s.mesh.wgBytes(ctx, t.node)
}

// pathOf says how bytes reached a node: if its WireGuard counters grew by
// at least half the payload moved, WireGuard carried it.
func pathOf(wgDelta, moved int64) string {
	if wgDelta >= moved/2 {
		return pathWG
	}
	return pathSSH
}

var fetchClient = &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// fetch GETs url with the Host header host and compares the body with want.
func fetch(ctx context.Context, url, host string, want []byte) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	if host != "" {
		req.Host = host
	}
	resp, err := fetchClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return fmt.Errorf("GET %s (Host %s): %w", url, host, err)
	}
	if resp.StatusCode != http.StatusOK || !bytes.Equal(body, want) {
		return fmt.Errorf("GET %s (Host %s): %s, %d bytes, want 200 and the %d-byte pattern", url, host, resp.Status, len(body), len(want))
	}
	return nil
}

// runBulkClient runs the bulk client role with args; if res is not nil it
// decodes the client's report into it, with the client's CPU time.
func (s *session) runBulkClient(ctx context.Context, args []string, res *bulkResult) error {
	cmd := exec.CommandContext(ctx, s.self, args...)
	cmd.Env = append(os.Environ(), roleEnv+"="+roleBulk)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("%w: %s", err, strings.TrimSpace(stderr.String()))
	}
	if res != nil {
		if err := json.Unmarshal(out, res); err != nil {
			return fmt.Errorf("bulk client printed %q: %w", out, err)
		}
		ru := cmd.ProcessState.SysUsage().(*syscall.Rusage)
		res.cpu = time.Duration(ru.Utime.Nano() + ru.Stime.Nano()).Seconds()
	}
	return nil
}
