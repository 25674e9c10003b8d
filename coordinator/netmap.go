package coordinator

import (
	"cmp"
	"encoding/json"
	"maps"
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
	byName  map[string]*wire.Peer
	sorted  []*wire.Peer // by name
	proxies []*wire.Peer // the members with role proxy, by name (hub topology)
	// sshByID and sshSorted (by name) hold the active SSH-only nodes. They
	// are never WireGuard peers (no key, no address); only proxies'
	// netmaps carry them, in SSHOnly.
	sshByID   map[string]*wire.Peer
	sshSorted []*wire.Peer
	// accessRevoked lists the access keys revoked before they expired,
	// sorted by id. Only proxies' netmaps carry it, without the entries
	// that have expired since (pruned when rendering).
	accessRevoked []revokedAccess
}

// revokedAccess is an access key revoked before its expiry.
type revokedAccess struct {
	id      string
	expires time.Time
}

// netmapState holds the current snapshot and wakes long-polls on change.
type netmapState struct {
	snap atomic.Pointer[snapshot]

	mu      sync.Mutex // serialises writers; guards changed
	changed chan struct{}

	// accessMu serialises refreshes of the revoked access keys (read the
	// store, then publish), so that an older read never replaces a newer
	// one.
	accessMu sync.Mutex
}

// newNetmapState builds the first snapshot from the store's active nodes.
// Versions start at the wall clock in nanoseconds, so they keep growing
// across coordinator restarts and a node's cached version never aliases a
// new one.
//
// revoked are the access keys revoked before they expired (see
// revokedAccessOf).
func newNetmapState(nodes []store.Node, revoked []revokedAccess, now time.Time) *netmapState {
	s := &netmapState{changed: make(chan struct{})}
	byID := make(map[string]*wire.Peer, len(nodes))
	sshByID := map[string]*wire.Peer{}
	for i := range nodes {
		if nodes[i].Revoked() {
			continue
		}
		if p := peerOf(&nodes[i]); p.Role == wire.RoleSSH {
			sshByID[p.ID] = p
		} else {
			byID[p.ID] = p
		}
	}
	s.snap.Store(newSnapshot(uint64(now.UnixNano()), byID, sshByID, revoked))
	return s
}

func newSnapshot(version uint64, byID, sshByID map[string]*wire.Peer, revoked []revokedAccess) *snapshot {
	sorted := make([]*wire.Peer, 0, len(byID))
	byName := make(map[string]*wire.Peer, len(byID)+len(sshByID))
	for _, p := range byID {
		sorted = append(sorted, p)
		byName[p.Name] = p
	}
	sshSorted := make([]*wire.Peer, 0, len(sshByID))
	for _, p := range sshByID {
		sshSorted = append(sshSorted, p)
		byName[p.Name] = p
	}
	byName2 := func(a, b *wire.Peer) int { return cmp.Compare(a.Name, b.Name) }
	slices.SortFunc(sorted, byName2)
	slices.SortFunc(sshSorted, byName2)
	var proxies []*wire.Peer
	for _, p := range sorted {
		if p.Role == wire.RoleProxy {
			proxies = append(proxies, p)
		}
	}
	return &snapshot{version: version, byID: byID, byName: byName, sorted: sorted, proxies: proxies,
		sshByID: sshByID, sshSorted: sshSorted, accessRevoked: revoked}
}

// lookup returns the active node (SSH-only ones included) named nameOrID,
// or else the active node with that id. Names win: a name that is also
// another node's id names the node with that name.
func (snap *snapshot) lookup(nameOrID string) (*wire.Peer, bool) {
	if p, ok := snap.byName[nameOrID]; ok {
		return p, true
	}
	if p, ok := snap.byID[nameOrID]; ok {
		return p, true
	}
	p, ok := snap.sshByID[nameOrID]
	return p, ok
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
// p (p == nil removes it), then wakes every waiter. SSH-only nodes (role
// ssh) go to the SSH-only index, never among the WireGuard peers.
func (s *netmapState) apply(id string, p *wire.Peer) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.snap.Load()
	byID, sshByID := maps.Clone(old.byID), maps.Clone(old.sshByID)
	if sshByID == nil {
		sshByID = map[string]*wire.Peer{}
	}
	delete(byID, id)
	delete(sshByID, id)
	switch {
	case p == nil:
	case p.Role == wire.RoleSSH:
		sshByID[id] = p
	default:
		byID[id] = p
	}
	s.publish(newSnapshot(old.version+1, byID, sshByID, old.accessRevoked))
}

// setAccessRevoked publishes a new snapshot with the same nodes and l as
// the revoked access keys, unless l is what the current snapshot has.
func (s *netmapState) setAccessRevoked(l []revokedAccess) {
	s.mu.Lock()
	defer s.mu.Unlock()
	old := s.snap.Load()
	if slices.Equal(old.accessRevoked, l) {
		return
	}
	next := *old
	next.version++
	next.accessRevoked = l
	s.publish(&next)
}

// publish stores snap as the current snapshot and wakes every waiter.
// The caller holds s.mu.
func (s *netmapState) publish(snap *snapshot) {
	s.snap.Store(snap)
	close(s.changed)
	s.changed = make(chan struct{})
}

// netmapFor renders the netmap node id sees, or false if the node is not
// active in snap. In the mesh topology every active member sees every
// other; in the hub topology a node sees only the proxies (a netmap whose
// size does not grow with the fleet), while proxies still see everyone.
func (snap *snapshot) netmapFor(id string, o *Options, ipv6Pool netip.Prefix) (wire.Netmap, bool) {
	self, ok := snap.byID[id]
	if !ok {
		return wire.Netmap{}, false
	}
	visible := snap.sorted
	if o.Topology == TopologyHub && self.Role != wire.RoleProxy {
		visible = snap.proxies
	}
	nm := wire.Netmap{
		Version:       snap.version,
		Self:          *self,
		Peers:         make([]wire.Peer, 0, len(visible)),
		ProxyEndpoint: o.WGEndpoint,
		Domain:        o.Domain,
		ProxySSH:      o.SSHEndpoint,
		Topology:      string(o.Topology),
		IPv4Pool:      o.IPv4Pool.String(),
		IPv6Pool:      ipv6Pool.String(),
	}
	for _, p := range visible {
		if p.ID != id {
			nm.Peers = append(nm.Peers, *p)
		}
	}
	if self.Role == wire.RoleProxy && len(snap.sshSorted) > 0 {
		nm.SSHOnly = make([]wire.Peer, 0, len(snap.sshSorted))
		for _, p := range snap.sshSorted {
			nm.SSHOnly = append(nm.SSHOnly, *p)
		}
	}
	if self.Role == wire.RoleProxy && len(snap.accessRevoked) > 0 {
		now := o.Now()
		for _, r := range snap.accessRevoked {
			if now.Before(r.expires) {
				nm.AccessRevoked = append(nm.AccessRevoked, r.id)
			}
		}
	}
	return nm, true
}

// revokedAccessOf picks the keys that were revoked before they expired and
// have not expired at now, sorted by id: the ones a proxy must refuse
// although it may have admitted them.
func revokedAccessOf(keys []store.AccessKey, now time.Time) []revokedAccess {
	var out []revokedAccess
	for _, k := range keys {
		if !k.RevokedAt.IsZero() && k.RevokedAt.Before(k.Expires) && now.Before(k.Expires) {
			out = append(out, revokedAccess{id: k.ID, expires: k.Expires})
		}
	}
	slices.SortFunc(out, func(a, b revokedAccess) int { return cmp.Compare(a.id, b.id) })
	return out
}

// peerOf renders a stored node as a peer. An admin's visibility override
// decides whether a service is public, whatever the node reported.
func peerOf(n *store.Node) *wire.Peer {
	var svcs []wire.Service
	if n.ServicesJSON != "" {
		_ = json.Unmarshal([]byte(n.ServicesJSON), &svcs) // written by us, validated on the way in
	}
	for i := range svcs {
		if public, ok := n.Visibility[svcs[i].Name]; ok {
			svcs[i].Public = public
		}
	}
	if n.Role == wire.RoleSSH { // no WireGuard key, addresses, endpoints, tags or disco key
		return &wire.Peer{ID: n.ID, Name: n.Name, Role: n.Role, Services: svcs}
	}
	return &wire.Peer{
		ID:           n.ID,
		Name:         n.Name,
		Role:         n.Role,
		WireGuardKey: n.WireGuardKey,
		IPv4:         addrString(n.IPv4),
		IPv6:         addrString(n.IPv6),
		Endpoints:    slices.Clone(n.Endpoints),
		Services:     svcs,
		Tags:         slices.Clone(n.Tags),
		DiscoKey:     n.DiscoKey,
	}
}

// addrString renders an address, "" for the zero one.
func addrString(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}
