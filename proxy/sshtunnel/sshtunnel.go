// Package sshtunnel is the meshctl proxy's SSH reverse-tunnel server: the
// fallback for nodes whose UDP (and so WireGuard) is blocked, and for
// devices that only have a stock OpenSSH client.
//
// A node connects with a user certificate issued by the coordinator's SSH CA
// (the login user name is the node name and must be one of the certificate's
// principals) and remote-forwards its services:
//
//	ssh -N -R pi1:80:localhost:3000 pi1@proxy.example.com      # default service
//	ssh -N -R api--pi1:80:localhost:8080 pi1@proxy.example.com # service "api"
//
// The bind address of a forward names what is published, exactly like the
// proxy's host names: "<node>" is the node's default service ("web" if it has
// one, else its first) and "<service>--<node>" is a named service. The port
// is virtual: no operating-system port is ever bound, so any non-zero port
// works and only becomes part of the forward's name (-R pi1:80:… and
// -R pi1:443:… are two forwards of the same service). Port 0 ("allocate a
// port") is refused because nothing is allocated.
//
// The proxy then reaches a service with [Server.Dial], which opens a
// "forwarded-tcpip" channel to the node over its SSH connection. Nothing
// else is allowed: the client cannot open any channel (no shell, exec, pty,
// agent, X11, tun or direct-tcpip, so the server is no open proxy) and only
// the tcpip-forward, cancel-tcpip-forward and keepalive@openssh.com global
// requests succeed. A node can only publish its own services, and one node
// can never see or affect another node's session or forwards.
//
// The one exception is the relay: when Options.Relay is set, a node that
// Lookup allows to relay (NodeInfo.Relay: a node with a WireGuard key) may
// open one channel of type wire.SSHRelayChannel per connection. The
// channel's requests are refused and the channel itself is handed to
// Options.Relay together with the node name the certificate proved; it is
// closed when the session ends (disconnect, replacement, DropNode, Close).
//
// Terrapin (CVE-2023-48795): golang.org/x/crypto/ssh implements OpenSSH's
// strict key exchange since v0.17.0 and always offers it as a server
// ("kex-strict-s-v00@openssh.com" in the first KEXINIT); there is no option
// to turn it off. The tests check that the server advertises it.
package sshtunnel

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/meshctl/meshctl/wire"
)

// nodeExtension is the ssh.Permissions extension in which the public-key
// callback records the node name taken from the verified certificate. It is
// the only source of a connection's identity.
const nodeExtension = "meshctl-node"

// Defaults for zero Options fields.
const (
	DefaultPreAuthTimeout = 10 * time.Second
	DefaultMaxAuthTries   = 3
	DefaultMaxConnsPerIP  = 8
	DefaultMaxPreAuth     = 256
	DefaultMaxForwards    = 16
	DefaultMaxChannels    = 256
)

// Keepalive defaults: a keepalive@openssh.com request is sent every
// keepaliveInterval and a connection is closed once keepaliveMax requests in
// a row have gone unanswered.
const (
	defaultKeepaliveInterval = 30 * time.Second
	defaultKeepaliveMax      = 3
)

// ErrNoForward is returned (wrapped) by Dial when the node has no live
// session forwarding the service, or may no longer publish it.
var ErrNoForward = errors.New("sshtunnel: no forward")

// ErrTooManyChannels is returned (wrapped) by Dial when the node's session
// already carries Options.MaxChannels channels.
var ErrTooManyChannels = errors.New("sshtunnel: too many channels")

// NodeInfo is what the server needs to know about an active node.
type NodeInfo struct {
	// Services are the services this node may publish. Only the names
	// matter here (ports are ignored); names that are not lower-case DNS
	// labels without "--" are ignored.
	Services []wire.Service
	// Relay allows the node to open a relay channel (wire.SSHRelayChannel)
	// when Options.Relay is set: true for nodes with a WireGuard key
	// (roles node and proxy), false for SSH-only nodes.
	Relay bool
}

// Options configure a Server. HostSigner, UserCA and Lookup are required;
// every other zero value means the documented default.
type Options struct {
	// HostSigner is the server's host key: normally a certificate signer
	// (ssh.NewCertSigner) certified by the coordinator's SSH CA, so that
	// clients verify it with an "@cert-authority" known_hosts line.
	// Required.
	HostSigner ssh.Signer
	// UserCA is the CA whose user certificates authenticate nodes; nothing
	// else does (no plain keys, passwords or keyboard-interactive).
	// Required.
	UserCA ssh.PublicKey
	// Lookup returns the info of an active (enrolled, unrevoked) node and
	// false for unknown or revoked names. It is asked at authentication and
	// again for every tcpip-forward request and every channel Dial opens.
	// It may be called concurrently and never under the server's locks.
	// Required.
	Lookup func(node string) (NodeInfo, bool)
	// Now is the clock that certificate validity is checked against.
	// Default time.Now.
	Now func() time.Time
	// Logger receives connection events. Nil discards them. Key material is
	// never logged.
	Logger *slog.Logger
	// OnChange, if set, is called whenever the set of forwards may have
	// changed (a forward added or cancelled, a session replaced, dropped,
	// disconnected or closed). It is never called under the server's locks,
	// but it runs on a connection's goroutine before the client gets its
	// reply, so it should return quickly.
	OnChange func()
	// PreAuthTimeout closes a connection that has not finished the SSH
	// handshake and authentication in time. Default 10s.
	PreAuthTimeout time.Duration
	// MaxAuthTries is the number of failed authentication attempts after
	// which a connection is closed (ssh.ServerConfig.MaxAuthTries; x/crypto
	// does not count the first MaxAuthTries refused public-key offers, so a
	// client may offer up to twice as many keys). Default 3.
	MaxAuthTries int
	// MaxConnsPerIP limits concurrent connections, authenticated or not,
	// per source IPv4 address or IPv6 /64. Default 8.
	MaxConnsPerIP int
	// MaxPreAuth limits the connections, from all addresses together,
	// that have not finished the handshake and authentication (OpenSSH's
	// MaxStartups): beyond it new connections are closed at once, so a
	// flood from many addresses (an IPv6 /48 has 65,536 /64s) cannot hold
	// unbounded memory. Authenticated sessions are not counted and are
	// never affected. Default 256.
	MaxPreAuth int
	// MaxForwards limits the forwards of one connection. Default 16.
	MaxForwards int
	// MaxChannels limits the concurrent channels Dial opens on one
	// connection. Default 256.
	MaxChannels int
	// Relay, if set, serves a relay channel (wire.SSHRelayChannel) that
	// node opened; nil rejects relay channels. It runs on its own
	// goroutine, which Close waits for, and should return once ch is
	// closed (reads and writes then fail); the server closes ch when
	// Relay returns and when the session ends. A session has at most one
	// relay channel open at a time.
	Relay func(node string, ch io.ReadWriteCloser)
}

// Forward is a service that a node currently publishes through its tunnel.
type Forward struct {
	Node    string
	Service string
}

// Server is the SSH reverse-tunnel server. Create it with New; it is safe
// for concurrent use.
type Server struct {
	o   Options
	log *slog.Logger
	cfg *ssh.ServerConfig

	keepaliveInterval time.Duration // set before Serve; tests shorten it
	keepaliveMax      int

	mu        sync.Mutex
	closed    bool
	closing   chan struct{} // closed by Close
	listeners map[net.Listener]struct{}
	conns     map[net.Conn]struct{} // every accepted connection
	perIP     map[string]int
	preAuth   int                 // connections not yet authenticated
	sessions  map[string]*session // node name -> its current session
	origPort  uint32              // last originator port handed out by Dial
	wg        sync.WaitGroup

	// Refused connections, counted for rate-limited log lines (under mu).
	refusedPerIP, refusedPreAuth refusals
}

// session is one authenticated connection of a node.
type session struct {
	node     string
	conn     *ssh.ServerConn
	forwards []forward // guarded by Server.mu
	channels int       // open Dial channels, guarded by Server.mu
	relay    bool      // a relay channel is open, guarded by Server.mu
	done     chan struct{}
}

// forward is one accepted tcpip-forward request.
type forward struct {
	service string
	addr    string // bind address exactly as the client sent it
	port    uint32
}

// New checks o and returns a Server. It fails if a required field is
// missing or a limit is negative.
func New(o Options) (*Server, error) {
	switch {
	case o.HostSigner == nil:
		return nil, errors.New("sshtunnel: Options.HostSigner is required")
	case o.UserCA == nil:
		return nil, errors.New("sshtunnel: Options.UserCA is required")
	case o.Lookup == nil:
		return nil, errors.New("sshtunnel: Options.Lookup is required")
	case o.PreAuthTimeout < 0 || o.MaxAuthTries < 0 || o.MaxConnsPerIP < 0 || o.MaxPreAuth < 0 || o.MaxForwards < 0 || o.MaxChannels < 0:
		return nil, errors.New("sshtunnel: Options limits must not be negative")
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.PreAuthTimeout == 0 {
		o.PreAuthTimeout = DefaultPreAuthTimeout
	}
	if o.MaxAuthTries == 0 {
		o.MaxAuthTries = DefaultMaxAuthTries
	}
	if o.MaxConnsPerIP == 0 {
		o.MaxConnsPerIP = DefaultMaxConnsPerIP
	}
	if o.MaxPreAuth == 0 {
		o.MaxPreAuth = DefaultMaxPreAuth
	}
	if o.MaxForwards == 0 {
		o.MaxForwards = DefaultMaxForwards
	}
	if o.MaxChannels == 0 {
		o.MaxChannels = DefaultMaxChannels
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		o:                 o,
		log:               log,
		keepaliveInterval: defaultKeepaliveInterval,
		keepaliveMax:      defaultKeepaliveMax,
		closing:           make(chan struct{}),
		listeners:         map[net.Listener]struct{}{},
		conns:             map[net.Conn]struct{}{},
		perIP:             map[string]int{},
		sessions:          map[string]*session{},
	}
	ca := o.UserCA.Marshal()
	checker := &ssh.CertChecker{
		IsUserAuthority: func(auth ssh.PublicKey) bool { return bytes.Equal(auth.Marshal(), ca) },
		Clock:           func() time.Time { return s.o.Now() },
	}
	s.cfg = &ssh.ServerConfig{
		MaxAuthTries: o.MaxAuthTries,
		PublicKeyCallback: func(meta ssh.ConnMetadata, key ssh.PublicKey) (*ssh.Permissions, error) {
			node := meta.User()
			if !validName(node) {
				return nil, errors.New("user name is not a node name")
			}
			// Authenticate accepts only user certificates signed by UserCA,
			// valid now, listing node as a principal, with no critical
			// option other than source-address (which x/crypto enforces
			// from the returned CriticalOptions).
			perms, err := checker.Authenticate(meta, key)
			if err != nil {
				return nil, err
			}
			// The coordinator grants exactly this; a certificate without it
			// was not issued for the fallback.
			if _, ok := perms.Extensions["permit-port-forwarding"]; !ok {
				return nil, errors.New("certificate does not permit port forwarding")
			}
			if _, ok := s.o.Lookup(node); !ok {
				return nil, fmt.Errorf("node %q is unknown or revoked", node)
			}
			return &ssh.Permissions{
				CriticalOptions: maps.Clone(perms.CriticalOptions),
				Extensions:      map[string]string{nodeExtension: node},
			}, nil
		},
		AuthLogCallback: func(meta ssh.ConnMetadata, method string, err error) {
			if err != nil && method != "none" {
				s.log.Debug("ssh auth attempt failed", "user", meta.User(), "remote", meta.RemoteAddr().String(), "method", method, "err", err)
			}
		},
	}
	s.cfg.AddHostKey(o.HostSigner)
	return s, nil
}

// Serve accepts connections on ln until Close and handles each in its own
// goroutine. It returns nil after Close, or the listener's error.
// Temporary accept errors are retried with a back-off.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return nil
	}
	s.listeners[ln] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
		s.wg.Done()
	}()
	var delay time.Duration
	for {
		raw, err := ln.Accept()
		if err != nil {
			if s.isClosed() {
				return nil
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.log.Warn("ssh accept failed; retrying", "err", err, "delay", delay)
			t := time.NewTimer(delay)
			select {
			case <-t.C:
			case <-s.closing:
				t.Stop()
				return nil
			}
			continue
		}
		delay = 0
		s.accept(raw)
	}
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// accept applies the per-IP limit and starts the connection's goroutine.
func (s *Server) accept(raw net.Conn) {
	key := ipKey(raw.RemoteAddr())
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		raw.Close()
		return
	}
	var refused *refusals
	var why string
	var limit int
	switch {
	case s.perIP[key] >= s.o.MaxConnsPerIP:
		refused, why, limit = &s.refusedPerIP, "too many connections from this address", s.o.MaxConnsPerIP
	case s.preAuth >= s.o.MaxPreAuth:
		refused, why, limit = &s.refusedPreAuth, "too many connections are still authenticating", s.o.MaxPreAuth
	}
	if refused != nil {
		n := refused.add()
		s.mu.Unlock()
		if n > 0 {
			s.log.Warn("ssh connection refused: "+why, "remote", raw.RemoteAddr().String(), "limit", limit, "refused", n)
		}
		raw.Close()
		return
	}
	s.preAuth++
	s.perIP[key]++
	s.conns[raw] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		s.handle(raw, key)
	}()
}

// refusals counts refused connections so that a flood logs one line per
// refusalLogEvery instead of one per connection.
type refusals struct {
	n  int   // refused since the last line
	at int64 // unix nanos of the last line
}

const refusalLogEvery = 10 * time.Second

// add counts a refusal and returns how many to report now (0: stay
// quiet). Callers hold the server's lock.
func (r *refusals) add() int {
	r.n++
	now := time.Now().UnixNano()
	if now-r.at < int64(refusalLogEvery) {
		return 0
	}
	n := r.n
	r.n, r.at = 0, now
	return n
}

// ipKey is the per-IP accounting key: the IPv4 address or the IPv6 /64.
func ipKey(a net.Addr) string {
	var ip netip.Addr
	if t, ok := a.(*net.TCPAddr); ok {
		ip, _ = netip.AddrFromSlice(t.IP)
	} else if ap, err := netip.ParseAddrPort(a.String()); err == nil {
		ip = ap.Addr()
	}
	ip = ip.Unmap()
	switch {
	case ip.Is4():
		return ip.String()
	case ip.Is6():
		p, _ := ip.WithZone("").Prefix(64)
		return p.String()
	}
	return a.String()
}

// handle runs one connection from the handshake to its end.
func (s *Server) handle(raw net.Conn, key string) {
	defer func() {
		raw.Close()
		s.mu.Lock()
		delete(s.conns, raw)
		if s.perIP[key]--; s.perIP[key] <= 0 {
			delete(s.perIP, key)
		}
		s.mu.Unlock()
	}()
	remote := raw.RemoteAddr().String()

	authDone := make(chan struct{})
	s.wg.Go(func() {
		t := time.NewTimer(s.o.PreAuthTimeout)
		defer t.Stop()
		select {
		case <-t.C:
			s.log.Info("ssh connection closed: not authenticated in time", "remote", remote)
			raw.Close()
		case <-authDone:
		}
	})
	sconn, chans, reqs, err := ssh.NewServerConn(raw, s.cfg)
	close(authDone)
	s.mu.Lock()
	s.preAuth--
	s.mu.Unlock()
	if err != nil {
		s.log.Debug("ssh handshake failed", "remote", remote, "err", err)
		return
	}
	defer sconn.Close()
	node := sconn.Permissions.Extensions[nodeExtension]
	if node == "" { // cannot happen: auth always sets it
		s.wg.Go(func() { rejectChannels(chans) })
		ssh.DiscardRequests(reqs)
		return
	}
	sess := &session{node: node, conn: sconn, done: make(chan struct{})}
	defer close(sess.done)
	log := s.log.With("node", node, "remote", remote)
	// Channels are handled from the start; whatever they start ends with
	// the connection, which every way a session ends closes.
	s.wg.Go(func() { s.handleChannels(sess, chans, log) })
	if !s.register(sess) {
		sconn.Close()
		ssh.DiscardRequests(reqs)
		return
	}
	log.Info("ssh tunnel session started")
	// The node may have been revoked (and DropNode called) between the
	// authentication and the registration.
	if _, ok := s.o.Lookup(node); !ok {
		s.dropSession(sess, "node revoked")
	}
	s.wg.Go(func() { s.keepalive(sess, log) })
	for req := range reqs {
		s.handleRequest(sess, req, log)
	}
	s.dropSession(sess, "")
	log.Info("ssh tunnel session ended")
}

// rejectChannels refuses every channel a client opens.
func rejectChannels(chans <-chan ssh.NewChannel) {
	for nc := range chans {
		nc.Reject(ssh.Prohibited, "this server only accepts remote forwards")
	}
}

// handleChannels answers the channels a node opens: a relay channel may be
// accepted (openRelay); every other type is refused.
func (s *Server) handleChannels(sess *session, chans <-chan ssh.NewChannel, log *slog.Logger) {
	for nc := range chans {
		if nc.ChannelType() == wire.SSHRelayChannel {
			s.openRelay(sess, nc, log)
			continue
		}
		nc.Reject(ssh.Prohibited, "this server only accepts remote forwards")
	}
}

// openRelay accepts a relay channel if the server has a relay, the node
// may use it and the session has no relay channel yet, and hands it to
// Options.Relay on a goroutine of its own.
func (s *Server) openRelay(sess *session, nc ssh.NewChannel, log *slog.Logger) {
	if s.o.Relay == nil {
		log.Debug("relay channel refused: no relay on this server")
		nc.Reject(ssh.Prohibited, "this server has no relay")
		return
	}
	info, ok := s.o.Lookup(sess.node)
	if !ok {
		nc.Reject(ssh.Prohibited, "node is unknown or revoked")
		s.dropSession(sess, "node revoked")
		return
	}
	if !info.Relay {
		log.Info("relay channel refused: the node may not relay (an SSH-only node has no WireGuard key)")
		nc.Reject(ssh.Prohibited, "this node may not use the relay: it has no WireGuard key")
		return
	}
	s.mu.Lock()
	busy := sess.relay
	sess.relay = true
	s.mu.Unlock()
	if busy {
		log.Info("relay channel refused: one is already open on this connection")
		nc.Reject(ssh.Prohibited, "a relay channel is already open on this connection")
		return
	}
	release := func() {
		s.mu.Lock()
		sess.relay = false
		s.mu.Unlock()
	}
	ch, reqs, err := nc.Accept()
	if err != nil {
		release()
		log.Debug("relay channel accept failed", "err", err)
		return
	}
	log.Debug("relay channel opened")
	s.wg.Go(func() { ssh.DiscardRequests(reqs) })
	s.wg.Go(func() {
		defer func() {
			ch.Close()
			release()
			log.Debug("relay channel closed")
		}()
		s.o.Relay(sess.node, ch)
	})
}

// register makes sess its node's current session, replacing (and closing)
// an older one. It fails after Close.
func (s *Server) register(sess *session) bool {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return false
	}
	old := s.sessions[sess.node]
	s.sessions[sess.node] = sess
	changed := old != nil && len(old.forwards) > 0
	s.mu.Unlock()
	// OnChange first: the old forwards are gone already, and a client that
	// sees its connection closed can rely on OnChange having run.
	if changed {
		s.changed()
	}
	if old != nil {
		s.log.Info("replaced older session", "node", sess.node, "old_remote", old.conn.RemoteAddr().String(), "remote", sess.conn.RemoteAddr().String())
		old.conn.Close()
	}
	return true
}

// dropSession removes sess if it is still its node's current session and
// closes it; its forwards vanish. reason, if set, is logged.
func (s *Server) dropSession(sess *session, reason string) {
	s.mu.Lock()
	current := s.sessions[sess.node] == sess
	changed := current && len(sess.forwards) > 0
	if current {
		delete(s.sessions, sess.node)
	}
	s.mu.Unlock()
	if reason != "" {
		s.log.Info("ssh tunnel session dropped", "node", sess.node, "reason", reason)
	}
	if changed {
		s.changed()
	}
	sess.conn.Close()
}

func (s *Server) changed() {
	if s.o.OnChange != nil {
		s.o.OnChange()
	}
}

// keepalive sends keepalive@openssh.com requests and closes the connection
// when keepaliveMax of them in a row go unanswered.
func (s *Server) keepalive(sess *session, log *slog.Logger) {
	t := time.NewTicker(s.keepaliveInterval)
	defer t.Stop()
	replies := make(chan error, 1)
	pending, missed := false, 0
	for {
		select {
		case <-sess.done:
			return
		case err := <-replies:
			if err != nil {
				return
			}
			pending, missed = false, 0
		case <-t.C:
			if pending {
				if missed++; missed >= s.keepaliveMax {
					log.Info("ssh connection closed: keepalives unanswered", "missed", missed)
					sess.conn.Close()
					return
				}
				continue
			}
			pending = true
			s.wg.Go(func() {
				// Any reply, true or false, proves the peer is alive.
				_, _, err := sess.conn.SendRequest("keepalive@openssh.com", true, nil)
				replies <- err // buffered; at most one request is pending
			})
		}
	}
}

// DropNode closes node's session at once (on revocation); its forwards
// vanish and OnChange is called if it had any. Call it after Lookup has
// started to report the node revoked, so that a session authenticating
// concurrently is refused or dropped too.
func (s *Server) DropNode(node string) {
	s.mu.Lock()
	sess := s.sessions[node]
	s.mu.Unlock()
	if sess != nil {
		s.dropSession(sess, "dropped")
	}
}

// Close closes every listener and connection and waits for all goroutines
// the server started (including running Serve calls) to end. It is
// idempotent and returns nil.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		s.wg.Wait()
		return nil
	}
	s.closed = true
	close(s.closing)
	changed := false
	var sessions []*session
	for _, sess := range s.sessions {
		changed = changed || len(sess.forwards) > 0
		sessions = append(sessions, sess)
	}
	clear(s.sessions)
	lns := make([]io.Closer, 0, len(s.listeners)+len(s.conns))
	for ln := range s.listeners {
		lns = append(lns, ln)
	}
	for c := range s.conns {
		lns = append(lns, c)
	}
	s.mu.Unlock()
	for _, sess := range sessions {
		sess.conn.Close()
	}
	for _, c := range lns {
		c.Close()
	}
	s.wg.Wait()
	if changed {
		s.changed()
	}
	return nil
}
