package wgconf

import (
	"bytes"
	"encoding/hex"
	"fmt"
	"slices"
	"strings"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// FullConfig renders a complete UAPI "set" body: private_key, listen_port
// (0 = let the device pick), replace_peers=true, and every peer with
// public_key, replace_allowed_ips=true, its allowed_ip lines, endpoint if
// known and persistent_keepalive_interval.
func FullConfig(priv wgtypes.Key, listenPort int, peers []Peer) string {
	var b strings.Builder
	fmt.Fprintf(&b, "private_key=%s\n", hexKey(priv))
	fmt.Fprintf(&b, "listen_port=%d\n", listenPort)
	b.WriteString("replace_peers=true\n")
	for _, p := range peers {
		writePeer(&b, p)
	}
	return b.String()
}

// Summary names the peers a Diff touches, for logs. Names fall back to the
// base64 public key when a peer has none.
type Summary struct{ Added, Removed, Updated []string }

// Empty reports whether the diff changed nothing.
func (s Summary) Empty() bool {
	return len(s.Added)+len(s.Removed)+len(s.Updated) == 0
}

// String renders s as "added [a b] removed [c] updated [d]", omitting empty
// groups; "no changes" when s is empty.
func (s Summary) String() string {
	var parts []string
	for _, g := range []struct {
		verb  string
		names []string
	}{{"added", s.Added}, {"removed", s.Removed}, {"updated", s.Updated}} {
		if len(g.names) > 0 {
			parts = append(parts, fmt.Sprintf("%s %v", g.verb, g.names))
		}
	}
	if len(parts) == 0 {
		return "no changes"
	}
	return strings.Join(parts, " ")
}

// Diff renders the UAPI "set" body that turns a device configured as old
// into new, touching only peers that changed (peers are matched by public
// key; each list must not repeat a key):
//   - a peer absent from new: "public_key=…" and "remove=true";
//   - a peer new in new: its full block, as in FullConfig;
//   - a changed peer: "public_key=…", "update_only=true" and only the changed
//     attributes: replace_allowed_ips=true plus allowed_ip lines if its
//     addresses changed, endpoint only if EndpointID changed or (without
//     EndpointID) the desired endpoint changed to a
//     known one (an unchanged endpoint is never re-set, so WireGuard's
//     roaming is not undone; an endpoint that became unknown cannot be unset
//     in UAPI and is left alone), persistent_keepalive_interval if it
//     changed (compared in whole seconds).
//
// Unchanged peers (including changes of Name only) produce no lines, so
// their sessions are not disturbed. Removals come first, then updates, then
// additions, each in public key order. Diff returns "" and an empty Summary
// when nothing changed.
func Diff(old, new []Peer) (uapi string, s Summary) {
	oldBy := byKey(old)
	newBy := byKey(new)
	var b strings.Builder

	for _, p := range sortedPeers(oldBy) {
		if _, ok := newBy[p.PublicKey]; !ok {
			fmt.Fprintf(&b, "public_key=%s\nremove=true\n", hexKey(p.PublicKey))
			s.Removed = append(s.Removed, p.label())
		}
	}
	var added []Peer
	for _, n := range sortedPeers(newBy) {
		o, ok := oldBy[n.PublicKey]
		if !ok {
			added = append(added, n)
			continue
		}
		ipsChanged := !slices.Equal(o.AllowedIPs(), n.AllowedIPs())
		epChanged := n.Endpoint.IsValid() && n.Endpoint != o.Endpoint && n.EndpointID == ""
		if n.EndpointID != "" {
			epChanged = n.EndpointID != o.EndpointID
		}
		kaChanged := keepaliveSeconds(o.Keepalive) != keepaliveSeconds(n.Keepalive)
		if !ipsChanged && !epChanged && !kaChanged {
			continue
		}
		fmt.Fprintf(&b, "public_key=%s\nupdate_only=true\n", hexKey(n.PublicKey))
		if ipsChanged {
			writeAllowedIPs(&b, n)
		}
		if epChanged {
			fmt.Fprintf(&b, "endpoint=%s\n", n.endpointValue())
		}
		if kaChanged {
			fmt.Fprintf(&b, "persistent_keepalive_interval=%d\n", keepaliveSeconds(n.Keepalive))
		}
		s.Updated = append(s.Updated, n.label())
	}
	for _, n := range added {
		writePeer(&b, n)
		s.Added = append(s.Added, n.label())
	}
	return b.String(), s
}

// writePeer writes the complete block of one peer.
func writePeer(b *strings.Builder, p Peer) {
	fmt.Fprintf(b, "public_key=%s\n", hexKey(p.PublicKey))
	writeAllowedIPs(b, p)
	if p.Endpoint.IsValid() || p.EndpointID != "" {
		fmt.Fprintf(b, "endpoint=%s\n", p.endpointValue())
	}
	fmt.Fprintf(b, "persistent_keepalive_interval=%d\n", keepaliveSeconds(p.Keepalive))
}

// endpointValue is what the UAPI endpoint line carries: EndpointID when
// set, else Endpoint.
func (p Peer) endpointValue() string {
	if p.EndpointID != "" {
		return p.EndpointID
	}
	return p.Endpoint.String()
}

func writeAllowedIPs(b *strings.Builder, p Peer) {
	b.WriteString("replace_allowed_ips=true\n")
	for _, pfx := range p.AllowedIPs() {
		fmt.Fprintf(b, "allowed_ip=%s\n", pfx)
	}
}

func hexKey(k wgtypes.Key) string { return hex.EncodeToString(k[:]) }

func byKey(peers []Peer) map[wgtypes.Key]Peer {
	m := make(map[wgtypes.Key]Peer, len(peers))
	for _, p := range peers {
		m[p.PublicKey] = p
	}
	return m
}

func sortedPeers(m map[wgtypes.Key]Peer) []Peer {
	out := make([]Peer, 0, len(m))
	for _, p := range m {
		out = append(out, p)
	}
	slices.SortFunc(out, func(a, b Peer) int { return bytes.Compare(a.PublicKey[:], b.PublicKey[:]) })
	return out
}
