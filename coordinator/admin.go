package coordinator

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
)

// adminHandler is an admin endpoint; actor names who called it, for the
// audit log.
type adminHandler func(w http.ResponseWriter, r *http.Request, actor string) error

type adminAuth func(adminHandler) http.Handler

// adminRoutes registers the admin API on mux behind auth. The same
// handlers serve the local Unix socket and remote admins with a key.
func (s *Server) adminRoutes(mux *http.ServeMux, auth adminAuth) {
	mux.Handle("GET "+wire.PathAdminInfo, auth(s.adminInfo))
	mux.Handle("GET "+wire.PathAdminTokens, auth(s.adminListTokens))
	mux.Handle("POST "+wire.PathAdminTokens, auth(s.adminCreateToken))
	mux.Handle("POST "+wire.PathAdminTokenRevoke, auth(s.adminRevokeToken))
	mux.Handle("GET "+wire.PathAdminNodes, auth(s.adminListNodes))
	mux.Handle("POST "+wire.PathAdminNodeRevoke, auth(s.adminRevokeNode))
	mux.Handle("POST "+wire.PathAdminNodeRename, auth(s.adminRenameNode))
	mux.Handle("POST "+wire.PathAdminNodeTags, auth(s.adminSetNodeTags))
	mux.Handle("POST "+wire.PathAdminNodeAddSSH, auth(s.adminAddSSH))
	mux.Handle("GET "+wire.PathAdminAudit, auth(s.adminAudit))
	mux.Handle("GET "+wire.PathAdminKeys, auth(s.adminListKeys))
	mux.Handle("POST "+wire.PathAdminKeys, auth(s.adminCreateKey))
	mux.Handle("POST "+wire.PathAdminKeyRevoke, auth(s.adminRevokeKey))
	mux.Handle("GET "+wire.PathAdminAccessKeys, auth(s.adminListAccessKeys))
	mux.Handle("POST "+wire.PathAdminAccessKeys, auth(s.adminCreateAccessKey))
	mux.Handle("POST "+wire.PathAdminAccessKeyRevoke, auth(s.adminRevokeAccessKey))
	mux.Handle("POST "+wire.PathAdminVisibility, auth(s.adminSetVisibility))
}

func (s *Server) adminSocketHandler() http.Handler {
	mux := http.NewServeMux()
	s.adminRoutes(mux, s.socketAuth)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, wire.Error{Code: wire.CodeNotFound, Message: "no such admin endpoint: " + r.Method + " " + r.URL.Path})
	})
	return mux
}

// socketAuth admits callers on the admin socket whose uid is root or the
// server's own. The socket is 0600 in a 0700 dir already; the peer
// credential check keeps that true even if someone loosens the modes.
func (s *Server) socketAuth(h adminHandler) http.Handler {
	return s.handle(func(w http.ResponseWriter, r *http.Request) error {
		pc := peerCredFrom(r.Context())
		if !pc.ok || (pc.uid != 0 && pc.uid != os.Geteuid()) {
			return errf(http.StatusForbidden, wire.CodeForbidden, "the admin socket accepts only root and the server's own user")
		}
		return h(w, r, fmt.Sprintf("local:uid=%d", pc.uid))
	})
}

// adminKeyAuth admits remote admins presenting "Authorization: Bearer KEY"
// with a valid, unexpired, unrevoked admin key. Failures are rate-limited
// per source like enrollment tokens.
func (s *Server) adminKeyAuth(h adminHandler) http.Handler {
	return s.handle(func(w http.ResponseWriter, r *http.Request) error {
		src := remoteAddr(r)
		if ok, wait := s.limiter.Allow(src); !ok {
			w.Header().Set("Retry-After", strconv.Itoa(int(wait/time.Second)+1))
			return errf(http.StatusTooManyRequests, wire.CodeRateLimited, "too many failed attempts from your address; retry in %s", (wait + time.Second).Truncate(time.Second))
		}
		refused := errf(http.StatusUnauthorized, wire.CodeUnauthorized,
			"admin key refused: pass a valid key in MESHCTL_ADMIN_KEY (create one on the server with meshctl admin-key create)")
		bearer, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		if !ok {
			s.limiter.Fail(src)
			return refused
		}
		id, hash, err := pki.ParseSecret(pki.KindAdmin, bearer)
		if err != nil {
			s.limiter.Fail(src)
			return refused
		}
		k, err := s.opts.Store.GetAdminKey(r.Context(), id)
		now := s.opts.Now()
		if err != nil || !pki.HashEqual(k.SecretHash, hash) || !k.RevokedAt.IsZero() || (!k.Expires.IsZero() && !now.Before(k.Expires)) {
			s.limiter.Fail(src)
			return refused
		}
		return h(w, r, "admin-key:"+id)
	})
}

func (s *Server) adminInfo(w http.ResponseWriter, r *http.Request, actor string) error {
	writeJSON(w, http.StatusOK, wire.Info{
		Version: s.opts.Version, Coordinator: s.URL(), CAPin: s.CAPin(),
		IPv4Pool: s.opts.IPv4Pool.String(), IPv6Pool: s.ipv6.String(),
	})
	return nil
}

// Token limits.
const (
	DefaultTokenTTL = time.Hour
	maxTokenTTL     = 365 * 24 * time.Hour
	maxTags         = 16
)

func (s *Server) adminCreateToken(w http.ResponseWriter, r *http.Request, actor string) error {
	var req wire.TokenCreateRequest
	if err := decodeJSON(w, r, &req); err != nil {
		return err
	}
	resp, err := s.CreateToken(r.Context(), req, actor)
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, resp)
	return nil
}

// CreateToken creates an enrollment token (the admin API's token create;
// the all-in-one server also uses it to enroll its own proxy).
func (s *Server) CreateToken(ctx context.Context, req wire.TokenCreateRequest, actor string) (wire.TokenCreateResponse, error) {
	ttl := time.Duration(req.TTL)
	switch {
	case ttl == 0:
		ttl = DefaultTokenTTL
	case ttl < 0 || ttl > maxTokenTTL:
		return wire.TokenCreateResponse{}, errf(http.StatusBadRequest, wire.CodeBadRequest, "ttl must be between 1s and %s", maxTokenTTL)
	}
	switch {
	case req.MaxUses < 0:
		return wire.TokenCreateResponse{}, errf(http.StatusBadRequest, wire.CodeBadRequest, "max_uses must be ≥ 1")
	case req.Reusable && req.MaxUses > 0:
		return wire.TokenCreateResponse{}, errf(http.StatusBadRequest, wire.CodeBadRequest, "max_uses and reusable exclude each other")
	case req.Reusable:
		req.MaxUses = 0 // the store's "unlimited"
	case req.MaxUses == 0:
		req.MaxUses = 1
	}
	if req.Role == "" {
		req.Role = wire.RoleNode
	}
	if req.Role != wire.RoleNode && req.Role != wire.RoleProxy {
		return wire.TokenCreateResponse{}, errf(http.StatusBadRequest, wire.CodeBadRequest, "role must be %q or %q", wire.RoleNode, wire.RoleProxy)
	}
	if err := validateTags(req.Tags); err != nil {
		return wire.TokenCreateResponse{}, err
	}
	secret, id, hash, err := pki.NewSecret(pki.KindEnroll)
	if err != nil {
		return wire.TokenCreateResponse{}, err
	}
	now := s.opts.Now()
	t := store.Token{ID: id, SecretHash: hash, Role: req.Role, Tags: nonNil(req.Tags), MaxUses: req.MaxUses,
		Created: now, Expires: now.Add(ttl), CreatedBy: actor}
	if err := s.opts.Store.CreateToken(ctx, t, actor); err != nil {
		return wire.TokenCreateResponse{}, err
	}
	s.log.Info("token created", "token_id", id, "actor", actor, "role", t.Role, "expires", t.Expires, "max_uses", t.MaxUses)
	cmd := fmt.Sprintf("meshctl enroll --coordinator %s --token %s --ca-pin %s", s.URL(), secret, s.CAPin())
	if t.Role == wire.RoleProxy {
		domain := s.opts.Domain
		if domain == "" {
			domain = "DOMAIN"
		}
		cmd = fmt.Sprintf("meshctl proxy serve --coordinator %s --token %s --ca-pin %s --domain %s", s.URL(), secret, s.CAPin(), domain)
	}
	return wire.TokenCreateResponse{
		Token: secret, ID: id, Coordinator: s.URL(), CAPin: s.CAPin(), Expires: t.Expires.UTC(),
		MaxUses: t.MaxUses, Tags: t.Tags, Role: t.Role, EnrollCommand: cmd,
	}, nil
}

func (s *Server) adminListTokens(w http.ResponseWriter, r *http.Request, actor string) error {
	ts, err := s.opts.Store.ListTokens(r.Context())
	if err != nil {
		return err
	}
	out := make([]wire.Token, 0, len(ts))
	for _, t := range ts {
		out = append(out, wire.Token{ID: t.ID, Role: t.Role, Tags: nonNil(t.Tags), Uses: t.Uses, MaxUses: t.MaxUses,
			Created: t.Created.UTC(), Expires: t.Expires.UTC(), Revoked: !t.RevokedAt.IsZero(), CreatedBy: t.CreatedBy})
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) adminRevokeToken(w http.ResponseWriter, r *http.Request, actor string) error {
	var req wire.IDRequest
	if err := decodeJSON(w, r, &req); err != nil {
		return err
	}
	if err := s.opts.Store.RevokeToken(r.Context(), req.ID, s.opts.Now(), actor); err != nil {
		return err
	}
	s.log.Info("token revoked", "token_id", req.ID, "actor", actor)
	writeJSON(w, http.StatusOK, wire.IDRequest{ID: req.ID})
	return nil
}

func (s *Server) adminListNodes(w http.ResponseWriter, r *http.Request, actor string) error {
	nodes, err := s.opts.Store.ListNodes(r.Context())
	if err != nil {
		return err
	}
	out := make([]wire.Node, 0, len(nodes))
	for i := range nodes {
		out = append(out, s.wireNode(&nodes[i]))
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

// adminRevokeNode revokes durably (the store commits before it returns),
// then removes the node from the netmap so every watcher learns at once.
func (s *Server) adminRevokeNode(w http.ResponseWriter, r *http.Request, actor string) error {
	var req wire.NameRequest
	if err := decodeJSON(w, r, &req); err != nil {
		return err
	}
	n, err := s.opts.Store.RevokeNode(r.Context(), req.Name, s.opts.Now(), actor)
	if err != nil {
		return err
	}
	s.state.apply(n.ID, nil)
	s.log.Info("node revoked", "node", n.Name, "id", n.ID, "actor", actor)
	writeJSON(w, http.StatusOK, s.wireNode(&n))
	return nil
}

// RetireProxy revokes the active proxy called name, if there is one, and
// reports whether it did. The all-in-one server calls it before it enrolls
// its own proxy into a state dir that holds no identity: a first start
// killed (or out of disk space) after the coordinator committed the
// proxy's enrollment but before the proxy saved its keys leaves a proxy
// nobody holds the keys of, whose name would refuse every later start.
func (s *Server) RetireProxy(ctx context.Context, name, actor string) (bool, error) {
	nodes, err := s.opts.Store.ListNodes(ctx)
	if err != nil {
		return false, err
	}
	for _, n := range nodes {
		if n.Name != name || n.Role != wire.RoleProxy || n.Revoked() {
			continue
		}
		rn, err := s.opts.Store.RevokeNode(ctx, n.ID, s.opts.Now(), actor)
		if err != nil {
			return false, err
		}
		s.state.apply(rn.ID, nil)
		s.log.Warn("revoked a proxy whose identity was never saved (a first start cut short?)", "node", rn.Name, "id", rn.ID, "actor", actor)
		return true, nil
	}
	return false, nil
}

func (s *Server) adminRenameNode(w http.ResponseWriter, r *http.Request, actor string) error {
	var req wire.NameRequest
	if err := decodeJSON(w, r, &req); err != nil {
		return err
	}
	if err := ValidateName("node", req.NewName); err != nil {
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "%v", err)
	}
	n, err := s.opts.Store.RenameNode(r.Context(), req.Name, req.NewName, s.opts.Now(), actor)
	if errors.Is(err, store.ErrSSHOnly) {
		return &apiError{status: http.StatusBadRequest, code: wire.CodeBadRequest, cause: err,
			msg: fmt.Sprintf("%q is an SSH-only node, and its SSH certificate names it: revoke it (meshctl nodes revoke) and add it again under the new name (meshctl nodes add-ssh)", req.Name)}
	}
	if err != nil {
		return err
	}
	s.state.apply(n.ID, peerOf(&n))
	s.log.Info("node renamed", "old", req.Name, "new", n.Name, "actor", actor)
	writeJSON(w, http.StatusOK, s.wireNode(&n))
	return nil
}

// validateTags checks tags given to a token or a node: at most maxTags,
// each a valid name, none twice.
func validateTags(tags []string) error {
	if len(tags) > maxTags {
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "at most %d tags", maxTags)
	}
	for i, t := range tags {
		if err := ValidateName("tag", t); err != nil {
			return errf(http.StatusBadRequest, wire.CodeBadRequest, "%v", err)
		}
		if slices.Contains(tags[:i], t) {
			return errf(http.StatusBadRequest, wire.CodeBadRequest, "tag %q given twice", t)
		}
	}
	return nil
}

// adminSetNodeTags replaces a node's tags. In the tags topology that
// changes whom it sees: the node gets a full netmap, and every node that
// starts or stops seeing it gets the change.
func (s *Server) adminSetNodeTags(w http.ResponseWriter, r *http.Request, actor string) error {
	var req wire.NodeTagsRequest
	if err := decodeJSON(w, r, &req); err != nil {
		return err
	}
	if err := validateTags(req.Tags); err != nil {
		return err
	}
	n, err := s.opts.Store.SetNodeTags(r.Context(), req.Name, req.Tags, s.opts.Now(), actor)
	if errors.Is(err, store.ErrSSHOnly) {
		return &apiError{status: http.StatusBadRequest, code: wire.CodeBadRequest, cause: err,
			msg: fmt.Sprintf("%q is an SSH-only node: it is never a WireGuard peer, so tags do not apply to it", req.Name)}
	}
	if err != nil {
		return err
	}
	s.state.apply(n.ID, peerOf(&n))
	s.log.Info("node tags set", "node", n.Name, "tags", strings.Join(n.Tags, ","), "actor", actor)
	writeJSON(w, http.StatusOK, s.wireNode(&n))
	return nil
}

func (s *Server) adminAudit(w http.ResponseWriter, r *http.Request, actor string) error {
	limit := 100
	if v := r.URL.Query().Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return errf(http.StatusBadRequest, wire.CodeBadRequest, "limit must be a number ≥ 0 (0 = all)")
		}
		limit = n
	}
	es, err := s.opts.Store.ListAudit(r.Context(), limit)
	if err != nil {
		return err
	}
	out := make([]wire.AuditEntry, 0, len(es))
	for _, e := range es {
		out = append(out, wire.AuditEntry{ID: e.ID, Time: e.Time.UTC(), Actor: e.Actor, Action: e.Action, Target: e.Target, Detail: e.Detail})
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) adminCreateKey(w http.ResponseWriter, r *http.Request, actor string) error {
	var req wire.AdminKeyCreateRequest
	if err := decodeJSON(w, r, &req); err != nil {
		return err
	}
	if req.TTL < 0 {
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "ttl must not be negative (0 = no expiry)")
	}
	secret, id, hash, err := pki.NewSecret(pki.KindAdmin)
	if err != nil {
		return err
	}
	now := s.opts.Now()
	k := store.AdminKey{ID: id, SecretHash: hash, Created: now, CreatedBy: actor}
	if req.TTL > 0 {
		k.Expires = now.Add(time.Duration(req.TTL))
	}
	if err := s.opts.Store.CreateAdminKey(r.Context(), k, actor); err != nil {
		return err
	}
	s.log.Info("admin key created", "key_id", id, "actor", actor)
	writeJSON(w, http.StatusOK, wire.AdminKeyCreateResponse{Key: secret, ID: id, Coordinator: s.URL(), CAPin: s.CAPin(), Expires: k.Expires.UTC()})
	return nil
}

func (s *Server) adminListKeys(w http.ResponseWriter, r *http.Request, actor string) error {
	ks, err := s.opts.Store.ListAdminKeys(r.Context())
	if err != nil {
		return err
	}
	out := make([]wire.AdminKey, 0, len(ks))
	for _, k := range ks {
		out = append(out, wire.AdminKey{ID: k.ID, Created: k.Created.UTC(), Expires: k.Expires.UTC(), Revoked: !k.RevokedAt.IsZero(), CreatedBy: k.CreatedBy})
	}
	writeJSON(w, http.StatusOK, out)
	return nil
}

func (s *Server) adminRevokeKey(w http.ResponseWriter, r *http.Request, actor string) error {
	var req wire.IDRequest
	if err := decodeJSON(w, r, &req); err != nil {
		return err
	}
	if err := s.opts.Store.RevokeAdminKey(r.Context(), req.ID, s.opts.Now(), actor); err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, wire.IDRequest{ID: req.ID})
	return nil
}
