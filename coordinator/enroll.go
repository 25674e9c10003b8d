package coordinator

import (
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"strconv"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
	"golang.org/x/crypto/ssh"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// handleEnroll turns a token, a name, a WireGuard public key and a CSR into
// a node: one store transaction verifies and consumes the token, allocates
// the addresses and inserts the node, so a crash leaves all or nothing.
func (s *Server) handleEnroll(w http.ResponseWriter, r *http.Request) error {
	src := remoteAddr(r)
	if ok, wait := s.limiter.Allow(src); !ok {
		w.Header().Set("Retry-After", strconv.Itoa(int(wait/time.Second)+1))
		return errf(http.StatusTooManyRequests, wire.CodeRateLimited,
			"too many failed enrollment attempts from your address; retry in %s", (wait + time.Second).Truncate(time.Second))
	}
	var req wire.EnrollRequest
	if err := decodeJSON(w, r, &req); err != nil {
		return err
	}
	tokenID, secretHash, err := pki.ParseSecret(pki.KindEnroll, req.Token)
	if err != nil {
		s.limiter.Fail(src)
		return &apiError{status: errTokenRefused.status, code: errTokenRefused.code, msg: errTokenRefused.msg, cause: err}
	}
	if err := validateMemberName(req.Name, req.Role); err != nil {
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "%v", err)
	}
	if err := validateWireGuardKey(req.WireGuardKey); err != nil {
		return err
	}
	nodeID, err := newID()
	if err != nil {
		return err
	}
	now := s.opts.Now()
	cert, err := s.ca.SignClientCSR([]byte(req.CSR), nodeID, now, s.opts.CertValidity)
	if err != nil {
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "csr: %v", err)
	}
	var sshCert string
	if req.SSHKey != "" {
		if sshCert, err = s.signSSH(req.SSHKey, req.Name, nodeID, now); err != nil {
			return err
		}
	}
	wantRole := req.Role
	if wantRole == "" {
		wantRole = wire.RoleNode
	}
	node, err := s.opts.Store.Enroll(r.Context(), store.EnrollParams{
		TokenID: tokenID,
		VerifyToken: func(t store.Token) error {
			switch {
			case !pki.HashEqual(t.SecretHash, secretHash):
				return errors.New("secret mismatch")
			case !t.RevokedAt.IsZero():
				return errors.New("token revoked")
			case !now.Before(t.Expires):
				return errors.New("token expired")
			case t.MaxUses > 0 && t.Uses >= t.MaxUses:
				return errors.New("token used up")
			case t.Role != wantRole:
				return &roleMismatch{token: t.Role, want: wantRole}
			}
			return nil
		},
		NodeID:       nodeID,
		Name:         req.Name,
		WireGuardKey: req.WireGuardKey,
		Now:          now,
		IPv4Pool:     s.opts.IPv4Pool,
		IPv6Pool:     s.ipv6,
		Quarantine:   s.opts.Quarantine,
		Actor:        "token:" + tokenID + " from " + src.String(),
	})
	if err != nil {
		var rm *roleMismatch
		if errors.As(err, &rm) { // a valid token for another role: say so, count no failure
			return &apiError{status: http.StatusForbidden, code: wire.CodeWrongRole, cause: err, msg: rm.Error()}
		}
		if errors.Is(err, store.ErrTokenInvalid) {
			s.limiter.Fail(src)
		}
		return err
	}
	s.state.apply(node.ID, peerOf(&node))
	s.log.Info("node enrolled", "node", node.Name, "id", node.ID, "ipv4", node.IPv4, "token_id", tokenID, "remote", src)
	return writeEnrollResponse(w, enrollHead{
		Node:           s.wireNode(&node),
		Certificate:    string(pki.CertPEM(cert)),
		CA:             string(s.ca.CertPEM()),
		SSHCertificate: sshCert,
		SSHCA:          s.sshCAKey(sshCert),
	}, s.state.current(), node.ID, &s.opts, s.ipv6)
}

// enrollHead is wire.EnrollResponse without Netmap, which
// writeEnrollResponse appends pre-encoded (in the mesh topology it lists
// every member). TestEnrollHeadMirrorsWire keeps it in step.
type enrollHead struct {
	Node           wire.Node `json:"node"`
	Certificate    string    `json:"certificate"`
	CA             string    `json:"ca"`
	SSHCertificate string    `json:"ssh_certificate,omitempty"`
	SSHCA          string    `json:"ssh_ca,omitempty"`
}

// writeEnrollResponse answers an enrollment: head and the new node's
// netmap in snap, streamed.
func writeEnrollResponse(w http.ResponseWriter, head enrollHead, snap *snapshot, id string, o *Options, ipv6Pool netip.Prefix) error {
	hb, err := json.Marshal(&head)
	if err != nil {
		return err
	}
	var nj *netmapJSON
	var empty []byte
	if self, ok := snap.byID[id]; ok {
		nj = snap.render(self, 0, netmapPlan{full: true}, o, ipv6Pool)
	} else { // revoked already
		empty, _ = json.Marshal(wire.Netmap{})
	}
	size := len(hb) - 1 + len(`,"netmap":`) + len(empty) + len("}\n")
	if nj != nil {
		size += nj.size
	}
	h := w.Header()
	h.Set("Content-Type", "application/json")
	h.Set("Cache-Control", "no-store")
	h.Set("Content-Length", strconv.Itoa(size))
	// From here on, like writeJSON, write errors are ignored: the status
	// is sent, and a client that went away mid-answer is nobody's to tell.
	w.WriteHeader(http.StatusOK)
	w.Write(hb[:len(hb)-1])
	w.Write([]byte(`,"netmap":`))
	if nj != nil {
		if nj.writeTo(w) != nil {
			return nil
		}
	} else {
		w.Write(empty)
	}
	w.Write([]byte("}\n"))
	return nil
}

func validateWireGuardKey(k string) error {
	key, err := wgtypes.ParseKey(k)
	if err != nil {
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "wireguard_key is not a base64 WireGuard public key: %v", err)
	}
	// One key, one spelling: the decoder skips line breaks and ignores the
	// padding bits, and the store refuses a registered key by its string.
	if key.String() != k {
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "wireguard_key is not in canonical base64 (want %q)", key.String())
	}
	if key == (wgtypes.Key{}) {
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "wireguard_key is all zeros")
	}
	return nil
}

// newID returns a random 12-hex-digit identifier.
func newID() (string, error) {
	var b [6]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", fmt.Errorf("random id: %w", err)
	}
	return hex.EncodeToString(b[:]), nil
}

// remoteAddr is the TCP peer address of r. The API is not meant to sit
// behind a reverse proxy, so X-Forwarded-For is never trusted.
func remoteAddr(r *http.Request) netip.Addr {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

// wireNode renders a stored node for the API.
func (s *Server) wireNode(n *store.Node) wire.Node {
	p := peerOf(n)
	return wire.Node{
		ID:           n.ID,
		Name:         n.Name,
		Role:         n.Role,
		IPv4:         p.IPv4,
		IPv6:         p.IPv6,
		WireGuardKey: n.WireGuardKey,
		Tags:         nonNil(p.Tags),
		Services:     nonNil(p.Services),
		Endpoints:    nonNil(p.Endpoints),
		Created:      n.Created.UTC(),
		LastSeen:     timePtr(s.seen.lastSeen(n.ID, n.LastSeen)),
		Online:       !n.Revoked() && n.Role != wire.RoleSSH && s.seen.online(n.ID),
		Revoked:      n.Revoked(),
		RevokedAt:    timePtr(n.RevokedAt),
	}
}

// timePtr renders a time for JSON: nil (null) for the zero time, else UTC.
func timePtr(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	t = t.UTC()
	return &t
}

func nonNil[T any](s []T) []T {
	if s == nil {
		return []T{}
	}
	return s
}

// roleMismatch refuses a valid token presented for another role. It is
// checked last, after the secret, so it reveals nothing to a guesser.
type roleMismatch struct{ token, want string }

func (e *roleMismatch) Error() string {
	if e.want == wire.RoleProxy {
		return "this token enrolls ordinary nodes, not a proxy (a proxy sees every service): create a proxy token with meshctl token create --role proxy"
	}
	return fmt.Sprintf("this token is for role %q; enroll a node with a token from meshctl token create", e.token)
}

// signSSH certifies a node's SSH key for the SSH fallback: principal = the
// node's name, as long-lived as its TLS certificate.
func (s *Server) signSSH(key, name, nodeID string, now time.Time) (string, error) {
	c, err := pki.SignSSHUserCert(s.sshCA, key, name, "node:"+nodeID, now, s.opts.CertValidity)
	if err != nil {
		return "", errf(http.StatusBadRequest, wire.CodeBadRequest, "%v", err)
	}
	return c, nil
}

// sshCAKey is the SSH CA public key to hand out with a certificate.
func (s *Server) sshCAKey(cert string) string {
	if cert == "" {
		return ""
	}
	return string(ssh.MarshalAuthorizedKey(s.sshCA.PublicKey()))
}
