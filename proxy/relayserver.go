package proxy

import (
	"context"
	"encoding/base64"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync/atomic"

	"github.com/meshctl/meshctl/proxy/relay"
	"github.com/meshctl/meshctl/wire"
)

// The relay. With the SSH fallback on, the proxy also runs a relay (package
// proxy/relay) for peers that have no direct UDP path to each other: a
// node reaches it by opening an SSH channel of type wire.SSHRelayChannel on
// its SSH connection to the proxy, so the relay knows the node by the name
// its SSH certificate proved, and maps that name to the WireGuard key the
// proxy's netmap gives it. Members with a WireGuard key (roles node and
// proxy, and the proxy itself) may relay; SSH-only nodes may not. The
// proxy's own agent attaches to the relay in-process (AgentOptions.
// RelayDial, over a net.Pipe). A node that leaves the netmap or changes its
// key is cut from the relay at once.

// meshRelay is the proxy's relay server and its view of who may use it.
type meshRelay struct {
	srv     *relay.Server
	self    string                              // the proxy's own node name
	selfKey [32]byte                            // and its WireGuard public key, from its state
	keys    atomic.Pointer[map[string][32]byte] // name -> WireGuard public key
	policy  atomic.Pointer[relayPolicy]         // who may reach whom; nil in a mesh (anyone)
	closed  atomic.Bool
	log     *slog.Logger
}

// newMeshRelay returns the relay of the proxy named self, whose WireGuard
// public key is selfKey.
func newMeshRelay(self string, selfKey [32]byte, log *slog.Logger) (*meshRelay, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	r := &meshRelay{self: self, selfKey: selfKey, log: log}
	// Until the first netmap, only the proxy itself is known (its key from
	// its state), so that its own agent can attach at once.
	keys := map[string][32]byte{self: selfKey}
	r.keys.Store(&keys)
	srv, err := relay.New(relay.Options{Lookup: r.lookup, Allow: r.allow, Logger: log})
	if err != nil {
		return nil, err
	}
	r.srv = srv
	return r, nil
}

func (r *meshRelay) lookup(name string) ([32]byte, bool) {
	k, ok := (*r.keys.Load())[name]
	return k, ok
}

// relayPolicy is who may reach whom through the relay outside a mesh: the
// same pairs the coordinator lets see each other (a node's WireGuard has
// no peer it does not see, but the relay must not forward for it either).
type relayPolicy struct {
	proxies map[string]bool     // by name: they reach and are reached by everyone
	tags    map[string][]string // tags topology: each node's tags; nil in a hub
}

// allow: in a mesh, anyone reaches anyone; in the hub topology the relay
// forwards only between a node and a proxy; in the tags topology also
// between two nodes that share a tag.
func (r *meshRelay) allow(src, dst string) bool {
	p := r.policy.Load()
	switch {
	case p == nil, src == r.self, dst == r.self, p.proxies[src], p.proxies[dst]:
		return true
	case p.tags != nil:
		return wire.SharesTag(p.tags[src], p.tags[dst])
	}
	return false
}

// setTopology records the netmap's topology and what its policy needs.
// An unknown topology (a newer coordinator) is treated as a hub: the
// relay then forwards only to and from proxies, never more than meant.
func (r *meshRelay) setTopology(nm *wire.Netmap) {
	if nm.Topology == "" || nm.Topology == wire.TopologyMesh {
		r.policy.Store(nil)
		return
	}
	p := &relayPolicy{proxies: map[string]bool{}}
	if nm.Topology == wire.TopologyTags {
		p.tags = make(map[string][]string, len(nm.Peers))
	}
	for _, peer := range nm.Peers {
		if peer.Role == wire.RoleProxy {
			p.proxies[peer.Name] = true
		}
		if p.tags != nil {
			p.tags[peer.Name] = peer.Tags
		}
	}
	r.policy.Store(p)
}

// relayKeys returns who may use the relay according to nm: the members
// with a WireGuard key (roles node and proxy) and the proxy itself, by
// name. Peers whose key does not decode are left out.
func relayKeys(nm *wire.Netmap) map[string][32]byte {
	keys := make(map[string][32]byte, len(nm.Peers)+1)
	add := func(p wire.Peer) {
		if p.Name == "" {
			return
		}
		if k, ok := decodeKey(p.WireGuardKey); ok {
			keys[p.Name] = k
		}
	}
	for _, p := range nm.Peers {
		if p.Role == wire.RoleNode || p.Role == wire.RoleProxy {
			add(p)
		}
	}
	add(nm.Self)
	return keys
}

// decodeKey decodes a WireGuard public key (standard base64 of 32 bytes).
func decodeKey(s string) (k [32]byte, ok bool) {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil || len(b) != len(k) {
		return k, false
	}
	copy(k[:], b)
	return k, true
}

// setKeys swaps in a new table and cuts the nodes that left it or whose
// key changed.
func (r *meshRelay) setKeys(keys map[string][32]byte) {
	if _, ok := keys[r.self]; !ok { // a netmap without a usable Self
		keys[r.self] = r.selfKey
	}
	old := *r.keys.Swap(&keys)
	for name, k := range old {
		if nk, ok := keys[name]; !ok || nk != k {
			r.srv.Drop(name)
		}
	}
}

// serve runs the relay on a stream of node that the caller authenticated
// (the SSH server's Options.Relay).
func (r *meshRelay) serve(name string, ch io.ReadWriteCloser) {
	err := r.srv.ServeConn(name, ch)
	r.log.Debug("relay stream ended", "node", name, "reason", err)
}

// dial attaches the proxy's own agent to the relay (AgentOptions.RelayDial):
// one end of a pipe whose other end the relay serves under the proxy's
// name.
func (r *meshRelay) dial(ctx context.Context) (io.ReadWriteCloser, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if r.closed.Load() {
		return nil, errors.New("proxy: relay closed")
	}
	agentEnd, relayEnd := net.Pipe()
	go r.serve(r.self, relayEnd) // returns at the latest when the relay closes
	return agentEnd, nil
}

func (r *meshRelay) close() {
	r.closed.Store(true)
	r.srv.Close()
}
