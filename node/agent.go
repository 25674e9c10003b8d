package node

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/meshctl/meshctl/node/inflight"
	"github.com/meshctl/meshctl/node/pathbind"
	"github.com/meshctl/meshctl/node/socks5"
	"github.com/meshctl/meshctl/node/wgconf"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// ProxyKeepalive is the persistent keepalive toward the proxy, so that a
// node behind NAT keeps its mapping open and stays reachable.
const ProxyKeepalive = 25 * time.Second

// AgentOptions configures an Agent. Zero values mean the documented default.
type AgentOptions struct {
	// StateDir holds the enrolled identity. Required.
	StateDir string
	// Services are published on the node's overlay addresses.
	Services []Service
	// ListenPort is the WireGuard UDP port; 0 picks an ephemeral one.
	ListenPort int
	// TUN, if set, names a kernel TUN interface to create (root) instead of
	// the userspace network stack.
	TUN string
	// SOCKS5, if set, is a local address for a SOCKS5 server whose
	// connections go out through the mesh.
	SOCKS5 string
	// AdvertiseEndpoints are the UDP endpoints reported to the coordinator;
	// nil means this host's interface addresses with the listen port.
	AdvertiseEndpoints []netip.AddrPort
	// UAPIDir is where the WireGuard UAPI socket goes (for `wg show`).
	// Default /var/run/wireguard when writable, else StateDir.
	UAPIDir string
	// MTU of the overlay. Default DefaultMTU.
	MTU int
	// Logger receives the agent's logs (nil discards).
	Logger *slog.Logger
	// Coordinator, if set, replaces the coordinator URL saved at enrollment
	// (the all-in-one server reaches its own coordinator over loopback).
	Coordinator string
	// OnNetmap, if set, is called with every netmap the device has applied
	// (the cached one at start included), on the agent's goroutine; it must
	// not block. The proxy builds its route table here.
	OnNetmap func(*wire.Netmap)
	// Fallback is the SSH fallback mode: FallbackAuto (default),
	// FallbackOff or FallbackAlways.
	Fallback string
	// FallbackTimeout is how long the agent waits for a WireGuard handshake
	// with the proxy before it falls back to SSH. Default 30s.
	FallbackTimeout time.Duration
	// Bind, if set, replaces WireGuard's UDP bind (tests put a lossy or
	// blocking path here). Nil is the standard bind.
	Bind conn.Bind
	// RelayDial, if set, opens the agent's stream to the relay (frames of
	// package proxy/relay) instead of an SSH channel to the proxy: the
	// proxy attaches its own device to its in-process relay with it.
	RelayDial func(ctx context.Context) (io.ReadWriteCloser, error)
	// RetryMin and RetryMax bound the backoff toward the coordinator.
	// Defaults 1s and 60s.
	RetryMin, RetryMax time.Duration
}

// Agent is a running node: a WireGuard device configured from the
// coordinator's netmap, the node's published services, and a local control
// socket for status, ping and dial.
type Agent struct {
	opts   AgentOptions
	log    *slog.Logger
	client *Client
	state  *State
	v4, v6 netip.Addr

	lock      *os.File // flock on the state dir: one agent per identity
	plane     dataplane
	dev       *device.Device
	ifname    string
	port      int
	uapiPath  string
	uapiLn    net.Listener
	ctlLn     net.Listener
	socks     *socks5.Server
	gate      *inflight.Gate // bounds packets in flight through a.dev
	fb        *fallback
	fwds      []*forwarder
	isLocal   func(netip.Addr) bool
	endpoints []netip.AddrPort
	bind      *pathbind.Bind
	ssh       *sshLink      // the SSH connection to the proxy (relay, fallback)
	epChanged chan struct{} // wakes reportLoop: our public endpoint changed

	applyMu sync.Mutex // serialises netmap application
	applied atomic.Pointer[appliedNetmap]

	reach atomic.Pointer[reachability]

	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup
	fatal   chan error
	closing sync.Once
}

// appliedNetmap is the netmap the device currently runs, with its peers.
type appliedNetmap struct {
	nm    *wire.Netmap
	peers []wgconf.Peer
	names map[wgtypes.Key]string
}

type reachability struct {
	ok    bool
	since time.Time
	err   string
}

// ErrCertificateExpired means the node's certificate expired beyond the
// coordinator's renewal grace: only a new enrollment helps.
var ErrCertificateExpired = errors.New("this node's certificate expired beyond the renewal grace period")

// NewAgent loads the identity and the cached netmap; it does not start
// anything.
func NewAgent(opts AgentOptions) (*Agent, error) {
	if opts.StateDir == "" {
		return nil, errors.New("agent: StateDir is required")
	}
	if opts.MTU == 0 {
		opts.MTU = DefaultMTU
	}
	if opts.RetryMin == 0 {
		opts.RetryMin = time.Second
	}
	if opts.RetryMax == 0 {
		opts.RetryMax = 60 * time.Second
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	switch opts.Fallback {
	case "":
		opts.Fallback = FallbackAuto
	case FallbackAuto, FallbackOff, FallbackAlways:
	default:
		return nil, fmt.Errorf("fallback mode %q: use auto, off or always", opts.Fallback)
	}
	if opts.FallbackTimeout == 0 {
		opts.FallbackTimeout = DefaultFallbackTimeout
	}
	if opts.Bind == nil {
		opts.Bind = conn.NewDefaultBind()
	}
	if opts.ListenPort < 0 || opts.ListenPort > 65535 {
		return nil, fmt.Errorf("listen port %d is not 0-65535", opts.ListenPort)
	}
	if err := checkServices(opts.Services); err != nil {
		return nil, err
	}
	if sock := filepath.Join(opts.StateDir, ControlSocket); len(sock) >= 108 {
		return nil, fmt.Errorf("control socket path %s is %d bytes; Unix sockets allow 107: use a shorter --state-dir", sock, len(sock))
	}
	client, err := NewClient(opts.StateDir)
	if err != nil {
		return nil, err
	}
	if opts.Coordinator != "" {
		if err := client.SetCoordinator(opts.Coordinator); err != nil {
			return nil, err
		}
	}
	st := client.State()
	a := &Agent{opts: opts, log: opts.Logger, client: client, state: st, fatal: make(chan error, 1), epChanged: make(chan struct{}, 1)}
	a.ssh = &sshLink{a: a}
	discoPriv, _ := pathbind.DiscoKeyFromWireGuard(st.WireGuardKey())
	a.bind, err = pathbind.New(pathbind.Options{
		Inner:        opts.Bind,
		DiscoPrivate: discoPriv,
		RelayDial:    a.relayDial,
		Logger:       opts.Logger.With("component", "paths"),
		OnPublicEndpoint: func(netip.AddrPort) {
			select {
			case a.epChanged <- struct{}{}:
			default:
			}
		},
		OnStaleSession: a.handshakeNow,
	})
	if err != nil {
		return nil, err
	}
	if a.v4, err = netip.ParseAddr(st.IPv4); err != nil || !a.v4.Is4() {
		return nil, corrupt(filepath.Join(opts.StateDir, StateFile), fmt.Errorf("ipv4 %q", st.IPv4))
	}
	if a.v6, err = netip.ParseAddr(st.IPv6); err != nil || !a.v6.Is6() {
		return nil, corrupt(filepath.Join(opts.StateDir, StateFile), fmt.Errorf("ipv6 %q", st.IPv6))
	}
	a.reach.Store(&reachability{since: time.Now(), err: "not contacted yet"})
	return a, nil
}

// Start brings the data plane up from the cached netmap (so tunnels work
// before, or without, the coordinator), starts the services and the control
// socket, and then follows the coordinator.
func (a *Agent) Start() (err error) {
	a.ctx, a.cancel = context.WithCancel(context.Background())
	defer func() {
		if err != nil {
			a.shutdown()
		}
	}()
	if a.lock, err = pki.LockDir(a.opts.StateDir); err != nil {
		if errors.Is(err, pki.ErrLocked) {
			return fmt.Errorf("another meshctl agent is already running with state dir %s", a.opts.StateDir)
		}
		return err
	}
	if a.opts.TUN != "" {
		pool4, pool6, perr := cachedPools(a.opts.StateDir)
		if perr != nil {
			return perr
		}
		a.plane, err = newTUNPlane(a.opts.TUN, a.v4, a.v6, a.opts.MTU, a.opts.Services, pool4, pool6)
		a.ifname = a.opts.TUN
	} else {
		a.plane, err = newNetstackPlane(a.v4, a.v6, a.opts.MTU)
		a.ifname = netstackIfname(a.state.Name)
	}
	if err != nil {
		return err
	}
	// The gate keeps wireguard-go's queues short: see node/inflight. A
	// kernel TUN keeps its own read batch, which TSO segments need.
	a.gate = inflight.New(0)
	if a.opts.TUN != "" {
		a.gate = inflight.NewWithReadBatch(0, 0)
	}
	a.dev = device.NewDevice(a.gate.Device(a.plane.Device()), a.gate.Bind(a.bind), wgLogger(a.log))
	if err := a.dev.IpcSet(wgconf.FullConfig(a.state.WireGuardKey(), a.opts.ListenPort, nil)); err != nil {
		return fmt.Errorf("configure WireGuard: %w", err)
	}
	if err := a.dev.Up(); err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return fmt.Errorf("WireGuard cannot listen on UDP port %d: it is in use (another agent?); pass --listen-port 0 for any free port, or another port", a.opts.ListenPort)
		}
		return fmt.Errorf("WireGuard device up: %w", err)
	}
	if a.port, err = a.listenPort(); err != nil {
		return err
	}
	if a.opts.ListenPort != 0 && a.port != a.opts.ListenPort {
		return fmt.Errorf("WireGuard could not listen on UDP port %d (in use?); pass --listen-port 0 for any free port", a.opts.ListenPort)
	}
	a.isLocal = localAddrChecker()
	a.endpoints = a.opts.AdvertiseEndpoints
	if a.endpoints == nil {
		a.endpoints = localEndpoints(a.port)
	}
	if nm, err := LoadNetmap(a.opts.StateDir); err == nil {
		if err := a.apply(nm); err != nil {
			a.log.Warn("cached netmap rejected; waiting for the coordinator", "err", err)
		} else {
			a.log.Info("up from the cached netmap", "version", nm.Version, "peers", len(nm.Peers))
		}
	}
	if err := a.startUAPI(); err != nil {
		return err
	}
	for _, svc := range a.opts.Services {
		for _, addr := range overlayListenAddrs(a.v4, a.v6, svc.Port) {
			ln, err := a.plane.Listen(addr)
			if err != nil {
				return fmt.Errorf("service %s: listen on %s: %w", svc.Name, addr, err)
			}
			a.fwds = append(a.fwds, serveForwarder(a.ctx, svc, ln, a.log))
		}
	}
	if err := a.startControl(); err != nil {
		return err
	}
	if a.opts.SOCKS5 != "" {
		if err := a.startSOCKS5(); err != nil {
			return err
		}
	}
	a.goLoop(func() { a.bind.Run(a.ctx) })
	a.goLoop(a.trimLoop)
	a.goLoop(a.netmapLoop)
	a.goLoop(a.reportLoop)
	a.goLoop(a.renewLoop)
	a.startFallback()
	a.log.Info("node up", "name", a.state.Name, "ipv4", a.v4, "ipv6", a.v6, "mode", a.plane.Mode(),
		"wireguard_port", a.port, "services", len(a.opts.Services), "control_socket", filepath.Join(a.opts.StateDir, ControlSocket))
	return nil
}

func (a *Agent) goLoop(f func()) {
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		f()
	}()
}

// Wait blocks until the agent stops on its own (revoked, certificate
// expired) and returns why, or until ctx ends (nil).
func (a *Agent) Wait(ctx context.Context) error {
	select {
	case err := <-a.fatal:
		return err
	case <-ctx.Done():
		return nil
	}
}

func (a *Agent) fail(err error) {
	select {
	case a.fatal <- err:
	default:
	}
	a.cancel()
}

// Close stops everything the agent started and waits for it. Idempotent.
func (a *Agent) Close() error {
	a.shutdown()
	return nil
}

func (a *Agent) shutdown() {
	a.closing.Do(func() {
		if a.cancel != nil {
			a.cancel()
		}
		if a.ctlLn != nil {
			a.ctlLn.Close()
		}
		a.ssh.close()
		if a.socks != nil {
			a.socks.Close()
		}
		for _, f := range a.fwds {
			f.close()
		}
		if a.uapiLn != nil {
			a.uapiLn.Close()
		}
		a.wg.Wait()
		if a.dev != nil {
			a.dev.Close() // closes the tun.Device too
		} else if a.plane != nil {
			a.plane.Device().Close()
		}
		if a.plane != nil {
			a.plane.Close()
		}
		a.client.Close()
		if a.lock != nil { // only the lock holder owns the sockets
			os.Remove(filepath.Join(a.opts.StateDir, ControlSocket))
			if a.uapiPath != "" {
				os.Remove(a.uapiPath)
			}
			a.lock.Close()
		}
	})
}

// apply validates nm and moves the device to it, touching only the peers
// that changed. A rejected netmap leaves the last good one in place.
func (a *Agent) apply(nm *wire.Netmap) error {
	a.applyMu.Lock()
	defer a.applyMu.Unlock()
	peers, err := wgconf.FromNetmap(nm, wgconf.Options{
		Self: a.state.WireGuardKey().PublicKey(), IsLocal: a.isLocal, ProxyKeepalive: ProxyKeepalive,
	})
	if err != nil {
		return fmt.Errorf("netmap version %d rejected: %w", nm.Version, err)
	}
	a.configureBind(nm, peers)
	var old []wgconf.Peer
	if cur := a.applied.Load(); cur != nil {
		old = cur.peers
	}
	uapi, sum := wgconf.Diff(old, peers)
	if uapi != "" {
		if err := a.dev.IpcSet(uapi); err != nil {
			return fmt.Errorf("apply netmap version %d: %w", nm.Version, err)
		}
		a.log.Info("peers updated", "version", nm.Version, "added", sum.Added, "removed", sum.Removed, "updated", sum.Updated)
	}
	names := make(map[wgtypes.Key]string, len(peers))
	for _, p := range peers {
		names[p.PublicKey] = p.Name
	}
	a.applied.Store(&appliedNetmap{nm: nm, peers: peers, names: names})
	if a.opts.OnNetmap != nil {
		a.opts.OnNetmap(nm)
	}
	return nil
}

// Client is the agent's control client (the node's mTLS identity toward the
// coordinator).
func (a *Agent) Client() *Client { return a.client }

// DialContext opens a connection over the mesh to an overlay address
// (netstack or TUN, whichever the agent runs).
func (a *Agent) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	return a.plane.DialContext(ctx, network, addr)
}

// netmapLoop long-polls the coordinator and applies every new netmap. It
// never tears the tunnel down because the coordinator is unreachable.
func (a *Agent) netmapLoop() {
	var since uint64
	if cur := a.applied.Load(); cur != nil {
		since = cur.nm.Version
	}
	backoff := a.opts.RetryMin
	for a.ctx.Err() == nil {
		nm, err := a.client.Netmap(a.ctx, since)
		if err != nil {
			if a.ctx.Err() != nil {
				return
			}
			if a.handleControlError(err) {
				return
			}
			a.sleep(jitter(backoff))
			backoff = min(backoff*2, a.opts.RetryMax)
			continue
		}
		a.setReachable(nil)
		backoff = a.opts.RetryMin
		if nm == nil {
			continue // the long-poll ran out with no change
		}
		since = nm.Version
		if err := a.apply(nm); err != nil {
			a.log.Error("keeping the last good netmap", "err", err)
			continue
		}
		if err := SaveNetmap(a.opts.StateDir, nm); err != nil {
			a.log.Warn("cache netmap", "err", err)
		}
	}
}

// handleControlError records a failed coordinator call. It returns true
// when the agent must stop (revoked, or certificate beyond renewal).
func (a *Agent) handleControlError(err error) bool {
	switch {
	case errors.Is(err, ErrRevoked):
		a.log.Error("this node was revoked; stopping", "err", err)
		a.fail(err)
		return true
	case wire.IsCode(err, wire.CodeCertExpired):
		if _, rerr := a.client.RenewIfDue(a.ctx, time.Now(), true); rerr != nil {
			if wire.IsCode(rerr, wire.CodeCertExpired) || errors.Is(rerr, ErrRevoked) {
				a.log.Error("certificate expired beyond the renewal grace; stopping", "err", rerr)
				a.fail(fmt.Errorf("%w: %v; enroll again with a new token (meshctl enroll --force …)", ErrCertificateExpired, rerr))
				return true
			}
			a.setReachable(rerr)
			return false
		}
		a.log.Info("renewed an expired certificate within the grace period")
		return false
	}
	a.setReachable(err)
	return false
}

func (a *Agent) setReachable(err error) {
	cur := a.reach.Load()
	ok := err == nil
	if cur.ok == ok && (ok || cur.err == err.Error()) {
		return
	}
	r := &reachability{ok: ok, since: time.Now()}
	if cur.ok == ok {
		r.since = cur.since
	}
	if err != nil {
		r.err = err.Error()
		if cur.ok {
			a.log.Warn("coordinator unreachable; tunnels stay up on the last netmap", "err", err)
		}
	} else {
		a.log.Info("coordinator reachable")
	}
	a.reach.Store(r)
}

// reportLoop tells the coordinator the node's services, endpoints and
// disco key, at start and whenever the endpoints change (a new public
// endpoint learned from the proxy wakes it at once).
func (a *Agent) reportLoop() {
	svcs := wireServices(a.opts.Services)
	disco := base64.StdEncoding.EncodeToString(func() []byte { k := a.bind.DiscoPublic(); return k[:] }())
	var reported []string
	backoff := a.opts.RetryMin
	for a.ctx.Err() == nil {
		epStrs := a.advertisedEndpoints()
		if reported != nil && slices.Equal(reported, epStrs) {
			t := time.NewTimer(2 * time.Minute)
			select {
			case <-a.ctx.Done():
			case <-a.epChanged:
			case <-t.C:
			}
			t.Stop()
			continue
		}
		err := a.client.Update(a.ctx, wire.UpdateRequest{Services: &svcs, Endpoints: &epStrs, DiscoKey: &disco})
		if err != nil {
			if a.ctx.Err() != nil || a.handleControlError(err) {
				return
			}
			a.sleep(jitter(backoff))
			backoff = min(backoff*2, a.opts.RetryMax)
			continue
		}
		reported, backoff = epStrs, a.opts.RetryMin
	}
}

// advertisedEndpoints are the local endpoints (or the configured ones)
// plus the public one the proxy saw, if it differs.
func (a *Agent) advertisedEndpoints() []string {
	eps := a.endpoints
	if a.opts.AdvertiseEndpoints == nil {
		eps = localEndpoints(a.port)
	}
	if pub := a.bind.PublicEndpoint(); pub.IsValid() && !slices.Contains(eps, pub) && !pub.Addr().IsLoopback() {
		eps = append(slices.Clone(eps), pub)
	}
	out := make([]string, 0, len(eps))
	for _, e := range eps {
		out = append(out, e.String())
	}
	return out
}

// renewLoop renews the client certificate when a third of its life is left.
func (a *Agent) renewLoop() {
	for a.ctx.Err() == nil {
		renewed, err := a.client.RenewIfDue(a.ctx, time.Now(), false)
		switch {
		case err != nil && a.ctx.Err() == nil:
			if a.handleControlError(err) {
				return
			}
			a.sleep(jitter(time.Minute))
			continue
		case renewed:
			a.log.Info("client certificate renewed", "valid_until", a.client.State().ClientCert().Leaf.NotAfter)
		}
		a.sleep(jitter(10 * time.Minute))
	}
}

func (a *Agent) sleep(d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-a.ctx.Done():
	case <-t.C:
	}
}

// jitter spreads retries: a random duration in [d/2, d).
func jitter(d time.Duration) time.Duration {
	return d/2 + time.Duration(rand.Int64N(int64(d/2)+1))
}

// handshakeNow starts a WireGuard handshake with peer, which pathbind
// found sending under a session this process does not have (see
// node/pathbind/stale.go). a.dev is set before the device is up, so
// before any packet can call this.
func (a *Agent) handshakeNow(peer [32]byte) {
	if p := a.dev.LookupPeer(device.NoisePublicKey(peer)); p != nil {
		p.SendHandshakeInitiation(false)
	}
}

func (a *Agent) listenPort() (int, error) {
	s, err := a.dev.IpcGet()
	if err != nil {
		return 0, err
	}
	st, err := wgconf.ParseGet(strings.NewReader(s))
	if err != nil {
		return 0, err
	}
	return st.ListenPort, nil
}

// netstackIfname names the userspace device for `wg show`: "mc-" and the
// node name, cut to the 15 bytes interface names allow.
func netstackIfname(name string) string {
	n := "mc-" + name
	if len(n) > 15 {
		n = strings.TrimRight(n[:15], "-")
	}
	return n
}

func wgLogger(log *slog.Logger) *device.Logger {
	return &device.Logger{
		Verbosef: func(format string, args ...any) {
			if log.Enabled(context.Background(), slog.LevelDebug) {
				log.Debug(fmt.Sprintf(format, args...), "component", "wireguard")
			}
		},
		Errorf: func(format string, args ...any) { log.Warn(fmt.Sprintf(format, args...), "component", "wireguard") },
	}
}
