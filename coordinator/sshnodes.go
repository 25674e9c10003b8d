package coordinator

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
	"golang.org/x/crypto/ssh"
)

// SSH-only nodes: devices with only stock OpenSSH. An admin certifies the
// device's SSH key for a name; the proxy's SSH fallback server then lets it
// remote-forward its services. They have no WireGuard key and no overlay
// address, are never WireGuard peers, and appear only in proxies' netmaps
// (Netmap.SSHOnly).

// SSH-only node limits.
const (
	DefaultSSHNodeTTL  = 7 * 24 * time.Hour
	maxSSHNodeTTL      = 365 * 24 * time.Hour
	maxSSHNodeServices = 16
	// sshServicePort is the nominal port of an SSH-only node's services:
	// the device forwards them over SSH, so no overlay port exists.
	sshServicePort = 80
)

// adminAddSSH certifies an SSH key for an SSH-only node, adding the node
// or, if an active SSH-only node has the name, re-certifying it.
func (s *Server) adminAddSSH(w http.ResponseWriter, r *http.Request, actor string) error {
	var req wire.AddSSHRequest
	if err := decodeJSON(w, r, &req); err != nil {
		return err
	}
	if err := ValidateName("node", req.Name); err != nil {
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "%v", err)
	}
	ttl := time.Duration(req.TTL)
	switch {
	case ttl == 0:
		ttl = DefaultSSHNodeTTL
	case ttl < 0 || ttl > maxSSHNodeTTL:
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "ttl must be positive and at most 365 days (%s)", maxSSHNodeTTL)
	}
	names := req.Services
	if len(names) == 0 {
		names = []string{"web"}
	}
	if len(names) > maxSSHNodeServices {
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "at most %d services", maxSSHNodeServices)
	}
	svcs := make([]wire.Service, 0, len(names))
	seen := map[string]bool{}
	for _, name := range names {
		if err := ValidateName("service", name); err != nil {
			return errf(http.StatusBadRequest, wire.CodeBadRequest, "%v", err)
		}
		if seen[name] {
			return errf(http.StatusBadRequest, wire.CodeBadRequest, "service %q is listed twice", name)
		}
		seen[name] = true
		svcs = append(svcs, wire.Service{Name: name, Port: sshServicePort})
	}
	servicesJSON, err := json.Marshal(svcs)
	if err != nil {
		return err
	}
	key := strings.TrimSpace(req.SSHKey)
	if key == "" {
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "ssh_key is empty: send the device's SSH public key (an authorized_keys line)")
	}

	// Sign before storing, so that a bad key writes nothing. Re-certifying
	// keeps the node's id; the snapshot guesses it, and the certificate is
	// signed again in the rare case the store decided otherwise.
	id := ""
	if p, ok := s.state.current().byNameLookup(req.Name); ok && p.Role == wire.RoleSSH {
		id = p.ID
	} else if id, err = newID(); err != nil {
		return err
	}
	now := s.opts.Now()
	cert, err := s.signSSHNode(key, req.Name, id, now, ttl)
	if err != nil {
		return err
	}
	n, created, err := s.opts.Store.AddSSHNode(r.Context(), store.SSHNodeParams{
		NodeID: id, Name: req.Name, ServicesJSON: string(servicesJSON), SSHKey: key, Now: now, Actor: actor,
	})
	if errors.Is(err, store.ErrNameTaken) {
		return &apiError{status: http.StatusConflict, code: wire.CodeNameTaken, cause: err,
			msg: fmt.Sprintf("node name %q is in use by an enrolled node: choose another name, or revoke that node first (meshctl nodes revoke %s)", req.Name, req.Name)}
	}
	if err != nil {
		return err
	}
	if n.ID != id {
		if cert, err = s.signSSHNode(key, n.Name, n.ID, now, ttl); err != nil {
			return err
		}
	}
	s.state.apply(n.ID, peerOf(&n))
	what := "SSH-only node added"
	if !created {
		what = "SSH-only node re-certified"
	}
	s.log.Info(what, "node", n.Name, "id", n.ID, "services", names, "expires", now.Add(ttl), "actor", actor)
	writeJSON(w, http.StatusOK, wire.AddSSHResponse{
		Node:        s.wireNode(&n),
		Certificate: cert,
		SSHCA:       string(ssh.MarshalAuthorizedKey(s.sshCA.PublicKey())),
		ProxySSH:    s.opts.SSHEndpoint,
		Domain:      s.opts.Domain,
	})
	return nil
}

// signSSHNode certifies an SSH-only node's key: principal = its name.
func (s *Server) signSSHNode(key, name, id string, now time.Time, ttl time.Duration) (string, error) {
	c, err := pki.SignSSHUserCert(s.sshCA, key, name, "ssh-node:"+id, now, ttl)
	if err != nil {
		return "", errf(http.StatusBadRequest, wire.CodeBadRequest, "%v", err)
	}
	return c, nil
}
