package pki

import (
	"bytes"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"fmt"
	"io/fs"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// File names inside a coordinator data dir.
const (
	CACertFile     = "ca.crt"
	CAKeyFile      = "ca.key"
	ServerCertFile = "server.crt"
	ServerKeyFile  = "server.key"
)

const (
	caValidity     = 10 * 365 * 24 * time.Hour
	serverValidity = 365 * 24 * time.Hour
	// serverRenewBefore: a server certificate closer than this to expiry is
	// reissued at start.
	serverRenewBefore = 30 * 24 * time.Hour
	// backdate covers clock skew between coordinator and nodes.
	backdate = 5 * time.Minute
)

// CA is the coordinator's certificate authority: it signs the API's server
// certificate and the nodes' mTLS client certificates.
type CA struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// Pin returns the CA's pin ("sha256:" + hex of its SubjectPublicKeyInfo hash).
func (ca *CA) Pin() string { return Pin(ca.Cert) }

// CertPEM returns the CA certificate as PEM.
func (ca *CA) CertPEM() []byte { return CertPEM(ca.Cert) }

// LoadOrCreateCA loads the CA from dir, or creates it (files 0600) if
// neither file exists. Exactly one of the two files existing is an error:
// meshctl never silently replaces a CA that nodes trust.
//
// Creation commits by rename: the key is written as ca.key.new, then the
// certificate, then the key is renamed into place. A first start cut short
// (killed, power cut, disk full) leaves either no ca.key and no ca.crt
// (then a new CA is made) or ca.crt with ca.key.new (then the rename is
// finished): never a key without its certificate, which would stop every
// later start.
func LoadOrCreateCA(dir string, now time.Time) (ca *CA, created bool, err error) {
	certPath, keyPath := filepath.Join(dir, CACertFile), filepath.Join(dir, CAKeyFile)
	newKeyPath := keyPath + ".new"
	_, certErr := os.Stat(certPath)
	_, keyErr := os.Stat(keyPath)
	if certErr == nil && errors.Is(keyErr, fs.ErrNotExist) {
		if _, err := os.Stat(newKeyPath); err == nil { // a creation that stopped before its last step
			if err := commitRename(newKeyPath, keyPath); err != nil {
				return nil, false, err
			}
			keyErr = nil
		}
	}
	if errors.Is(certErr, fs.ErrNotExist) && errors.Is(keyErr, fs.ErrNotExist) {
		ca, err := newCA(now)
		if err != nil {
			return nil, false, err
		}
		keyPEM, err := MarshalKeyPEM(ca.Key)
		if err != nil {
			return nil, false, err
		}
		if err := WriteFileAtomic(newKeyPath, keyPEM, 0o600); err != nil {
			return nil, false, err
		}
		if err := WriteFileAtomic(certPath, ca.CertPEM(), 0o600); err != nil {
			return nil, false, err
		}
		if err := commitRename(newKeyPath, keyPath); err != nil {
			return nil, false, err
		}
		return ca, true, nil
	}
	certPEM, err := os.ReadFile(certPath)
	if err != nil {
		return nil, false, fmt.Errorf("CA certificate: %w (the data dir has %s but not %s: restore it from a backup; meshctl will not replace a CA that nodes trust)", err, CAKeyFile, CACertFile)
	}
	keyPEM, err := ReadPrivateFile(keyPath)
	if err != nil {
		return nil, false, fmt.Errorf("CA key: %w", err)
	}
	cert, err := ParseCertPEM(certPEM)
	if err != nil {
		return nil, false, fmt.Errorf("%s: %w", certPath, err)
	}
	key, err := ParseKeyPEM(keyPEM)
	if err != nil {
		return nil, false, fmt.Errorf("%s: %w", keyPath, err)
	}
	if !publicKeysEqual(cert.PublicKey, key.Public()) {
		return nil, false, fmt.Errorf("%s does not belong to %s: restore the matching pair", keyPath, certPath)
	}
	return &CA{Cert: cert, Key: key}, false, nil
}

// commitRename renames from to to and syncs the directory.
func commitRename(from, to string) error {
	if err := os.Rename(from, to); err != nil {
		return fmt.Errorf("create %s: %w", to, err)
	}
	return syncDir(filepath.Dir(to))
}

func newCA(now time.Time) (*CA, error) {
	key, err := GenerateKey()
	if err != nil {
		return nil, err
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: "meshctl CA " + serial.Text(16)[:8], Organization: []string{"meshctl"}},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("create CA: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, err
	}
	return &CA{Cert: cert, Key: key}, nil
}

// LoadOrCreateServerCert returns the API server certificate from dir,
// reissuing it (files 0600) when it is missing, was not issued by ca, does
// not cover every name in hosts, or expires within 30 days. The returned
// chain is [leaf, CA] so that clients can find the pinned CA in it.
func LoadOrCreateServerCert(dir string, ca *CA, hosts []string, now time.Time) (tls.Certificate, error) {
	certPath, keyPath := filepath.Join(dir, ServerCertFile), filepath.Join(dir, ServerKeyFile)
	if certPEM, err := os.ReadFile(certPath); err == nil {
		if keyPEM, err := ReadPrivateFile(keyPath); err == nil {
			leaf, err1 := ParseCertPEM(certPEM)
			key, err2 := ParseKeyPEM(keyPEM)
			if err1 == nil && err2 == nil && leaf.CheckSignatureFrom(ca.Cert) == nil &&
				publicKeysEqual(leaf.PublicKey, key.Public()) &&
				coversHosts(leaf, hosts) && now.Add(serverRenewBefore).Before(leaf.NotAfter) {
				return tls.Certificate{Certificate: [][]byte{leaf.Raw, ca.Cert.Raw}, PrivateKey: key, Leaf: leaf}, nil
			}
		} else if errors.Is(err, ErrInsecurePermissions) {
			return tls.Certificate{}, err
		}
	}
	key, err := GenerateKey()
	if err != nil {
		return tls.Certificate{}, err
	}
	leaf, err := ca.issue(key.Public(), pkix.Name{CommonName: "meshctl coordinator"}, hosts,
		x509.ExtKeyUsageServerAuth, now, serverValidity)
	if err != nil {
		return tls.Certificate{}, err
	}
	keyPEM, err := MarshalKeyPEM(key)
	if err != nil {
		return tls.Certificate{}, err
	}
	if err := WriteFileAtomic(keyPath, keyPEM, 0o600); err != nil {
		return tls.Certificate{}, err
	}
	if err := WriteFileAtomic(certPath, CertPEM(leaf), 0o600); err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{leaf.Raw, ca.Cert.Raw}, PrivateKey: key, Leaf: leaf}, nil
}

// SignClientCSR issues a client (mTLS) certificate for the node with the
// given id from a PEM CSR. The certificate's CommonName is the node id; the
// CSR's subject is ignored.
func (ca *CA) SignClientCSR(csrPEM []byte, nodeID string, now time.Time, validity time.Duration) (*x509.Certificate, error) {
	csr, err := ParseCSR(csrPEM)
	if err != nil {
		return nil, err
	}
	return ca.issue(csr.PublicKey, pkix.Name{CommonName: nodeID, Organization: []string{"meshctl node"}}, nil,
		x509.ExtKeyUsageClientAuth, now, validity)
}

func (ca *CA) issue(pub crypto.PublicKey, subject pkix.Name, hosts []string, eku x509.ExtKeyUsage, now time.Time, validity time.Duration) (*x509.Certificate, error) {
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      subject,
		NotBefore:    now.Add(-backdate),
		NotAfter:     now.Add(validity),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{eku},
	}
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if h != "" {
			tmpl.DNSNames = append(tmpl.DNSNames, h)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, pub, ca.Key)
	if err != nil {
		return nil, fmt.Errorf("issue certificate: %w", err)
	}
	return x509.ParseCertificate(der)
}

func coversHosts(c *x509.Certificate, hosts []string) bool {
	for _, h := range hosts {
		if ip := net.ParseIP(h); ip != nil {
			if !slices.ContainsFunc(c.IPAddresses, ip.Equal) {
				return false
			}
		} else if h != "" && !slices.Contains(c.DNSNames, h) {
			return false
		}
	}
	return true
}

func randomSerial() (*big.Int, error) {
	return rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	da, err1 := x509.MarshalPKIXPublicKey(a)
	db, err2 := x509.MarshalPKIXPublicKey(b)
	return err1 == nil && err2 == nil && bytes.Equal(da, db)
}

// IssueServerCert issues a TLS server certificate with a fresh key for
// hosts (names, wildcards such as "*.mesh.example" or addresses), chained
// [leaf, CA]. The all-in-one server uses it to serve the proxy over HTTPS
// from its own CA for local use.
func (ca *CA) IssueServerCert(hosts []string, now time.Time, validity time.Duration) (tls.Certificate, error) {
	key, err := GenerateKey()
	if err != nil {
		return tls.Certificate{}, err
	}
	leaf, err := ca.issue(key.Public(), pkix.Name{CommonName: hosts[0]}, hosts, x509.ExtKeyUsageServerAuth, now, validity)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{leaf.Raw, ca.Cert.Raw}, PrivateKey: key, Leaf: leaf}, nil
}
