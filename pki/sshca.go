package pki

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"
)

// File names of the SSH CA inside a coordinator data dir.
const (
	SSHCAKeyFile = "ssh_ca"
	SSHCAPubFile = "ssh_ca.pub"
)

// LoadOrCreateSSHCA loads the coordinator's SSH CA key from dir, creating
// an Ed25519 key (OpenSSH format, 0600, with a .pub beside it) on first
// start. The SSH reverse-tunnel fallback uses it to certify host and node
// keys.
func LoadOrCreateSSHCA(dir string) (ssh.Signer, error) {
	signer, err := LoadOrCreateSSHKey(filepath.Join(dir, SSHCAKeyFile))
	if err != nil {
		return nil, fmt.Errorf("SSH CA key: %w", err)
	}
	pub := ssh.MarshalAuthorizedKey(signer.PublicKey())
	// Rewritten only when it differs: a start needs no free disk space.
	pubPath := filepath.Join(dir, SSHCAPubFile)
	if old, err := ReadPrivateFile(pubPath); err == nil && bytes.Equal(old, pub) {
		return signer, nil
	}
	if err := WriteFileAtomic(pubPath, pub, 0o600); err != nil {
		return nil, err
	}
	return signer, nil
}

// SignSSHUserCert certifies an SSH public key (authorized_keys format) as a
// user certificate for principal, valid from now (backdated for clock skew)
// for validity. It permits port forwarding only: no pty, no agent or X11
// forwarding, no user rc — the SSH fallback server allows nothing else
// anyway, and a stock OpenSSH server trusting this CA would not either.
func SignSSHUserCert(ca ssh.Signer, authorizedKey, principal, keyID string, now time.Time, validity time.Duration) (string, error) {
	pub, _, _, rest, err := ssh.ParseAuthorizedKey([]byte(authorizedKey))
	if err != nil || len(strings.TrimSpace(string(rest))) != 0 {
		return "", fmt.Errorf("ssh key is not one authorized_keys line: %v", err)
	}
	if _, isCert := pub.(*ssh.Certificate); isCert {
		return "", errors.New("ssh key is a certificate; send the plain public key")
	}
	switch pub.Type() {
	case ssh.KeyAlgoED25519, ssh.KeyAlgoECDSA256:
	default:
		return "", fmt.Errorf("ssh key type %s not accepted (use ed25519 or ecdsa-sha2-nistp256)", pub.Type())
	}
	serial := make([]byte, 8)
	rand.Read(serial)
	cert := &ssh.Certificate{
		Key:             pub,
		Serial:          binary.BigEndian.Uint64(serial),
		CertType:        ssh.UserCert,
		KeyId:           keyID,
		ValidPrincipals: []string{principal},
		ValidAfter:      uint64(now.Add(-backdate).Unix()),
		ValidBefore:     uint64(now.Add(validity).Unix()),
		Permissions:     ssh.Permissions{Extensions: map[string]string{"permit-port-forwarding": ""}},
	}
	if err := cert.SignCert(rand.Reader, ca); err != nil {
		return "", fmt.Errorf("sign ssh certificate: %w", err)
	}
	return string(ssh.MarshalAuthorizedKey(cert)), nil
}

// SignSSHHostCert certifies an SSH host key for the given host names.
func SignSSHHostCert(ca ssh.Signer, host ssh.PublicKey, principals []string, now time.Time, validity time.Duration) (*ssh.Certificate, error) {
	serial := make([]byte, 8)
	rand.Read(serial)
	cert := &ssh.Certificate{
		Key:             host,
		Serial:          binary.BigEndian.Uint64(serial),
		CertType:        ssh.HostCert,
		KeyId:           "meshctl proxy",
		ValidPrincipals: principals,
		ValidAfter:      uint64(now.Add(-backdate).Unix()),
		ValidBefore:     uint64(now.Add(validity).Unix()),
	}
	if err := cert.SignCert(rand.Reader, ca); err != nil {
		return nil, fmt.Errorf("sign ssh host certificate: %w", err)
	}
	return cert, nil
}

// LoadOrCreateSSHKey loads an Ed25519 SSH private key (OpenSSH format,
// 0600) from path, creating it on first use: a host key, for instance.
func LoadOrCreateSSHKey(path string) (ssh.Signer, error) {
	b, err := ReadPrivateFile(path)
	if err == nil {
		return ssh.ParsePrivateKey(b)
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, err
	}
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	block, err := ssh.MarshalPrivateKey(priv, "meshctl")
	if err != nil {
		return nil, err
	}
	if err := WriteFileAtomic(path, pemEncode(block), 0o600); err != nil {
		return nil, err
	}
	return ssh.NewSignerFromKey(priv)
}
