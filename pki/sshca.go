package pki

import (
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"

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
	keyPath := filepath.Join(dir, SSHCAKeyFile)
	b, err := ReadPrivateFile(keyPath)
	if err == nil {
		s, err := ssh.ParsePrivateKey(b)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", keyPath, err)
		}
		return s, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("SSH CA key: %w", err)
	}
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	block, err := ssh.MarshalPrivateKey(priv, "meshctl SSH CA")
	if err != nil {
		return nil, err
	}
	signer, err := ssh.NewSignerFromKey(priv)
	if err != nil {
		return nil, err
	}
	if err := WriteFileAtomic(keyPath, pemEncode(block), 0o600); err != nil {
		return nil, err
	}
	pub := ssh.MarshalAuthorizedKey(signer.PublicKey())
	if err := WriteFileAtomic(filepath.Join(dir, SSHCAPubFile), pub, 0o600); err != nil {
		return nil, err
	}
	return signer, nil
}
