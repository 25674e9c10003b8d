package coordinator

import (
	"bufio"
	"cmp"
	"encoding/json"
	"io"
	"maps"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
	"github.com/meshctl/meshctl/wire"
)

// peerRec is a published peer and its JSON encoding, made once when it is
// published and shared by every netmap and delta that lists it, so that
// rendering a netmap of n peers is n copies of bytes, not n encodings.
// Published records are never modified.
type peerRec struct {
	wire.Peer
	enc []byte
}

func newPeerRec(p *wire.Peer) *peerRec {
	b, err := json.Marshal(p)
	if err != nil {
		panic("coordinator: encode peer: " + err.Error()) // strings, numbers and bools only
	}
	return &peerRec{Peer: *p, enc: b}
}

// snapshot is an immutable view of the active (unrevoked) nodes at one
// netmap version. Readers load it without locks; the single writer
// (netmapState.publish) makes a new one per batch of changes, copying the
// indexes, never re-reading the store or rendering anyone's netmap.
type snapshot struct {
	version uint64
	byID    map[string]*peerRec
	// names indexes byID and sshByID by name; built on first use (see
	// byName), as only admin and proxy lookups by name need it.
	names     map[string]*peerRec
	namesOnce sync.Once
	sorted    []*peerRec // by name
	proxies   []*peerRec // the members with role proxy, by name (hub and tags topologies)
	// sshByID and sshSorted (by name) hold the active SSH-only nodes. They
	// are never WireGuard peers (no key, no address); only proxies'
	// netmaps carry them, in SSHOnly.
	sshByID   map[string]*peerRec
	sshSorted []*peerRec
	// accessRevoked lists the access keys revoked before they expired,
	// sorted by id. Only proxies' netmaps carry it, without the entries
	// that have expired since (pruned when rendering).
	accessRevoked []revokedAccess
	// diffs are the most recent changes, oldest first, the last one being
	// the change that made this snapshot: diffs[i] made version
	// version-len(diffs)+1+i. They let a node that has an older version
	// get only what changed (a delta), and let a long-poll tell whether a
	// change concerns its node at all. Bounded by maxDiffs and
	// maxDiffChanges.
	diffs []*diff
	// next is closed once the next snapshot is published.
	next chan struct{}
}

// Bounds of the ring of recent diffs a snapshot keeps. A node whose
// version is older than the ring gets a full netmap.
const (
	maxDiffs       = 1024
	maxDiffChanges = 16384
)

// diff is what changed from one snapshot to the next.
type diff struct {
	changes []change
	access  bool // the revoked access keys changed
}

// change is one node's entry before and after a diff (nil: absent, i.e.
// not enrolled yet, or revoked).
type change struct {
	id       string
	old, new *peerRec
}

// revokedAccess is an access key revoked before its expiry.
type revokedAccess struct {
	id      string
	expires time.Time
}

// netmapState holds the current snapshot and publishes changes.
type netmapState struct {
	snap atomic.Pointer[snapshot]

	// mu serialises publishers. Changes are queued first (qmu, queue) and
	// whoever holds mu publishes every queued change in one snapshot, so
	// that a burst of enrollments costs one snapshot copy per batch rather
	// than one per node.
	mu    sync.Mutex
	qmu   sync.Mutex
	queue []*pendingChange

	// accessMu serialises refreshes of the revoked access keys (read the
	// store, then publish), so that an older read never replaces a newer
	// one.
	accessMu sync.Mutex
}

type pendingChange struct {
	id   string
	p    *wire.Peer // nil removes
	done chan struct{}
}

// newNetmapState builds the first snapshot from the store's active nodes.
// Versions start at the wall clock in nanoseconds, so they keep growing
// across coordinator restarts and a node's cached version never aliases a
// new one.
//
// revoked are the access keys revoked before they expired (see
// revokedAccessOf).
func newNetmapState(nodes []store.Node, revoked []revokedAccess, now time.Time) *netmapState {
	s := &netmapState{}
	snap := &snapshot{version: uint64(now.UnixNano()), byID: map[string]*peerRec{},
		sshByID: map[string]*peerRec{}, accessRevoked: revoked, next: make(chan struct{})}
	for i := range nodes {
		if nodes[i].Revoked() {
			continue
		}
		r := newPeerRec(peerOf(&nodes[i]))
		if r.Role == wire.RoleSSH {
			snap.sshByID[r.ID] = r
			snap.sshSorted = append(snap.sshSorted, r)
		} else {
			snap.byID[r.ID] = r
			snap.sorted = append(snap.sorted, r)
		}
	}
	slices.SortFunc(snap.sorted, byName)
	slices.SortFunc(snap.sshSorted, byName)
	snap.proxies = proxiesOf(snap.sorted)
	s.snap.Store(snap)
	return s
}

func byName(a, b *peerRec) int { return cmp.Compare(a.Name, b.Name) }

// byNameLookup returns the active node (SSH-only ones included) with this name.
func (snap *snapshot) byNameLookup(name string) (*peerRec, bool) {
	snap.namesOnce.Do(func() {
		snap.names = make(map[string]*peerRec, len(snap.byID)+len(snap.sshByID))
		for _, m := range []map[string]*peerRec{snap.byID, snap.sshByID} {
			for _, p := range m {
				snap.names[p.Name] = p
			}
		}
	})
	p, ok := snap.names[name]
	return p, ok
}

func proxiesOf(sorted []*peerRec) []*peerRec {
	var out []*peerRec
	for _, p := range sorted {
		if p.Role == wire.RoleProxy {
			out = append(out, p)
		}
	}
	return out
}

// lookup returns the active node (SSH-only ones included) named nameOrID,
// or else the active node with that id. Names win: a name that is also
// another node's id names the node with that name.
func (snap *snapshot) lookup(nameOrID string) (*wire.Peer, bool) {
	if p, ok := snap.byNameLookup(nameOrID); ok {
		return &p.Peer, true
	}
	if p, ok := snap.byID[nameOrID]; ok {
		return &p.Peer, true
	}
	if p, ok := snap.sshByID[nameOrID]; ok {
		return &p.Peer, true
	}
	return nil, false
}

func (s *netmapState) current() *snapshot { return s.snap.Load() }

// apply publishes a snapshot in which the node with id is replaced by p (p
// == nil removes it), then wakes every waiter. SSH-only nodes (role ssh)
// go to the SSH-only index, never among the WireGuard peers. Concurrent
// calls are published together; each returns once its change is in the
// current snapshot.
func (s *netmapState) apply(id string, p *wire.Peer) {
	pc := &pendingChange{id: id, p: p, done: make(chan struct{})}
	s.qmu.Lock()
	s.queue = append(s.queue, pc)
	s.qmu.Unlock()
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-pc.done: // published with an earlier batch while we waited for mu
		return
	default:
	}
	s.qmu.Lock()
	batch := s.queue
	s.queue = nil
	s.qmu.Unlock()
	s.publishChanges(batch)
	for _, c := range batch {
		close(c.done)
	}
}

// publishChanges publishes a snapshot with batch applied in order. The
// caller holds s.mu.
func (s *netmapState) publishChanges(batch []*pendingChange) {
	old := s.snap.Load()
	byID, sshByID := maps.Clone(old.byID), maps.Clone(old.sshByID)
	first := map[string]int{} // id -> index in changes
	var changes []change
	for _, pc := range batch {
		var next *peerRec
		if pc.p != nil {
			next = newPeerRec(pc.p)
		}
		prev := byID[pc.id]
		if prev == nil {
			prev = sshByID[pc.id]
		}
		if i, ok := first[pc.id]; ok {
			changes[i].new = next
		} else {
			first[pc.id] = len(changes)
			changes = append(changes, change{id: pc.id, old: prev, new: next})
		}
		delete(byID, pc.id)
		delete(sshByID, pc.id)
		switch {
		case next == nil:
		case next.Role == wire.RoleSSH:
			sshByID[pc.id] = next
		default:
			byID[pc.id] = next
		}
	}
	snap := &snapshot{version: old.version + 1, byID: byID, sshByID: sshByID,
		accessRevoked: old.accessRevoked}
	// The sorted lists: drop the changed nodes, merge their new entries in.
	var added, sshAdded []*peerRec
	for _, c := range changes {
		switch {
		case c.new == nil:
		case c.new.Role == wire.RoleSSH:
			sshAdded = append(sshAdded, c.new)
		default:
			added = append(added, c.new)
		}
	}
	snap.sorted = mergeSorted(old.sorted, first, added)
	snap.sshSorted = mergeSorted(old.sshSorted, first, sshAdded)
	snap.proxies = proxiesOf(snap.sorted)
	s.publish(old, snap, &diff{changes: changes})
}

// mergeSorted returns the entries of sorted whose ids are not in drop,
// with added merged in, by name.
func mergeSorted(sorted []*peerRec, drop map[string]int, added []*peerRec) []*peerRec {
	slices.SortFunc(added, byName)
	out := make([]*peerRec, 0, len(sorted)+len(added))
	i := 0
	for _, p := range sorted {
		if _, gone := drop[p.ID]; gone {
			continue
		}
		for i < len(added) && byName(added[i], p) < 0 {
			out = append(out, added[i])
			i++
		}
		out = append(out, p)
	}
	return append(out, added[i:]...)
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
	next := &snapshot{version: old.version + 1, byID: old.byID, sorted: old.sorted, proxies: old.proxies,
		sshByID: old.sshByID, sshSorted: old.sshSorted, accessRevoked: l}
	s.publish(old, next, &diff{access: true})
}

// publish makes snap (whose version is old's + 1, made by d) the current
// snapshot and wakes every waiter. The caller holds s.mu.
func (s *netmapState) publish(old, snap *snapshot, d *diff) {
	// Keep the ring bounded: drop the oldest diffs past either bound.
	diffs := old.diffs
	total := len(d.changes)
	keep := 0
	for i := len(diffs) - 1; i >= 0 && keep < maxDiffs-1; i-- {
		if total+len(diffs[i].changes) > maxDiffChanges {
			break
		}
		total += len(diffs[i].changes)
		keep++
	}
	snap.diffs = append(slices.Clip(diffs[len(diffs)-keep:]), d)
	snap.next = make(chan struct{})
	s.snap.Store(snap)
	close(old.next)
}

// visibleTo reports whether node self sees p as a WireGuard peer under
// topology: in the mesh topology every active member sees every other; in
// the hub topology a node sees only the proxies (a netmap whose size does
// not grow with the fleet); in the tags topology a node sees the proxies
// and the nodes that share a tag with it. Proxies always see everyone.
// Visibility is symmetric, and a node's WireGuard device has exactly the
// peers it sees, so a node cannot even send to a node it does not see.
func visibleTo(self, p *peerRec, topology string) bool {
	if p == nil || p.ID == self.ID || p.Role == wire.RoleSSH {
		return false
	}
	switch {
	case topology == TopologyMesh, self.Role == wire.RoleProxy, p.Role == wire.RoleProxy:
		return true
	case topology == TopologyTags:
		return wire.SharesTag(self.Tags, p.Tags)
	}
	return false
}

// netmapPlan is what a long-poll answers.
type netmapPlan struct {
	wait    bool // nothing the node sees has changed: keep waiting
	full    bool
	upserts []*peerRec // delta: peers added or changed, by name
	removed []string   // delta: ids of peers gone
}

// planFor decides what node self (active in snap) gets for a long-poll
// that has version since: nothing yet (no change it can see; the version
// it has stays valid), a delta (if it asked for deltas and the ring
// reaches back to since), or a full netmap. Versions after since up to
// checked were already found to change nothing it sees.
func (snap *snapshot) planFor(self *peerRec, since, checked uint64, topology string, wantDelta bool) netmapPlan {
	oldest := snap.version - uint64(len(snap.diffs)) // the version the ring starts from
	if since >= snap.version || since < oldest {
		return netmapPlan{full: true} // unknown to the ring: from before a restart, too old, or bogus
	}
	isProxy := self.Role == wire.RoleProxy
	relevant := false
	for v := max(checked, since) + 1; v <= snap.version && !relevant; v++ {
		d := snap.diffs[v-oldest-1]
		relevant = d.access && isProxy
		for _, c := range d.changes {
			if relevant {
				break
			}
			relevant = c.id == self.ID || visibleTo(self, c.old, topology) || visibleTo(self, c.new, topology) ||
				(isProxy && (c.old != nil && c.old.Role == wire.RoleSSH || c.new != nil && c.new.Role == wire.RoleSSH))
		}
	}
	if !relevant {
		return netmapPlan{wait: true}
	}
	if !wantDelta {
		return netmapPlan{full: true}
	}
	// Compose the diffs since the node's version: each touched node's
	// entry then (the first diff's old) against now.
	then := map[string]*peerRec{}
	var order []string
	for _, d := range snap.diffs[since-oldest:] {
		for _, c := range d.changes {
			if c.id == self.ID && (c.old == nil || c.new == nil || c.old.Role != c.new.Role || !slices.Equal(c.old.Tags, c.new.Tags)) {
				return netmapPlan{full: true} // its own role or tags changed: what it sees may have changed wholesale
			}
			if _, seen := then[c.id]; !seen {
				then[c.id] = c.old
				order = append(order, c.id)
			}
		}
	}
	var p netmapPlan
	for _, id := range order {
		now := snap.byID[id]
		switch {
		case visibleTo(self, now, topology):
			if now != then[id] {
				p.upserts = append(p.upserts, now)
			}
		case visibleTo(self, then[id], topology):
			p.removed = append(p.removed, id)
		}
	}
	if n := len(p.upserts) + len(p.removed); n > 64 && n > len(snap.visibleFor(self, topology))/2 {
		return netmapPlan{full: true} // as big as the netmap itself
	}
	slices.SortFunc(p.upserts, byName)
	return p
}

// netmapHead is wire.Netmap without Peers: every field a netmap and a
// delta carry in full. writeNetmap appends the peers, pre-encoded.
// TestNetmapHeadMirrorsWire keeps it in step with wire.Netmap.
type netmapHead struct {
	Version          uint64      `json:"version"`
	Delta            bool        `json:"delta,omitempty"`
	Base             uint64      `json:"base,omitempty"`
	Removed          []string    `json:"removed,omitempty"`
	Self             wire.Peer   `json:"self"`
	ProxyEndpoint    string      `json:"proxy_endpoint,omitempty"`
	ProxyEndpointKey string      `json:"proxy_endpoint_key,omitempty"`
	Domain           string      `json:"domain,omitempty"`
	SSHOnly          []wire.Peer `json:"ssh_only,omitempty"`
	ProxySSH         string      `json:"proxy_ssh,omitempty"`
	AccessRevoked    []string    `json:"access_revoked,omitempty"`
	Topology         string      `json:"topology,omitempty"`
	IPv4Pool         string      `json:"ipv4_pool"`
	IPv6Pool         string      `json:"ipv6_pool"`
}

// headFor renders the fields of self's netmap other than the peers.
func (snap *snapshot) headFor(self *peerRec, o *Options, ipv6Pool netip.Prefix) netmapHead {
	h := netmapHead{
		Version:       snap.version,
		Self:          self.Peer,
		ProxyEndpoint: o.WGEndpoint,
		Domain:        o.Domain,
		ProxySSH:      o.SSHEndpoint,
		Topology:      string(o.Topology),
		IPv4Pool:      o.IPv4Pool.String(),
		IPv6Pool:      ipv6Pool.String(),
	}
	if o.WGEndpoint != "" && o.EmbeddedProxy != "" {
		// WGEndpoint is the embedded proxy's: say whose, so that a
		// standalone proxy beside it keeps its own endpoints.
		for _, p := range snap.proxies {
			if p.Name == o.EmbeddedProxy {
				h.ProxyEndpointKey = p.WireGuardKey
			}
		}
	}
	if self.Role == wire.RoleProxy && len(snap.sshSorted) > 0 {
		h.SSHOnly = make([]wire.Peer, 0, len(snap.sshSorted))
		for _, p := range snap.sshSorted {
			h.SSHOnly = append(h.SSHOnly, p.Peer)
		}
	}
	if self.Role == wire.RoleProxy && len(snap.accessRevoked) > 0 {
		now := o.Now()
		for _, r := range snap.accessRevoked {
			if now.Before(r.expires) {
				h.AccessRevoked = append(h.AccessRevoked, r.id)
			}
		}
	}
	return h
}

// visibleFor lists the peers self sees under topology, by name (itself
// may be included: writers skip it).
func (snap *snapshot) visibleFor(self *peerRec, topology string) []*peerRec {
	switch {
	case self.Role == wire.RoleProxy || topology == TopologyMesh:
		return snap.sorted
	case topology == TopologyHub:
		return snap.proxies
	}
	var out []*peerRec
	for _, p := range snap.sorted {
		if visibleTo(self, p, topology) {
			out = append(out, p)
		}
	}
	return out
}

// netmapJSON is one netmap or delta, ready to write: its head encoded, and
// the pre-encoded peers that follow it.
type netmapJSON struct {
	head  []byte // encoded netmapHead, without its closing brace
	peers []*peerRec
	skip  string // the id of a peer to leave out (the node itself)
	size  int
}

// render prepares self's netmap: a delta if plan has one, else full.
func (snap *snapshot) render(self *peerRec, since uint64, plan netmapPlan, o *Options, ipv6Pool netip.Prefix) *netmapJSON {
	h := snap.headFor(self, o, ipv6Pool)
	peers := snap.visibleFor(self, o.Topology)
	if !plan.full {
		h.Delta, h.Base, h.Removed, peers = true, since, plan.removed, plan.upserts
	}
	b, err := json.Marshal(&h)
	if err != nil {
		panic("coordinator: encode netmap: " + err.Error())
	}
	nj := &netmapJSON{head: b[:len(b)-1], peers: peers, skip: self.ID}
	nj.size = len(nj.head) + len(`,"peers":[]}`)
	n := 0
	for _, p := range peers {
		if p.ID != nj.skip {
			nj.size += len(p.enc)
			n++
		}
	}
	nj.size += max(0, n-1) // commas
	return nj
}

// bufPool holds the writers netmaps are streamed through, so that a full
// netmap of thousands of peers goes out in large TLS records without ever
// being assembled in memory.
var bufPool = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 32<<10) }}

// writeTo writes the netmap as JSON to w.
func (nj *netmapJSON) writeTo(w io.Writer) error {
	bw := bufPool.Get().(*bufio.Writer)
	bw.Reset(w)
	defer func() {
		bw.Reset(nil)
		bufPool.Put(bw)
	}()
	bw.Write(nj.head)
	bw.WriteString(`,"peers":[`)
	sep := false
	for _, p := range nj.peers {
		if p.ID == nj.skip {
			continue
		}
		if sep {
			bw.WriteByte(',')
		}
		bw.Write(p.enc)
		sep = true
	}
	bw.WriteString(`]}`)
	return bw.Flush()
}

// writeNetmapResponse answers a netmap request with nj. Like writeJSON, it
// ignores write errors: the status is sent, and a client that went away
// mid-answer is nobody's to tell.
func writeNetmapResponse(w http.ResponseWriter, nj *netmapJSON) {
	h := w.Header()
	h["Content-Type"] = []string{"application/json"}
	h["Cache-Control"] = []string{"no-store"}
	h["Content-Length"] = []string{strconv.Itoa(nj.size + 1)}
	w.WriteHeader(http.StatusOK)
	if nj.writeTo(w) == nil {
		w.Write([]byte{'\n'})
	}
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
