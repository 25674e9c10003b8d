package node

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
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
}

// NewClient returns a control client for the identity in dir.
func NewClient(dir string) (*Client, error) {
	st, err := LoadState(dir)
	if err != nil {
		return nil, err
	}
	c := &Client{dir: dir, state: st}
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
// the coordinator's version differs from since, or (nil, nil) when the
// coordinator's wait ran out with no change.
func (c *Client) Netmap(ctx context.Context, since uint64) (*wire.Netmap, error) {
	var nm wire.Netmap
	err := c.call(ctx, http.MethodGet, wire.PathNetmap+"?since="+strconv.FormatUint(since, 10), nil, &nm)
	if errors.Is(err, wire.ErrNotModified) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return &nm, nil
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
