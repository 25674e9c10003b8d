package coordinator

import (
	"context"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
)

type nodeIDKey struct{}

// nodeAuth authenticates a node by its mTLS client certificate: it must
// chain to the coordinator CA for client auth at the current time, and name
// (as CommonName) a node that is enrolled and not revoked. Everything else
// is refused with a message that says what to do.
//
// The renew endpoint (graceful) also accepts a certificate that expired less
// than RenewGrace ago: the TLS handshake proved possession of its key, so a
// node that was offline past its certificate's lifetime can renew instead
// of re-enrolling. Revoked nodes never can.
func (s *Server) nodeAuth(h func(w http.ResponseWriter, r *http.Request, nodeID string) error) http.Handler {
	return s.nodeAuthGrace(h, false)
}

func (s *Server) nodeAuthGrace(h func(w http.ResponseWriter, r *http.Request, nodeID string) error, graceful bool) http.Handler {
	return s.handle(func(w http.ResponseWriter, r *http.Request) error {
		// Authentication is a function of its own so that its locals are
		// not part of the frame that stays on the stack while h runs: a
		// long-poll waits in h, one per node, and a small stack while it
		// waits lets the runtime shrink it.
		id, err := s.authNode(r, graceful)
		if err != nil {
			return err
		}
		return h(w, r, id)
	})
}

// authNode returns the id of the node whose client certificate r carries
// (see nodeAuth).
func (s *Server) authNode(r *http.Request, graceful bool) (string, error) {
	if r.TLS == nil || len(r.TLS.PeerCertificates) == 0 {
		return "", errf(http.StatusUnauthorized, wire.CodeUnauthorized, "this endpoint needs the node's client certificate: enroll first (meshctl enroll)")
	}
	leaf := r.TLS.PeerCertificates[0]
	now := s.opts.Now()
	at := now
	if graceful && now.After(leaf.NotAfter) && now.Before(leaf.NotAfter.Add(s.opts.RenewGrace)) {
		at = leaf.NotAfter // verify the chain as of the last valid instant
	}
	if err := s.verified.verify(leaf, s.ca.Cert, at); err != nil {
		var inv x509.CertificateInvalidError
		if errors.As(err, &inv) && inv.Reason == x509.Expired {
			msg := fmt.Sprintf("the node certificate expired at %s; the agent renews it automatically within %s of expiry",
				leaf.NotAfter.UTC().Format(time.RFC3339), s.opts.RenewGrace)
			if now.After(leaf.NotAfter.Add(s.opts.RenewGrace)) {
				msg = fmt.Sprintf("the node certificate expired at %s, longer ago than the %s renewal grace; re-enroll this device with a new token (meshctl enroll --force …)",
					leaf.NotAfter.UTC().Format(time.RFC3339), s.opts.RenewGrace)
			}
			return "", &apiError{status: http.StatusForbidden, code: wire.CodeCertExpired, cause: err, msg: msg}
		}
		return "", &apiError{status: http.StatusForbidden, code: wire.CodeForbidden, cause: err,
			msg: "the client certificate was not issued by this coordinator for a node"}
	}
	id := leaf.Subject.CommonName
	if _, ok := s.state.current().byID[id]; !ok {
		n, err := s.opts.Store.GetNode(r.Context(), id)
		switch {
		case err == nil && n.Revoked():
			return "", errf(http.StatusForbidden, wire.CodeRevoked,
				"node %s was revoked at %s; it can no longer use this coordinator (re-enroll with a new token if that was a mistake)",
				n.Name, n.RevokedAt.UTC().Format(time.RFC3339))
		case err == nil || errors.Is(err, store.ErrNotFound):
			return "", errf(http.StatusForbidden, wire.CodeForbidden, "this node is not enrolled with this coordinator")
		default:
			return "", err
		}
	}
	s.seen.touch(id)
	return id, nil
}

// handleNetmap is the long-poll: it answers at once when the caller's
// version (?since=N) is one it cannot account for (0, from before a
// restart, or older than the ring of recent changes), and when a change
// since then concerns the caller (its own entry, a peer it sees, and for
// proxies the SSH-only nodes and revoked access keys); else it waits for
// such a change up to LongPoll plus jitter and answers 304 Not Modified.
// Changes that concern the caller not at all (in the hub topology, other
// nodes; in the tags topology, nodes it shares no tag with) do not wake it: its version stays valid. With delta=1 it answers
// a delta against since when the ring reaches back to it (see wire.Netmap).
func (s *Server) handleNetmap(w http.ResponseWriter, r *http.Request, id string) error {
	q := r.URL.Query()
	var since uint64
	if v := q.Get("since"); v != "" {
		var err error
		if since, err = strconv.ParseUint(v, 10, 64); err != nil {
			return errf(http.StatusBadRequest, wire.CodeBadRequest, "since must be a netmap version number")
		}
	}
	wantDelta := q.Get(wire.NetmapDeltaParam) == "1"
	done := s.seen.polling(id)
	defer done()
	checked := since // versions up to here change nothing the caller sees
	var timer *time.Timer
	for {
		snap := s.state.current()
		self, ok := snap.byID[id]
		if !ok {
			return s.refuseGone(r.Context(), id)
		}
		if snap.version != checked {
			plan := snap.planFor(self, since, checked, s.opts.Topology, wantDelta)
			if !plan.wait {
				writeNetmapResponse(w, snap.render(self, since, plan, &s.opts, s.ipv6))
				return nil
			}
			checked = snap.version
		}
		if timer == nil {
			jitter := time.Duration(rand.Int64N(int64(s.opts.LongPoll/10) + 1))
			timer = time.NewTimer(s.opts.LongPoll + jitter)
			defer timer.Stop()
		}
		select {
		case <-snap.next:
		case <-timer.C:
			w.WriteHeader(http.StatusNotModified)
			return nil
		case <-r.Context().Done():
			return nil
		}
	}
}

// refuseGone answers a node that vanished from the netmap while it waited.
func (s *Server) refuseGone(ctx context.Context, id string) error {
	if n, err := s.opts.Store.GetNode(ctx, id); err == nil && n.Revoked() {
		return errf(http.StatusForbidden, wire.CodeRevoked, "node %s was revoked at %s", n.Name, n.RevokedAt.UTC().Format(time.RFC3339))
	}
	return errf(http.StatusForbidden, wire.CodeForbidden, "this node is not enrolled with this coordinator")
}

const (
	maxServices  = 64
	maxEndpoints = 16
)

// handleUpdate records the services, endpoints and disco key a node
// reports. Nil fields are left unchanged; the netmap version moves only
// when the node's peer entry actually changes.
func (s *Server) handleUpdate(w http.ResponseWriter, r *http.Request, id string) error {
	var req wire.UpdateRequest
	if err := decodeJSON(w, r, &req); err != nil {
		return err
	}
	var svcJSON *string
	if req.Services != nil {
		if err := validateServices(*req.Services); err != nil {
			return errf(http.StatusBadRequest, wire.CodeBadRequest, "%v", err)
		}
		b, _ := json.Marshal(nonNil(*req.Services))
		str := string(b)
		svcJSON = &str
	}
	if req.Endpoints != nil {
		if err := validateEndpoints(*req.Endpoints); err != nil {
			return errf(http.StatusBadRequest, wire.CodeBadRequest, "%v", err)
		}
	}
	if req.DiscoKey != nil {
		if err := validateDiscoKey(*req.DiscoKey); err != nil {
			return errf(http.StatusBadRequest, wire.CodeBadRequest, "%v", err)
		}
	}
	old := s.state.current().byID[id]
	node, err := s.opts.Store.UpdateNode(r.Context(), id,
		store.NodeUpdate{ServicesJSON: svcJSON, Endpoints: req.Endpoints, DiscoKey: req.DiscoKey})
	if err != nil {
		return err
	}
	p := peerOf(&node)
	if old == nil || !peersEqual(&old.Peer, p) {
		s.state.apply(id, p)
	}
	writeJSON(w, http.StatusOK, s.wireNode(&node))
	return nil
}

func validateServices(svcs []wire.Service) error {
	if len(svcs) > maxServices {
		return fmt.Errorf("%d services; at most %d", len(svcs), maxServices)
	}
	seen := map[string]bool{}
	for _, sv := range svcs {
		if err := ValidateName("service", sv.Name); err != nil {
			return err
		}
		if seen[sv.Name] {
			return fmt.Errorf("service %q listed twice", sv.Name)
		}
		seen[sv.Name] = true
		if sv.Port == 0 {
			return fmt.Errorf("service %q has port 0", sv.Name)
		}
	}
	return nil
}

func validateEndpoints(eps []string) error {
	if len(eps) > maxEndpoints {
		return fmt.Errorf("%d endpoints; at most %d", len(eps), maxEndpoints)
	}
	for _, e := range eps {
		ap, err := netip.ParseAddrPort(e)
		if err != nil || ap.Port() == 0 || !ap.Addr().IsValid() || ap.Addr().IsUnspecified() || ap.Addr().IsMulticast() {
			return fmt.Errorf("endpoint %q is not a usable IP:port", e)
		}
	}
	return nil
}

// validateDiscoKey accepts a disco (path-probe) public key: standard
// padded base64 of 32 bytes, in its canonical form (no line breaks, zero
// padding bits, so that equal keys are equal strings), and not all zero.
func validateDiscoKey(k string) error {
	const want = "disco_key: want standard base64 of 32 bytes (an X25519 public key)"
	b, err := base64.StdEncoding.DecodeString(k)
	if err != nil || len(b) != 32 || base64.StdEncoding.EncodeToString(b) != k {
		return fmt.Errorf("%s, got %q", want, truncate(k, 64))
	}
	if [32]byte(b) == [32]byte{} {
		return errors.New(want + ", got the all-zero key")
	}
	return nil
}

// truncate shortens s to at most n bytes for an error message.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

func peersEqual(a, b *wire.Peer) bool {
	return a.Name == b.Name && a.WireGuardKey == b.WireGuardKey && a.IPv4 == b.IPv4 && a.IPv6 == b.IPv6 &&
		slices.Equal(a.Endpoints, b.Endpoints) && slices.Equal(a.Services, b.Services) && slices.Equal(a.Tags, b.Tags) && a.Role == b.Role &&
		a.DiscoKey == b.DiscoKey
}

// handleRenew issues a fresh client certificate for a new (or the same)
// key; the node proves possession of its current certificate by mTLS.
func (s *Server) handleRenew(w http.ResponseWriter, r *http.Request, id string) error {
	var req wire.RenewRequest
	if err := decodeJSON(w, r, &req); err != nil {
		return err
	}
	now := s.opts.Now()
	cert, err := s.ca.SignClientCSR([]byte(req.CSR), id, now, s.opts.CertValidity)
	if err != nil {
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "csr: %v", err)
	}
	var sshCert string
	if req.SSHKey != "" {
		p, ok := s.state.current().byID[id]
		if !ok {
			return s.refuseGone(r.Context(), id)
		}
		if sshCert, err = s.signSSH(req.SSHKey, p.Name, id, now); err != nil { // the current name: renames follow
			return err
		}
	}
	writeJSON(w, http.StatusOK, wire.RenewResponse{Certificate: string(pki.CertPEM(cert)), CA: string(s.ca.CertPEM()),
		SSHCertificate: sshCert, SSHCA: s.sshCAKey(sshCert)})
	return nil
}
