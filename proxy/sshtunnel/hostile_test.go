package sshtunnel

// Hostile clients of the SSH server: floods of connections that never
// authenticate, and floods of global requests from an authenticated node.

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

// dialFrom connects to the server from a loopback source address of our
// choosing (all of 127.0.0.0/8 is local), so that per-address limits can
// be told apart.
func dialFrom(t *testing.T, addr, src string) net.Conn {
	t.Helper()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("dial from %s: %v", src, err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// connectFrom authenticates node from source address src.
func (e *testEnv) connectFrom(src, node string) (*ssh.Client, error) {
	raw := dialFrom(e.t, e.addr, src)
	raw.SetDeadline(time.Now().Add(10 * time.Second))
	sc, chans, reqs, err := ssh.NewClientConn(raw, e.addr, e.clientConfig(node, ssh.PublicKeys(e.nodeSigner(node))))
	if err != nil {
		return nil, err
	}
	raw.SetDeadline(time.Time{})
	c := ssh.NewClient(sc, chans, reqs)
	e.t.Cleanup(func() { c.Close() })
	return c, nil
}

func (s *Server) connsFrom(key string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.perIP[key]
}

// pollGoroutines waits until at most base+tolerance goroutines are left.
func pollGoroutines(t *testing.T, base, tolerance int, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for n := runtime.NumGoroutine(); n > base+tolerance; n = runtime.NumGoroutine() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d goroutines, baseline %d (+%d allowed); server goroutines:\n%s", what, n, base, tolerance,
				strings.Join(leakedGoroutines("sshtunnel", "x/crypto/ssh"), "\n\n"))
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("%s: %d goroutines (baseline %d)", what, runtime.NumGoroutine(), base)
}

// TestHostilePreAuthFlood: hundreds of connections that never finish the
// handshake — silent, banner only, garbage, an endless version line, and a
// full key exchange that never authenticates — from one address and from
// many. The per-address cap holds (the excess is closed at once), every
// pre-auth connection is closed by the timeout, a legitimate node gets in
// during the flood, and no goroutine is left.
func TestHostilePreAuthFlood(t *testing.T) {
	const preAuth, perIP = 500 * time.Millisecond, 8
	e := newEnv(t, func(o *Options) { o.PreAuthTimeout = preAuth; o.MaxConnsPerIP = perIP }, nil)
	base := runtime.NumGoroutine()

	type attacker struct {
		src   string
		write string // sent after connecting
	}
	var attackers []attacker
	for range 100 { // one address, far over its cap
		attackers = append(attackers, attacker{"127.0.0.1", ""})
	}
	behaviours := []string{"", "SSH-2.0-flood\r\n", "SSH-2.0-flood\r\n\x00\x00\x01\x00garbage" + strings.Repeat("\xff", 300), strings.Repeat("S", 4000)}
	for i := range 24 { // many addresses, each at its cap
		for j := range perIP {
			attackers = append(attackers, attacker{fmt.Sprintf("127.0.1.%d", i+1), behaviours[j%len(behaviours)]})
		}
	}
	start := time.Now()
	var wg sync.WaitGroup
	type outcome struct {
		banner bool
		after  time.Duration
		err    error
	}
	outcomes := make(chan outcome, len(attackers)+perIP)
	for _, a := range attackers {
		c := dialFrom(t, e.addr, a.src)
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if a.write != "" {
			io.WriteString(c, a.write) // may fail once the server has closed
		}
		wg.Go(func() {
			line, err := bufio.NewReader(c).ReadString('\n')
			banner := err == nil && strings.HasPrefix(line, "SSH-2.0-")
			if err == nil {
				_, err = io.Copy(io.Discard, c)
			} else if errors.Is(err, io.EOF) {
				err = nil
			}
			if errors.Is(err, syscall.ECONNRESET) { // closed with our bytes unread
				err = nil
			}
			outcomes <- outcome{banner, time.Since(start), err}
		})
	}
	// Full key exchanges that never authenticate: the auth callback blocks
	// until the server has closed them all (or a deadline passes).
	release := make(chan struct{})
	for i := range perIP {
		raw := dialFrom(t, e.addr, "127.0.2.1")
		raw.SetDeadline(time.Now().Add(10 * time.Second))
		wg.Go(func() {
			cfg := e.clientConfig("pi1", ssh.PublicKeysCallback(func() ([]ssh.Signer, error) {
				<-release
				return nil, errors.New("never")
			}))
			_, _, _, err := ssh.NewClientConn(raw, e.addr, cfg)
			if err == nil {
				err = fmt.Errorf("stalled client %d authenticated", i)
			} else {
				err = nil
			}
			outcomes <- outcome{true, time.Since(start), err}
		})
	}
	waitUntil := func(cond func() bool) bool {
		deadline := time.Now().Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				return false
			}
			time.Sleep(5 * time.Millisecond)
		}
		return true
	}
	if !waitUntil(func() bool { return e.srv.connsFrom("127.0.2.1") == perIP }) {
		close(release)
		t.Fatalf("the stalled key exchanges were not all accepted: %d", e.srv.connsFrom("127.0.2.1"))
	}
	var stalledClosed time.Duration
	go func() {
		defer close(release)
		if waitUntil(func() bool { return e.srv.connsFrom("127.0.2.1") == 0 }) {
			stalledClosed = time.Since(start)
		} else {
			t.Errorf("the server did not close the stalled key exchanges")
		}
	}()
	if n := e.srv.connsFrom("127.0.0.1"); n > perIP {
		t.Errorf("%d connections from one address, cap %d", n, perIP)
	}
	flooding := runtime.NumGoroutine() - base
	// The legitimate node, from its own address, gets in during the flood.
	c, err := e.connectFrom("127.0.3.1", "pi1")
	if err != nil {
		t.Fatalf("legitimate node refused during the pre-auth flood: %v", err)
	}
	if !forwardReq(t, c, "pi1", 80) {
		t.Fatal("legitimate node's forward refused during the flood")
	}
	wg.Wait() // after release: stalledClosed is set
	close(outcomes)
	t.Logf("the stalled key exchanges were closed by the server after %v", stalledClosed)
	var banners, refused int
	var longest time.Duration
	for o := range outcomes {
		if o.err != nil {
			t.Errorf("flood connection: %v", o.err)
		}
		if o.banner {
			banners++
		} else {
			refused++
		}
		longest = max(longest, o.after)
	}
	t.Logf("%d pre-auth connections: %d served a banner, %d refused at once; all closed within %v (timeout %v); %d goroutines during the flood (%d per connection served)",
		len(attackers)+perIP, banners, refused, longest, preAuth, flooding, flooding/max(banners, 1))
	// At most perIP per address were ever served a banner.
	if max := 25*perIP + perIP; banners > max {
		t.Errorf("%d connections got a banner, the per-address caps allow %d", banners, max)
	}
	if refused < 100-perIP {
		t.Errorf("only %d connections refused at once; the one-address flood sent 100 with a cap of %d", refused, perIP)
	}
	if longest > preAuth+5*time.Second {
		t.Errorf("the last pre-auth connection closed after %v (timeout %v)", longest, preAuth)
	}
	if !isOpen(c) {
		t.Fatal("the legitimate session did not outlive the flood")
	}
	c.Close()
	if !waitUntil(func() bool { return len(e.srv.Forwards()) == 0 }) {
		t.Fatalf("forwards after the session closed: %v", e.srv.Forwards())
	}
	pollGoroutines(t, base, 3, "after the pre-auth flood")
}

// TestHostilePreAuthGlobalCap: connections from many addresses, each under
// its per-address cap, that never authenticate fill the global pre-auth
// cap; the next one is closed at once without a banner, an authenticated
// session is unaffected, and a slot freed is usable again.
func TestHostilePreAuthGlobalCap(t *testing.T) {
	const maxPreAuth = 6
	var logs syncBuffer
	e := newEnv(t, func(o *Options) {
		o.MaxPreAuth = maxPreAuth
		o.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	}, nil)
	c, err := e.connectFrom("127.0.3.1", "pi1")
	if err != nil {
		t.Fatal(err)
	}
	if !forwardReq(t, c, "pi1", 80) {
		t.Fatal("forward refused")
	}

	// banner reads the server's version line: false if it closed first.
	banner := func(raw net.Conn) bool {
		raw.SetReadDeadline(time.Now().Add(10 * time.Second))
		line, err := bufio.NewReader(raw).ReadString('\n')
		return err == nil && strings.HasPrefix(line, "SSH-2.0-")
	}
	var silent []net.Conn
	for i := range maxPreAuth {
		raw := dialFrom(t, e.addr, fmt.Sprintf("127.0.4.%d", i+1))
		if !banner(raw) {
			t.Fatalf("pre-auth connection %d of %d refused", i+1, maxPreAuth)
		}
		silent = append(silent, raw)
	}
	for i := range 3 {
		if banner(dialFrom(t, e.addr, fmt.Sprintf("127.0.5.%d", i+1))) {
			t.Fatalf("connection %d over the global pre-auth cap of %d got a banner", maxPreAuth+i+1, maxPreAuth)
		}
	}
	if !isOpen(c) || !forwardReq(t, c, "pi1", 81) {
		t.Fatal("the authenticated session was affected by the full pre-auth cap")
	}
	got := logs.String()
	if n := strings.Count(got, "too many connections are still authenticating"); n != 1 {
		t.Errorf("%d log lines for 3 refusals within 10 s, want 1:\n%s", n, got)
	}

	// A freed slot is usable again, by a node that authenticates.
	silent[0].Close()
	waitAccepted(t, "no connection accepted after a pre-auth slot was freed", func() (*ssh.Client, error) {
		return e.connectFrom("127.0.6.1", "pi2")
	})
}

// TestHostileGlobalRequestFlood: an authenticated node sends thousands of
// unknown global requests, tcpip-forwards for other nodes' names and
// addresses, cancels of forwards it does not have, and large payloads. All
// are refused, its own forwards stay capped, another node is unaffected,
// and goroutines and heap stay bounded.
func TestHostileGlobalRequestFlood(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.MaxForwards = 4 }, nil)
	idle := runtime.NumGoroutine()
	other := e.connect("pi2")
	if !forwardReq(t, other, "pi2", 80) {
		t.Fatal("pi2's own forward refused")
	}
	c := e.connect("pi1")
	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	base := runtime.NumGoroutine()

	foreign := []string{"pi2", "web--pi2", "pi3", "api--pi3", "127.0.0.1", "0.0.0.0", "", "localhost", "::1", "pi1.evil", "web--pi1--pi2"}
	kinds := []func(i int) (string, []byte){
		func(i int) (string, []byte) { return fmt.Sprintf("flood-%d@example.com", i), nil },
		func(i int) (string, []byte) {
			return "tcpip-forward", ssh.Marshal(forwardMsg{foreign[i%len(foreign)], uint32(1 + i%65535)})
		},
		func(i int) (string, []byte) { return "cancel-tcpip-forward", ssh.Marshal(forwardMsg{"pi2", 80}) },
		func(i int) (string, []byte) { return "tcpip-forward", []byte{0, 0, 0, 9, 'g'} }, // truncated
		func(i int) (string, []byte) {
			return "streamlocal-forward@openssh.com", ssh.Marshal(struct{ Path string }{"/tmp/x"})
		},
	}
	const workers, perWorker = 8, 1000
	var peak int
	var mu sync.Mutex
	var wg sync.WaitGroup
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	for w := range workers {
		wg.Go(func() {
			for i := range perWorker {
				if ctx.Err() != nil {
					return
				}
				n := w*perWorker + i
				typ, payload := kinds[n%len(kinds)](n)
				wantReply := n%3 != 0 // some fire-and-forget
				ok, _, err := c.SendRequest(typ, wantReply, payload)
				if err != nil {
					t.Errorf("request %d (%s): %v", n, typ, err)
					cancel()
					return
				}
				if ok {
					t.Errorf("request %d (%s %x) accepted", n, typ, payload)
				}
				if i%100 == 0 {
					mu.Lock()
					peak = max(peak, runtime.NumGoroutine()-base)
					mu.Unlock()
				}
			}
		})
	}
	// Large payloads: the most one packet may carry.
	wg.Go(func() {
		big := make([]byte, 200<<10)
		for range 20 {
			if _, _, err := c.SendRequest("tcpip-forward", true, big); err != nil {
				t.Errorf("large request: %v", err)
				return
			}
		}
	})
	start := time.Now()
	wg.Wait()
	took := time.Since(start)
	// Requests are answered in order: a keepalive answered now means the
	// fire-and-forget ones were all handled too.
	if !isOpen(c) || !isOpen(other) {
		t.Fatal("a session was closed by the flood")
	}
	e.wantForwards(Forward{"pi2", "web"})
	// The node's own forwards are still capped.
	for i := range 6 {
		if got, want := forwardReq(t, c, "pi1", uint32(1000+i)), i < 4; got != want {
			t.Errorf("own forward %d after the flood: %v, want %v", i, got, want)
		}
	}
	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	grew := int64(after.HeapInuse) - int64(before.HeapInuse)
	t.Logf("%d refused global requests in %v; goroutines at most +%d during the flood; heap %+d KiB after", workers*perWorker+20, took, peak, grew>>10)
	if peak > 2*workers+10 {
		t.Errorf("goroutines grew by %d during the flood", peak)
	}
	if grew > 16<<20 {
		t.Errorf("heap grew by %d MiB", grew>>20)
	}
	// A fresh node still gets in, and the flooding session ends cleanly.
	pi3, err := e.connectFrom("127.0.0.5", "pi3")
	if err != nil {
		t.Fatalf("pi3 after the flood: %v", err)
	}
	for _, cl := range []*ssh.Client{c, other, pi3} {
		cl.Close()
	}
	pollGoroutines(t, idle, 3, "after the sessions closed")
}
