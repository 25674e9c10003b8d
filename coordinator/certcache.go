package coordinator

import (
	"crypto/sha256"
	"crypto/x509"
	"sync"
	"time"
)

// certCache remembers the node certificates whose chain to the CA (and
// client-auth key usage) has been verified, with the window in which that
// chain is valid, so that the long-poll every node makes after every change
// does not cost an ECDSA signature verification each. A certificate is
// accepted from the cache only inside that window; anything else goes
// through x509 verification, and its errors (expired, unknown issuer) are
// what the caller sees. The CA is fixed for a server's lifetime.
type certCache struct {
	mu sync.RWMutex
	m  map[[32]byte]certWindow
}

type certWindow struct{ notBefore, notAfter time.Time }

// maxCertCache bounds the cache; when full it starts over.
const maxCertCache = 1 << 17

// verify checks that leaf chains to ca for client auth at time at.
func (c *certCache) verify(leaf, ca *x509.Certificate, at time.Time) error {
	key := sha256.Sum256(leaf.Raw)
	c.mu.RLock()
	win, ok := c.m[key]
	c.mu.RUnlock()
	if ok && !at.Before(win.notBefore) && !at.After(win.notAfter) {
		return nil
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca)
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots:       roots,
		CurrentTime: at,
		KeyUsages:   []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}); err != nil {
		return err
	}
	// x509 accepts a certificate at t when NotBefore <= t <= NotAfter, for
	// the leaf and the CA alike.
	win = certWindow{notBefore: leaf.NotBefore, notAfter: leaf.NotAfter}
	if ca.NotBefore.After(win.notBefore) {
		win.notBefore = ca.NotBefore
	}
	if ca.NotAfter.Before(win.notAfter) {
		win.notAfter = ca.NotAfter
	}
	c.mu.Lock()
	if c.m == nil || len(c.m) >= maxCertCache {
		c.m = make(map[[32]byte]certWindow)
	}
	c.m[key] = win
	c.mu.Unlock()
	return nil
}
