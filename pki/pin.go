package pki

import (
	"crypto/sha256"
	"crypto/subtle"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

const pinPrefix = "sha256:"

// Pin returns "sha256:" + the hex SHA-256 of c's SubjectPublicKeyInfo, the
// same hash kubeadm's discovery-token-ca-cert-hash uses.
func Pin(c *x509.Certificate) string {
	sum := sha256.Sum256(c.RawSubjectPublicKeyInfo)
	return pinPrefix + hex.EncodeToString(sum[:])
}

// ParsePin validates a pin string and returns its hash.
func ParsePin(s string) ([32]byte, error) {
	var out [32]byte
	s = strings.TrimSpace(s)
	if !strings.HasPrefix(s, pinPrefix) {
		return out, fmt.Errorf("CA pin %q must start with %q (copy it from the line `meshctl token create` printed)", s, pinPrefix)
	}
	h := strings.ToLower(strings.TrimPrefix(s, pinPrefix))
	b, err := hex.DecodeString(h)
	if err != nil || len(b) != 32 {
		return out, fmt.Errorf("CA pin must be %q followed by 64 hex digits, got %d characters after the prefix", pinPrefix, len(h))
	}
	copy(out[:], b)
	return out, nil
}

// ErrPinMismatch means the server did not present a chain to the pinned CA.
var ErrPinMismatch = errors.New("CA pin mismatch")

// PinnedTLSConfig returns a client TLS config that trusts exactly the CA
// whose SubjectPublicKeyInfo hashes to pin. The server must send that CA in
// its chain; the leaf must chain to it for server auth. Host names are not
// checked: the pinned CA is private to one coordinator and issues server
// certificates only for it, so the pin alone identifies the coordinator (the
// coordinator may be reached through NAT or by any name or address).
func PinnedTLSConfig(pin [32]byte) *tls.Config {
	return &tls.Config{
		MinVersion:         tls.VersionTLS12,
		InsecureSkipVerify: true, // replaced by VerifyConnection below
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("coordinator sent no certificate")
			}
			for _, c := range cs.PeerCertificates[1:] {
				sum := sha256.Sum256(c.RawSubjectPublicKeyInfo)
				if subtle.ConstantTimeCompare(sum[:], pin[:]) == 1 && c.IsCA {
					return verifyLeaf(cs.PeerCertificates, c)
				}
			}
			return fmt.Errorf("%w: the coordinator's certificate does not chain to the CA with pin %s%s (its CA is %s): "+
				"check the --ca-pin you were given, or you may be talking to a different server",
				ErrPinMismatch, pinPrefix, hex.EncodeToString(pin[:]), presentedCAPin(cs.PeerCertificates))
		},
	}
}

// CATLSConfig returns a client TLS config that trusts exactly ca (used after
// enrollment, with the CA saved in the node's state). Host names are not
// checked, as for PinnedTLSConfig.
func CATLSConfig(ca *x509.Certificate) *tls.Config {
	return &tls.Config{
		MinVersion:         tls.VersionTLS12,
		InsecureSkipVerify: true, // replaced by VerifyConnection below
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("coordinator sent no certificate")
			}
			return verifyLeaf(cs.PeerCertificates, ca)
		},
	}
}

func verifyLeaf(chain []*x509.Certificate, ca *x509.Certificate) error {
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	_, err := chain[0].Verify(x509.VerifyOptions{
		Roots:     roots,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return fmt.Errorf("coordinator certificate: %w", err)
	}
	return nil
}

func presentedCAPin(chain []*x509.Certificate) string {
	if len(chain) < 2 {
		return "not sent"
	}
	return Pin(chain[len(chain)-1])
}
