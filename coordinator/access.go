package coordinator

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
)

// Access control for private services behind the proxy: admins create
// access keys (optionally limited to one node and/or one service) and set
// services public or private; the proxy asks the coordinator whether a key
// a browser presents opens a service, and learns from its netmap which
// keys were revoked early.

// Access key lifetimes.
const (
	DefaultAccessKeyTTL = 24 * time.Hour
	maxAccessKeyTTL     = 365 * 24 * time.Hour
)

// errAccessRefused is the one answer to every access key that does not
// open the service asked about, so that the proxy (and through it a
// browser) learns nothing about why: malformed, unknown, wrong secret,
// revoked, expired or out of scope all look the same.
var errAccessRefused = errf(http.StatusUnauthorized, wire.CodeUnauthorized, "access key refused")

func accessRefused(reason string) error {
	return &apiError{status: errAccessRefused.status, code: errAccessRefused.code, msg: errAccessRefused.msg, cause: errors.New(reason)}
}

func (s *Server) adminCreateAccessKey(w http.ResponseWriter, r *http.Request, actor string) error {
	var req wire.AccessKeyCreateRequest
	if err := decodeJSON(w, r, &req); err != nil {
		return err
	}
	ttl := time.Duration(req.TTL)
	switch {
	case ttl == 0:
		ttl = DefaultAccessKeyTTL
	case ttl < 0 || ttl > maxAccessKeyTTL:
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "ttl must be positive and at most 365 days (%s)", maxAccessKeyTTL)
	}
	var nodeID, nodeName string
	if req.Node != "" {
		if err := ValidateName("node", req.Node); err != nil {
			return errf(http.StatusBadRequest, wire.CodeBadRequest, "%v", err)
		}
		p, ok := s.state.current().lookup(req.Node)
		if !ok {
			return errf(http.StatusNotFound, wire.CodeNotFound,
				"no active node %q: an access key can only be limited to an enrolled node (see meshctl nodes list)", req.Node)
		}
		nodeID, nodeName = p.ID, p.Name
	}
	if req.Service != "" {
		if err := ValidateName("service", req.Service); err != nil {
			return errf(http.StatusBadRequest, wire.CodeBadRequest, "%v", err)
		}
	}
	secret, id, hash, err := pki.NewSecret(pki.KindAccess)
	if err != nil {
		return err
	}
	now := s.opts.Now()
	k := store.AccessKey{ID: id, SecretHash: hash, Node: nodeID, Service: req.Service,
		Created: now, Expires: now.Add(ttl), CreatedBy: actor}
	if err := s.opts.Store.CreateAccessKey(r.Context(), k, actor); err != nil {
		return err
	}
	s.log.Info("access key created", "key_id", id, "actor", actor, "node", nodeName, "service", req.Service, "expires", k.Expires)
	writeJSON(w, http.StatusOK, wire.AccessKeyCreateResponse{
		Key: secret, ID: id, Node: nodeName, Service: req.Service, Expires: k.Expires.UTC(), Domain: s.opts.Domain,
	})
	return nil
}

func (s *Server) adminListAccessKeys(w http.ResponseWriter, r *http.Request, actor string) error {
	ks, err := s.opts.Store.ListAccessKeys(r.Context())
	if err != nil {
		return err
	}
	snap := s.state.current()
	names := map[string]string{} // node id -> name, for nodes no longer active
	out := make([]wire.AccessKey, 0, len(ks))
	for _, k := range ks {
		node := k.Node
		if node != "" {
			if p, ok := snap.byID[node]; ok {
				node = p.Name
			} else if name, ok := names[node]; ok {
				node = name
			} else if n, err := s.opts.Store.GetNode(r.Context(), node); err == nil {
				names[node] = n.Name
				node = n.Name
			}
		}
		out = append(out, wire.AccessKey{ID: k.ID, Node: node, Service: k.Service, Created: k.Created.UTC(),
			Expires: k.Expires.UTC(), Revoked: !k.RevokedAt.IsZero(), CreatedBy: k.CreatedBy})
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// adminRevokeAccessKey revokes durably, then tells the proxies (through
// their netmaps) so that they end the key's sessions at once. Revoking a
// revoked key succeeds and publishes again, so an admin can simply retry
// if publishing failed.
func (s *Server) adminRevokeAccessKey(w http.ResponseWriter, r *http.Request, actor string) error {
	var req wire.IDRequest
	if err := decodeJSON(w, r, &req); err != nil {
		return err
	}
	if err := s.opts.Store.RevokeAccessKey(r.Context(), req.ID, s.opts.Now(), actor); err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return &apiError{status: http.StatusNotFound, code: wire.CodeNotFound, cause: err,
				msg: fmt.Sprintf("no access key with id %q (see meshctl access-key list)", req.ID)}
		}
		return err
	}
	// The revocation is committed; publishing must not depend on the
	// admin's connection staying open.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(r.Context()), 10*time.Second)
	defer cancel()
	if err := s.publishAccessRevoked(ctx); err != nil {
		return &apiError{status: http.StatusInternalServerError, code: wire.CodeInternal, cause: err,
			msg: fmt.Sprintf("access key %s is revoked, but telling the proxies failed; revoke it again to retry", req.ID)}
	}
	s.log.Info("access key revoked", "key_id", req.ID, "actor", actor)
	writeJSON(w, http.StatusOK, wire.IDRequest{ID: req.ID})
	return nil
}

// publishAccessRevoked reloads the revoked access keys from the store and
// puts them into the proxies' netmaps.
func (s *Server) publishAccessRevoked(ctx context.Context) error {
	s.state.accessMu.Lock()
	defer s.state.accessMu.Unlock()
	keys, err := s.opts.Store.ListAccessKeys(ctx)
	if err != nil {
		return err
	}
	s.state.setAccessRevoked(revokedAccessOf(keys, s.opts.Now()))
	return nil
}

// adminSetVisibility makes a node's service public or private whatever the
// node reports, and changes every netmap at once.
func (s *Server) adminSetVisibility(w http.ResponseWriter, r *http.Request, actor string) error {
	var req wire.VisibilityRequest
	if err := decodeJSON(w, r, &req); err != nil {
		return err
	}
	if req.Node == "" {
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "node is empty: name the node whose service to change")
	}
	if err := ValidateName("service", req.Service); err != nil {
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "%v", err)
	}
	n, err := s.opts.Store.SetServiceVisibility(r.Context(), req.Node, req.Service, req.Public, s.opts.Now(), actor)
	if err != nil {
		if errors.Is(err, store.ErrNotFound) {
			return &apiError{status: http.StatusNotFound, code: wire.CodeNotFound, cause: err,
				msg: fmt.Sprintf("no active node %q (see meshctl nodes list)", req.Node)}
		}
		if errors.Is(err, store.ErrSSHOnly) {
			return &apiError{status: http.StatusBadRequest, code: wire.CodeBadRequest, cause: err,
				msg: fmt.Sprintf("SSH-only node %q was not certified for service %q: add it with meshctl nodes add-ssh first", req.Node, req.Service)}
		}
		return err
	}
	s.state.apply(n.ID, peerOf(&n))
	s.log.Info("service visibility set", "node", n.Name, "service", req.Service, "public", req.Public, "actor", actor)
	writeJSON(w, http.StatusOK, s.wireNode(&n))
	return nil
}

// handleAccessCheck answers a proxy asking whether an access key opens a
// node's service. Only members with role proxy may ask. Every refusal is
// the same 401; the reason goes to the log only (never the key). It is not
// rate-limited per source: every request comes from a proxy, which limits
// the browsers behind it.
func (s *Server) handleAccessCheck(w http.ResponseWriter, r *http.Request, callerID string) error {
	snap := s.state.current()
	if caller, ok := snap.byID[callerID]; !ok || caller.Role != wire.RoleProxy {
		return errf(http.StatusForbidden, wire.CodeForbidden, "only proxies may check access keys")
	}
	var req wire.AccessCheckRequest
	if err := decodeJSON(w, r, &req); err != nil {
		return err
	}
	id, hash, err := pki.ParseSecret(pki.KindAccess, req.Key)
	if err != nil {
		return accessRefused("malformed key")
	}
	k, err := s.opts.Store.GetAccessKey(r.Context(), id)
	switch {
	case errors.Is(err, store.ErrNotFound):
		return accessRefused("unknown key id " + id)
	case err != nil:
		return err
	}
	now := s.opts.Now()
	switch {
	case !pki.HashEqual(k.SecretHash, hash):
		return accessRefused("wrong secret for key " + id)
	case !k.RevokedAt.IsZero():
		return accessRefused("key " + id + " is revoked")
	case !now.Before(k.Expires):
		return accessRefused("key " + id + " has expired")
	case k.Service != "" && k.Service != req.Service:
		return accessRefused(fmt.Sprintf("key %s is for service %q, not %q", id, k.Service, req.Service))
	}
	if k.Node != "" {
		if p, ok := snap.lookup(req.Node); !ok || p.ID != k.Node {
			return accessRefused(fmt.Sprintf("key %s is for node id %s, not %q", id, k.Node, req.Node))
		}
	}
	s.log.Info("access key accepted", "key_id", id, "node", req.Node, "service", req.Service, "proxy", callerID)
	writeJSON(w, http.StatusOK, wire.AccessCheckResponse{ID: k.ID, Expires: k.Expires.UTC()})
	return nil
}
