// Package node is the device side of meshctl: the node's identity and state
// dir, enrollment, and the control client that talks to the coordinator.
// It never imports coordinator code.
package node

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"time"

	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
	"golang.org/x/crypto/ssh"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// DefaultStateDir is where node commands keep their state unless told
// otherwise (--state-dir).
const DefaultStateDir = "/var/lib/meshctl"

// Files inside a state dir. StateFile holds the identity including private
// keys (0600), so that enrollment commits it with one atomic rename;
// NetmapFile caches the last netmap.
const (
	StateFile  = "node.json"
	NetmapFile = "netmap.json"
)

const stateFormat = 1

// ErrNotEnrolled means the state dir holds no identity.
var ErrNotEnrolled = errors.New("not enrolled")

// State is a node's identity as kept in StateFile.
type State struct {
	Format      int       `json:"format"`
	NodeID      string    `json:"node_id"`
	Name        string    `json:"name"`
	Role        string    `json:"role,omitempty"` // "" or "node", or "proxy"
	Coordinator string    `json:"coordinator"`
	CAPin       string    `json:"ca_pin"`
	CA          string    `json:"ca"`          // PEM
	Certificate string    `json:"certificate"` // PEM client certificate
	TLSKey      string    `json:"tls_key"`     // PEM PKCS #8, secret
	WireGuard   string    `json:"wireguard_private_key"`
	IPv4        string    `json:"ipv4"`
	IPv6        string    `json:"ipv6"`
	Enrolled    time.Time `json:"enrolled"`
	// SSH fallback identity: the device's SSH key (OpenSSH PEM, secret),
	// its certificate from the coordinator's SSH CA and that CA's public
	// key (authorized_keys format). Empty for identities enrolled before
	// the SSH fallback existed.
	SSHKey         string `json:"ssh_key,omitempty"`
	SSHCertificate string `json:"ssh_certificate,omitempty"`
	SSHCA          string `json:"ssh_ca,omitempty"`

	// Parsed forms, filled by LoadState / validate.
	caCert  *x509.Certificate
	tlsCert tls.Certificate
	wgKey   wgtypes.Key
}

// CACert returns the coordinator CA the node trusts.
func (s *State) CACert() *x509.Certificate { return s.caCert }

// ClientCert returns the node's mTLS certificate and key.
func (s *State) ClientCert() tls.Certificate { return s.tlsCert }

// WireGuardKey returns the node's WireGuard private key.
func (s *State) WireGuardKey() wgtypes.Key { return s.wgKey }

// LoadState reads and validates the identity in dir. A missing file is
// ErrNotEnrolled; a truncated, corrupt or inconsistent one is an error that
// names the file and says what to do. It never re-keys.
func LoadState(dir string) (*State, error) {
	path := filepath.Join(dir, StateFile)
	b, err := pki.ReadPrivateFile(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s has no %s; enroll this device first (meshctl enroll --state-dir %s …)", ErrNotEnrolled, dir, StateFile, dir)
	}
	if err != nil {
		return nil, err
	}
	var s State
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, corrupt(path, err)
	}
	if err := s.validate(); err != nil {
		return nil, corrupt(path, err)
	}
	return &s, nil
}

func corrupt(path string, err error) error {
	return fmt.Errorf("state file %s is corrupt (%v); meshctl will not guess or re-key: restore it from a backup, or re-enroll with a new token (meshctl enroll --force)", path, err)
}

func (s *State) validate() error {
	if s.Format != stateFormat {
		return fmt.Errorf("unknown format %d (this meshctl writes %d)", s.Format, stateFormat)
	}
	if s.NodeID == "" || s.Name == "" || s.Coordinator == "" {
		return errors.New("node_id, name or coordinator missing")
	}
	var err error
	if s.caCert, err = pki.ParseCertPEM([]byte(s.CA)); err != nil {
		return fmt.Errorf("ca: %w", err)
	}
	leaf, err := pki.ParseCertPEM([]byte(s.Certificate))
	if err != nil {
		return fmt.Errorf("certificate: %w", err)
	}
	key, err := pki.ParseKeyPEM([]byte(s.TLSKey))
	if err != nil {
		return fmt.Errorf("tls_key: %w", err)
	}
	if !matches(leaf, key) {
		return errors.New("certificate does not belong to tls_key")
	}
	s.tlsCert = tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: key, Leaf: leaf}
	if s.wgKey, err = wgtypes.ParseKey(s.WireGuard); err != nil {
		return fmt.Errorf("wireguard_private_key: %w", err)
	}
	if s.SSHKey != "" {
		signer, err := ssh.ParsePrivateKey([]byte(s.SSHKey))
		if err != nil {
			return fmt.Errorf("ssh_key: %w", err)
		}
		if s.SSHCertificate != "" {
			pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(s.SSHCertificate))
			cert, ok := pub.(*ssh.Certificate)
			if err != nil || !ok || string(cert.Key.Marshal()) != string(signer.PublicKey().Marshal()) {
				return errors.New("ssh_certificate does not certify ssh_key")
			}
		}
	}
	return nil
}

// SSHDir is where the SSH fallback files live inside a state dir: the key
// and certificate as stock OpenSSH reads them (meshctl ssh-config).
const SSHDir = "ssh"

// writeSSHFiles puts the SSH key and certificate where `ssh -i` and
// CertificateFile read them: DIR/ssh/id_ed25519 (0600) and
// id_ed25519-cert.pub. Nothing happens for identities without SSH.
func (s *State) writeSSHFiles(dir string) error {
	if s.SSHKey == "" || s.SSHCertificate == "" {
		return nil
	}
	d := filepath.Join(dir, SSHDir)
	if err := pki.EnsurePrivateDir(d); err != nil {
		return err
	}
	if err := pki.WriteFileAtomic(filepath.Join(d, "id_ed25519"), []byte(s.SSHKey), 0o600); err != nil {
		return err
	}
	if err := pki.WriteFileAtomic(filepath.Join(d, "id_ed25519-cert.pub"), []byte(s.SSHCertificate), 0o600); err != nil {
		return err
	}
	return pki.WriteFileAtomic(filepath.Join(d, "ssh_ca.pub"), []byte(s.SSHCA), 0o600)
}

func matches(c *x509.Certificate, key crypto.Signer) bool {
	a, err1 := x509.MarshalPKIXPublicKey(c.PublicKey)
	b, err2 := x509.MarshalPKIXPublicKey(key.Public())
	return err1 == nil && err2 == nil && string(a) == string(b)
}

// Save writes the state atomically (0600) into dir.
func (s *State) Save(dir string) error {
	if err := s.validate(); err != nil {
		return fmt.Errorf("refusing to save invalid state: %w", err)
	}
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		return err
	}
	return pki.WriteFileAtomic(filepath.Join(dir, StateFile), append(b, '\n'), 0o600)
}

// SaveNetmap caches nm in dir (0600, atomic).
func SaveNetmap(dir string, nm *wire.Netmap) error {
	b, err := json.MarshalIndent(nm, "", "  ")
	if err != nil {
		return err
	}
	return pki.WriteFileAtomic(filepath.Join(dir, NetmapFile), append(b, '\n'), 0o600)
}

// LoadNetmap reads the cached netmap from dir.
func LoadNetmap(dir string) (*wire.Netmap, error) {
	path := filepath.Join(dir, NetmapFile)
	b, err := pki.ReadPrivateFile(path)
	if err != nil {
		return nil, err
	}
	var nm wire.Netmap
	if err := json.Unmarshal(b, &nm); err != nil {
		return nil, fmt.Errorf("cached netmap %s is corrupt: %w", path, err)
	}
	return &nm, nil
}
