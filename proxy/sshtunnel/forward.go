package sshtunnel

import (
	"cmp"
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/meshctl/meshctl/wire"
)

// defaultService mirrors proxy.DefaultService (not imported, to keep this
// package free of a dependency on its importer).
const defaultService = "web"

// forwardMsg is the payload of tcpip-forward and cancel-tcpip-forward
// (RFC 4254 section 7.1).
type forwardMsg struct {
	Addr string
	Port uint32
}

// forwardedTCPMsg is the extra data of a forwarded-tcpip channel open
// (RFC 4254 section 7.2).
type forwardedTCPMsg struct {
	Addr       string
	Port       uint32
	OriginAddr string
	OriginPort uint32
}

// handleRequest answers a global request. Only the allow-listed types can
// succeed; everything else gets false.
func (s *Server) handleRequest(sess *session, req *ssh.Request, log *slog.Logger) {
	ok := false
	switch req.Type {
	case "keepalive@openssh.com":
		ok = true
	case "tcpip-forward":
		ok = s.addForward(sess, req.Payload, log)
	case "cancel-tcpip-forward":
		ok = s.cancelForward(sess, req.Payload, log)
	default:
		log.Debug("ssh global request refused", "type", req.Type)
	}
	req.Reply(ok, nil) // no payload: the port is never allocated
}

// addForward records a tcpip-forward after checking the bind address names
// one of the node's own services. No port is bound.
func (s *Server) addForward(sess *session, payload []byte, log *slog.Logger) bool {
	var m forwardMsg
	if err := ssh.Unmarshal(payload, &m); err != nil {
		log.Info("tcpip-forward refused: bad payload")
		return false
	}
	if m.Port == 0 || m.Port > 65535 {
		log.Info("tcpip-forward refused: the port must be 1-65535 (it only names the forward)", "addr", m.Addr, "port", m.Port)
		return false
	}
	info, ok := s.o.Lookup(sess.node)
	if !ok {
		s.dropSession(sess, "node revoked")
		return false
	}
	svc, ok := resolveBind(sess.node, m.Addr, info.Services)
	if !ok {
		log.Info("tcpip-forward refused: bind address must be <node> or <service>--<node> for one of this node's services", "addr", m.Addr, "port", m.Port)
		return false
	}
	s.mu.Lock()
	switch {
	case s.sessions[sess.node] != sess:
		s.mu.Unlock()
		return false // replaced or dropped meanwhile
	case len(sess.forwards) >= s.o.MaxForwards:
		s.mu.Unlock()
		log.Info("tcpip-forward refused: too many forwards", "limit", s.o.MaxForwards)
		return false
	case sess.findForward(m.Addr, m.Port) >= 0:
		s.mu.Unlock()
		log.Info("tcpip-forward refused: already forwarded", "addr", m.Addr, "port", m.Port)
		return false
	}
	sess.forwards = append(sess.forwards, forward{service: svc, addr: m.Addr, port: m.Port})
	s.mu.Unlock()
	log.Info("forward added", "service", svc, "addr", m.Addr, "port", m.Port)
	s.changed()
	return true
}

// cancelForward removes the forward with the same bind address and port.
func (s *Server) cancelForward(sess *session, payload []byte, log *slog.Logger) bool {
	var m forwardMsg
	if err := ssh.Unmarshal(payload, &m); err != nil {
		return false
	}
	s.mu.Lock()
	i := sess.findForward(m.Addr, m.Port)
	if i < 0 {
		s.mu.Unlock()
		return false
	}
	sess.forwards = slices.Delete(sess.forwards, i, i+1)
	current := s.sessions[sess.node] == sess
	s.mu.Unlock()
	log.Info("forward cancelled", "addr", m.Addr, "port", m.Port)
	if current {
		s.changed()
	}
	return true
}

// findForward returns the index of the forward of addr (case-insensitive)
// and port, or -1. Server.mu must be held.
func (sess *session) findForward(addr string, port uint32) int {
	return slices.IndexFunc(sess.forwards, func(f forward) bool {
		return f.port == port && strings.EqualFold(f.addr, addr)
	})
}

// resolveBind maps a tcpip-forward bind address to the service it
// publishes: "<node>" is the default service, "<service>--<node>" a named
// one, compared after lower-casing. Everything else is refused, including
// other nodes' names, IP literals, "", "localhost" and "*".
func resolveBind(node, addr string, services []wire.Service) (string, bool) {
	a := strings.ToLower(addr)
	if a == "" || a == "localhost" || a == "*" || strings.ContainsAny(a, "[]:%") {
		return "", false
	}
	if _, err := netip.ParseAddr(a); err == nil {
		return "", false
	}
	names := serviceNames(services)
	if a == node {
		if slices.Contains(names, defaultService) {
			return defaultService, true
		}
		if len(names) > 0 {
			return names[0], true
		}
		return "", false
	}
	svc, rest, found := strings.Cut(a, "--")
	if !found || rest != node || !slices.Contains(names, svc) {
		return "", false
	}
	return svc, true
}

// serviceNames returns the valid service names, in order, without
// duplicates.
func serviceNames(services []wire.Service) []string {
	var names []string
	for _, sv := range services {
		if validName(sv.Name) && !slices.Contains(names, sv.Name) {
			names = append(names, sv.Name)
		}
	}
	return names
}

// hasService reports whether services contains the valid name svc.
func hasService(services []wire.Service, svc string) bool {
	return slices.Contains(serviceNames(services), svc)
}

// validHostLabel reports whether l is a DNS label: 1 to 63 lower-case
// letters, digits and hyphens, not starting or ending with a hyphen.
func validHostLabel(l string) bool {
	if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
		return false
	}
	for _, c := range []byte(l) {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return false
		}
	}
	return true
}

// validName mirrors the coordinator's node and service name rules: a
// lower-case DNS label without "--".
func validName(n string) bool {
	return validHostLabel(n) && !strings.Contains(n, "--")
}

// Forwards returns the services currently published through tunnels, one
// entry per node and service (however many forwards carry it), sorted by
// node, then service. Only current sessions count.
func (s *Server) Forwards() []Forward {
	s.mu.Lock()
	var out []Forward
	for node, sess := range s.sessions {
		for _, f := range sess.forwards {
			out = append(out, Forward{Node: node, Service: f.service})
		}
	}
	s.mu.Unlock()
	slices.SortFunc(out, func(a, b Forward) int {
		return cmp.Or(strings.Compare(a.Node, b.Node), strings.Compare(a.Service, b.Service))
	})
	return slices.Compact(out)
}

// Dial opens a connection to service on node: a "forwarded-tcpip" channel
// on the node's current session, for the first forward that publishes the
// service, with the forward's bind address and port as the connected
// address and 127.0.0.1 with a made-up non-zero port as the originator
// (clients such as x/crypto/ssh refuse port 0). It fails with ErrNoForward
// if no session forwards the service or Lookup no longer allows it (a
// revoked node's session is dropped), with ErrTooManyChannels at the
// MaxChannels limit, and with ctx's error if ctx ends before the node
// accepts the channel.
//
// The returned net.Conn supports CloseWrite. Its deadlines work for
// operations that start after they pass; one that passes while a Read or
// Write is blocked closes the channel (an SSH channel read cannot be
// interrupted otherwise) and the blocked call returns a timeout error.
func (s *Server) Dial(ctx context.Context, node, service string) (net.Conn, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	noForward := fmt.Errorf("%w for service %q of node %q", ErrNoForward, service, node)
	s.mu.Lock()
	sess := s.sessions[node]
	s.mu.Unlock()
	if sess == nil {
		return nil, noForward
	}
	info, ok := s.o.Lookup(node)
	if !ok {
		s.dropSession(sess, "node revoked")
		return nil, noForward
	}
	if !hasService(info.Services, service) {
		return nil, noForward
	}
	s.mu.Lock()
	i := slices.IndexFunc(sess.forwards, func(f forward) bool { return f.service == service })
	switch {
	case s.closed || s.sessions[node] != sess || i < 0:
		s.mu.Unlock()
		return nil, noForward
	case sess.channels >= s.o.MaxChannels:
		s.mu.Unlock()
		return nil, fmt.Errorf("%w: node %q already has %d", ErrTooManyChannels, node, s.o.MaxChannels)
	}
	f := sess.forwards[i]
	sess.channels++
	if s.origPort++; s.origPort < 32768 || s.origPort > 60999 {
		s.origPort = 32768 // a Linux ephemeral port
	}
	origin := s.origPort
	s.wg.Add(2) // the opener below and the conn's drainer
	s.mu.Unlock()

	c := &channelConn{
		s:      s,
		sess:   sess,
		local:  &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: int(origin)},
		remote: tunnelAddr(service + "--" + node),
	}
	payload := ssh.Marshal(forwardedTCPMsg{Addr: f.addr, Port: f.port, OriginAddr: "127.0.0.1", OriginPort: origin})
	opened := make(chan error) // unbuffered: exactly one side owns the channel
	go func() {
		defer s.wg.Done()
		ch, reqs, err := sess.conn.OpenChannel("forwarded-tcpip", payload)
		if err == nil {
			c.ch = ch
			go c.drain(reqs)
		} else {
			s.wg.Done() // no drainer
			c.release()
		}
		select {
		case opened <- err:
		case <-ctx.Done():
			if err == nil {
				c.Close()
			}
		}
	}()
	select {
	case err := <-opened:
		if err != nil {
			return nil, fmt.Errorf("sshtunnel: open channel to %s of node %q: %w", service, node, err)
		}
		return c, nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// tunnelAddr is the RemoteAddr of a Dial connection: "<service>--<node>".
type tunnelAddr string

func (a tunnelAddr) Network() string { return "sshtunnel" }
func (a tunnelAddr) String() string  { return string(a) }

// channelConn adapts an SSH channel opened by Dial to net.Conn.
type channelConn struct {
	s             *Server
	sess          *session
	ch            ssh.Channel // nil if opening failed
	local, remote net.Addr

	releaseOnce sync.Once
	mu          sync.Mutex // guards rd, wr
	rd, wr      deadline
}

// deadline is one direction's deadline state.
type deadline struct {
	t      time.Time
	timer  *time.Timer
	active int  // calls blocked in this direction
	fired  bool // the deadline closed the channel
}

// drain discards channel requests and stderr data (which would otherwise
// hold the channel's window) until the channel closes.
func (c *channelConn) drain(reqs <-chan *ssh.Request) {
	defer c.s.wg.Done()
	done := make(chan struct{})
	go func() {
		defer close(done)
		ssh.DiscardRequests(reqs)
	}()
	buf := make([]byte, 4096)
	for {
		if _, err := c.ch.Stderr().Read(buf); err != nil {
			break
		}
	}
	<-done
}

func (c *channelConn) release() {
	c.releaseOnce.Do(func() {
		c.s.mu.Lock()
		c.sess.channels--
		c.s.mu.Unlock()
	})
}

func (c *channelConn) Read(p []byte) (int, error) {
	if err := c.begin(&c.rd); err != nil {
		return 0, err
	}
	n, err := c.ch.Read(p)
	return n, c.end(&c.rd, err)
}

func (c *channelConn) Write(p []byte) (int, error) {
	if err := c.begin(&c.wr); err != nil {
		return 0, err
	}
	n, err := c.ch.Write(p)
	return n, c.end(&c.wr, err)
}

// CloseWrite sends EOF to the node; reading continues.
func (c *channelConn) CloseWrite() error { return c.ch.CloseWrite() }

// Close closes the channel and frees its MaxChannels slot.
func (c *channelConn) Close() error {
	c.mu.Lock()
	for _, d := range []*deadline{&c.rd, &c.wr} {
		if d.timer != nil {
			d.timer.Stop()
			d.timer = nil
		}
	}
	c.mu.Unlock()
	c.release()
	return c.ch.Close()
}

func (c *channelConn) LocalAddr() net.Addr  { return c.local }
func (c *channelConn) RemoteAddr() net.Addr { return c.remote }

func (c *channelConn) SetDeadline(t time.Time) error {
	c.SetReadDeadline(t)
	return c.SetWriteDeadline(t)
}
func (c *channelConn) SetReadDeadline(t time.Time) error  { c.set(&c.rd, t); return nil }
func (c *channelConn) SetWriteDeadline(t time.Time) error { c.set(&c.wr, t); return nil }

func (c *channelConn) begin(d *deadline) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if d.fired || !d.t.IsZero() && !time.Now().Before(d.t) {
		return os.ErrDeadlineExceeded
	}
	d.active++
	return nil
}

func (c *channelConn) end(d *deadline, err error) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	d.active--
	if err != nil && d.fired {
		return os.ErrDeadlineExceeded
	}
	return err
}

func (c *channelConn) set(d *deadline, t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	d.t = t
	if d.timer != nil {
		d.timer.Stop()
		d.timer = nil
	}
	if t.IsZero() {
		return
	}
	d.timer = time.AfterFunc(time.Until(t), func() {
		c.mu.Lock()
		abort := d.t.Equal(t) && d.active > 0
		if abort {
			d.fired = true
		}
		c.mu.Unlock()
		if abort {
			c.ch.Close()
		}
	})
}
