package relay

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshctl/meshctl/pki"
)

type msg struct {
	src [32]byte
	pkt []byte
	err error
}

type env struct {
	t        *testing.T
	ca       *pki.CA
	srv      *Server
	addr     string
	serveErr chan error

	mu   sync.Mutex
	keys map[string][32]byte // Lookup table

	offset atomic.Int64 // added to time.Now for Options.Now
}

func newCA(t *testing.T) *pki.CA {
	t.Helper()
	ca, _, err := pki.LoadOrCreateCA(t.TempDir(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func newEnv(t *testing.T, mod func(*Options)) *env {
	t.Helper()
	e := &env{t: t, ca: newCA(t), keys: map[string][32]byte{}, serveErr: make(chan error, 1)}
	sc, err := e.ca.IssueServerCert([]string{"127.0.0.1"}, time.Now(), 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	o := Options{
		TLSCert:  sc,
		ClientCA: e.ca.Cert,
		Lookup: func(id string) ([32]byte, bool) {
			e.mu.Lock()
			defer e.mu.Unlock()
			k, ok := e.keys[id]
			return k, ok
		},
		Now: func() time.Time { return time.Now().Add(time.Duration(e.offset.Load())) },
	}
	if mod != nil {
		mod(&o)
	}
	e.srv, err = New(o)
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.addr = ln.Addr().String()
	go func() { e.serveErr <- e.srv.Serve(ln) }()
	t.Cleanup(func() { e.srv.Close() })
	return e
}

func randKey(t *testing.T) [32]byte {
	var k [32]byte
	if _, err := rand.Read(k[:]); err != nil {
		t.Fatal(err)
	}
	return k
}

// certFrom issues a client certificate for id from ca.
func certFrom(t *testing.T, ca *pki.CA, id string, now time.Time) tls.Certificate {
	t.Helper()
	key, err := pki.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	csr, err := pki.NewCSR(key, id)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := ca.SignClientCSR(csr, id, now, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{leaf.Raw}, PrivateKey: key, Leaf: leaf}
}

// node registers id in Lookup with a fresh key and returns its certificate.
func (e *env) node(id string) (tls.Certificate, [32]byte) {
	k := randKey(e.t)
	e.mu.Lock()
	e.keys[id] = k
	e.mu.Unlock()
	return certFrom(e.t, e.ca, id, time.Now()), k
}

func (e *env) dial(cert tls.Certificate) (*Client, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return Dial(ctx, e.addr, cert, e.ca.Cert)
}

// connect dials as id, starts a receive loop and waits until the server
// lists id as connected.
func (e *env) connect(id string) (*Client, [32]byte, <-chan msg) {
	e.t.Helper()
	cert, key := e.node(id)
	c, ch := e.connectCert(id, cert)
	return c, key, ch
}

func (e *env) connectCert(id string, cert tls.Certificate) (*Client, <-chan msg) {
	e.t.Helper()
	c, err := e.dial(cert)
	if err != nil {
		e.t.Fatalf("dial %s: %v", id, err)
	}
	e.t.Cleanup(func() { c.Close() })
	ch := recvLoop(c)
	e.waitFor(func() bool { return slices.Contains(e.srv.Connected(), id) }, id+" connected")
	return c, ch
}

// recvErr returns the error of c's first Recv, or nil if it is still
// blocked after 5 s (the connection was accepted).
func recvErr(c *Client) error {
	ch := make(chan error, 1)
	go func() {
		_, _, err := c.Recv()
		ch <- err
	}()
	select {
	case err := <-ch:
		if err == nil {
			return nil
		}
		return err
	case <-time.After(5 * time.Second):
		return nil
	}
}

func recvLoop(c *Client) <-chan msg {
	ch := make(chan msg, 4096)
	go func() {
		defer close(ch)
		for {
			src, pkt, err := c.Recv()
			ch <- msg{src, pkt, err}
			if err != nil {
				return
			}
		}
	}()
	return ch
}

// waitFor polls cond until it holds or a 5 s deadline passes.
func (e *env) waitFor(cond func() bool, what string) {
	e.t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			e.t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

func expect(t *testing.T, ch <-chan msg, src [32]byte, pkt []byte) {
	t.Helper()
	select {
	case m, ok := <-ch:
		if !ok || m.err != nil {
			t.Fatalf("recv: closed=%v err=%v", !ok, m.err)
		}
		if m.src != src {
			t.Fatalf("source key %x, want %x", m.src[:4], src[:4])
		}
		if !bytes.Equal(m.pkt, pkt) {
			t.Fatalf("payload differs: got %d bytes %x..., want %d bytes %x...", len(m.pkt), head(m.pkt), len(pkt), head(pkt))
		}
	case <-time.After(5 * time.Second):
		t.Fatal("timed out waiting for packet")
	}
}

func head(b []byte) []byte { return b[:min(8, len(b))] }

// expectClosed waits for the receive loop to report an error.
func expectClosed(t *testing.T, ch <-chan msg, what string) {
	t.Helper()
	timeout := time.After(5 * time.Second)
	for {
		select {
		case m, ok := <-ch:
			if !ok || m.err != nil {
				return
			}
			t.Fatalf("%s: received a packet, want the connection closed", what)
		case <-timeout:
			t.Fatalf("%s: connection still open", what)
		}
	}
}

func wgPacket(t *testing.T, typ byte, n int) []byte {
	p := make([]byte, n)
	if _, err := rand.Read(p); err != nil {
		t.Fatal(err)
	}
	p[0], p[1], p[2], p[3] = typ, 0, 0, 0
	return p
}

func TestExchange(t *testing.T) {
	e := newEnv(t, nil)
	a, ka, cha := e.connect("node-a")
	b, kb, chb := e.connect("node-b")
	if got := e.srv.Connected(); !slices.Equal(got, []string{"node-a", "node-b"}) {
		t.Fatalf("Connected() = %v", got)
	}
	for _, p := range [][]byte{wgPacket(t, 4, 32+200), wgPacket(t, 1, 148), wgPacket(t, 2, 92), wgPacket(t, 3, 64), wgPacket(t, 4, 65535)} {
		if err := a.Send(kb, p); err != nil {
			t.Fatal(err)
		}
		expect(t, chb, ka, p)
		q := wgPacket(t, p[0], len(p))
		if err := b.Send(ka, q); err != nil {
			t.Fatal(err)
		}
		expect(t, cha, kb, q)
	}
}

func TestNonWireGuardDropped(t *testing.T) {
	e := newEnv(t, nil)
	a, _, _ := e.connect("node-a")
	_, kb, chb := e.connect("node-b")
	badInit := wgPacket(t, 1, 100) // type 1 with the wrong length
	badReserved := wgPacket(t, 4, 64)
	badReserved[2] = 7
	junk := [][]byte{
		[]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
		badInit,
		badReserved,
		wgPacket(t, 4, 31), // too short for transport data
		wgPacket(t, 5, 64), // unknown type
	}
	for _, j := range junk {
		if err := a.Send(kb, j); err != nil {
			t.Fatal(err)
		}
	}
	marker := wgPacket(t, 4, 48)
	if err := a.Send(kb, marker); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-chb:
		if m.err != nil || !bytes.Equal(m.pkt, marker) {
			t.Fatalf("first packet delivered is not the marker (err %v, %q)", m.err, head(m.pkt))
		}
	case <-time.After(5 * time.Second):
		t.Fatal("marker not delivered")
	}
	if n := e.srv.dropNotWG.Load(); n != uint64(len(junk)) {
		t.Fatalf("dropped %d non-WireGuard payloads, want %d", n, len(junk))
	}
}

func TestRefused(t *testing.T) {
	e := newEnv(t, nil)
	other := newCA(t)
	goodCert, _ := e.node("good")

	cases := []struct {
		name  string
		cert  tls.Certificate
		setup func()
		reset func()
	}{
		{name: "no certificate", cert: tls.Certificate{}},
		{name: "other CA", cert: certFrom(t, other, "good", time.Now())},
		{name: "expired", cert: goodCert,
			setup: func() { e.offset.Store(int64(48 * time.Hour)) },
			reset: func() { e.offset.Store(0) }},
		{name: "not yet valid", cert: goodCert,
			setup: func() { e.offset.Store(int64(-time.Hour)) },
			reset: func() { e.offset.Store(0) }},
		{name: "unknown node", cert: certFrom(t, e.ca, "stranger", time.Now())},
		{name: "server certificate as client", cert: func() tls.Certificate {
			c, err := e.ca.IssueServerCert([]string{"good"}, time.Now(), time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			return c
		}()},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if tc.setup != nil {
				tc.setup()
				defer tc.reset()
			}
			before := e.srv.refusedConn.Load()
			c, err := e.dial(tc.cert)
			if err == nil {
				defer c.Close()
				// A refused connection is closed by the server.
				if err = recvErr(c); err == nil {
					t.Fatal("connection accepted")
				}
			}
			t.Logf("client error: %v", err)
			e.waitFor(func() bool { return e.srv.refusedConn.Load() == before+1 }, "the server to count the refusal")
			if got := e.srv.Connected(); len(got) != 0 {
				t.Fatalf("Connected() = %v", got)
			}
		})
	}

	// Revoked (removed from Lookup) after it was issued, then it tries again.
	e.mu.Lock()
	delete(e.keys, "good")
	e.mu.Unlock()
	c, err := e.dial(goodCert)
	if err == nil {
		defer c.Close()
		if err = recvErr(c); err == nil {
			t.Fatal("revoked node accepted")
		}
	}

	// The good certificate works when the node is known (the refusals above
	// are not a broken setup).
	e.mu.Lock()
	e.keys["good"] = randKey(t)
	e.mu.Unlock()
	e.connectCert("good", goodCert)
}

func TestDrop(t *testing.T) {
	e := newEnv(t, nil)
	a, _, cha := e.connect("node-a")
	_, kb, chb := e.connect("node-b")
	e.srv.Drop("node-a")
	if got := e.srv.Connected(); !slices.Equal(got, []string{"node-b"}) {
		t.Fatalf("after Drop, Connected() = %v", got)
	}
	expectClosed(t, cha, "dropped node")
	if err := a.Send(kb, wgPacket(t, 4, 40)); err == nil {
		// The write may still succeed locally; it must not be delivered.
		e.waitFor(func() bool { return e.srv.forwarded.Load() == 0 }, "nothing forwarded")
	}
	select {
	case m := <-chb:
		t.Fatalf("B received %v after A was dropped", m)
	default:
	}
}

func TestRevokedWhileConnected(t *testing.T) {
	e := newEnv(t, nil)
	a, _, cha := e.connect("node-a")
	b, kb, chb := e.connect("node-b")
	e.mu.Lock()
	delete(e.keys, "node-a")
	e.mu.Unlock()
	// Within the re-check interval A may still send; after it the next send
	// closes A.
	e.offset.Store(int64(2 * time.Second))
	_ = a.Send(kb, wgPacket(t, 4, 40))
	expectClosed(t, cha, "revoked node")
	e.waitFor(func() bool { return !slices.Contains(e.srv.Connected(), "node-a") }, "node-a gone")
	// B, still known, is unaffected.
	if got := e.srv.Connected(); !slices.Equal(got, []string{"node-b"}) {
		t.Fatalf("Connected() = %v", got)
	}
	if n := e.srv.forwarded.Load(); n != 0 {
		t.Fatalf("%d packets from the revoked node were forwarded", n)
	}
	_, _ = b, chb
}

func TestUnknownDestination(t *testing.T) {
	e := newEnv(t, nil)
	a, ka, _ := e.connect("node-a")
	_, kb, chb := e.connect("node-b")
	if err := a.Send(randKey(t), wgPacket(t, 4, 64)); err != nil {
		t.Fatalf("send to unknown key: %v", err)
	}
	if err := a.Send(ka, wgPacket(t, 4, 64)); err != nil { // to itself
		t.Fatalf("send to own key: %v", err)
	}
	p := wgPacket(t, 4, 80)
	if err := a.Send(kb, p); err != nil {
		t.Fatal(err)
	}
	expect(t, chb, ka, p)
	if n := e.srv.dropNoDst.Load(); n != 2 {
		t.Fatalf("dropped %d packets without destination, want 2", n)
	}
	if got := e.srv.Connected(); !slices.Equal(got, []string{"node-a", "node-b"}) {
		t.Fatalf("Connected() = %v", got)
	}
}

func TestBadFrameClosesConnection(t *testing.T) {
	e := newEnv(t, nil)
	cert, _ := e.node("node-a")
	for _, tc := range []struct {
		name string
		typ  byte
		n    int
	}{{"type 2 from client", 2, 40}, {"type 0", 0, 40}, {"zero length", 1, 0}} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := pki.CATLSConfig(e.ca.Cert)
			cfg.Certificates = []tls.Certificate{cert}
			conn, err := tls.Dial("tcp", e.addr, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			e.waitFor(func() bool { return slices.Contains(e.srv.Connected(), "node-a") }, "connected")
			f := make([]byte, headerLen+tc.n)
			f[0] = tc.typ
			binary.BigEndian.PutUint16(f[33:], uint16(tc.n))
			if _, err := conn.Write(f); err != nil {
				t.Fatal(err)
			}
			conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err = conn.Read(make([]byte, 1))
			var ne net.Error
			if err == nil || (errors.As(err, &ne) && ne.Timeout()) {
				t.Fatalf("connection not closed after bad frame: %v", err)
			}
			e.waitFor(func() bool { return len(e.srv.Connected()) == 0 }, "node-a gone")
		})
	}
	if n := e.srv.badFrames.Load(); n != 3 {
		t.Fatalf("counted %d bad frames, want 3", n)
	}
}

func TestOversizeFrameClosesConnection(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.MaxPacket = 1000 })
	a, _, cha := e.connect("node-a")
	_, kb, _ := e.connect("node-b")
	_ = a.Send(kb, wgPacket(t, 4, 1001))
	expectClosed(t, cha, "oversize frame")
}

func TestRateLimit(t *testing.T) {
	const rate = 16 << 10
	const burst = 2 * rate
	const pktLen = 1024
	e := newEnv(t, func(o *Options) { o.RateBytes = rate })
	a, ka, _ := e.connect("node-a")
	_, kb, chb := e.connect("node-b")

	marker := wgPacket(t, 4, 32)
	start := time.Now()
	sent := 0
	for i := 0; i < 1000; i++ { // 1 MiB, far above the budget
		if err := a.Send(kb, wgPacket(t, 4, pktLen)); err != nil {
			t.Fatal(err)
		}
		sent += pktLen
	}
	// Packets from one source are forwarded in order, so everything B
	// receives before the marker was sent before it. The marker itself may
	// be rate limited; resend it until it arrives.
	received := 0
	if err := a.Send(kb, marker); err != nil {
		t.Fatal(err)
	}
	retry := time.NewTicker(50 * time.Millisecond)
	defer retry.Stop()
	timeout := time.After(10 * time.Second)
loop:
	for {
		select {
		case m := <-chb:
			if m.err != nil {
				t.Fatal(m.err)
			}
			if m.src != ka {
				t.Fatalf("unexpected source %x", m.src[:4])
			}
			if bytes.Equal(m.pkt, marker) {
				break loop
			}
			received += len(m.pkt)
		case <-retry.C:
			if err := a.Send(kb, marker); err != nil {
				t.Fatal(err)
			}
		case <-timeout:
			t.Fatal("marker never delivered")
		}
	}
	elapsed := time.Since(start)
	limit := burst + int(rate*elapsed.Seconds()) + pktLen
	t.Logf("sent %d bytes, received %d before the marker in %v (limit %d)", sent, received, elapsed, limit)
	if received > limit {
		t.Fatalf("received %d bytes, more than burst+rate*elapsed = %d", received, limit)
	}
	if received < burst/2 {
		t.Fatalf("received only %d bytes, want at least half the burst (%d)", received, burst/2)
	}
	if e.srv.dropRate.Load() == 0 {
		t.Fatal("no packet was counted as rate limited")
	}
}

func TestSecondConnectionReplacesFirst(t *testing.T) {
	e := newEnv(t, nil)
	cert, ka := e.node("node-a")
	_, cha1 := e.connectCert("node-a", cert)
	b, kb, _ := e.connect("node-b")

	a2, err := e.dial(cert)
	if err != nil {
		t.Fatal(err)
	}
	defer a2.Close()
	cha2 := recvLoop(a2)
	expectClosed(t, cha1, "first connection of node-a")
	e.waitFor(func() bool { return slices.Equal(e.srv.Connected(), []string{"node-a", "node-b"}) }, "node-a reconnected")
	// Packets for A now reach the second connection, and A can send from it.
	p := wgPacket(t, 4, 100)
	if err := b.Send(ka, p); err != nil {
		t.Fatal(err)
	}
	expect(t, cha2, kb, p)
}

func TestCloseEndsEverything(t *testing.T) {
	base := runtime.NumGoroutine()
	e := newEnv(t, nil)
	a, _, cha := e.connect("node-a")
	b, _, chb := e.connect("node-b")
	// A connection still in its TLS handshake.
	raw, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()

	done := make(chan struct{})
	go func() { e.srv.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return")
	}
	// Close waits for the connection goroutines, which untrack their
	// connections before they end.
	e.srv.mu.Lock()
	open := len(e.srv.raw)
	e.srv.mu.Unlock()
	if open != 0 {
		t.Fatalf("Close returned with %d connection goroutines still running", open)
	}
	if err := e.srv.Close(); err != nil { // idempotent
		t.Fatal(err)
	}
	select {
	case err := <-e.serveErr:
		if !errors.Is(err, ErrServerClosed) {
			t.Fatalf("Serve returned %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Serve did not return")
	}
	expectClosed(t, cha, "node-a")
	expectClosed(t, chb, "node-b")
	raw.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := raw.Read(make([]byte, 1)); err != io.EOF {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			t.Fatal("handshaking connection not closed")
		}
	}
	if got := e.srv.Connected(); len(got) != 0 {
		t.Fatalf("Connected() = %v after Close", got)
	}
	a.Close()
	b.Close()
	raw.Close()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("goroutines: %d, want ≤ %d\n%s", runtime.NumGoroutine(), base, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestNewValidates(t *testing.T) {
	ca := newCA(t)
	sc, err := ca.IssueServerCert([]string{"127.0.0.1"}, time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	lookup := func(string) ([32]byte, bool) { return [32]byte{}, false }
	for name, o := range map[string]Options{
		"no cert":      {ClientCA: ca.Cert, Lookup: lookup},
		"no CA":        {TLSCert: sc, Lookup: lookup},
		"no lookup":    {TLSCert: sc, ClientCA: ca.Cert},
		"huge packets": {TLSCert: sc, ClientCA: ca.Cert, Lookup: lookup, MaxPacket: 70000},
	} {
		if _, err := New(o); err == nil {
			t.Errorf("%s: New accepted invalid options", name)
		}
	}
	s, err := New(Options{TLSCert: sc, ClientCA: ca.Cert, Lookup: lookup})
	if err != nil {
		t.Fatal(err)
	}
	if s.o.RateBytes != DefaultRateBytes || s.o.MaxPacket != DefaultMaxPacket {
		t.Fatalf("defaults: %+v", s.o)
	}
}
