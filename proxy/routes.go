// Package proxy is the HTTP routing core of the meshctl proxy: it maps host
// names under the mesh domain to a node's service and forwards requests to
// the node's overlay address through a userspace network stack.
package proxy

import (
	"hash/fnv"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"

	"github.com/meshctl/meshctl/wire"
)

// DefaultService is the service that <node>.<domain> leads to when a node
// publishes one by this name; otherwise the node's first service does.
const DefaultService = "web"

// Route is where a host name leads.
type Route struct {
	Host    string // canonical host, e.g. "pi1.example.com"
	Node    string // node name
	NodeID  string
	Service string // service name
	// Addr is the node's overlay IPv4 and the service's port: the only
	// thing the proxy ever dials.
	Addr   netip.AddrPort
	Public bool
	// SSHOnly marks a route to an SSH-only node (no WireGuard, no overlay
	// address): Addr is then a placeholder in 240.0.0.0/4, never a
	// destination of any packet; the proxy reaches the service only through
	// the node's SSH tunnel.
	SSHOnly bool
}

// Table is an immutable route table built from a netmap; it is safe for
// concurrent readers. A nil *Table is an empty table.
type Table struct {
	byHost map[string]Route
	routes []Route                   // sorted by Host
	addrs  map[netip.AddrPort]string // dialable address -> node ID
	byAddr map[netip.AddrPort]Route  // dialable address -> its (service) route
}

// BuildTable builds the route table for a netmap. For every peer with role
// "node" and at least one service, <node>.<domain> leads to its default
// service and <service>--<node>.<domain> to each service. Peers with an
// unparsable IPv4 or an invalid name, services with an invalid name or port
// 0, and host names that would not be valid DNS names are skipped. If two
// peers claim the same name (which the coordinator prevents), the first one
// in the netmap wins. An invalid domain yields an empty table.
func BuildTable(nm *wire.Netmap, domain string) *Table {
	t := &Table{byHost: map[string]Route{}, addrs: map[netip.AddrPort]string{}, byAddr: map[netip.AddrPort]Route{}}
	domain = normalizeDomain(domain)
	if nm == nil || domain == "" {
		return t
	}
	for _, p := range nm.Peers {
		ip, err := netip.ParseAddr(p.IPv4)
		if p.Role != wire.RoleNode || !validName(p.Name) || err != nil || !ip.Is4() {
			continue
		}
		if _, taken := t.byHost[p.Name+"."+domain]; taken {
			continue
		}
		t.addServices(p, ip, domain, false)
	}
	for _, p := range nm.SSHOnly {
		if p.Role != wire.RoleSSH || !validName(p.Name) {
			continue
		}
		if _, taken := t.byHost[p.Name+"."+domain]; taken {
			continue
		}
		t.addServices(p, placeholderAddr(p.ID, t.addrs), domain, true)
	}
	slices.SortFunc(t.routes, func(a, b Route) int { return strings.Compare(a.Host, b.Host) })
	return t
}

// addServices adds the routes of one node: <service>--<node>.<domain> for
// each service and <node>.<domain> for the default one. An SSH-only node's
// routes get placeholder ports (1, 2, …) on its placeholder address, so
// that each service has an address of its own.
func (t *Table) addServices(p wire.Peer, ip netip.Addr, domain string, sshOnly bool) {
	var def *Route
	seen := map[string]bool{}
	for i, s := range p.Services {
		if !validName(s.Name) || s.Port == 0 || seen[s.Name] {
			continue
		}
		seen[s.Name] = true
		port := s.Port
		if sshOnly {
			port = uint16(i + 1)
		}
		rt := Route{
			Host:    ServiceHost(s.Name, p.Name, domain),
			Node:    p.Name,
			NodeID:  p.ID,
			Service: s.Name,
			Addr:    netip.AddrPortFrom(ip, port),
			Public:  s.Public,
			SSHOnly: sshOnly,
		}
		if validHost(rt.Host) { // else "<service>--<node>" is over 63 characters
			t.add(rt)
		}
		if def == nil || s.Name == DefaultService && def.Service != DefaultService {
			def = &rt
		}
	}
	if def != nil {
		rt := *def
		rt.Host = p.Name + "." + domain
		t.add(rt)
	}
}

// placeholderAddr derives a stable address in 240.0.0.0/4 (reserved, never
// routed) from an SSH-only node's id, so that its routes keep their
// addresses when other nodes come and go.
func placeholderAddr(id string, used map[netip.AddrPort]string) netip.Addr {
	h := fnv.New32a()
	h.Write([]byte(id))
	v := h.Sum32() & 0x00ffffff
	for {
		a := netip.AddrFrom4([4]byte{240, byte(v >> 16), byte(v >> 8), byte(v)})
		taken := false
		for ap, owner := range used {
			if ap.Addr() == a && owner != id {
				taken = true
				break
			}
		}
		if !taken {
			return a
		}
		v = (v + 1) & 0x00ffffff
	}
}

func (t *Table) add(rt Route) {
	t.byHost[rt.Host] = rt
	t.routes = append(t.routes, rt)
	t.addrs[rt.Addr] = rt.NodeID
	if _, ok := t.byAddr[rt.Addr]; !ok {
		t.byAddr[rt.Addr] = rt
	}
}

// RouteFor returns the route that leads to a dialable address.
func (t *Table) RouteFor(addr netip.AddrPort) (Route, bool) {
	if t == nil {
		return Route{}, false
	}
	rt, ok := t.byAddr[addr]
	return rt, ok
}

// Lookup finds the route for a host as sent by a client (the Host header);
// the host is normalised with CanonicalHost first.
func (t *Table) Lookup(host string) (Route, bool) {
	if t == nil {
		return Route{}, false
	}
	rt, ok := t.byHost[CanonicalHost(host)]
	return rt, ok
}

// Routes returns a copy of all routes, sorted by Host.
func (t *Table) Routes() []Route {
	if t == nil {
		return nil
	}
	return slices.Clone(t.routes)
}

// Len is the number of routes (host names).
func (t *Table) Len() int {
	if t == nil {
		return 0
	}
	return len(t.routes)
}

// hasAddr reports whether some route leads to exactly addr.
func (t *Table) hasAddr(addr netip.AddrPort) bool {
	if t == nil {
		return false
	}
	_, ok := t.addrs[addr]
	return ok
}

// sameAddrs reports whether t and u lead to the same addresses on the same
// nodes. When they do not, pooled connections may lead to a device that no
// longer owns an address, or to none.
func (t *Table) sameAddrs(u *Table) bool {
	if t == nil || u == nil {
		return t.Len() == 0 && u.Len() == 0
	}
	return maps.Equal(t.addrs, u.addrs)
}

// ServiceHost is the host of a named service: "<service>--<node>.<domain>",
// a single label under the domain so that one wildcard certificate for
// *.<domain> covers every service.
func ServiceHost(service, node, domain string) string {
	return service + "--" + node + "." + normalizeDomain(domain)
}

// CanonicalHost lower-cases host, strips a :port and one trailing dot. It
// returns "" for an empty host, IP literals (IPv4, IPv6, bracketed) and
// anything that is not a valid DNS name.
func CanonicalHost(host string) string {
	if strings.Contains(host, ":") {
		h, port, err := net.SplitHostPort(host)
		if err != nil || strings.Trim(port, "0123456789") != "" {
			return "" // includes bare IPv6 literals
		}
		host = h
	}
	host = strings.TrimSuffix(strings.ToLower(host), ".")
	if _, err := netip.ParseAddr(host); err != nil && validHost(host) {
		return host
	}
	return ""
}

// normalizeDomain canonicalises the configured domain like a host name.
func normalizeDomain(domain string) string { return CanonicalHost(domain) }

// validHost reports whether h (lower-case, no trailing dot) is a DNS name
// of letters, digits and hyphens whose last label is not a number (browsers
// treat "127.1" or "0x7f.1" as IPv4 addresses).
func validHost(h string) bool {
	if h == "" || len(h) > 253 {
		return false
	}
	labels := strings.Split(h, ".")
	for _, l := range labels {
		if !validLabel(l) {
			return false
		}
	}
	last := labels[len(labels)-1]
	hex, isHex := strings.CutPrefix(last, "0x")
	return strings.Trim(last, "0123456789") != "" && !(isHex && strings.Trim(hex, "0123456789abcdef") == "")
}

// validLabel reports whether l is a DNS label: 1 to 63 letters, digits and
// hyphens, not starting or ending with a hyphen.
func validLabel(l string) bool {
	if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
		return false
	}
	for _, c := range []byte(l) {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// validName mirrors the coordinator's name rules (coordinator.ValidateName,
// without its reserved list): a lower-case DNS label without "--".
func validName(n string) bool {
	return validLabel(n) && !strings.Contains(n, "--")
}
