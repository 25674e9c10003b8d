// Package socks5 implements a small, hardened SOCKS5 server (RFC 1928) that
// supports only the CONNECT command without authentication. Outbound
// connections are opened through a caller-supplied dialer (typically a
// userspace network stack that only reaches the mesh), and domain names are
// resolved only through a caller-supplied resolver: the system resolver is
// never used.
package socks5

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Defaults for the zero values of the corresponding Server fields.
const (
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultDialTimeout      = 10 * time.Second
	DefaultMaxConns         = 256
)

// SOCKS5 protocol constants.
const (
	version5 = 0x05

	methodNoAuth       = 0x00
	methodNoAcceptable = 0xFF

	cmdConnect = 0x01

	atypIPv4   = 0x01
	atypDomain = 0x03
	atypIPv6   = 0x04
)

// Reply codes (RFC 1928 section 6).
const (
	repSucceeded          = 0x00
	repGeneralFailure     = 0x01
	repNetworkUnreachable = 0x03
	repHostUnreachable    = 0x04
	repConnRefused        = 0x05
	repCmdNotSupported    = 0x07
	repAddrNotSupported   = 0x08
)

// Server is a SOCKS5 server whose outbound connections go through Dial.
//
// The exported fields must not be changed once Serve has been called.
type Server struct {
	// Dial opens the outbound connection (required), e.g. a netstack dialer
	// that only reaches the mesh. It is always called with network "tcp" and
	// an address of the form "1.2.3.4:80" or "[fd00::1]:80".
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)

	// Resolve maps a domain name from the client (ATYP 3) to an address; nil
	// or false → reply "host unreachable" (0x04). The server never uses the
	// system resolver: names are mesh names. Names that are IP literals are
	// used directly without calling Resolve.
	Resolve func(name string) (netip.Addr, bool)

	// Logger receives connection-level events (nil = discard). Payloads are
	// never logged.
	Logger *slog.Logger

	// HandshakeTimeout bounds greeting+request (default 10s).
	HandshakeTimeout time.Duration
	// DialTimeout bounds Dial (default 10s).
	DialTimeout time.Duration
	// MaxConns bounds concurrent client connections (default 256); beyond
	// it new connections are closed at once.
	MaxConns int

	mu        sync.Mutex
	closed    bool
	ctx       context.Context // cancelled by Close; parent of every Dial
	cancel    context.CancelFunc
	listeners map[net.Listener]struct{}
	conns     map[net.Conn]struct{} // client and upstream conns, closed by Close
	active    int                   // client sessions counted against MaxConns
	wg        sync.WaitGroup        // Serve loops and session goroutines
}

// initLocked lazily initialises internal state. s.mu must be held.
func (s *Server) initLocked() {
	if s.conns == nil {
		s.ctx, s.cancel = context.WithCancel(context.Background())
		s.listeners = make(map[net.Listener]struct{})
		s.conns = make(map[net.Conn]struct{})
	}
}

// Serve accepts connections on ln and serves each in its own goroutine. It
// returns nil after Close, otherwise the error from ln.Accept. Serve may be
// called for several listeners concurrently; ln is closed when Serve returns.
func (s *Server) Serve(ln net.Listener) error {
	if s.Dial == nil {
		ln.Close()
		return errors.New("socks5: Server.Dial is nil")
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return nil
	}
	s.initLocked()
	s.listeners[ln] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()

	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
		ln.Close()
		s.wg.Done()
	}()

	for {
		c, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return nil
			}
			return err
		}
		if !s.admit(c) {
			c.Close()
			continue
		}
		go s.handle(c)
	}
}

// Close closes the listeners and every active connection, cancels pending
// dials and waits until all goroutines started by the server have returned.
// It is idempotent.
func (s *Server) Close() error {
	var errs []error
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		s.initLocked()
		s.cancel()
		for ln := range s.listeners {
			if err := ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
				errs = append(errs, err)
			}
		}
		for c := range s.conns {
			c.Close()
		}
	}
	s.mu.Unlock()
	s.wg.Wait()
	return errors.Join(errs...)
}

// admit registers a new client connection, or reports false if the server
// is closed or full.
func (s *Server) admit(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	if s.active >= orDefault(s.MaxConns, DefaultMaxConns) {
		s.log().Warn("socks5: connection limit reached, rejecting", "client", c.RemoteAddr().String())
		return false
	}
	s.active++
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	return true
}

// track registers an upstream connection so that Close closes it; it
// reports false if the server is already closed.
func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	return true
}

func (s *Server) untrack(c net.Conn, client bool) {
	s.mu.Lock()
	delete(s.conns, c)
	if client {
		s.active--
	}
	s.mu.Unlock()
	c.Close()
}

func (s *Server) log() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.New(slog.DiscardHandler)
}

// orDefault returns v if positive, else def.
func orDefault[T int | time.Duration](v, def T) T {
	if v > 0 {
		return v
	}
	return def
}

// replyError is a handshake failure that is reported to the client with a
// SOCKS5 reply before the connection is closed.
type replyError struct {
	code byte
	err  error
}

func (e *replyError) Error() string { return fmt.Sprintf("reply 0x%02x: %v", e.code, e.err) }
func (e *replyError) Unwrap() error { return e.err }

func replyErr(code byte, format string, args ...any) error {
	return &replyError{code: code, err: fmt.Errorf(format, args...)}
}

func (s *Server) handle(c net.Conn) {
	defer s.wg.Done()
	defer s.untrack(c, true)
	log := s.log().With("client", c.RemoteAddr().String())

	c.SetDeadline(time.Now().Add(orDefault(s.HandshakeTimeout, DefaultHandshakeTimeout)))
	target, err := s.handshake(c)
	if err != nil {
		log.Debug("socks5: handshake failed", "err", err)
		var re *replyError
		if errors.As(err, &re) {
			writeReply(c, re.code, netip.AddrPort{})
			lingerClose(c)
		}
		return
	}

	ctx, cancel := context.WithTimeout(s.ctx, orDefault(s.DialTimeout, DefaultDialTimeout))
	up, err := s.Dial(ctx, "tcp", target)
	cancel()
	c.SetDeadline(time.Now().Add(orDefault(s.HandshakeTimeout, DefaultHandshakeTimeout)))
	if err != nil {
		code := replyCode(err)
		log.Debug("socks5: dial failed", "target", target, "reply", code, "err", err)
		writeReply(c, code, netip.AddrPort{})
		lingerClose(c)
		return
	}
	if !s.track(up) {
		up.Close()
		return
	}
	defer s.untrack(up, false)

	if err := writeReply(c, repSucceeded, addrPortOf(up.LocalAddr())); err != nil {
		log.Debug("socks5: writing reply failed", "target", target, "err", err)
		return
	}
	c.SetDeadline(time.Time{})

	log.Debug("socks5: connected", "target", target)
	sent, received := splice(c, up)
	log.Debug("socks5: closed", "target", target, "sent", sent, "received", received)
}

// handshake performs method negotiation and reads the request, returning the
// address to dial.
func (s *Server) handshake(c net.Conn) (string, error) {
	var hdr [2]byte
	if _, err := io.ReadFull(c, hdr[:]); err != nil {
		return "", err
	}
	if hdr[0] != version5 {
		return "", fmt.Errorf("unsupported version %d", hdr[0])
	}
	methods := make([]byte, hdr[1])
	if _, err := io.ReadFull(c, methods); err != nil {
		return "", err
	}
	if !bytes.Contains(methods, []byte{methodNoAuth}) {
		c.Write([]byte{version5, methodNoAcceptable})
		lingerClose(c)
		return "", errors.New("client does not offer the no-authentication method")
	}
	if _, err := c.Write([]byte{version5, methodNoAuth}); err != nil {
		return "", err
	}

	var req [4]byte // VER CMD RSV ATYP
	if _, err := io.ReadFull(c, req[:]); err != nil {
		return "", err
	}
	if req[0] != version5 {
		return "", replyErr(repGeneralFailure, "unsupported request version %d", req[0])
	}
	// Read the whole address before rejecting a command, so that no unread
	// request bytes make the kernel reset the connection over our reply.
	var (
		ip   netip.Addr
		name string
	)
	switch req[3] {
	case atypIPv4:
		var b [4]byte
		if _, err := io.ReadFull(c, b[:]); err != nil {
			return "", err
		}
		ip = netip.AddrFrom4(b)
	case atypIPv6:
		var b [16]byte
		if _, err := io.ReadFull(c, b[:]); err != nil {
			return "", err
		}
		ip = netip.AddrFrom16(b).Unmap()
	case atypDomain:
		var n [1]byte
		if _, err := io.ReadFull(c, n[:]); err != nil {
			return "", err
		}
		b := make([]byte, n[0])
		if _, err := io.ReadFull(c, b); err != nil {
			return "", err
		}
		name = string(b)
	default:
		return "", replyErr(repAddrNotSupported, "unsupported address type %d", req[3])
	}
	var p [2]byte
	if _, err := io.ReadFull(c, p[:]); err != nil {
		return "", err
	}
	port := uint16(p[0])<<8 | uint16(p[1])

	if req[1] != cmdConnect {
		return "", replyErr(repCmdNotSupported, "unsupported command %d", req[1])
	}
	if req[3] == atypDomain {
		var err error
		if ip, err = s.resolve(name); err != nil {
			return "", err
		}
	}
	return netip.AddrPortFrom(ip, port).String(), nil
}

// resolve maps a client-supplied name to an address through s.Resolve.
func (s *Server) resolve(name string) (netip.Addr, error) {
	if ip, err := netip.ParseAddr(name); err == nil && ip.Zone() == "" {
		return ip.Unmap(), nil
	}
	if !validName(name) {
		return netip.Addr{}, replyErr(repGeneralFailure, "invalid domain name %q", name)
	}
	if s.Resolve != nil {
		if ip, ok := s.Resolve(name); ok && ip.IsValid() {
			return ip.Unmap(), nil
		}
	}
	return netip.Addr{}, replyErr(repHostUnreachable, "cannot resolve %q", name)
}

// validName reports whether name is a plausible host name: non-empty, at
// most 253 bytes, letters, digits, '-', '_' and '.' only.
func validName(name string) bool {
	if name == "" || len(name) > 253 {
		return false
	}
	for i := 0; i < len(name); i++ {
		switch b := name[i]; {
		case 'a' <= b && b <= 'z', 'A' <= b && b <= 'Z', '0' <= b && b <= '9',
			b == '-', b == '_', b == '.':
		default:
			return false
		}
	}
	return true
}

// replyCode maps a Dial error to a SOCKS5 reply code. Both kernel errors
// (errno) and gVisor netstack errors (which only carry a message) are
// recognised. Timeouts are reported as "host unreachable" (0x04) rather
// than "TTL expired" (0x06), as most clients and servers do.
func replyCode(err error) byte {
	switch {
	case errors.Is(err, syscall.ECONNREFUSED):
		return repConnRefused
	case errors.Is(err, syscall.ENETUNREACH):
		return repNetworkUnreachable
	case errors.Is(err, syscall.EHOSTUNREACH), errors.Is(err, syscall.EHOSTDOWN):
		return repHostUnreachable
	case errors.Is(err, context.DeadlineExceeded), errors.Is(err, syscall.ETIMEDOUT):
		return repHostUnreachable
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return repHostUnreachable
	}
	msg := err.Error()
	switch {
	case strings.HasSuffix(msg, "connection was refused"), strings.HasSuffix(msg, "connection refused"):
		return repConnRefused
	case strings.HasSuffix(msg, "network is unreachable"):
		return repNetworkUnreachable
	case strings.HasSuffix(msg, "no route to host"), strings.HasSuffix(msg, "host is down"),
		strings.HasSuffix(msg, "timed out"):
		return repHostUnreachable
	}
	return repGeneralFailure
}

// addrPortOf returns a as an AddrPort for BND.ADDR/BND.PORT, or the zero
// value (sent as 0.0.0.0:0) if it cannot be represented.
func addrPortOf(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		return ta.AddrPort()
	}
	if a != nil {
		if ap, err := netip.ParseAddrPort(a.String()); err == nil {
			return ap
		}
	}
	return netip.AddrPort{}
}

// writeReply writes a reply with the given code and bound address.
func writeReply(c net.Conn, code byte, bnd netip.AddrPort) error {
	ip := bnd.Addr().Unmap()
	b := make([]byte, 0, 22)
	switch {
	case ip.Is6():
		b = append(b, version5, code, 0, atypIPv6)
		b = append(b, ip.AsSlice()...)
	case ip.Is4():
		b = append(b, version5, code, 0, atypIPv4)
		b = append(b, ip.AsSlice()...)
	default:
		b = append(b, version5, code, 0, atypIPv4, 0, 0, 0, 0)
	}
	b = append(b, byte(bnd.Port()>>8), byte(bnd.Port()))
	_, err := c.Write(b)
	return err
}

type closeWriter interface{ CloseWrite() error }

// lingerTimeout bounds how long lingerClose waits for the client to close.
const lingerTimeout = time.Second

// lingerClose half-closes c and discards what the client still sends (for
// at most lingerTimeout), so that unread input does not make the
// kernel reset the connection before the client has read our reply.
func lingerClose(c net.Conn) {
	if cw, ok := c.(closeWriter); ok && cw.CloseWrite() == nil {
		c.SetReadDeadline(time.Now().Add(lingerTimeout))
		io.CopyN(io.Discard, c, 64<<10)
	}
}

// splice copies data both ways until both directions have ended,
// propagating half-closes. It returns the byte counts client→upstream and
// upstream→client.
func splice(client, up net.Conn) (sent, received int64) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		received = pipe(client, up)
	}()
	sent = pipe(up, client)
	wg.Wait()
	return sent, received
}

// pipe copies src to dst. On EOF it half-closes dst so the peer sees the
// end of the stream while the other direction keeps flowing; on an error,
// or if dst cannot be half-closed, it closes both so the other direction
// ends too.
func pipe(dst, src net.Conn) int64 {
	n, err := io.Copy(dst, src)
	if cw, ok := dst.(closeWriter); ok && err == nil && cw.CloseWrite() == nil {
		return n
	}
	dst.Close()
	src.Close()
	return n
}
