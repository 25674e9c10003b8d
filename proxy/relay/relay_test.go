package relay

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

type msg struct {
	src [32]byte
	pkt []byte
	err error
}

type env struct {
	t   *testing.T
	srv *Server

	mu   sync.Mutex
	keys map[string][32]byte // Lookup table

	offset atomic.Int64 // added to time.Now for Options.Now
}

func newEnv(t *testing.T, mod func(*Options)) *env {
	t.Helper()
	e := &env{t: t, keys: map[string][32]byte{}}
	o := Options{
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
	var err error
	e.srv, err = New(o)
	if err != nil {
		t.Fatal(err)
	}
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

// node registers id in Lookup with a fresh key.
func (e *env) node(id string) [32]byte {
	k := randKey(e.t)
	e.setKey(id, k)
	return k
}

func (e *env) setKey(id string, k [32]byte) {
	e.mu.Lock()
	e.keys[id] = k
	e.mu.Unlock()
}

func (e *env) revoke(id string) {
	e.mu.Lock()
	delete(e.keys, id)
	e.mu.Unlock()
}

// pipe returns the two ends of an in-memory stream (net.Pipe: it has
// deadlines).
func pipe(*testing.T) (client, server io.ReadWriteCloser) {
	c, s := net.Pipe()
	return c, s
}

// tcpPair returns the two ends of a real loopback TCP connection.
func tcpPair(t *testing.T) (client, server io.ReadWriteCloser) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, ok := <-accepted
	if !ok {
		t.Fatal("accept failed")
	}
	return c, s
}

// noDeadline hides a stream's deadline methods (like an SSH channel), so
// the watchdog path is used.
type noDeadline struct{ rw io.ReadWriteCloser }

func (n noDeadline) Read(p []byte) (int, error)  { return n.rw.Read(p) }
func (n noDeadline) Write(p []byte) (int, error) { return n.rw.Write(p) }
func (n noDeadline) Close() error                { return n.rw.Close() }

// serve runs ServeConn(id, srvEnd) and returns a channel with its result.
func (e *env) serve(id string, srvEnd io.ReadWriteCloser) <-chan error {
	done := make(chan error, 1)
	go func() { done <- e.srv.ServeConn(id, srvEnd) }()
	return done
}

type peer struct {
	c      *Client
	key    [32]byte
	in     <-chan msg
	served <-chan error // ServeConn's result
}

// connect registers id with a fresh key and attaches it over a net.Pipe.
func (e *env) connect(id string) peer {
	e.t.Helper()
	return e.connectKey(id, e.node(id), pipe)
}

// connectKey attaches id (whose Lookup key must be key) over a stream
// made by mk, starts a receive loop and waits until the server lists id.
func (e *env) connectKey(id string, key [32]byte, mk func(*testing.T) (io.ReadWriteCloser, io.ReadWriteCloser)) peer {
	e.t.Helper()
	cEnd, sEnd := mk(e.t)
	c := NewClient(cEnd)
	e.t.Cleanup(func() { c.Close() })
	served := e.serve(id, sEnd)
	ch := recvLoop(c)
	e.waitFor(func() bool { return slices.Contains(e.srv.Connected(), id) }, id+" connected")
	return peer{c: c, key: key, in: ch, served: served}
}

// recvLoop copies every packet out of the client's reused buffer.
func recvLoop(c *Client) <-chan msg {
	ch := make(chan msg, 4096)
	go func() {
		defer close(ch)
		for {
			src, pkt, err := c.Recv()
			ch <- msg{src, bytes.Clone(pkt), err}
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
	waitFor(e.t, cond, what)
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
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
			t.Fatalf("%s: received a packet, want the stream closed", what)
		case <-timeout:
			t.Fatalf("%s: stream still open", what)
		}
	}
}

// expectServed waits for ServeConn's result and checks it is want.
func expectServed(t *testing.T, served <-chan error, want error, what string) {
	t.Helper()
	select {
	case err := <-served:
		if !errors.Is(err, want) {
			t.Fatalf("%s: ServeConn returned %v, want %v", what, err, want)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: ServeConn still running", what)
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
	for name, mk := range map[string]func(*testing.T) (io.ReadWriteCloser, io.ReadWriteCloser){
		"pipe": pipe,
		"tcp":  tcpPair,
		"no deadlines": func(t *testing.T) (io.ReadWriteCloser, io.ReadWriteCloser) {
			c, s := tcpPair(t)
			return noDeadline{c}, noDeadline{s}
		},
	} {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t, nil)
			a := e.connectKey("node-a", e.node("node-a"), mk)
			b := e.connectKey("node-b", e.node("node-b"), mk)
			if got := e.srv.Connected(); !slices.Equal(got, []string{"node-a", "node-b"}) {
				t.Fatalf("Connected() = %v", got)
			}
			var bytesSent uint64
			for _, p := range [][]byte{wgPacket(t, 4, 32+200), wgPacket(t, 1, 148), wgPacket(t, 2, 92), wgPacket(t, 3, 64), wgPacket(t, 4, 65535)} {
				if err := a.c.Send(b.key, p); err != nil {
					t.Fatal(err)
				}
				expect(t, b.in, a.key, p)
				q := wgPacket(t, p[0], len(p))
				if err := b.c.Send(a.key, q); err != nil {
					t.Fatal(err)
				}
				expect(t, a.in, b.key, q)
				bytesSent += 2 * uint64(len(p))
			}
			// The counters are bumped right after a packet is queued, so
			// the last one may trail its delivery by a moment.
			e.waitFor(func() bool {
				st := e.srv.Stats()
				return st.Forwarded == 10 && st.ForwardedBytes == bytesSent && st.Connected == 2
			}, fmt.Sprintf("Stats() to show 10 packets, %d bytes, 2 connected (now %+v)", bytesSent, e.srv.Stats()))
			// The client ending its stream ends ServeConn with nil.
			a.c.Close()
			expectServed(t, a.served, nil, "client closed")
			e.waitFor(func() bool { return slices.Equal(e.srv.Connected(), []string{"node-b"}) }, "node-a gone")
		})
	}
}

// Recv reuses its buffer: the packet it returned is overwritten by the
// next Recv (documented), and is exactly the payload until then.
func TestRecvReusesBuffer(t *testing.T) {
	e := newEnv(t, nil)
	a := e.connect("node-a")
	kb := e.node("node-b")
	cEnd, sEnd := pipe(t)
	b := NewClient(cEnd)
	defer b.Close()
	e.serve("node-b", sEnd)
	e.waitFor(func() bool { return slices.Contains(e.srv.Connected(), "node-b") }, "node-b connected")
	p1, p2 := wgPacket(t, 4, 100), wgPacket(t, 4, 100)
	a.c.Send(kb, p1)
	a.c.Send(kb, p2)
	_, got1, err := b.Recv()
	if err != nil || !bytes.Equal(got1, p1) {
		t.Fatalf("first Recv: %v, %x", err, head(got1))
	}
	_, got2, err := b.Recv()
	if err != nil || !bytes.Equal(got2, p2) {
		t.Fatalf("second Recv: %v, %x", err, head(got2))
	}
	if &got1[0] != &got2[0] {
		t.Fatal("Recv did not reuse its buffer, as documented")
	}
}

func TestNonWireGuardDropped(t *testing.T) {
	e := newEnv(t, nil)
	a := e.connect("node-a")
	b := e.connect("node-b")
	badInit := wgPacket(t, 1, 100) // type 1 with the wrong length
	badReserved := wgPacket(t, 4, 64)
	badReserved[2] = 7
	junk := [][]byte{
		[]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
		badInit,
		badReserved,
		wgPacket(t, 4, 31), // too short for transport data
		wgPacket(t, 5, 64), // unknown type
		wgPacket(t, 2, 148),
	}
	for _, j := range junk {
		if err := a.c.Send(b.key, j); err != nil {
			t.Fatal(err)
		}
	}
	marker := wgPacket(t, 4, 48)
	if err := a.c.Send(b.key, marker); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-b.in:
		if m.err != nil || !bytes.Equal(m.pkt, marker) {
			t.Fatalf("first packet delivered is not the marker (err %v, %q)", m.err, head(m.pkt))
		}
	case <-time.After(5 * time.Second):
		t.Fatal("marker not delivered")
	}
	if n := e.srv.Stats().DropNotWG; n != uint64(len(junk)) {
		t.Fatalf("dropped %d non-WireGuard payloads, want %d", n, len(junk))
	}
	if got := e.srv.Connected(); !slices.Equal(got, []string{"node-a", "node-b"}) {
		t.Fatalf("a dropped payload closed a stream: Connected() = %v", got)
	}
}

func TestRefused(t *testing.T) {
	e := newEnv(t, nil)
	e.node("good")
	for _, id := range []string{"stranger", "", "GOOD", "good "} {
		t.Run(id, func(t *testing.T) {
			before := e.srv.Stats().Refused
			cEnd, sEnd := pipe(t)
			c := NewClient(cEnd)
			defer c.Close()
			expectServed(t, e.serve(id, sEnd), ErrRefused, "unknown node")
			if _, _, err := c.Recv(); err == nil {
				t.Fatal("refused stream delivered a frame")
			}
			if err := c.Send(randKey(t), wgPacket(t, 4, 40)); err == nil {
				t.Fatal("Send on a refused stream succeeded")
			}
			if got := e.srv.Stats().Refused; got != before+1 {
				t.Fatalf("refusals counted: %d, want %d", got, before+1)
			}
			if got := e.srv.Connected(); len(got) != 0 {
				t.Fatalf("Connected() = %v", got)
			}
		})
	}

	// Revoked (removed from Lookup), then it tries again.
	e.revoke("good")
	cEnd, sEnd := pipe(t)
	defer cEnd.Close()
	expectServed(t, e.serve("good", sEnd), ErrRefused, "revoked node")

	// The name works when the node is known (the refusals above are not a
	// broken setup).
	e.connect("good")
}

func TestDrop(t *testing.T) {
	e := newEnv(t, nil)
	a := e.connect("node-a")
	b := e.connect("node-b")
	e.srv.Drop("node-a")
	if got := e.srv.Connected(); !slices.Equal(got, []string{"node-b"}) {
		t.Fatalf("after Drop, Connected() = %v", got)
	}
	expectClosed(t, a.in, "dropped node")
	expectServed(t, a.served, ErrDropped, "dropped node")
	if err := a.c.Send(b.key, wgPacket(t, 4, 40)); err == nil {
		t.Fatal("Send on a dropped stream succeeded")
	}
	if n := e.srv.Stats().Forwarded; n != 0 {
		t.Fatalf("%d packets forwarded", n)
	}
	select {
	case m := <-b.in:
		t.Fatalf("B received %v after A was dropped", m)
	default:
	}
	e.srv.Drop("node-a") // idempotent
	e.srv.Drop("nobody") // unknown: nothing happens
	if got := e.srv.Connected(); !slices.Equal(got, []string{"node-b"}) {
		t.Fatalf("Connected() = %v", got)
	}
}

func TestRevokedWhileConnected(t *testing.T) {
	for name, change := range map[string]func(e *env){
		"revoked": func(e *env) { e.revoke("node-a") },
		"rekeyed": func(e *env) { e.node("node-a") },
	} {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t, nil)
			a := e.connect("node-a")
			b := e.connect("node-b")
			change(e)
			// Within the re-check interval A may still send; after it the
			// next send closes A, and that packet is not forwarded.
			e.offset.Store(int64(2 * time.Second))
			_ = a.c.Send(b.key, wgPacket(t, 4, 40))
			expectClosed(t, a.in, "revoked node")
			expectServed(t, a.served, ErrRevoked, "revoked node")
			e.waitFor(func() bool { return !slices.Contains(e.srv.Connected(), "node-a") }, "node-a gone")
			if got := e.srv.Connected(); !slices.Equal(got, []string{"node-b"}) {
				t.Fatalf("Connected() = %v", got)
			}
			if n := e.srv.Stats().Forwarded; n != 0 {
				t.Fatalf("%d packets from the revoked node were forwarded", n)
			}
		})
	}
}

func TestUnknownDestination(t *testing.T) {
	e := newEnv(t, nil)
	a := e.connect("node-a")
	b := e.connect("node-b")
	if err := a.c.Send(randKey(t), wgPacket(t, 4, 64)); err != nil {
		t.Fatalf("send to unknown key: %v", err)
	}
	if err := a.c.Send(a.key, wgPacket(t, 4, 64)); err != nil { // to itself
		t.Fatalf("send to own key: %v", err)
	}
	p := wgPacket(t, 4, 80)
	if err := a.c.Send(b.key, p); err != nil {
		t.Fatal(err)
	}
	expect(t, b.in, a.key, p)
	if n := e.srv.Stats().DropNoDst; n != 2 {
		t.Fatalf("dropped %d packets without destination, want 2", n)
	}
	select {
	case m := <-a.in:
		t.Fatalf("A received its own packet: %v", m)
	default:
	}
	if got := e.srv.Connected(); !slices.Equal(got, []string{"node-a", "node-b"}) {
		t.Fatalf("Connected() = %v", got)
	}
}

// The source key of a delivered packet is always the sender's key from
// Lookup: a client frame cannot name a source, and a client that sends a
// server-style "from" frame (claiming another node's key) is cut without
// anything being delivered.
func TestSourceCannotBeSpoofed(t *testing.T) {
	e := newEnv(t, nil)
	b := e.connect("node-b")
	c := e.connect("node-c")
	ka := e.node("node-a")
	cEnd, sEnd := pipe(t)
	defer cEnd.Close()
	served := e.serve("node-a", sEnd)
	e.waitFor(func() bool { return slices.Contains(e.srv.Connected(), "node-a") }, "node-a connected")

	// A legitimate frame whose payload carries C's key where a naive relay
	// might look for a source: still delivered as from A.
	p := wgPacket(t, 4, 64)
	copy(p[8:40], c.key[:])
	f := make([]byte, headerLen+len(p))
	f[0] = frameSend
	copy(f[1:33], b.key[:])
	binary.BigEndian.PutUint16(f[33:], uint16(len(p)))
	copy(f[headerLen:], p)
	if _, err := cEnd.Write(f); err != nil {
		t.Fatal(err)
	}
	expect(t, b.in, ka, p)

	// A "from C" frame, as the relay would send it, to B.
	spoof := slices.Clone(f)
	spoof[0] = frameFrom
	copy(spoof[1:33], c.key[:])
	go cEnd.Write(spoof) // the relay closes the stream mid-frame
	expectServed(t, served, ErrBadFrame, "spoofing sender")
	select {
	case m := <-b.in:
		t.Fatalf("B received %x... from %x after the spoof", head(m.pkt), m.src[:4])
	case <-time.After(50 * time.Millisecond):
	}
	if st := e.srv.Stats(); st.Forwarded != 1 || st.BadFrames != 1 {
		t.Fatalf("Stats() = %+v, want 1 forwarded, 1 bad frame", st)
	}
}

func TestBadFrameClosesStream(t *testing.T) {
	e := newEnv(t, nil)
	e.node("node-a")
	for _, tc := range []struct {
		name string
		typ  byte
		n    int
	}{{"type 2 from client", 2, 40}, {"type 0", 0, 40}, {"zero length", 1, 0}} {
		t.Run(tc.name, func(t *testing.T) {
			cEnd, sEnd := tcpPair(t)
			defer cEnd.Close()
			served := e.serve("node-a", sEnd)
			e.waitFor(func() bool { return slices.Contains(e.srv.Connected(), "node-a") }, "connected")
			f := make([]byte, headerLen+tc.n)
			f[0] = tc.typ
			binary.BigEndian.PutUint16(f[33:], uint16(tc.n))
			if _, err := cEnd.Write(f); err != nil {
				t.Fatal(err)
			}
			conn := cEnd.(net.Conn)
			conn.SetReadDeadline(time.Now().Add(5 * time.Second))
			_, err := conn.Read(make([]byte, 1))
			var ne net.Error
			if err == nil || (errors.As(err, &ne) && ne.Timeout()) {
				t.Fatalf("stream not closed after bad frame: %v", err)
			}
			expectServed(t, served, ErrBadFrame, tc.name)
			e.waitFor(func() bool { return len(e.srv.Connected()) == 0 }, "node-a gone")
		})
	}
	if n := e.srv.Stats().BadFrames; n != 3 {
		t.Fatalf("counted %d bad frames, want 3", n)
	}
}

func TestOversizeFrameClosesStream(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.MaxPacket = 1000 })
	a := e.connect("node-a")
	b := e.connect("node-b")
	go a.c.Send(b.key, wgPacket(t, 4, 1001)) // the relay closes the pipe mid-frame
	expectClosed(t, a.in, "oversize frame")
	expectServed(t, a.served, ErrBadFrame, "oversize frame")
}

func TestRateLimit(t *testing.T) {
	const rate = 16 << 10
	const burst = 2 * rate
	const pktLen = 1024
	e := newEnv(t, func(o *Options) { o.RateBytes = rate })
	a := e.connect("node-a")
	b := e.connect("node-b")

	marker := wgPacket(t, 4, 32)
	start := time.Now()
	sent := 0
	for i := 0; i < 1000; i++ { // 1 MiB, far above the budget
		if err := a.c.Send(b.key, wgPacket(t, 4, pktLen)); err != nil {
			t.Fatal(err)
		}
		sent += pktLen
	}
	// Packets from one source are forwarded in order, so everything B
	// receives before the marker was sent before it. The marker itself may
	// be rate limited; resend it until it arrives.
	received := 0
	if err := a.c.Send(b.key, marker); err != nil {
		t.Fatal(err)
	}
	retry := time.NewTicker(50 * time.Millisecond)
	defer retry.Stop()
	timeout := time.After(10 * time.Second)
loop:
	for {
		select {
		case m := <-b.in:
			if m.err != nil {
				t.Fatal(m.err)
			}
			if m.src != a.key {
				t.Fatalf("unexpected source %x", m.src[:4])
			}
			if bytes.Equal(m.pkt, marker) {
				break loop
			}
			received += len(m.pkt)
		case <-retry.C:
			if err := a.c.Send(b.key, marker); err != nil {
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
	if e.srv.Stats().DropRate == 0 {
		t.Fatal("no packet was counted as rate limited")
	}
}

func TestSecondStreamReplacesFirst(t *testing.T) {
	e := newEnv(t, nil)
	a1 := e.connect("node-a")
	b := e.connect("node-b")

	a2 := e.connectKey("node-a", a1.key, pipe)
	expectClosed(t, a1.in, "first stream of node-a")
	expectServed(t, a1.served, ErrReplaced, "first stream of node-a")
	e.waitFor(func() bool { return slices.Equal(e.srv.Connected(), []string{"node-a", "node-b"}) }, "node-a reconnected")
	// Packets for A now reach the second stream, and A can send from it.
	p := wgPacket(t, 4, 100)
	if err := b.c.Send(a1.key, p); err != nil {
		t.Fatal(err)
	}
	expect(t, a2.in, b.key, p)
	q := wgPacket(t, 4, 100)
	if err := a2.c.Send(b.key, q); err != nil {
		t.Fatal(err)
	}
	expect(t, b.in, a1.key, q)

	// Another name holding the same key (a node renamed, or re-enrolled
	// with its key) replaces the stream too.
	e.setKey("node-a2", a1.key)
	a3 := e.connectKey("node-a2", a1.key, pipe)
	expectClosed(t, a2.in, "stream holding the same key")
	expectServed(t, a2.served, ErrReplaced, "stream holding the same key")
	e.waitFor(func() bool { return slices.Equal(e.srv.Connected(), []string{"node-a2", "node-b"}) }, "node-a2 holds the key")
	if err := b.c.Send(a1.key, p); err != nil {
		t.Fatal(err)
	}
	expect(t, a3.in, b.key, p)
}

// A destination that does not read is cut after the write timeout, both
// with deadlines (net.Pipe) and without (the watchdog); the sender is
// unaffected.
func TestStalledReceiverIsCut(t *testing.T) {
	old := writeTimeout.Load()
	writeTimeout.Store(int64(200 * time.Millisecond))
	defer writeTimeout.Store(old)
	for name, wrap := range map[string]func(io.ReadWriteCloser) io.ReadWriteCloser{
		"deadline": func(rw io.ReadWriteCloser) io.ReadWriteCloser { return rw },
		"watchdog": func(rw io.ReadWriteCloser) io.ReadWriteCloser { return noDeadline{rw} },
	} {
		t.Run(name, func(t *testing.T) {
			e := newEnv(t, nil)
			a := e.connect("node-a")
			kb := e.node("node-b")
			cEnd, sEnd := net.Pipe() // nobody reads cEnd
			defer cEnd.Close()
			served := e.serve("node-b", wrap(sEnd))
			e.waitFor(func() bool { return slices.Contains(e.srv.Connected(), "node-b") }, "node-b connected")
			if err := a.c.Send(kb, wgPacket(t, 4, 64)); err != nil {
				t.Fatal(err)
			}
			expectServed(t, served, ErrWriteTimeout, "stalled receiver")
			if got := e.srv.Connected(); !slices.Equal(got, []string{"node-a"}) {
				t.Fatalf("Connected() = %v", got)
			}
		})
	}
}

// Client.Send does not block forever on a stream nobody reads.
func TestClientSendTimesOut(t *testing.T) {
	old := writeTimeout.Load()
	writeTimeout.Store(int64(200 * time.Millisecond))
	defer writeTimeout.Store(old)
	for name, wrap := range map[string]func(io.ReadWriteCloser) io.ReadWriteCloser{
		"deadline": func(rw io.ReadWriteCloser) io.ReadWriteCloser { return rw },
		"watchdog": func(rw io.ReadWriteCloser) io.ReadWriteCloser { return noDeadline{rw} },
	} {
		t.Run(name, func(t *testing.T) {
			cEnd, sEnd := net.Pipe() // nobody reads sEnd
			defer sEnd.Close()
			c := NewClient(wrap(cEnd))
			done := make(chan error, 2)
			for range 2 { // a second sender waits for the first, not forever
				go func() { done <- c.Send(randKey(t), wgPacket(t, 4, 64)) }()
			}
			for range 2 {
				select {
				case err := <-done:
					if err == nil {
						t.Fatal("Send to a stalled stream succeeded")
					}
				case <-time.After(5 * time.Second):
					t.Fatal("Send blocked")
				}
			}
			if err := c.Send(randKey(t), wgPacket(t, 4, 64)); !errors.Is(err, ErrClientClosed) {
				t.Fatalf("Send after a timed-out write: %v, want ErrClientClosed", err)
			}
			if _, _, err := c.Recv(); err == nil {
				t.Fatal("Recv on a closed client succeeded")
			}
		})
	}
}

func TestClientRejects(t *testing.T) {
	cEnd, sEnd := net.Pipe()
	defer sEnd.Close()
	c := NewClient(cEnd)
	defer c.Close()
	for _, n := range []int{0, DefaultMaxPacket + 1} {
		if err := c.Send([32]byte{}, make([]byte, n)); err == nil {
			t.Errorf("Send of %d bytes accepted", n)
		}
	}
	// A relay that sends a client-style frame breaks the protocol.
	go sEnd.Write(append([]byte{frameSend}, make([]byte, 34)...))
	if _, _, err := c.Recv(); err == nil || !strings.Contains(err.Error(), "unexpected frame") {
		t.Fatalf("Recv of a bad frame: %v", err)
	}
}

func TestCloseEndsEverything(t *testing.T) {
	base := runtime.NumGoroutine()
	e := newEnv(t, nil)
	a := e.connect("node-a")
	b := e.connect("node-b")

	done := make(chan struct{})
	go func() { e.srv.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not return")
	}
	// Close waits for the ServeConn calls.
	for _, p := range []peer{a, b} {
		select {
		case err := <-p.served:
			if !errors.Is(err, ErrServerClosed) {
				t.Fatalf("ServeConn returned %v, want ErrServerClosed", err)
			}
		default:
			t.Fatal("Close returned before ServeConn")
		}
	}
	if err := e.srv.Close(); err != nil { // idempotent
		t.Fatal(err)
	}
	expectClosed(t, a.in, "node-a")
	expectClosed(t, b.in, "node-b")
	if got := e.srv.Connected(); len(got) != 0 {
		t.Fatalf("Connected() = %v after Close", got)
	}
	// Later streams are closed at once.
	e.node("node-c")
	cEnd, sEnd := pipe(t)
	if err := e.srv.ServeConn("node-c", sEnd); !errors.Is(err, ErrServerClosed) {
		t.Fatalf("ServeConn after Close: %v", err)
	}
	if _, err := cEnd.Read(make([]byte, 1)); err == nil {
		t.Fatal("stream given after Close not closed")
	}
	a.c.Close()
	b.c.Close()
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
	lookup := func(string) ([32]byte, bool) { return [32]byte{}, false }
	for name, o := range map[string]Options{
		"no lookup":     {},
		"huge packets":  {Lookup: lookup, MaxPacket: 70000},
		"negative rate": {Lookup: lookup, RateBytes: -1},
	} {
		if _, err := New(o); err == nil {
			t.Errorf("%s: New accepted invalid options", name)
		}
	}
	s, err := New(Options{Lookup: lookup})
	if err != nil {
		t.Fatal(err)
	}
	if s.o.RateBytes != DefaultRateBytes || s.o.MaxPacket != DefaultMaxPacket {
		t.Fatalf("defaults: %+v", s.o)
	}
}
