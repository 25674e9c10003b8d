package socks5

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"
)

const ioTimeout = 5 * time.Second

// upstream is a TCP server that runs handler for every connection.
type upstream struct {
	ln    net.Listener
	wg    sync.WaitGroup
	peers chan netip.AddrPort // remote addresses of accepted conns
}

func startUpstream(t *testing.T, network, addr string, handler func(net.Conn)) *upstream {
	t.Helper()
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	u := &upstream{ln: ln, peers: make(chan netip.AddrPort, 16)}
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			select {
			case u.peers <- c.RemoteAddr().(*net.TCPAddr).AddrPort():
			default:
			}
			u.wg.Add(1)
			go func() {
				defer u.wg.Done()
				defer c.Close()
				c.SetDeadline(time.Now().Add(ioTimeout))
				handler(c)
			}()
		}
	}()
	t.Cleanup(u.close)
	return u
}

func (u *upstream) close() { u.ln.Close(); u.wg.Wait() }

func (u *upstream) addr() netip.AddrPort { return u.ln.Addr().(*net.TCPAddr).AddrPort() }

// echo copies everything back and half-closes when the client does.
func echo(c net.Conn) {
	io.Copy(c, c)
	c.(*net.TCPConn).CloseWrite()
}

// testServer runs s on 127.0.0.1:0 and returns its address. Dial defaults to
// a net.Dialer recording the addresses it was asked for.
type testServer struct {
	*Server
	addr    string
	serveCh chan error
	mu      sync.Mutex
	dialed  []string
}

func startServer(t *testing.T, s *Server) *testServer {
	t.Helper()
	ts := &testServer{Server: s, serveCh: make(chan error, 1)}
	if s.Dial == nil {
		s.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
			ts.mu.Lock()
			ts.dialed = append(ts.dialed, network+" "+addr)
			ts.mu.Unlock()
			var d net.Dialer
			return d.DialContext(ctx, network, addr)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ts.addr = ln.Addr().String()
	go func() { ts.serveCh <- s.Serve(ln) }()
	t.Cleanup(func() {
		if err := closeWithin(s, ioTimeout); err != nil {
			t.Error(err)
		}
	})
	return ts
}

// closeWithin calls s.Close and fails if it does not return within d, so
// that a hanging Close fails the test instead of blocking it.
func closeWithin(s *Server, d time.Duration) error {
	done := make(chan error, 1)
	go func() { done <- s.Close() }()
	select {
	case err := <-done:
		return err
	case <-time.After(d):
		return errors.New("Close did not return")
	}
}

func (ts *testServer) dialedAddrs() []string {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	return append([]string(nil), ts.dialed...)
}

// client dials the SOCKS server and completes no-auth negotiation.
func client(t *testing.T, addr string) net.Conn {
	t.Helper()
	c := rawDial(t, addr)
	mustWrite(t, c, []byte{5, 1, 0})
	if got := mustRead(t, c, 2); !bytes.Equal(got, []byte{5, 0}) {
		t.Fatalf("method reply = %v, want [5 0]", got)
	}
	return c
}

func rawDial(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(ioTimeout))
	t.Cleanup(func() { c.Close() })
	return c
}

func mustWrite(t *testing.T, c net.Conn, b []byte) {
	t.Helper()
	if _, err := c.Write(b); err != nil {
		t.Fatal(err)
	}
}

func mustRead(t *testing.T, c net.Conn, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := io.ReadFull(c, b); err != nil {
		t.Fatalf("reading %d bytes: %v", n, err)
	}
	return b
}

// request builds a request with the given command for an IP address.
func request(cmd byte, ap netip.AddrPort) []byte {
	atyp := byte(atypIPv4)
	if ap.Addr().Is6() {
		atyp = atypIPv6
	}
	b := append([]byte{5, cmd, 0, atyp}, ap.Addr().AsSlice()...)
	return append(b, byte(ap.Port()>>8), byte(ap.Port()))
}

func domainRequest(name string, port uint16) []byte {
	b := append([]byte{5, cmdConnect, 0, atypDomain, byte(len(name))}, name...)
	return append(b, byte(port>>8), byte(port))
}

// readReply reads a reply and returns its code and bound address.
func readReply(t *testing.T, c net.Conn) (byte, netip.AddrPort) {
	t.Helper()
	h := mustRead(t, c, 4)
	if h[0] != 5 || h[2] != 0 {
		t.Fatalf("bad reply header %v", h)
	}
	var ip netip.Addr
	switch h[3] {
	case atypIPv4:
		ip = netip.AddrFrom4([4]byte(mustRead(t, c, 4)))
	case atypIPv6:
		ip = netip.AddrFrom16([16]byte(mustRead(t, c, 16)))
	default:
		t.Fatalf("reply ATYP %d", h[3])
	}
	p := mustRead(t, c, 2)
	return h[1], netip.AddrPortFrom(ip, uint16(p[0])<<8|uint16(p[1]))
}

// expectClosed asserts that the server closes c without sending anything.
func expectClosed(t *testing.T, c net.Conn) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(ioTimeout))
	n, err := c.Read(make([]byte, 16))
	if n != 0 {
		t.Fatalf("read %d bytes, want connection closed", n)
	}
	if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read error = %v, want EOF or reset", err)
	}
}

// expectReplyThenClose asserts that the server replies code and then closes.
func expectReplyThenClose(t *testing.T, c net.Conn, code byte) {
	t.Helper()
	if got, _ := readReply(t, c); got != code {
		t.Fatalf("reply code = %#x, want %#x", got, code)
	}
	expectClosed(t, c)
}

func roundTrip(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	mustWrite(t, c, []byte(msg))
	if got := string(mustRead(t, c, len(msg))); got != msg {
		t.Fatalf("echo = %q, want %q", got, msg)
	}
}

func TestConnectIPv4(t *testing.T) {
	up := startUpstream(t, "tcp", "127.0.0.1:0", echo)
	ts := startServer(t, &Server{})
	c := client(t, ts.addr)
	mustWrite(t, c, request(cmdConnect, up.addr()))
	code, bnd := readReply(t, c)
	if code != repSucceeded {
		t.Fatalf("reply code = %#x", code)
	}
	// BND.ADDR is the local address of the outbound conn, which the
	// upstream sees as its peer.
	if peer := <-up.peers; bnd != peer {
		t.Errorf("BND = %v, want upstream's peer %v", bnd, peer)
	}
	roundTrip(t, c, "hello")
	roundTrip(t, c, string(bytes.Repeat([]byte("x"), 1<<20)))
	if got, want := ts.dialedAddrs(), []string{"tcp " + up.addr().String()}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("dialed %v, want %v", got, want)
	}
	// Closing the client write side ends the echo, which closes the session.
	c.(*net.TCPConn).CloseWrite()
	if rest, err := io.ReadAll(c); err != nil || len(rest) != 0 {
		t.Errorf("after CloseWrite: read %q, %v; want EOF", rest, err)
	}
}

func TestConnectIPv6(t *testing.T) {
	ln, err := net.Listen("tcp6", "[::1]:0")
	if err != nil {
		t.Skipf("IPv6 loopback unavailable: %v", err)
	}
	ln.Close()
	up := startUpstream(t, "tcp6", "[::1]:0", echo)
	ts := startServer(t, &Server{})
	c := client(t, ts.addr)
	mustWrite(t, c, request(cmdConnect, up.addr()))
	code, bnd := readReply(t, c)
	if code != repSucceeded || !bnd.Addr().Is6() {
		t.Fatalf("reply = %#x %v, want success with IPv6 BND", code, bnd)
	}
	roundTrip(t, c, "hello over v6")
	if got, want := ts.dialedAddrs(), []string{"tcp " + up.addr().String()}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("dialed %v, want %v", got, want)
	}
}

func TestConnectDomain(t *testing.T) {
	up := startUpstream(t, "tcp", "127.0.0.1:0", echo)
	var resolved []string
	ts := startServer(t, &Server{Resolve: func(name string) (netip.Addr, bool) {
		resolved = append(resolved, name) // only called from one session
		if name == "echo.mesh" {
			return netip.MustParseAddr("127.0.0.1"), true
		}
		return netip.Addr{}, false
	}})
	c := client(t, ts.addr)
	mustWrite(t, c, domainRequest("echo.mesh", up.addr().Port()))
	if code, _ := readReply(t, c); code != repSucceeded {
		t.Fatalf("reply code = %#x", code)
	}
	roundTrip(t, c, "by name")
	want := fmt.Sprintf("tcp 127.0.0.1:%d", up.addr().Port())
	if got := ts.dialedAddrs(); len(got) != 1 || got[0] != want {
		t.Errorf("dialed %v, want [%s]", got, want)
	}
	if fmt.Sprint(resolved) != "[echo.mesh]" {
		t.Errorf("resolved %v, want [echo.mesh]", resolved)
	}
}

func TestDomainErrors(t *testing.T) {
	ts := startServer(t, &Server{Resolve: func(string) (netip.Addr, bool) { return netip.Addr{}, false }})
	for _, tc := range []struct {
		name string
		code byte
	}{
		{"unknown.mesh", repHostUnreachable},
		{"", repGeneralFailure},
		{"bad name\x00", repGeneralFailure},
	} {
		c := client(t, ts.addr)
		mustWrite(t, c, domainRequest(tc.name, 80))
		expectReplyThenClose(t, c, tc.code)
	}
	if got := ts.dialedAddrs(); len(got) != 0 {
		t.Errorf("Dial called for %v, want never", got)
	}
	// Without a Resolve function names are unreachable too.
	ts = startServer(t, &Server{})
	c := client(t, ts.addr)
	mustWrite(t, c, domainRequest("echo.mesh", 80))
	expectReplyThenClose(t, c, repHostUnreachable)
}

func TestDomainIPLiteral(t *testing.T) {
	up := startUpstream(t, "tcp", "127.0.0.1:0", echo)
	ts := startServer(t, &Server{Resolve: func(string) (netip.Addr, bool) {
		t.Error("Resolve called for an IP literal")
		return netip.Addr{}, false
	}})
	c := client(t, ts.addr)
	mustWrite(t, c, domainRequest("127.0.0.1", up.addr().Port()))
	if code, _ := readReply(t, c); code != repSucceeded {
		t.Fatalf("reply code = %#x", code)
	}
	roundTrip(t, c, "literal")
}

func TestHalfClose(t *testing.T) {
	// The upstream answers only after it has seen EOF.
	sawEOF := make(chan struct{})
	up := startUpstream(t, "tcp", "127.0.0.1:0", func(c net.Conn) {
		req, err := io.ReadAll(c)
		if err != nil {
			return
		}
		close(sawEOF)
		c.Write(append([]byte("got: "), req...))
	})
	ts := startServer(t, &Server{})
	c := client(t, ts.addr)
	mustWrite(t, c, request(cmdConnect, up.addr()))
	if code, _ := readReply(t, c); code != repSucceeded {
		t.Fatalf("reply code = %#x", code)
	}
	mustWrite(t, c, []byte("request"))
	if err := c.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sawEOF:
	case <-time.After(ioTimeout):
		t.Fatal("upstream did not see EOF after client CloseWrite")
	}
	resp, err := io.ReadAll(c)
	if err != nil || string(resp) != "got: request" {
		t.Fatalf("response = %q, %v; want %q", resp, err, "got: request")
	}
}

func TestNegotiation(t *testing.T) {
	ts := startServer(t, &Server{})
	t.Run("no acceptable method", func(t *testing.T) {
		c := rawDial(t, ts.addr)
		mustWrite(t, c, []byte{5, 2, 1, 2}) // GSSAPI, user/pass
		if got := mustRead(t, c, 2); !bytes.Equal(got, []byte{5, 0xFF}) {
			t.Fatalf("method reply = %v, want [5 255]", got)
		}
		expectClosed(t, c)
	})
	t.Run("zero methods", func(t *testing.T) {
		c := rawDial(t, ts.addr)
		mustWrite(t, c, []byte{5, 0})
		if got := mustRead(t, c, 2); !bytes.Equal(got, []byte{5, 0xFF}) {
			t.Fatalf("method reply = %v, want [5 255]", got)
		}
		expectClosed(t, c)
	})
	t.Run("version 4", func(t *testing.T) {
		c := rawDial(t, ts.addr)
		mustWrite(t, c, []byte{4, 1, 0, 80, 127, 0, 0, 1, 0})
		expectClosed(t, c)
	})
	target := netip.MustParseAddrPort("127.0.0.1:9")
	for _, tc := range []struct {
		name string
		req  []byte
		code byte
	}{
		{"bind", request(2, target), repCmdNotSupported},
		{"udp associate", request(3, target), repCmdNotSupported},
		{"unknown command", request(9, target), repCmdNotSupported},
		{"unknown atyp", []byte{5, cmdConnect, 0, 9, 1, 2, 3, 4, 0, 80}, repAddrNotSupported},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := client(t, ts.addr)
			mustWrite(t, c, tc.req)
			expectReplyThenClose(t, c, tc.code)
		})
	}
	if got := ts.dialedAddrs(); len(got) != 0 {
		t.Errorf("Dial called for %v, want never", got)
	}
}

func TestConnectionRefused(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	ts := startServer(t, &Server{})
	c := client(t, ts.addr)
	mustWrite(t, c, request(cmdConnect, closed))
	expectReplyThenClose(t, c, repConnRefused)
}

func TestDialTimeout(t *testing.T) {
	ts := startServer(t, &Server{
		DialTimeout: 50 * time.Millisecond,
		Dial: func(ctx context.Context, _, _ string) (net.Conn, error) {
			<-ctx.Done()
			return nil, ctx.Err()
		},
	})
	c := client(t, ts.addr)
	mustWrite(t, c, request(cmdConnect, netip.MustParseAddrPort("127.0.0.1:9")))
	expectReplyThenClose(t, c, repHostUnreachable)
}

func TestReplyCode(t *testing.T) {
	op := func(err error) error { return &net.OpError{Op: "dial", Net: "tcp", Err: err} }
	for _, tc := range []struct {
		err  error
		want byte
	}{
		{op(os.NewSyscallError("connect", syscall.ECONNREFUSED)), repConnRefused},
		{op(os.NewSyscallError("connect", syscall.ENETUNREACH)), repNetworkUnreachable},
		{op(os.NewSyscallError("connect", syscall.EHOSTUNREACH)), repHostUnreachable},
		{op(os.NewSyscallError("connect", syscall.ETIMEDOUT)), repHostUnreachable},
		{fmt.Errorf("dial: %w", context.DeadlineExceeded), repHostUnreachable},
		// gVisor netstack (gonet) errors carry only a message.
		{op(errors.New("connection was refused")), repConnRefused},
		{op(errors.New("network is unreachable")), repNetworkUnreachable},
		{op(errors.New("no route to host")), repHostUnreachable},
		{op(errors.New("operation timed out")), repHostUnreachable},
		{errors.New("something else"), repGeneralFailure},
		{context.Canceled, repGeneralFailure},
	} {
		if got := replyCode(tc.err); got != tc.want {
			t.Errorf("replyCode(%v) = %#x, want %#x", tc.err, got, tc.want)
		}
	}
}

func TestHandshakeTimeout(t *testing.T) {
	ts := startServer(t, &Server{HandshakeTimeout: 200 * time.Millisecond})
	// Silent client.
	c := rawDial(t, ts.addr)
	start := time.Now()
	expectClosed(t, c)
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Errorf("closed after %v, before the handshake timeout", d)
	}
	// Client that stalls after the greeting.
	c = client(t, ts.addr)
	mustWrite(t, c, []byte{5, cmdConnect})
	expectClosed(t, c)
}

func TestMaxConns(t *testing.T) {
	up := startUpstream(t, "tcp", "127.0.0.1:0", echo)
	ts := startServer(t, &Server{MaxConns: 2})
	open := func() net.Conn {
		c := client(t, ts.addr)
		mustWrite(t, c, request(cmdConnect, up.addr()))
		if code, _ := readReply(t, c); code != repSucceeded {
			t.Fatalf("reply code = %#x", code)
		}
		roundTrip(t, c, "x")
		return c
	}
	first := open()
	open()
	third := rawDial(t, ts.addr)
	mustWrite(t, third, []byte{5, 1, 0})
	expectClosed(t, third)

	// Ending a session frees its slot.
	first.Close()
	deadline := time.Now().Add(ioTimeout)
	for {
		c := rawDial(t, ts.addr)
		c.Write([]byte{5, 1, 0})
		b := make([]byte, 2)
		if _, err := io.ReadFull(c, b); err == nil && bytes.Equal(b, []byte{5, 0}) {
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatal("slot not freed after a session ended")
		}
		runtime.Gosched()
	}
}

func TestCloseEndsSessions(t *testing.T) {
	base := runtime.NumGoroutine()

	up := startUpstream(t, "tcp", "127.0.0.1:0", echo)
	ts := startServer(t, &Server{})
	var sessions []net.Conn
	for range 3 {
		c := client(t, ts.addr)
		mustWrite(t, c, request(cmdConnect, up.addr()))
		if code, _ := readReply(t, c); code != repSucceeded {
			t.Fatalf("reply code = %#x", code)
		}
		roundTrip(t, c, "before close")
		sessions = append(sessions, c)
	}
	handshaking := rawDial(t, ts.addr) // mid-handshake connection

	if err := closeWithin(ts.Server, ioTimeout); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-ts.serveCh:
		if err != nil {
			t.Fatalf("Serve returned %v, want nil", err)
		}
	case <-time.After(ioTimeout):
		t.Fatal("Serve did not return after Close")
	}
	for _, c := range append(sessions, handshaking) {
		if _, err := io.ReadAll(c); err != nil && errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("session still open after Close: %v", err)
		}
	}
	if err := ts.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	if _, err := net.Dial("tcp", ts.addr); err == nil {
		t.Error("listener still accepting after Close")
	}
	if got := len(ts.dialedAddrs()); got != 3 {
		t.Errorf("Dial called %d times, want 3", got)
	}

	up.close()
	for _, c := range append(sessions, handshaking) {
		c.Close()
	}
	deadline := time.Now().Add(ioTimeout)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("goroutines: %d, baseline %d\n%s", runtime.NumGoroutine(), base, buf[:runtime.Stack(buf, true)])
		}
		runtime.Gosched()
	}
}

func TestServeAfterClose(t *testing.T) {
	s := &Server{Dial: (&net.Dialer{}).DialContext}
	s.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Serve(ln); err != nil {
		t.Fatalf("Serve after Close = %v, want nil", err)
	}
	if _, err := net.Dial("tcp", ln.Addr().String()); err == nil {
		t.Error("listener not closed by Serve after Close")
	}
}
