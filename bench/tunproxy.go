//go:build linux

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
	"strconv"
	"time"
)

// proxyTUNName is the TUN interface of the standalone proxy of the last
// phase.
const proxyTUNName = "mbench1"

// measureProxyTUN is the last phase (root): the proxy on a kernel TUN.
// One meshctl TUN per host (each routes the overlay pool), so the TUN node
// pi5 is stopped first; then a standalone `meshctl proxy serve --tun`
// joins, and its rows run interleaved with the reverse proxy baseline and
// the server's netstack proxy, which this phase measures again so that
// every ratio comes from the same phase.
func (s *session) measureProxyTUN(ctx context.Context) error {
	var pi5 *node
	for _, n := range s.nodes {
		if n.name == "pi5" {
			pi5 = n
		}
	}
	if pi5 == nil {
		return nil // not root: no TUN rows at all
	}
	fmt.Fprintln(s.o.log, "last phase: the proxy on a kernel TUN (pi5 stopped: one meshctl TUN per host) …")
	pi5.proc.stop()

	m := s.mesh
	var tok tokenJSON
	tokenArgs := []string{"token", "create", "--data-dir", m.data, "--role", "proxy", "--json"}
	m.note(tokenArgs)
	out, err := m.cli(ctx, tokenArgs...)
	if err != nil {
		return err
	}
	if err := json.Unmarshal(out, &tok); err != nil || tok.Token == "" {
		return fmt.Errorf("meshctl token create --role proxy --json printed %q: %v", out, err)
	}
	httpPort, err := freePort("tcp")
	if err != nil {
		return err
	}
	wgPort, err := freePort("udp")
	if err != nil {
		return err
	}
	httpAddr := "127.0.0.1:" + strconv.Itoa(httpPort)
	args := []string{"proxy", "serve", "--coordinator", tok.Coordinator, "--ca-pin", tok.CAPin, "--name", "tproxy",
		"--state-dir", filepath.Join(s.dir, "tproxy"), "--domain", "localhost", "--http", httpAddr,
		"--wg-listen", "127.0.0.1:" + strconv.Itoa(wgPort), "--ssh-listen", "", "--tun", proxyTUNName}
	m.cmds = append(m.cmds, "MESHCTL_TOKEN=… meshctl "+shellJoin(args))
	p, err := s.ps.start("meshctl proxy serve --tun", filepath.Join(s.dir, "tproxy.log"), []string{"MESHCTL_TOKEN=" + tok.Token}, nil, m.bin, args...)
	if err != nil {
		return err
	}
	s.tunProxy = p

	var pi1 *node
	for _, n := range s.nodes {
		if n.name == "pi1" {
			pi1 = n
		}
	}
	tunRow := &httpTarget{key: "tunproxy", label: "proxy on a kernel TUN (--tun) → pi1 (netstack)", url: "http://" + httpAddr, host: "pi1.localhost", node: pi1, want: pathWG}
	for _, t := range s.http {
		switch t.key {
		case "revproxy":
			s.tunPhase = append(s.tunPhase, &httpTarget{key: "tunphase-revproxy", label: t.label, url: t.url})
		case "mesh":
			s.tunPhase = append(s.tunPhase, &httpTarget{key: "tunphase-mesh", label: t.label, url: t.url, host: t.host, node: t.node, want: t.want})
		}
	}
	s.tunPhase = append(s.tunPhase, tunRow)
	err = waitFor(ctx, time.Minute, func() error {
		if p.exited() {
			return p.failure("exited")
		}
		for _, sz := range sizes {
			if err := fetch(ctx, tunRow.url+sz.path, tunRow.host, pattern(sz.n)); err != nil {
				return fmt.Errorf("%s: %w", tunRow.label, err)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	return s.httpRows(ctx, s.tunPhase)
}
