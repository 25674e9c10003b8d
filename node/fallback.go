package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshctl/meshctl/wire"
	"golang.org/x/crypto/ssh"
)

// SSH fallback in the agent. When UDP to the proxy is blocked (no
// WireGuard handshake with it within FallbackTimeout), the agent opens an
// SSH connection to the proxy's SSH endpoint with the certificate from
// enrollment and remote-forwards its services, so the proxy still reaches
// them. WireGuard keeps trying (persistent keepalive toward the proxy);
// as soon as a handshake succeeds, the agent closes the SSH connection.

// Fallback modes.
const (
	FallbackAuto   = "auto"   // SSH only while UDP to the proxy is blocked
	FallbackOff    = "off"    // never
	FallbackAlways = "always" // SSH always (e.g. networks known to block UDP)
)

// DefaultFallbackTimeout is how long the agent waits for a WireGuard
// handshake with the proxy before it falls back to SSH.
const DefaultFallbackTimeout = 30 * time.Second

// handshakeFresh: a handshake this recent means UDP to the proxy works
// (WireGuard rekeys every 2 minutes; the proxy keepalive is 25 s).
const handshakeFresh = 3 * time.Minute

// FallbackStatus says whether and why the agent serves through SSH.
type FallbackStatus struct {
	Mode   string    `json:"mode"`
	Active bool      `json:"active"`
	Since  time.Time `json:"since,omitzero"`
	Reason string    `json:"reason,omitempty"`
}

type fallback struct {
	a     *Agent
	state atomic.Pointer[FallbackStatus]

	mu     sync.Mutex
	client *ssh.Client // nil when not connected
}

func (a *Agent) startFallback() {
	f := &fallback{a: a}
	f.state.Store(&FallbackStatus{Mode: a.opts.Fallback})
	a.fb = f
	if a.opts.Fallback == FallbackOff {
		return
	}
	a.goLoop(f.run)
}

func (f *fallback) status() FallbackStatus { return *f.state.Load() }

func (f *fallback) set(active bool, reason string) {
	cur := f.state.Load()
	if cur.Active == active && cur.Reason == reason {
		return
	}
	next := &FallbackStatus{Mode: f.a.opts.Fallback, Active: active, Reason: reason, Since: cur.Since}
	if cur.Active != active {
		next.Since = time.Now()
		if active {
			f.a.log.Warn("serving through the SSH fallback", "reason", reason)
		} else {
			f.a.log.Info("back on WireGuard; SSH fallback closed", "reason", reason)
		}
	}
	f.state.Store(next)
}

// run decides every 2 s whether SSH is needed and keeps the connection.
func (f *fallback) run() {
	a := f.a
	start := time.Now()
	backoff := a.opts.RetryMin
	defer f.disconnect()
	for a.ctx.Err() == nil {
		need, reason := f.needed(start)
		switch {
		case need && f.connected():
			f.set(true, reason)
		case need:
			if err := f.connect(); err != nil {
				f.set(false, "SSH fallback failed: "+err.Error())
				a.log.Warn("SSH fallback connection failed", "err", err, "retry_in", backoff)
				a.sleep(jitter(backoff))
				backoff = min(backoff*2, a.opts.RetryMax)
				continue
			}
			backoff = a.opts.RetryMin
			f.set(true, reason)
		case f.connected():
			f.disconnect()
			f.set(false, reason)
		default:
			f.set(false, reason)
		}
		a.sleep(2 * time.Second)
	}
}

// needed reports whether the agent should serve through SSH now, and why
// (in words for meshctl status).
func (f *fallback) needed(start time.Time) (bool, string) {
	a := f.a
	if a.opts.Fallback == FallbackAlways {
		return true, "SSH fallback is always on (--fallback always)"
	}
	cur := a.applied.Load()
	if cur == nil || cur.nm.ProxySSH == "" {
		return false, "no SSH fallback endpoint in the netmap"
	}
	hs, ok := a.proxyHandshake()
	switch {
	case !ok:
		return false, "no proxy in the netmap"
	case !hs.IsZero() && time.Since(hs) < handshakeFresh:
		return false, "WireGuard handshake with the proxy " + time.Since(hs).Round(time.Second).String() + " ago"
	case hs.IsZero() && time.Since(start) < a.opts.FallbackTimeout:
		return false, "waiting for a first WireGuard handshake with the proxy"
	}
	return true, fmt.Sprintf("UDP to the proxy is blocked (no WireGuard handshake for %s)", a.opts.FallbackTimeout)
}

// proxyHandshake returns the last handshake with the proxy peer.
func (a *Agent) proxyHandshake() (time.Time, bool) {
	st, err := a.Status()
	if err != nil {
		return time.Time{}, false
	}
	cur := a.applied.Load()
	for _, p := range st.Peers {
		for _, q := range cur.nm.Peers {
			if q.Role == wire.RoleProxy && q.WireGuardKey == p.PublicKey {
				t, _ := time.Parse(time.RFC3339, p.LastHandshake)
				return t, true
			}
		}
	}
	return time.Time{}, false
}

func (f *fallback) connected() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.client != nil
}

func (f *fallback) disconnect() {
	f.mu.Lock()
	c := f.client
	f.client = nil
	f.mu.Unlock()
	if c != nil {
		c.Close()
	}
}

// connect dials the proxy's SSH endpoint, authenticates with the node's
// certificate (the proxy is verified through the SSH CA), and forwards the
// services: <node> for the default one and <service>--<node> for each.
func (f *fallback) connect() error {
	a := f.a
	st := a.client.State()
	if st.SSHKey == "" || st.SSHCertificate == "" {
		return errors.New("this identity has no SSH certificate (enrolled before the SSH fallback existed): enroll again")
	}
	key, err := ssh.ParsePrivateKey([]byte(st.SSHKey))
	if err != nil {
		return err
	}
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(st.SSHCertificate))
	if err != nil {
		return err
	}
	cert, ok := pub.(*ssh.Certificate)
	if !ok {
		return errors.New("ssh_certificate is not a certificate")
	}
	signer, err := ssh.NewCertSigner(cert, key)
	if err != nil {
		return err
	}
	ca, _, _, _, err := ssh.ParseAuthorizedKey([]byte(st.SSHCA))
	if err != nil {
		return fmt.Errorf("ssh_ca: %w", err)
	}
	checker := &ssh.CertChecker{IsHostAuthority: func(k ssh.PublicKey, _ string) bool { return string(k.Marshal()) == string(ca.Marshal()) }}
	addr := a.applied.Load().nm.ProxySSH
	cl, err := ssh.Dial("tcp", addr, &ssh.ClientConfig{
		User: st.Name, Auth: []ssh.AuthMethod{ssh.PublicKeys(signer)},
		HostKeyCallback: checker.CheckHostKey, Timeout: 10 * time.Second,
	})
	if err != nil {
		return fmt.Errorf("ssh %s: %w", addr, err)
	}
	for i, svc := range a.opts.Services {
		binds := []string{svc.Name + "--" + st.Name}
		if i == defaultService(a.opts.Services) {
			binds = append(binds, st.Name)
		}
		for _, b := range binds {
			ln, err := cl.Listen("tcp", net.JoinHostPort(b, "80"))
			if err != nil {
				cl.Close()
				return fmt.Errorf("forward %s: %w", b, err)
			}
			a.goLoop(func() { f.serveForward(ln, svc) })
		}
	}
	f.mu.Lock()
	f.client = cl
	f.mu.Unlock()
	a.goLoop(func() {
		cl.Wait()
		f.mu.Lock()
		if f.client == cl {
			f.client = nil
		}
		f.mu.Unlock()
	})
	a.log.Info("SSH fallback connected", "proxy", addr, "services", len(a.opts.Services))
	return nil
}

// defaultService is the index of the service <node>.<domain> leads to:
// the one named web, else the first (as the proxy routes).
func defaultService(svcs []Service) int {
	for i, s := range svcs {
		if s.Name == "web" {
			return i
		}
	}
	return 0
}

// serveForward splices every channel the proxy opens on ln to the
// service's target on the device.
func (f *fallback) serveForward(ln net.Listener, svc Service) {
	done := make(chan struct{})
	defer close(done)
	defer ln.Close()
	go func() {
		select {
		case <-f.a.ctx.Done():
			ln.Close()
		case <-done: // the SSH connection ended: nothing to wait for
		}
	}()
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		go func() {
			defer c.Close()
			ctx, cancel := context.WithTimeout(f.a.ctx, targetDialTimeout)
			up, err := (&net.Dialer{}).DialContext(ctx, "tcp", svc.Target)
			cancel()
			if err != nil {
				f.a.log.Warn("service target unreachable", "service", svc.Name, "target", svc.Target, "via", "ssh", "err", err)
				return
			}
			defer up.Close()
			Splice(c, up)
		}()
	}
}

// describe renders the fallback state for meshctl status.
func (s FallbackStatus) describe() string {
	if !s.Active {
		return ""
	}
	return strings.TrimSpace(s.Reason) + "; serving through SSH fallback since " + s.Since.Local().Format("15:04")
}
