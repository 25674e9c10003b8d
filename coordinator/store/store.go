// Package store defines the coordinator's persistent state behind a Store
// interface. Backends live in subpackages (sqlite; postgres later) and are
// all checked by the conformance suite in storetest.
//
// Every method that changes security-relevant state (enrollment, revocation)
// commits durably before it returns: a caller may acknowledge the change to a
// user as soon as the method returns nil.
package store

import (
	"context"
	"errors"
	"net/netip"
	"time"
)

// Sentinel errors. Backends wrap them with %w; callers test with errors.Is.
var (
	ErrNotFound      = errors.New("not found")
	ErrTokenInvalid  = errors.New("token invalid") // unknown, wrong secret, expired, used up or revoked: callers must not say which
	ErrNameTaken     = errors.New("name already in use")
	ErrKeyTaken      = errors.New("WireGuard key already registered")
	ErrPoolExhausted = errors.New("address pool exhausted")
	ErrRevoked       = errors.New("revoked")
	ErrAmbiguous     = errors.New("ambiguous node reference") // a name that is also another node's id
	// ErrDiskFull: a write failed for lack of disk space, and nothing of it
	// was written. Backends name the file in the wrapping error.
	ErrDiskFull = errors.New("disk full")
	// ErrSSHOnly refuses an operation that SSH-only nodes do not support
	// (RenameNode: their certificate names them; SetServiceVisibility of a
	// service they were not certified for).
	ErrSSHOnly = errors.New("not possible for an SSH-only node")
)

// RoleSSH is the Role of SSH-only nodes (the same string as wire.RoleSSH).
const RoleSSH = "ssh"

// Token is an enrollment token. Only the SHA-256 hash of its secret is kept.
type Token struct {
	ID         string
	SecretHash [32]byte
	Role       string
	Tags       []string
	MaxUses    int // 0 = unlimited until expiry
	Uses       int
	Created    time.Time
	Expires    time.Time
	RevokedAt  time.Time // zero = not revoked
	CreatedBy  string
}

// Node is an enrolled node. Revoked nodes stay (for audit and IP quarantine).
//
// SSH-only nodes (Role RoleSSH, see AddSSHNode) are Nodes too, with zero
// IPv4 and IPv6 (netip.Addr{}), empty WireGuardKey and TokenID, empty Tags
// and Endpoints, zero LastSeen, and the services the admin certified them
// for in ServicesJSON (their public flags included; Visibility is always
// empty for them).
type Node struct {
	ID           string
	Name         string
	Role         string
	IPv4         netip.Addr
	IPv6         netip.Addr
	WireGuardKey string // base64 public key
	Tags         []string
	ServicesJSON string // JSON array of wire.Service, "[]" when none
	Endpoints    []string
	// DiscoKey is the node's path-probe public key as it reported it
	// (standard base64 of 32 bytes; the API validates it), "" until it
	// does and always for SSH-only nodes.
	DiscoKey  string
	TokenID   string
	Created   time.Time
	LastSeen  time.Time // zero = never
	RevokedAt time.Time // zero = not revoked
	// Visibility holds an admin's overrides of whether the node's services
	// are public, by service name (true = public, false = private). An
	// override wins over what the node reports; overrides for services the
	// node does not publish are kept and take effect when it does. Never
	// nil in what a Store returns.
	Visibility map[string]bool
	// SSHKey is an SSH-only node's certified public key (authorized_keys
	// format); empty for other nodes.
	SSHKey string
}

// Revoked reports whether the node has been revoked.
func (n *Node) Revoked() bool { return !n.RevokedAt.IsZero() }

// AdminKey is an admin API key. Only the SHA-256 hash of its secret is kept.
type AdminKey struct {
	ID         string
	SecretHash [32]byte
	Created    time.Time
	Expires    time.Time // zero = never
	RevokedAt  time.Time
	CreatedBy  string
}

// AccessKey is a key that lets a browser through the proxy to private
// services. Only the SHA-256 hash of its secret is kept.
type AccessKey struct {
	ID         string
	SecretHash [32]byte
	// Node is the id of the node whose services the key opens; empty means
	// every node.
	Node string
	// Service is the name of the service the key opens; empty means every
	// service (of Node, or of every node).
	Service   string
	Created   time.Time
	Expires   time.Time // required: access keys always expire
	RevokedAt time.Time // zero = not revoked
	CreatedBy string
}

// AuditEntry is one row of the append-only audit log.
type AuditEntry struct {
	ID     int64
	Time   time.Time
	Actor  string
	Action string
	Target string
	Detail string
}

// EnrollParams is one enrollment, executed as a single transaction:
// verify and consume the token, check name and key, allocate addresses,
// insert the node and its audit row — all or nothing.
type EnrollParams struct {
	TokenID string
	// VerifyToken is called inside the transaction with the stored token and
	// returns nil if the presented secret matches and the token may be used
	// now. Any error aborts the enrollment with ErrTokenInvalid.
	VerifyToken func(Token) error

	NodeID       string
	Name         string
	WireGuardKey string
	Now          time.Time

	// IPv4Pool is the prefix addresses come from; the network address and,
	// for prefixes shorter than /31, the broadcast address are never used.
	IPv4Pool netip.Prefix
	// IPv6Pool is a /48 (or longer, at most /96); a node's IPv6 is the pool
	// prefix with the node's IPv4 in the low 32 bits.
	IPv6Pool netip.Prefix
	// Quarantine: addresses of a node revoked less than this long ago are not
	// handed out again.
	Quarantine time.Duration

	Actor string // for the audit row
}

// NodeUpdate is what a node reports about itself (see UpdateNode). Nil
// fields are left unchanged.
type NodeUpdate struct {
	ServicesJSON *string   // JSON array of wire.Service
	Endpoints    *[]string // "IP:port" strings; empty (not nil) clears them
	DiscoKey     *string   // see Node.DiscoKey; stored as given
}

// SSHNodeParams adds or re-certifies an SSH-only node (see AddSSHNode).
type SSHNodeParams struct {
	NodeID       string // id of a new node; unused when re-certifying
	Name         string
	ServicesJSON string // JSON array of wire.Service
	SSHKey       string // authorized_keys line
	Now          time.Time
	Actor        string // for the audit row
}

// Store is the coordinator's persistent state.
//
// Node names are unique among the active nodes, SSH-only ones included:
// Enroll, RenameNode and AddSSHNode all refuse (ErrNameTaken) a name held
// by any active node.
type Store interface {
	// Tokens.
	CreateToken(ctx context.Context, t Token, actor string) error
	ListTokens(ctx context.Context) ([]Token, error)
	// RevokeToken marks a token revoked; ErrNotFound if unknown.
	RevokeToken(ctx context.Context, id string, now time.Time, actor string) error

	// Enroll runs EnrollParams as one transaction and returns the new node.
	// Errors: ErrTokenInvalid, ErrNameTaken, ErrKeyTaken, ErrPoolExhausted,
	// ErrDiskFull.
	Enroll(ctx context.Context, p EnrollParams) (Node, error)

	// AddSSHNode adds an SSH-only node, in one write transaction: if an
	// active enrolled (WireGuard) node has the name, ErrNameTaken; if an
	// active SSH-only node has it, its SSH key and services are replaced
	// ("re-certified", audit "node.ssh-recertify"; it keeps its id and
	// creation time, and the public flags of the services it keeps) and
	// created is false; else a node with p.NodeID is inserted (audit
	// "node.add-ssh") and created is true. Returns the node (see Node).
	AddSSHNode(ctx context.Context, p SSHNodeParams) (n Node, created bool, err error)

	// Nodes. GetNode, ListNodes and RevokeNode cover SSH-only nodes too.
	GetNode(ctx context.Context, id string) (Node, error)
	// ListNodes returns all nodes, revoked ones included, ordered by creation.
	ListNodes(ctx context.Context) ([]Node, error)
	// RevokeNode revokes the active node with this name (or id), durably,
	// with an audit row in the same transaction. ErrNotFound if no active
	// node matches; ErrAmbiguous if the string is one active node's name
	// and another's id.
	RevokeNode(ctx context.Context, nameOrID string, now time.Time, actor string) (Node, error)
	// RenameNode renames an active node. ErrNotFound, ErrNameTaken, and
	// ErrSSHOnly for an SSH-only node (its certificate names it: revoke it
	// and add it again under the new name).
	RenameNode(ctx context.Context, nameOrID, newName string, now time.Time, actor string) (Node, error)
	// SetNodeTags replaces the tags of an active node (nil or empty: none),
	// with an audit row in the same transaction. ErrNotFound, and
	// ErrSSHOnly for an SSH-only node (it is never a WireGuard peer, so
	// tags would mean nothing).
	SetNodeTags(ctx context.Context, nameOrID string, tags []string, now time.Time, actor string) (Node, error)
	// UpdateNode sets the non-nil fields of u (services, endpoints, disco
	// key) of an active node, in one write, and returns the node.
	// ErrNotFound (also for SSH-only nodes), ErrRevoked.
	UpdateNode(ctx context.Context, id string, u NodeUpdate) (Node, error)
	// TouchNode records that the node was seen at t. ErrNotFound for
	// unknown and SSH-only nodes.
	TouchNode(ctx context.Context, id string, t time.Time) error

	// Admin keys.
	CreateAdminKey(ctx context.Context, k AdminKey, actor string) error
	GetAdminKey(ctx context.Context, id string) (AdminKey, error)
	ListAdminKeys(ctx context.Context) ([]AdminKey, error)
	RevokeAdminKey(ctx context.Context, id string, now time.Time, actor string) error

	// Access keys. Creation and revocation write "accesskey.create" and
	// "accesskey.revoke" audit rows in the same transaction.
	CreateAccessKey(ctx context.Context, k AccessKey, actor string) error
	// GetAccessKey returns the key with this id, revoked or expired or
	// not; ErrNotFound if unknown.
	GetAccessKey(ctx context.Context, id string) (AccessKey, error)
	// ListAccessKeys returns all access keys, oldest first.
	ListAccessKeys(ctx context.Context) ([]AccessKey, error)
	// RevokeAccessKey marks a key revoked, durably; ErrNotFound if unknown.
	// Revoking a revoked key changes nothing and succeeds.
	RevokeAccessKey(ctx context.Context, id string, now time.Time, actor string) error

	// SetServiceVisibility records whether service on the active node with
	// this name (or id) is public, overriding what the node reports, with a
	// "service.visibility" audit row (detail "service=… public=…") in the
	// same transaction, and returns the updated node. The service need not
	// be published (yet). ErrNotFound if no active node matches,
	// ErrAmbiguous as for RevokeNode.
	//
	// For an SSH-only node the public flag of the service in its
	// ServicesJSON is set instead (its Visibility stays empty); a service
	// it was not certified for is refused with ErrSSHOnly.
	SetServiceVisibility(ctx context.Context, nodeNameOrID, service string, public bool, now time.Time, actor string) (Node, error)

	// Audit log. Store methods that take an actor write their own rows;
	// Audit appends others (e.g. refused attempts worth keeping).
	Audit(ctx context.Context, e AuditEntry) error
	// ListAudit returns the newest limit entries, oldest first.
	ListAudit(ctx context.Context, limit int) ([]AuditEntry, error)

	// Meta is a small key/value table for settings fixed at first start
	// (e.g. the IPv6 ULA prefix). GetMeta returns ErrNotFound if unset.
	GetMeta(ctx context.Context, key string) (string, error)
	// SetMetaIfAbsent stores value unless key is set, and returns the value
	// that is stored afterwards.
	SetMetaIfAbsent(ctx context.Context, key, value string) (string, error)

	Close() error
}
