// Package wire holds the JSON types that the coordinator, nodes, proxies and
// admin clients exchange. It imports nothing of ours, so every role can link
// it. Changes are additive; a breaking change bumps ProtocolVersion.
package wire

import (
	"slices"
	"time"
)

// ProtocolVersion is sent by clients in the Meshctl-Protocol header. The
// coordinator refuses versions it does not speak with a clear message.
const ProtocolVersion = 1

// HeaderProtocol carries ProtocolVersion on every request.
const HeaderProtocol = "Meshctl-Protocol"

// API paths. Node paths need an mTLS client certificate; admin paths need
// the Unix socket or an admin key; enrollment needs a token.
const (
	PathEnroll  = "/api/v1/enroll"
	PathNetmap  = "/api/v1/netmap"
	PathUpdate  = "/api/v1/node/update"
	PathRenew   = "/api/v1/node/renew"
	PathHealthz = "/healthz"

	PathAdminInfo        = "/api/v1/admin/info"
	PathAdminTokens      = "/api/v1/admin/tokens"        // GET list, POST create
	PathAdminTokenRevoke = "/api/v1/admin/tokens/revoke" // POST {id}
	PathAdminNodes       = "/api/v1/admin/nodes"         // GET list
	PathAdminNodeRevoke  = "/api/v1/admin/nodes/revoke"  // POST {name}
	PathAdminNodeRename  = "/api/v1/admin/nodes/rename"  // POST {name,new_name}
	PathAdminNodeTags    = "/api/v1/admin/nodes/tags"    // POST NodeTagsRequest
	PathAdminAudit       = "/api/v1/admin/audit"         // GET ?limit=N
	PathAdminKeys        = "/api/v1/admin/admin-keys"    // GET list, POST create
	PathAdminKeyRevoke   = "/api/v1/admin/admin-keys/revoke"

	PathAdminAccessKeys      = "/api/v1/admin/access-keys"         // GET list, POST create
	PathAdminAccessKeyRevoke = "/api/v1/admin/access-keys/revoke"  // POST {id}
	PathAdminVisibility      = "/api/v1/admin/services/visibility" // POST VisibilityRequest
	PathAdminNodeAddSSH      = "/api/v1/admin/nodes/add-ssh"       // POST AddSSHRequest

	// PathAccessCheck is for proxies (mTLS, role proxy only): verify an
	// access key a browser presented for a route.
	PathAccessCheck = "/api/v1/proxy/access-check"
	// PathSSHHostCert is for proxies (mTLS, role proxy only): certify the
	// SSH fallback server's host key.
	PathSSHHostCert = "/api/v1/proxy/ssh-host-cert"
)

// SSHRelayChannel is the SSH channel type a node opens on its connection
// to the proxy's SSH server to reach the relay: the channel carries relay
// frames (see package proxy/relay), the node's identity is the one its SSH
// certificate proved. A node in SSH fallback thus stays a full mesh member.
const SSHRelayChannel = "meshctl-relay"

// Error is the body of every non-2xx API response.
type Error struct {
	// Code is a stable machine-readable reason, e.g. "revoked", "name_taken".
	Code string `json:"code"`
	// Message says what was wrong and, where it can, how to fix it.
	Message string `json:"message"`
}

// Error codes shared by coordinator and clients.
const (
	CodeBadRequest    = "bad_request"
	CodeUnauthorized  = "unauthorized"
	CodeRevoked       = "revoked"
	CodeCertExpired   = "cert_expired"
	CodeWrongRole     = "wrong_role"
	CodeForbidden     = "forbidden"
	CodeNotFound      = "not_found"
	CodeNameTaken     = "name_taken"
	CodeKeyTaken      = "key_taken"
	CodeRateLimited   = "rate_limited"
	CodePoolExhausted = "pool_exhausted"
	CodeTooLarge      = "too_large"
	CodeInternal      = "internal"
	CodeUnavailable   = "unavailable"
)

// Roles a node can have.
const (
	RoleNode  = "node"
	RoleProxy = "proxy"
	// RoleSSH is an SSH-only node (meshctl nodes add-ssh): a device with
	// stock OpenSSH and no meshctl; no WireGuard key, no overlay address.
	RoleSSH = "ssh"
)

// EnrollRequest is sent by a device with a token. Only public material
// leaves the device.
type EnrollRequest struct {
	Token string `json:"token"`
	// Name is the requested node name: a lower-case DNS label.
	Name string `json:"name"`
	// WireGuardKey is the node's WireGuard public key, standard base64.
	WireGuardKey string `json:"wireguard_key"`
	// CSR is a PEM certificate request for the node's mTLS key.
	CSR string `json:"csr"`
	// SSHKey is the device's SSH public key (authorized_keys format), for
	// the SSH fallback; the coordinator certifies it. Optional.
	SSHKey string `json:"ssh_key,omitempty"`
	// Role is the role the device expects the token to grant ("" means
	// node). A mismatch is refused before the token is used, so that a
	// proxy is never enrolled with a node token or the other way round.
	Role string `json:"role,omitempty"`
}

// EnrollResponse is everything a node needs to join.
type EnrollResponse struct {
	Node        Node   `json:"node"`
	Certificate string `json:"certificate"` // PEM client certificate
	CA          string `json:"ca"`          // PEM CA certificate
	Netmap      Netmap `json:"netmap"`
	// SSHCertificate certifies the device's SSH key (principal = node
	// name), and SSHCA is the coordinator's SSH CA public key, both in
	// authorized_keys format; empty when no SSH key was sent.
	SSHCertificate string `json:"ssh_certificate,omitempty"`
	SSHCA          string `json:"ssh_ca,omitempty"`
}

// RenewRequest asks for a fresh client certificate (over mTLS).
type RenewRequest struct {
	CSR    string `json:"csr"`
	SSHKey string `json:"ssh_key,omitempty"` // renew the SSH certificate too
}

// RenewResponse carries the new certificate.
type RenewResponse struct {
	Certificate    string `json:"certificate"`
	CA             string `json:"ca"`
	SSHCertificate string `json:"ssh_certificate,omitempty"`
	SSHCA          string `json:"ssh_ca,omitempty"`
}

// Node is a node as the coordinator knows it.
type Node struct {
	ID           string     `json:"id"`
	Name         string     `json:"name"`
	Role         string     `json:"role"`
	IPv4         string     `json:"ipv4"`
	IPv6         string     `json:"ipv6"`
	WireGuardKey string     `json:"public_key"`
	Tags         []string   `json:"tags"`
	Services     []Service  `json:"services"`
	Endpoints    []string   `json:"endpoints"`
	Created      time.Time  `json:"created"`
	LastSeen     *time.Time `json:"last_seen"` // null: never seen
	Online       bool       `json:"online"`
	Revoked      bool       `json:"revoked"`
	RevokedAt    *time.Time `json:"revoked_at"` // null: not revoked
}

// Service is a service a node publishes on its overlay address. The
// device-local target never leaves the node: only name and overlay port.
type Service struct {
	Name   string `json:"name"`
	Port   uint16 `json:"port"`
	Public bool   `json:"public,omitempty"`
}

// Peer is another mesh member as seen in a netmap.
type Peer struct {
	ID           string    `json:"id"`
	Name         string    `json:"name"`
	Role         string    `json:"role"`
	WireGuardKey string    `json:"public_key"`
	IPv4         string    `json:"ipv4"`
	IPv6         string    `json:"ipv6"`
	Endpoints    []string  `json:"endpoints,omitempty"`
	Services     []Service `json:"services,omitempty"`
	Tags         []string  `json:"tags,omitempty"`
	// DiscoKey is the peer's path-probe key: standard base64 of a 32-byte
	// X25519 public key (nacl/box), distinct from its WireGuard key. Nodes
	// authenticate the probes that choose between a direct UDP path and
	// the relay with it. Empty: the peer has not reported one yet (it is
	// then reached through the relay, or at its first endpoint).
	DiscoKey string `json:"disco_key,omitempty"`
}

// NetmapDeltaParam is the query parameter (value "1") by which a client
// asks PathNetmap for a delta against the version it passes in "since".
const NetmapDeltaParam = "delta"

// Netmap is what a node needs to configure its data plane. Version grows
// with every change the coordinator makes.
//
// A netmap with Delta set is a delta (sent only to clients that asked for
// one with NetmapDeltaParam): it turns the netmap of version Base into the
// netmap of version Version. Peers then holds only the peers added or
// changed since Base, and Removed the ids of the peers gone since; every
// other field is complete, as in a full netmap. Clients that cannot apply
// a delta (their netmap is not version Base) fetch a full netmap.
type Netmap struct {
	Version uint64 `json:"version"`
	// Delta, Base and Removed: see above. Never set in a full netmap.
	Delta   bool     `json:"delta,omitempty"`
	Base    uint64   `json:"base,omitempty"`
	Removed []string `json:"removed,omitempty"`
	Self    Peer     `json:"self"`
	Peers   []Peer   `json:"peers"`
	// ProxyEndpoint is the proxy's public WireGuard endpoint (host:port)
	// that nodes behind NAT keep alive to. Empty when no proxy runs.
	ProxyEndpoint string `json:"proxy_endpoint,omitempty"`
	// ProxyEndpointKey is the WireGuard key of the proxy ProxyEndpoint
	// belongs to (the server's embedded proxy). Empty from coordinators
	// that predate it: ProxyEndpoint then applies only when the netmap has
	// one proxy (with a standalone proxy beside the embedded one, giving it
	// to every proxy sent two peers' packets to one address).
	ProxyEndpointKey string `json:"proxy_endpoint_key,omitempty"`
	// Domain is the proxy's domain (<name>.<domain>), empty without a proxy.
	Domain string `json:"domain,omitempty"`
	// SSHOnly lists the SSH-only nodes (name, id, services); only proxies'
	// netmaps carry it. They have no WireGuard key or address and are
	// never WireGuard peers.
	SSHOnly []Peer `json:"ssh_only,omitempty"`
	// ProxySSH is the proxy's SSH endpoint (host:port), empty when none
	// runs: the SSH fallback for nodes whose UDP is blocked, and the way to
	// the relay (channel SSHRelayChannel) for peers with no direct path.
	ProxySSH string `json:"proxy_ssh,omitempty"`
	// AccessRevoked lists the ids of access keys that were revoked before
	// they expired; only proxies' netmaps carry it, and a proxy ends the
	// sessions they opened at once.
	AccessRevoked []string `json:"access_revoked,omitempty"`
	// Topology is the coordinator's topology: "mesh" (every member sees
	// every other), "hub" (nodes see only proxies, and the relay forwards
	// only between a node and a proxy) or "tags" (nodes see the proxies
	// and the nodes that share a tag with them, see SharesTag; the relay
	// forwards only between those). Empty means mesh.
	Topology string `json:"topology,omitempty"`
	// IPv4Pool and IPv6Pool are the overlay prefixes every member's
	// addresses come from (routed into a TUN interface as a whole).
	IPv4Pool string `json:"ipv4_pool"`
	IPv6Pool string `json:"ipv6_pool"`
}

// UpdateRequest reports what a node publishes and where it can be reached.
// Nil fields are left unchanged.
type UpdateRequest struct {
	Services  *[]Service `json:"services,omitempty"`
	Endpoints *[]string  `json:"endpoints,omitempty"`
	// DiscoKey is the node's path-probe public key (see Peer.DiscoKey).
	DiscoKey *string `json:"disco_key,omitempty"`
}

// Token is an enrollment token as admins see it (never the secret, except
// once at creation in TokenCreateResponse).
type Token struct {
	ID        string    `json:"id"`
	Role      string    `json:"role"`
	Tags      []string  `json:"tags"`
	Uses      int       `json:"uses"`     // times used so far
	MaxUses   int       `json:"max_uses"` // 0 = unlimited (reusable)
	Created   time.Time `json:"created"`
	Expires   time.Time `json:"expires"`
	Revoked   bool      `json:"revoked"`
	CreatedBy string    `json:"created_by"`
}

// TokenCreateRequest asks for a new enrollment token.
type TokenCreateRequest struct {
	TTL Duration `json:"ttl"` // 0 = 1h
	// MaxUses is how many enrollments the token allows; 0 means 1 unless
	// Reusable is set. A token is never unlimited by omission.
	MaxUses  int      `json:"max_uses"`
	Reusable bool     `json:"reusable"` // any number of uses until expiry
	Tags     []string `json:"tags"`
	Role     string   `json:"role"`
}

// TokenCreateResponse is returned once; the secret is not stored.
type TokenCreateResponse struct {
	Token         string    `json:"token"`
	ID            string    `json:"id"`
	Coordinator   string    `json:"coordinator"`
	CAPin         string    `json:"ca_pin"`
	Expires       time.Time `json:"expires"`
	MaxUses       int       `json:"max_uses"`
	Tags          []string  `json:"tags"`
	Role          string    `json:"role"`
	EnrollCommand string    `json:"enroll_command"`
}

// IDRequest names a token or admin key by id.
type IDRequest struct {
	ID string `json:"id"`
}

// NodeTagsRequest replaces the tags of a node (by name or id); no tags
// clears them.
type NodeTagsRequest struct {
	Name string   `json:"name"`
	Tags []string `json:"tags"`
}

// NameRequest names a node (by name or id).
type NameRequest struct {
	Name    string `json:"name"`
	NewName string `json:"new_name,omitempty"`
}

// AdminKey is an admin API key as listed (never the secret).
type AdminKey struct {
	ID        string    `json:"id"`
	Created   time.Time `json:"created"`
	Expires   time.Time `json:"expires,omitzero"`
	Revoked   bool      `json:"revoked"`
	CreatedBy string    `json:"created_by"`
}

// AdminKeyCreateRequest asks for a new admin key.
type AdminKeyCreateRequest struct {
	TTL Duration `json:"ttl"` // 0 = no expiry
}

// AdminKeyCreateResponse is returned once; the secret is not stored.
type AdminKeyCreateResponse struct {
	Key         string    `json:"key"`
	ID          string    `json:"id"`
	Coordinator string    `json:"coordinator"`
	CAPin       string    `json:"ca_pin"`
	Expires     time.Time `json:"expires,omitzero"`
}

// AuditEntry is one line of the audit log.
type AuditEntry struct {
	ID     int64     `json:"id"`
	Time   time.Time `json:"time"`
	Actor  string    `json:"actor"`
	Action string    `json:"action"`
	Target string    `json:"target"`
	Detail string    `json:"detail,omitempty"`
}

// Info describes a coordinator to admin clients.
type Info struct {
	Version     string `json:"version"`
	Coordinator string `json:"coordinator"` // public URL
	CAPin       string `json:"ca_pin"`
	IPv4Pool    string `json:"ipv4_pool"`
	IPv6Pool    string `json:"ipv6_pool"`
}

// AccessKey is an access key as admins see it (never the secret). An access
// key lets a browser through the proxy to private services: all of them,
// or one node's, or one service of one node.
type AccessKey struct {
	ID        string    `json:"id"`
	Node      string    `json:"node,omitempty"`    // empty: any node
	Service   string    `json:"service,omitempty"` // empty: any service
	Created   time.Time `json:"created"`
	Expires   time.Time `json:"expires"`
	Revoked   bool      `json:"revoked"`
	CreatedBy string    `json:"created_by"`
}

// AccessKeyCreateRequest asks for a new access key.
type AccessKeyCreateRequest struct {
	Node    string   `json:"node,omitempty"`
	Service string   `json:"service,omitempty"`
	TTL     Duration `json:"ttl"` // 0 = 24h
}

// AccessKeyCreateResponse is returned once; the secret is not stored.
type AccessKeyCreateResponse struct {
	Key     string    `json:"key"`
	ID      string    `json:"id"`
	Node    string    `json:"node,omitempty"`
	Service string    `json:"service,omitempty"`
	Expires time.Time `json:"expires"`
	// Domain is the proxy's domain, when the coordinator knows it.
	Domain string `json:"domain,omitempty"`
}

// AccessCheckRequest is a proxy asking whether Key opens Node's Service.
type AccessCheckRequest struct {
	Key     string `json:"key"`
	Node    string `json:"node"`
	Service string `json:"service"`
}

// AccessCheckResponse is a yes: the key's id and when it expires. A no is
// a 401 that does not say why.
type AccessCheckResponse struct {
	ID      string    `json:"id"`
	Expires time.Time `json:"expires"`
}

// VisibilityRequest sets whether a node's service is public (no sign-in at
// the proxy) or private, overriding what the node reports.
type VisibilityRequest struct {
	Node    string `json:"node"`
	Service string `json:"service"`
	Public  bool   `json:"public"`
}

// AddSSHRequest certifies an SSH key for an SSH-only node (a device with
// only OpenSSH). Adding an active SSH-only node's name again re-certifies
// it (for instance with a new key, or before its certificate expires).
type AddSSHRequest struct {
	Name     string   `json:"name"`
	SSHKey   string   `json:"ssh_key"`  // authorized_keys line
	TTL      Duration `json:"ttl"`      // certificate lifetime; 0 = 7 days
	Services []string `json:"services"` // service names it may forward; empty = ["web"]
}

// AddSSHResponse carries the certificate and what the device needs to use it.
type AddSSHResponse struct {
	Node        Node   `json:"node"`
	Certificate string `json:"certificate"` // authorized_keys format, for CertificateFile
	SSHCA       string `json:"ssh_ca"`      // for the @cert-authority known_hosts line
	ProxySSH    string `json:"proxy_ssh"`   // host:port of the proxy's SSH server, empty without one
	Domain      string `json:"domain,omitempty"`
}

// SSHHostCertRequest asks the coordinator to certify a proxy's SSH host key
// for the names nodes connect to.
type SSHHostCertRequest struct {
	HostKey    string   `json:"host_key"`   // authorized_keys line
	Principals []string `json:"principals"` // host names or addresses
}

// SSHHostCertResponse carries the host certificate and the SSH CA.
type SSHHostCertResponse struct {
	Certificate string `json:"certificate"` // authorized_keys format
	SSHCA       string `json:"ssh_ca"`
}

// Topologies (Netmap.Topology).
const (
	TopologyMesh = "mesh"
	TopologyHub  = "hub"
	TopologyTags = "tags"
)

// SharesTag reports whether two members' tags (from their enrollment
// tokens) have one in common: in the "tags" topology, two nodes see each
// other exactly when they do. Members without tags share none.
func SharesTag(a, b []string) bool {
	for _, x := range a {
		if slices.Contains(b, x) {
			return true
		}
	}
	return false
}
