package proxy

import (
	"context"
	"fmt"

	"golang.org/x/crypto/acme"
	"golang.org/x/crypto/acme/autocert"
)

// ACME configures certificates from an ACME CA.
type ACME struct {
	// Directory is the ACME directory URL (Let's Encrypt's by default in
	// the CLI).
	Directory string
	// Email is the account contact (optional).
	Email string
	// CacheDir keeps the account key and certificates (created 0700).
	CacheDir string
}

func (a *ACME) manager(policy autocert.HostPolicy) *autocert.Manager {
	return &autocert.Manager{
		Prompt:     autocert.AcceptTOS,
		Cache:      autocert.DirCache(a.CacheDir),
		HostPolicy: policy,
		Email:      a.Email,
		Client:     &acme.Client{DirectoryURL: a.Directory},
	}
}

// hostPolicy allows certificates only for hosts that route to an enrolled,
// unrevoked node's service: nobody can make the proxy request certificates
// for arbitrary names (and burn its rate limits).
func (p *Proxy) hostPolicy(_ context.Context, host string) error {
	if _, ok := p.table.Load().Lookup(host); !ok {
		return fmt.Errorf("acme: %q is not the host of a routed node", host)
	}
	return nil
}
