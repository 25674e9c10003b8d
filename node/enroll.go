package node

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
	"golang.org/x/crypto/ssh"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// EnrollOptions configures Enroll.
type EnrollOptions struct {
	// Coordinator is the coordinator's https:// URL. Required.
	Coordinator string
	// Token is the enrollment token. Required.
	Token string
	// CAPin is the coordinator CA pin ("sha256:…"). Empty means the
	// coordinator must have a publicly trusted certificate.
	CAPin string
	// Name is the node name; required (the CLI defaults it from the host name).
	Name string
	// StateDir receives the identity. Required; created 0700.
	StateDir string
	// Force replaces an existing identity in StateDir.
	Force bool
	// Role is the role to enroll as ("" = node); the coordinator refuses a
	// token for another role.
	Role string
	// Timeout bounds the whole exchange. Default 30s.
	Timeout time.Duration
}

// Enroll creates the node's keys on the device, sends only public keys
// and a CSR to the coordinator (verified by the CA pin), and commits the
// returned identity to the state dir with a single atomic write.
func Enroll(ctx context.Context, o EnrollOptions) (*State, *wire.EnrollResponse, error) {
	base, err := ParseCoordinatorURL(o.Coordinator)
	if err != nil {
		return nil, nil, err
	}
	if strings.TrimSpace(o.Token) == "" {
		return nil, nil, errors.New("no enrollment token: pass --token, --token-file or MESHCTL_TOKEN")
	}
	if o.StateDir == "" || o.Name == "" {
		return nil, nil, errors.New("enroll: StateDir and Name are required")
	}
	// The state dir is created only once the coordinator has said yes, so
	// a refused enrollment leaves nothing behind; check now that it can be.
	if err := checkCreatable(o.StateDir); err != nil {
		return nil, nil, err
	}
	if !o.Force {
		old, err := LoadState(o.StateDir)
		switch {
		case err == nil:
			return nil, nil, fmt.Errorf("%s is already enrolled as %q (node %s) with %s; pass --force to replace that identity with a new one",
				o.StateDir, old.Name, old.NodeID, old.Coordinator)
		case !errors.Is(err, ErrNotEnrolled):
			return nil, nil, fmt.Errorf("%w\n(pass --force to overwrite it with a new enrollment)", err)
		}
	}
	var tlsConf *tls.Config
	if o.CAPin != "" {
		pin, err := pki.ParsePin(o.CAPin)
		if err != nil {
			return nil, nil, err
		}
		tlsConf = pki.PinnedTLSConfig(pin)
	} else {
		tlsConf = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	if o.Timeout == 0 {
		o.Timeout = 30 * time.Second
	}
	hc := &http.Client{Timeout: o.Timeout, Transport: &http.Transport{TLSClientConfig: tlsConf, Proxy: http.ProxyFromEnvironment}}
	defer hc.CloseIdleConnections()

	wgKey, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return nil, nil, err
	}
	tlsKey, err := pki.GenerateKey()
	if err != nil {
		return nil, nil, err
	}
	csr, err := pki.NewCSR(tlsKey, o.Name)
	if err != nil {
		return nil, nil, err
	}
	sshPriv, sshPub, err := newSSHKey(o.Name)
	if err != nil {
		return nil, nil, err
	}
	var resp wire.EnrollResponse
	err = wire.Call(ctx, hc, http.MethodPost, base+wire.PathEnroll, nil, wire.EnrollRequest{
		Token: strings.TrimSpace(o.Token), Name: o.Name, WireGuardKey: wgKey.PublicKey().String(), CSR: string(csr), Role: o.Role,
		SSHKey: sshPub,
	}, &resp)
	if err != nil {
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err // the URL is in every message below already
		}
		return nil, nil, explainTLS(err, base, o.CAPin != "")
	}
	keyPEM, err := pki.MarshalKeyPEM(tlsKey)
	if err != nil {
		return nil, nil, err
	}
	ca, err := pki.ParseCertPEM([]byte(resp.CA))
	if err != nil {
		return nil, nil, fmt.Errorf("coordinator sent a bad CA certificate: %w", err)
	}
	if o.CAPin != "" && pki.Pin(ca) != strings.ToLower(strings.TrimSpace(o.CAPin)) {
		return nil, nil, fmt.Errorf("coordinator sent a CA (%s) that differs from the pinned one (%s)", pki.Pin(ca), o.CAPin)
	}
	st := &State{
		Format: stateFormat, NodeID: resp.Node.ID, Name: resp.Node.Name, Role: resp.Node.Role, Coordinator: base,
		CAPin: pki.Pin(ca), CA: resp.CA, Certificate: resp.Certificate, TLSKey: string(keyPEM),
		WireGuard: wgKey.String(), IPv4: resp.Node.IPv4, IPv6: resp.Node.IPv6, Enrolled: time.Now().UTC(),
		SSHKey: sshPriv, SSHCertificate: resp.SSHCertificate, SSHCA: resp.SSHCA,
	}
	if err := st.validate(); err != nil {
		return nil, nil, fmt.Errorf("coordinator's answer is unusable: %w", err)
	}
	if err := pki.EnsurePrivateDir(o.StateDir); err != nil {
		return nil, nil, err
	}
	if err := SaveNetmap(o.StateDir, &resp.Netmap); err != nil {
		return nil, nil, err
	}
	if err := st.Save(o.StateDir); err != nil {
		return nil, nil, err
	}
	if err := st.writeSSHFiles(o.StateDir); err != nil {
		return nil, nil, err
	}
	return st, &resp, nil
}

// ParseCoordinatorURL accepts https://HOST[:PORT][/] and returns it without
// a trailing slash. Plain http:// is refused: tokens and keys must not
// travel in clear text.
func ParseCoordinatorURL(s string) (string, error) {
	if s == "" {
		return "", errors.New("no coordinator URL: pass --coordinator https://HOST:PORT (printed by meshctl token create)")
	}
	u, err := url.Parse(s)
	if err != nil || !strings.Contains(s, "://") {
		return "", fmt.Errorf("coordinator URL %q must look like https://HOST:PORT", s)
	}
	switch {
	case u.Scheme == "http":
		return "", fmt.Errorf("refusing plain http:// coordinator URL %q: enrollment carries a secret token and must be encrypted; use https://", s)
	case u.Scheme != "https" || u.Host == "":
		return "", fmt.Errorf("coordinator URL %q must look like https://HOST:PORT", s)
	case u.User != nil || u.RawQuery != "" || u.Fragment != "" || (u.Path != "" && u.Path != "/"):
		return "", fmt.Errorf("coordinator URL %q must be just https://HOST:PORT (no path, user or query)", s)
	}
	return "https://" + u.Host, nil
}

// explainTLS turns certificate errors into advice.
func explainTLS(err error, base string, pinned bool) error {
	var ua x509.UnknownAuthorityError
	var cv *tls.CertificateVerificationError
	switch {
	case errors.Is(err, pki.ErrPinMismatch):
		return fmt.Errorf("refusing to enroll: %w", err)
	case !pinned && (errors.As(err, &ua) || errors.As(err, &cv)):
		return fmt.Errorf("refusing to enroll: %s does not have a publicly trusted certificate, so pass --ca-pin sha256:… "+
			"(meshctl token create prints the full enroll line with it): %w", base, err)
	}
	var ne *net.OpError
	if errors.As(err, &ne) && ne.Op == "dial" {
		return fmt.Errorf("cannot reach the coordinator at %s: %w (is it running, and is that its --public-host?)", base, err)
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		return fmt.Errorf("the coordinator at %s did not answer in time: %w", base, err)
	}
	return err
}

// checkCreatable reports whether dir exists as a directory, or could be
// created (its nearest existing ancestor is a writable directory).
func checkCreatable(dir string) error {
	for d := filepath.Clean(dir); ; d = filepath.Dir(d) {
		st, err := os.Stat(d)
		if err == nil {
			if !st.IsDir() {
				return fmt.Errorf("state dir %s: %s is not a directory", dir, d)
			}
			if d != filepath.Clean(dir) && syscall.Access(d, 2 /* W_OK */) != nil {
				return fmt.Errorf("cannot create state dir %s: %s is not writable (run as root, or pick another --state-dir)", dir, d)
			}
			return nil
		}
		if !errors.Is(err, os.ErrNotExist) || d == filepath.Dir(d) {
			return fmt.Errorf("state dir %s: %w", dir, err)
		}
	}
}

// newSSHKey makes the device's SSH key for the SSH fallback: the private
// key in OpenSSH PEM and the public key as an authorized_keys line.
func newSSHKey(comment string) (priv, pub string, err error) {
	pk, sk, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return "", "", err
	}
	block, err := ssh.MarshalPrivateKey(sk, "meshctl "+comment)
	if err != nil {
		return "", "", err
	}
	sshPub, err := ssh.NewPublicKey(pk)
	if err != nil {
		return "", "", err
	}
	return string(pem.EncodeToMemory(block)), string(ssh.MarshalAuthorizedKey(sshPub)), nil
}
