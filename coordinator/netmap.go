package coordinator

import (
	"cmp"
	"encoding/json"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
	"github.com/meshctl/meshctl/wire"
)

// snapshot is an immutable view of the active (unrevoked) nodes at one
// netmap version. Readers load it without locks; the single writer
// (netmapState.apply) publishes a new one per change, copying only the
// index, never re-reading the store or rendering every node's netmap.
type snapshot struct {
	version uint64
	byID    map[string]*wire.Peer
	sorted  []*wire.Peer // by name
}

// netmapState holds the current snapshot and wakes long-polls on change.
type netmapState struct {
	snap atomic.Pointer[snapshot]

	mu      sync.Mutex // serialises writers; guards changed
	changed chan struct{}
}

// newNetmapState builds the first snapshot from the store's active nodes.
// Versions start at the wall clock in nanoseconds, so they keep growing
// across coordinator restarts and a node's cached version never aliases a
// new one.
func newNetmapState(nodes []store.Node, now time.Time) *netmapState {
	s := &netmapState{changed: make(chan struct{})}
	byID := make(map[string]*wire.Peer, len(nodes))
	for i := range nodes {
		if !nodes[i].Revoked() {
			byID[nodes[i].ID] = peerOf(&nodes[i])
		}
	}
	s.snap.Store(newSnapshot(uint64(now.UnixNano()), byID))
	return s
}

func newSnapshot(version uint64, byID map[string]*wire.Peer) *snapshot {
	sorted := make([]*wire.Peer, 0, len(byID))
	for _, p := range byID {
		sorted = append(sorted, p)
	}
	slices.SortFunc(sorted, func(a, b *wire.Peer) int { return cmp.Compare(a.Name, b.Name) })
	return &snapshot{version: version, byID: byID, sorted: sorted}
}

func (s *netmapState) current() *snapshot { return s.snap.Load() }

// wait returns a channel closed at the next change after snap.
func (s *netmapState) wait(snap *snapshot) <-chan struct{} {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.snap.Load() != snap {
		c := make(chan struct{})
		close(c)
		return c
	}
	return s.changed
}

// apply publishes a new snapshot in which the node with id is replaced by
// p (p == nil removes it), then wakes every waiter.
func (s *netmapState) apply(id string, p *wire.Peer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.snap.Load()
	byID := make(map[string]*wire.Peer, len(old.byID)+1)
	for k, v := range old.byID {
		byID[k] = v
	}
	if p == nil {
		delete(byID, id)
	} else {
		byID[id] = p
	}
	s.snap.Store(newSnapshot(old.version+1, byID))
	close(s.changed)
	s.changed = make(chan struct{})
}

// netmapFor renders the netmap node id sees, or false if the node is not
// active in snap. Every active node sees every other (full mesh).
func (snap *snapshot) netmapFor(id string, o *Options, ipv6Pool netip.Prefix) (wire.Netmap, bool) {
	self, ok := snap.byID[id]
	if !ok {
		return wire.Netmap{}, false
	}
	nm := wire.Netmap{
		Version:       snap.version,
		Self:          *self,
		Peers:         make([]wire.Peer, 0, len(snap.sorted)),
		ProxyEndpoint: o.WGEndpoint,
		Domain:        o.Domain,
		IPv4Pool:      o.IPv4Pool.String(),
		IPv6Pool:      ipv6Pool.String(),
	}
	for _, p := range snap.sorted {
		if p.ID != id {
			nm.Peers = append(nm.Peers, *p)
		}
	}
	return nm, true
}

func peerOf(n *store.Node) *wire.Peer {
	var svcs []wire.Service
	if n.ServicesJSON != "" {
		_ = json.Unmarshal([]byte(n.ServicesJSON), &svcs) // written by us, validated on the way in
	}
	return &wire.Peer{
		ID:           n.ID,
		Name:         n.Name,
		Role:         n.Role,
		WireGuardKey: n.WireGuardKey,
		IPv4:         n.IPv4.String(),
		IPv6:         n.IPv6.String(),
		Endpoints:    slices.Clone(n.Endpoints),
		Services:     svcs,
		Tags:         slices.Clone(n.Tags),
	}
}
