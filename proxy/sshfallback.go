package proxy

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"sync/atomic"

	"github.com/meshctl/meshctl/proxy/sshtunnel"
	"github.com/meshctl/meshctl/wire"
	"golang.org/x/crypto/ssh"
)

// SSH fallback. Nodes whose UDP is blocked connect to the proxy's SSH
// server with the certificate their coordinator issued (principal = node
// name) and remote-forward their own services; the proxy then reaches
// those services through the SSH connection. A node's identity, and which
// services it may forward, come from the proxy's netmap: a revoked node
// leaves the netmap, so its SSH session is closed and its forwards vanish.
// When both a WireGuard path and an SSH forward exist, WireGuard wins as
// long as the proxy reaches the node directly over UDP (its probes are
// answered); otherwise the forward is the shorter way. The same SSH
// connection also carries the node's relay channel (see relayserver.go).

// SSHOptions configure the proxy's SSH fallback server.
type SSHOptions struct {
	// Listen is the TCP address, e.g. ":2222". Required.
	Listen string
	// HostSigner is the host key certified by the coordinator's SSH CA
	// (ssh.NewCertSigner). Required.
	HostSigner ssh.Signer
	// UserCA is the coordinator's SSH CA: it certifies nodes. Required.
	UserCA ssh.PublicKey
}

type sshFallback struct {
	srv   *sshtunnel.Server
	ln    net.Listener
	nodes atomic.Pointer[map[string]sshtunnel.NodeInfo] // active node name -> its services and relay right, from the netmap
}

func (p *Proxy) startSSH(o *SSHOptions) error {
	f := &sshFallback{}
	empty := map[string]sshtunnel.NodeInfo{}
	f.nodes.Store(&empty)
	var relayFn func(string, io.ReadWriteCloser)
	if p.relay != nil {
		relayFn = p.relay.serve
	}
	srv, err := sshtunnel.New(sshtunnel.Options{
		HostSigner: o.HostSigner,
		UserCA:     o.UserCA,
		Lookup:     f.lookup,
		Logger:     p.log.With("component", "ssh"),
		OnChange:   func() { p.handler.TableChanged() },
		Relay:      relayFn,
	})
	if err != nil {
		return err
	}
	ln, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return fmt.Errorf("SSH fallback: listen on %s: %w", o.Listen, err)
	}
	f.srv, f.ln = srv, ln
	p.ssh = f
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		if err := srv.Serve(ln); err != nil {
			p.log.Error("SSH fallback server stopped", "err", err)
		}
	}()
	p.log.Info("SSH fallback listening", "addr", ln.Addr().String())
	return nil
}

func (f *sshFallback) lookup(node string) (sshtunnel.NodeInfo, bool) {
	info, ok := (*f.nodes.Load())[node]
	return info, ok
}

// setNetmap refreshes which nodes may use the SSH fallback and closes the
// sessions of nodes that left the netmap (revoked). relay holds the names
// that may use the relay (relayKeys): nodes with a WireGuard key. Other
// proxies may log in for the relay only: they publish nothing here.
func (f *sshFallback) setNetmap(nm *wire.Netmap, relay map[string][32]byte) {
	nodes := make(map[string]sshtunnel.NodeInfo, len(nm.Peers)+len(nm.SSHOnly))
	for _, peer := range nm.Peers {
		_, mayRelay := relay[peer.Name]
		switch peer.Role {
		case wire.RoleNode:
			nodes[peer.Name] = sshtunnel.NodeInfo{Services: slices.Clone(peer.Services), Relay: mayRelay}
		case wire.RoleProxy:
			if mayRelay {
				nodes[peer.Name] = sshtunnel.NodeInfo{Relay: true}
			}
		}
	}
	for _, peer := range nm.SSHOnly {
		if peer.Role == wire.RoleSSH {
			nodes[peer.Name] = sshtunnel.NodeInfo{Services: slices.Clone(peer.Services)}
		}
	}
	old := f.nodes.Swap(&nodes)
	// A node that left may hold a session with forwards, or one with only
	// a relay channel: both end.
	for name := range *old {
		if _, ok := nodes[name]; !ok {
			f.srv.DropNode(name)
		}
	}
	for _, fw := range f.srv.Forwards() {
		if _, ok := nodes[fw.Node]; !ok {
			f.srv.DropNode(fw.Node)
		}
	}
}

// hasForward reports whether node forwards service over SSH now.
func (f *sshFallback) hasForward(node, service string) bool {
	return slices.Contains(f.srv.Forwards(), sshtunnel.Forward{Node: node, Service: service})
}

// directPath reports whether the proxy reaches node over a direct UDP
// path confirmed by probes (WireGuard through the relay would ride on the
// node's SSH connection anyway, so its forward is the shorter way).
func directPath(p *Proxy, node string) bool {
	info, ok := p.agent.PeerPath(node)
	return ok && info.Path == "direct" && info.Confirmed
}

// dial reaches a route's address: through WireGuard, or through the node's
// SSH tunnel when it forwards that service and WireGuard is not up.
func (p *Proxy) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	if f := p.ssh; f != nil {
		if ap, err := netip.ParseAddrPort(addr); err == nil {
			rt, ok := p.table.Load().RouteFor(ap)
			if ok && (rt.SSHOnly || f.hasForward(rt.Node, rt.Service) && !directPath(p, rt.Node)) {
				return f.srv.Dial(ctx, rt.Node, rt.Service)
			}
		}
	}
	if ap, err := netip.ParseAddrPort(addr); err == nil && placeholders.Contains(ap.Addr()) {
		return nil, fmt.Errorf("%s: an SSH-only node is reached only through its SSH tunnel", addr)
	}
	return p.agent.DialContext(ctx, network, addr)
}

// placeholders holds SSH-only nodes' route addresses: never dialed.
var placeholders = netip.MustParsePrefix("240.0.0.0/4")

// SSHAddr is the SSH fallback's listening address (nil without one).
func (p *Proxy) SSHAddr() net.Addr {
	if p.ssh == nil {
		return nil
	}
	return p.ssh.ln.Addr()
}
