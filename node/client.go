package node

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
	"golang.org/x/crypto/ssh"
)

// ErrRevoked is returned when the coordinator says this node was revoked.
// The agent stops on it: retrying cannot help.
var ErrRevoked = errors.New("this node has been revoked by the coordinator")

// Client talks to the coordinator with the node's mTLS identity.
type Client struct {
	dir string
	hc  *http.Client

	mu    sync.Mutex
	state *State

	// nmMu guards netmap: a private copy of the last netmap Netmap
	// returned, which netmap deltas are applied to.
	nmMu   sync.Mutex
	netmap *wire.Netmap
}

// NewClient returns a control client for the identity in dir.
func NewClient(dir string) (*Client, error) {
	st, err := LoadState(dir)
	if err != nil {
		return nil, err
	}
	c := &Client{dir: dir, state: st}
	if nm, err := LoadNetmap(dir); err == nil && nm.Self.ID == st.NodeID {
		c.netmap = nm // the agent long-polls from this version first
	}
	tlsConf := pki.CATLSConfig(st.CACert())
	tlsConf.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
		c.mu.Lock()
		defer c.mu.Unlock()
		cert := c.state.ClientCert()
		return &cert, nil
	}
	c.hc = &http.Client{Transport: &http.Transport{
		TLSClientConfig:     tlsConf,
		TLSHandshakeTimeout: 10 * time.Second,
		IdleConnTimeout:     90 * time.Second,
	}}
	return c, nil
}

// SetCoordinator points the client at another URL for the same
// coordinator (verified by the same CA), without changing the saved state.
func (c *Client) SetCoordinator(rawURL string) error {
	base, err := ParseCoordinatorURL(rawURL)
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	next := *c.state
	next.Coordinator = base
	c.state = &next
	return nil
}

// State returns the node's current identity.
func (c *Client) State() *State {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.state
}

// Close releases idle connections.
func (c *Client) Close() { c.hc.CloseIdleConnections() }

func (c *Client) call(ctx context.Context, method, path string, in, out any) error {
	err := wire.Call(ctx, c.hc, method, c.State().Coordinator+path, nil, in, out)
	if wire.IsCode(err, wire.CodeRevoked) {
		return fmt.Errorf("%w: %w", ErrRevoked, err)
	}
	return err
}

// Netmap fetches the netmap. With since != 0 it long-polls: it returns when
// the coordinator has a newer netmap for this node than version since, or
// (nil, nil) when the coordinator's wait ran out with no change.
//
// It always returns a full netmap. When since is the version of the netmap
// it returned last, it asks for a delta against it and applies it (see
// wire.Netmap); a delta it cannot apply (made against another version, or
// inconsistent) is dropped, the netmap it had is kept, and it fetches a
// full netmap instead.
func (c *Client) Netmap(ctx context.Context, since uint64) (*wire.Netmap, error) {
	c.nmMu.Lock()
	base := c.netmap
	c.nmMu.Unlock()
	useDelta := since != 0 && base != nil && base.Version == since
	nm, err := c.fetchNetmap(ctx, since, useDelta)
	if err != nil || nm == nil {
		return nil, err
	}
	if nm.Delta {
		merged, err := applyDelta(base, nm)
		if err != nil {
			// since=0 is never current: the coordinator answers at once.
			if nm, err = c.fetchNetmap(ctx, 0, false); err != nil {
				return nil, err
			}
			if nm == nil || nm.Delta {
				return nil, errors.New("coordinator answered a request for a full netmap with no netmap or a delta")
			}
		} else {
			nm = merged
		}
	}
	cp := *nm
	cp.Peers = slices.Clone(nm.Peers)
	c.nmMu.Lock()
	c.netmap = &cp
	c.nmMu.Unlock()
	return nm, nil
}

func (c *Client) fetchNetmap(ctx context.Context, since uint64, delta bool) (*wire.Netmap, error) {
	path := wire.PathNetmap + "?since=" + strconv.FormatUint(since, 10)
	if delta {
		path += "&" + wire.NetmapDeltaParam + "=1"
	}
	var nm wire.Netmap
	err := c.call(ctx, http.MethodGet, path, nil, &nm)
	if errors.Is(err, wire.ErrNotModified) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return &nm, nil
}

// applyDelta returns the full netmap that delta d makes of base, which is
// not modified. It refuses a delta made against another version than
// base's, and one that would leave an inconsistent netmap (a peer without
// id, the node itself, or two peers with one id or name).
func applyDelta(base, d *wire.Netmap) (*wire.Netmap, error) {
	switch {
	case base == nil:
		return nil, errors.New("netmap delta: no netmap to apply it to")
	case d.Base != base.Version:
		return nil, fmt.Errorf("netmap delta from version %d, but this node has version %d", d.Base, base.Version)
	case d.Version == d.Base:
		return nil, fmt.Errorf("netmap delta from version %d to itself", d.Base)
	case d.Self.ID != base.Self.ID:
		return nil, fmt.Errorf("netmap delta for node %q, but this is node %q", d.Self.ID, base.Self.ID)
	}
	changed := make(map[string]bool, len(d.Removed)+len(d.Peers))
	for _, id := range d.Removed {
		changed[id] = true
	}
	for _, p := range d.Peers {
		if p.ID == "" || p.ID == d.Self.ID || changed[p.ID] {
			return nil, fmt.Errorf("netmap delta: peer %q (%q) is itself, removed, listed twice or has no id", p.ID, p.Name)
		}
		changed[p.ID] = true
	}
	out := *d
	out.Delta, out.Base, out.Removed = false, 0, nil
	out.Peers = make([]wire.Peer, 0, len(base.Peers)+len(d.Peers))
	for _, p := range base.Peers {
		if !changed[p.ID] {
			out.Peers = append(out.Peers, p)
		}
	}
	out.Peers = append(out.Peers, d.Peers...)
	slices.SortStableFunc(out.Peers, func(a, b wire.Peer) int { return cmp.Compare(a.Name, b.Name) })
	ids := make(map[string]bool, len(out.Peers))
	for i, p := range out.Peers {
		// The base's peers are checked too: a malformed base (a peer
		// with no id) is not merged onto; the client fetches a full one.
		if p.ID == "" || p.ID == d.Self.ID || ids[p.ID] || (i > 0 && out.Peers[i-1].Name == p.Name) {
			return nil, fmt.Errorf("netmap delta: applying it lists peer %q (%q) twice, without an id or the node itself", p.ID, p.Name)
		}
		ids[p.ID] = true
	}
	return &out, nil
}

// Update reports services and/or endpoints.
func (c *Client) Update(ctx context.Context, req wire.UpdateRequest) error {
	return c.call(ctx, http.MethodPost, wire.PathUpdate, req, nil)
}

// RenewIfDue renews the client certificate when less than a third of its
// lifetime is left (or always, if force), with a fresh key, and saves the
// new identity atomically. It reports whether it renewed.
func (c *Client) RenewIfDue(ctx context.Context, now time.Time, force bool) (bool, error) {
	st := c.State()
	leaf := st.ClientCert().Leaf
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	if !force && leaf.NotAfter.Sub(now) > life/3 {
		return false, nil
	}
	key, err := pki.GenerateKey()
	if err != nil {
		return false, err
	}
	csr, err := pki.NewCSR(key, st.Name)
	if err != nil {
		return false, err
	}
	req := wire.RenewRequest{CSR: string(csr)}
	if st.SSHKey != "" {
		signer, err := ssh.ParsePrivateKey([]byte(st.SSHKey))
		if err != nil {
			return false, fmt.Errorf("ssh key: %w", err)
		}
		req.SSHKey = string(ssh.MarshalAuthorizedKey(signer.PublicKey()))
	}
	var resp wire.RenewResponse
	if err := c.call(ctx, http.MethodPost, wire.PathRenew, req, &resp); err != nil {
		return false, fmt.Errorf("renew certificate: %w", err)
	}
	keyPEM, err := pki.MarshalKeyPEM(key)
	if err != nil {
		return false, err
	}
	next := *st
	next.Certificate, next.TLSKey = resp.Certificate, string(keyPEM)
	if resp.SSHCertificate != "" {
		next.SSHCertificate, next.SSHCA = resp.SSHCertificate, resp.SSHCA
	}
	if err := next.Save(c.dir); err != nil { // validates that certs and keys match
		return false, fmt.Errorf("save renewed certificate: %w", err)
	}
	if err := next.writeSSHFiles(c.dir); err != nil {
		return false, fmt.Errorf("save renewed SSH certificate: %w", err)
	}
	c.mu.Lock()
	c.state = &next
	c.mu.Unlock()
	c.hc.CloseIdleConnections() // new connections present the new certificate
	return true, nil
}

// CheckAccessKey asks the coordinator whether req.Key opens req.Service on
// req.Node (by name). Only a proxy's identity may ask. A refused key is a
// *wire.APIError with status 401 and code wire.CodeUnauthorized that says
// nothing about why; other errors mean the question could not be answered.
func (c *Client) CheckAccessKey(ctx context.Context, req wire.AccessCheckRequest) (wire.AccessCheckResponse, error) {
	var resp wire.AccessCheckResponse
	if err := c.call(ctx, http.MethodPost, wire.PathAccessCheck, req, &resp); err != nil {
		return wire.AccessCheckResponse{}, err
	}
	return resp, nil
}

// RequestSSHHostCert asks the coordinator (as a proxy) to certify an SSH
// host key for principals.
func (c *Client) RequestSSHHostCert(ctx context.Context, req wire.SSHHostCertRequest) (wire.SSHHostCertResponse, error) {
	var resp wire.SSHHostCertResponse
	err := c.call(ctx, http.MethodPost, wire.PathSSHHostCert, req, &resp)
	return resp, err
}
