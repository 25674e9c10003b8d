package node

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync/atomic"
	"time"

	"github.com/meshctl/meshctl/wire"
	"golang.org/x/crypto/ssh"
)

// SSH fallback in the agent. When UDP to the proxy is blocked (no direct
// probe answered within FallbackTimeout), the agent remote-forwards its
// services on its SSH connection to the proxy (sshlink.go; the
// certificate from enrollment authenticates it), so the proxy reaches them
// without WireGuard; the relay runs on the same connection, so peers still
// reach the node over WireGuard, through TCP. Probes keep trying UDP; as
// soon as one is answered, the forwards are cancelled.

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

	lastDirect time.Time   // last time the proxy was reached directly (run's goroutine only)
	fwdClient  *ssh.Client // the connection the forwards are on (run's goroutine only)
	fwds       []net.Listener
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

// run decides every second whether SSH forwards are needed and keeps them
// on the agent's SSH connection; it closes that connection when neither
// the forwards nor the relay use it.
func (f *fallback) run() {
	a := f.a
	start := time.Now()
	backoff := a.opts.RetryMin
	defer f.unforward()
	for a.ctx.Err() == nil {
		need, reason := f.needed(start)
		switch {
		case need:
			if err := f.forward(); err != nil {
				f.set(false, "SSH fallback failed: "+err.Error())
				a.log.Warn("SSH fallback connection failed", "err", err, "retry_in", backoff)
				a.sleep(jitter(backoff))
				backoff = min(backoff*2, a.opts.RetryMax)
				continue
			}
			backoff = a.opts.RetryMin
			f.set(true, reason)
		default:
			f.unforward()
			f.set(false, reason)
			if !a.bind.RelayConnected() {
				a.ssh.close()
			}
		}
		a.sleep(time.Second)
	}
}

// needed reports whether the agent should serve through SSH now, and why
// (in words for meshctl status). UDP to the proxy counts as working when
// a probe of the direct path was answered (or, with no path probes, a
// WireGuard handshake went over UDP) within FallbackTimeout.
func (f *fallback) needed(start time.Time) (bool, string) {
	a := f.a
	if a.opts.Fallback == FallbackAlways {
		return true, "SSH fallback is always on (--fallback always)"
	}
	cur := a.applied.Load()
	if cur == nil || cur.nm.ProxySSH == "" {
		return false, "no SSH fallback endpoint in the netmap"
	}
	info, ok := a.proxyPath()
	if !ok {
		return false, "no proxy in the netmap"
	}
	now := time.Now()
	if info.Path == "direct" && info.Confirmed {
		f.lastDirect = now
		return false, "direct UDP path to the proxy (" + info.Reason + ")"
	}
	if hs, ok := a.proxyHandshake(); ok && info.Path == "direct" && !hs.IsZero() && now.Sub(hs) < handshakeFresh {
		f.lastDirect = now
		return false, "WireGuard handshake with the proxy " + now.Sub(hs).Round(time.Second).String() + " ago"
	}
	ref := f.lastDirect
	if ref.IsZero() {
		ref = start
	}
	if now.Sub(ref) < a.opts.FallbackTimeout {
		if f.lastDirect.IsZero() {
			return false, "waiting for the proxy to answer over UDP"
		}
		return false, "direct UDP path to the proxy lost " + now.Sub(f.lastDirect).Round(time.Second).String() + " ago; waiting"
	}
	return true, fmt.Sprintf("UDP to the proxy is blocked (no answer over UDP for %s)", a.opts.FallbackTimeout)
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

// unforward cancels the forwards (the connection may stay for the relay).
func (f *fallback) unforward() {
	for _, ln := range f.fwds {
		ln.Close()
	}
	f.fwds, f.fwdClient = nil, nil
}

// forward makes sure the services are forwarded on the current SSH
// connection to the proxy (connecting if needed): <node> for the default
// service and <service>--<node> for each.
func (f *fallback) forward() error {
	a := f.a
	ctx, cancel := context.WithTimeout(a.ctx, 15*time.Second)
	defer cancel()
	cl, err := a.ssh.get(ctx)
	if err != nil {
		return err
	}
	if cl == f.fwdClient {
		return nil
	}
	f.unforward()
	name := a.client.State().Name
	for i, svc := range a.opts.Services {
		binds := []string{svc.Name + "--" + name}
		if i == defaultService(a.opts.Services) {
			binds = append(binds, name)
		}
		for _, b := range binds {
			ln, err := cl.Listen("tcp", net.JoinHostPort(b, "80"))
			if err != nil {
				f.unforward()
				cl.Close()
				return fmt.Errorf("forward %s: %w", b, err)
			}
			f.fwds = append(f.fwds, ln)
			a.goLoop(func() { f.serveForward(ln, svc) })
		}
	}
	f.fwdClient = cl
	a.log.Info("SSH fallback forwarding", "services", len(a.opts.Services))
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
