package coordinator

import (
	"net/http"
	"net/netip"
	"strings"
	"time"

	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
	"golang.org/x/crypto/ssh"
)

// sshHostCertValidity is how long a proxy's SSH host certificate lasts; a
// proxy asks for a new one at every start.
const sshHostCertValidity = 30 * 24 * time.Hour

// handleSSHHostCert certifies a proxy's SSH host key, so that nodes verify
// the proxy through the SSH CA (an @cert-authority known_hosts line), never
// by trust on first use. Only members with role proxy may ask.
func (s *Server) handleSSHHostCert(w http.ResponseWriter, r *http.Request, callerID string) error {
	if caller, ok := s.state.current().byID[callerID]; !ok || caller.Role != wire.RoleProxy {
		return errf(http.StatusForbidden, wire.CodeForbidden, "only proxies may have SSH host keys certified")
	}
	var req wire.SSHHostCertRequest
	if err := decodeJSON(w, r, &req); err != nil {
		return err
	}
	if len(req.Principals) == 0 || len(req.Principals) > 16 {
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "give 1 to 16 host names or addresses (principals)")
	}
	for _, p := range req.Principals {
		if !validHostPrincipal(p) {
			return errf(http.StatusBadRequest, wire.CodeBadRequest, "principal %q is not a host name or IP address", p)
		}
	}
	pub, _, _, rest, err := ssh.ParseAuthorizedKey([]byte(req.HostKey))
	if err != nil || strings.TrimSpace(string(rest)) != "" {
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "host_key is not one authorized_keys line")
	}
	if _, isCert := pub.(*ssh.Certificate); isCert {
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "host_key is a certificate; send the plain public key")
	}
	cert, err := pki.SignSSHHostCert(s.sshCA, pub, req.Principals, s.opts.Now(), sshHostCertValidity)
	if err != nil {
		return err
	}
	s.log.Info("proxy SSH host key certified", "proxy_id", callerID, "principals", req.Principals)
	writeJSON(w, http.StatusOK, wire.SSHHostCertResponse{
		Certificate: string(ssh.MarshalAuthorizedKey(cert)),
		SSHCA:       string(ssh.MarshalAuthorizedKey(s.sshCA.PublicKey())),
	})
	return nil
}

func validHostPrincipal(p string) bool {
	if _, err := netip.ParseAddr(p); err == nil {
		return true
	}
	if p == "" || len(p) > 253 {
		return false
	}
	for _, label := range strings.Split(p, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}
