package node

import (
	"context"
	"encoding/base64"
	"errors"
	"net/netip"

	"github.com/meshctl/meshctl/node/pathbind"
	"github.com/meshctl/meshctl/node/wgconf"
	"github.com/meshctl/meshctl/proxy/relay"
	"github.com/meshctl/meshctl/wire"
	"golang.org/x/crypto/ssh"
)

// Paths between peers. The agent's WireGuard device sends through a
// pathbind.Bind, which picks per peer a direct UDP path (when probes from
// the WireGuard socket are answered) or the proxy's relay. The relay is
// reached over the agent's SSH connection to the proxy (channel
// wire.SSHRelayChannel), the same connection the SSH fallback forwards
// services on; the proxy itself attaches in process (AgentOptions.RelayDial).

// configureBind hands the Bind the peers of a validated netmap, and sets
// each peer's UAPI endpoint to its per-peer Endpoint (EndpointID).
func (a *Agent) configureBind(nm *wire.Netmap, peers []wgconf.Peer) {
	disco := make(map[string]string, len(nm.Peers))
	for _, p := range nm.Peers {
		disco[p.WireGuardKey] = p.DiscoKey
	}
	cfgs := make([]pathbind.PeerConfig, 0, len(peers))
	for i := range peers {
		p := &peers[i]
		p.EndpointID = pathbind.EndpointID(p.PublicKey)
		c := pathbind.PeerConfig{Key: p.PublicKey, Name: p.Name, Candidates: p.Candidates, Proxy: p.Keepalive > 0}
		if k, err := base64.StdEncoding.DecodeString(disco[p.PublicKey.String()]); err == nil && len(k) == 32 {
			c.DiscoKey = [32]byte(k)
		}
		cfgs = append(cfgs, c)
	}
	a.bind.SetPeers(cfgs)
	relayAddr, _ := netip.ParseAddrPort(nm.ProxySSH)
	a.bind.SetRelay(nm.ProxySSH != "" && (a.opts.RelayDial != nil || a.opts.Fallback != FallbackOff), relayAddr)
}

// relayDial opens the relay: in process for the proxy, else a relay
// channel on the agent's SSH connection to the proxy.
func (a *Agent) relayDial(ctx context.Context) (pathbind.RelayConn, error) {
	if a.opts.RelayDial != nil {
		rw, err := a.opts.RelayDial(ctx)
		if err != nil {
			return nil, err
		}
		return relay.NewClient(rw), nil
	}
	if a.opts.Fallback == FallbackOff {
		return nil, errors.New("the relay is reached over SSH, and the SSH fallback is off (--fallback off)")
	}
	cl, err := a.ssh.get(ctx)
	if err != nil {
		return nil, err
	}
	ch, reqs, err := cl.OpenChannel(wire.SSHRelayChannel, nil)
	if err != nil {
		return nil, err
	}
	go ssh.DiscardRequests(reqs)
	return relay.NewClient(ch), nil
}

// proxyPath reports how the proxy is reached.
func (a *Agent) proxyPath() (pathbind.PathInfo, bool) {
	cur := a.applied.Load()
	if cur == nil {
		return pathbind.PathInfo{}, false
	}
	for _, p := range cur.peers {
		if p.Keepalive > 0 {
			return a.bind.PathOf(p.PublicKey)
		}
	}
	return pathbind.PathInfo{}, false
}

// PeerPath reports how the peer named name is reached now.
func (a *Agent) PeerPath(name string) (pathbind.PathInfo, bool) {
	k, ok := a.peerKey(name)
	if !ok {
		return pathbind.PathInfo{}, false
	}
	return a.bind.PathOf(k)
}

// pathOf is the path of a peer for status and ping, in words.
func (a *Agent) pathOf(key [32]byte) (path, reason, endpoint string) {
	info, ok := a.bind.PathOf(key)
	if !ok {
		return "none", "not a peer", ""
	}
	if info.Endpoint.IsValid() && info.Endpoint.Port() != 0 {
		endpoint = info.Endpoint.String()
	}
	if info.Path == "relay" && a.fb != nil && a.fb.status().Active {
		info.Reason += "; relay over the SSH fallback connection"
	}
	return info.Path, info.Reason, endpoint
}
