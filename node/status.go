package node

import (
	"slices"
	"strings"
	"time"

	"github.com/meshctl/meshctl/node/wgconf"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// Status is what `meshctl status` shows, read from the running agent.
type Status struct {
	Name                 string          `json:"name"`
	PublicKey            string          `json:"public_key"`
	IPv4                 string          `json:"ipv4"`
	IPv6                 string          `json:"ipv6"`
	Mode                 string          `json:"mode"` // netstack or tun
	Interface            string          `json:"interface"`
	ListenPort           int             `json:"listen_port"`
	UAPISocket           string          `json:"uapi_socket"`
	Coordinator          string          `json:"coordinator"`
	CoordinatorReachable bool            `json:"coordinator_reachable"`
	CoordinatorSince     time.Time       `json:"coordinator_since"`
	CoordinatorError     string          `json:"coordinator_error,omitempty"`
	NetmapVersion        uint64          `json:"netmap_version"`
	CertificateExpires   time.Time       `json:"certificate_expires"`
	Services             []ServiceStatus `json:"services"`
	Peers                []PeerStatus    `json:"peers"`
	// Fallback says whether the services are served through SSH because
	// UDP to the proxy is blocked, and why.
	Fallback FallbackStatus `json:"fallback"`
	// DataPlane has counters of the packet path, for diagnosing speed.
	DataPlane DataPlaneStatus `json:"dataplane"`
}

// DataPlaneStatus counts how often the packet path had to hold packets
// back or dropped them (node/inflight and node/fastnet explain each).
type DataPlaneStatus struct {
	// OutboundWaits and InboundWaits count reads that waited because the
	// most packets allowed in flight through WireGuard were; Resets count
	// waits ended by forgetting packets WireGuard had dropped.
	OutboundWaits  uint64 `json:"outbound_waits"`
	OutboundResets uint64 `json:"outbound_resets"`
	InboundWaits   uint64 `json:"inbound_waits"`
	InboundResets  uint64 `json:"inbound_resets"`
	// OutboundInFlight and InboundInFlight are the packets counted in
	// flight right now (near 0 when idle).
	OutboundInFlight int64 `json:"outbound_in_flight"`
	InboundInFlight  int64 `json:"inbound_in_flight"`
	// QueueDrops (netstack only) counts packets the network stack sent
	// while the queue to WireGuard was full.
	QueueDrops uint64 `json:"queue_drops"`
	// StaleSessions counts peers found sending under a WireGuard session
	// this process never made (it restarted), each answered with a
	// handshake at once (node/pathbind/stale.go).
	StaleSessions uint64 `json:"stale_sessions"`
}

// FallbackText is the fallback state in words, empty when not active.
func (s Status) FallbackText() string { return s.Fallback.describe() }

// ServiceStatus is a published service. Target is shown locally only; it
// is never sent to the coordinator.
type ServiceStatus struct {
	Name   string `json:"name"`
	Port   uint16 `json:"port"`
	Target string `json:"target"`
	Public bool   `json:"public"`
}

// PeerStatus is one peer as the WireGuard device sees it.
type PeerStatus struct {
	Name          string `json:"name"`
	PublicKey     string `json:"public_key"`
	IPv4          string `json:"ipv4"`
	IPv6          string `json:"ipv6"`
	Endpoint      string `json:"endpoint"`
	LastHandshake string `json:"last_handshake"` // RFC 3339; empty if never
	RxBytes       int64  `json:"rx_bytes"`
	TxBytes       int64  `json:"tx_bytes"`
	// Path is how packets reach the peer: "direct" (UDP to Endpoint),
	// "relay" (still encrypted, through the proxy's relay; over the SSH
	// connection) or "none"; PathReason says why.
	Path       string `json:"path"`
	PathReason string `json:"path_reason"`
}

// DeviceState is the WireGuard device's configuration and counters, as
// `wg show` reads them.
func (a *Agent) DeviceState() (wgconf.DeviceState, error) {
	raw, err := a.dev.IpcGet()
	if err != nil {
		return wgconf.DeviceState{}, err
	}
	return wgconf.ParseGet(strings.NewReader(raw))
}

// Status reports the agent's current state.
func (a *Agent) Status() (Status, error) {
	st := a.client.State()
	r := a.reach.Load()
	out := Status{
		Name: st.Name, PublicKey: st.WireGuardKey().PublicKey().String(), IPv4: st.IPv4, IPv6: st.IPv6,
		Mode: a.plane.Mode(), Interface: a.ifname, ListenPort: a.port, UAPISocket: a.uapiPath,
		Coordinator: st.Coordinator, CoordinatorReachable: r.ok, CoordinatorSince: r.since.UTC(), CoordinatorError: r.err,
		CertificateExpires: st.ClientCert().Leaf.NotAfter.UTC(),
		Services:           []ServiceStatus{}, Peers: []PeerStatus{},
	}
	for _, s := range a.opts.Services {
		out.Services = append(out.Services, ServiceStatus{Name: s.Name, Port: s.Port, Target: s.Target, Public: s.Public})
	}
	if a.fb != nil {
		out.Fallback = a.fb.status()
	}
	if a.gate != nil {
		o, in := a.gate.Stats()
		out.DataPlane = DataPlaneStatus{OutboundWaits: o.Waits, OutboundResets: o.Resets, InboundWaits: in.Waits, InboundResets: in.Resets,
			OutboundInFlight: o.InFlight, InboundInFlight: in.InFlight}
	}
	if p, ok := a.plane.(*netstackPlane); ok {
		out.DataPlane.QueueDrops = p.dev.Stats().QueueDrops
	}
	out.DataPlane.StaleSessions = a.bind.Stats().StaleSessions.Load()
	cur := a.applied.Load()
	if cur == nil {
		return out, nil
	}
	out.NetmapVersion = cur.nm.Version
	dev, err := a.DeviceState()
	if err != nil {
		return out, err
	}
	// The device is the truth: list its peers, named from the netmap.
	byKey := make(map[wgtypes.Key]*wgconf.Peer, len(cur.peers))
	for i := range cur.peers {
		byKey[cur.peers[i].PublicKey] = &cur.peers[i]
	}
	for _, d := range dev.Peers {
		ps := PeerStatus{Name: "(unknown)", PublicKey: d.PublicKey.String(), RxBytes: d.RxBytes, TxBytes: d.TxBytes}
		if p := byKey[d.PublicKey]; p != nil {
			ps.Name, ps.IPv4, ps.IPv6 = p.Name, p.IPv4.String(), p.IPv6.String()
		}
		ps.Path, ps.PathReason, ps.Endpoint = a.pathOf(d.PublicKey)
		if !d.LastHandshake.IsZero() {
			ps.LastHandshake = d.LastHandshake.UTC().Format(time.RFC3339)
		}
		out.Peers = append(out.Peers, ps)
	}
	slices.SortFunc(out.Peers, func(x, y PeerStatus) int { return strings.Compare(x.Name, y.Name) })
	return out, nil
}
