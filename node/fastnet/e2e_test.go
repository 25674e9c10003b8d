package fastnet

import (
	"context"
	"io"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.zx2c4.com/wireguard/tun"
)

// TestEndToEnd moves 64 MiB over TCP (8 MiB with -short or -race), per
// family, content checked, through two wireguard-go devices on fastnet, and
// 4 MiB back on the same connection.
func TestEndToEnd(t *testing.T) {
	n := int64(64 << 20)
	if testing.Short() || raceEnabled {
		n = 8 << 20
	}
	a, b := newPair(t, fastnetMaker(Options{}))
	for _, v6 := range []bool{false, true} {
		t.Run(famName(v6), func(t *testing.T) {
			dst := b.v4
			if v6 {
				dst = b.v6
			}
			c, s := connect(t, a, b, dst)
			defer c.Close()
			defer s.Close()
			sendVerified(t, c, s, n, 1)
			// And back, on the same connection.
			sendBack(t, s, c, 4<<20)
		})
	}
	st := a.tun.(*Device).Stats()
	rt := b.tun.(*Device).Stats()
	t.Logf("sender: %+v", st)
	t.Logf("receiver: %+v", rt)
	if st.GSOPackets == 0 {
		t.Error("the sender split no GSO packet")
	}
	if rt.GROPackets == 0 {
		t.Error("the receiver coalesced nothing")
	}
}

func sendBack(t *testing.T, from, to interface {
	Read([]byte) (int, error)
	Write([]byte) (int, error)
}, n int64) {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		_, err := io.Copy(from, io.LimitReader(stream(2), n))
		errc <- err
	}()
	want := make([]byte, n)
	io.ReadFull(stream(2), want)
	got := make([]byte, n)
	if _, err := io.ReadFull(to, got); err != nil {
		t.Fatal(err)
	}
	if string(got) != string(want) {
		t.Fatal("reverse stream differs")
	}
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
}

// TestEndToEndVariants runs the transfer with GSO and GRO each off, and
// against a stock netstack peer (both directions of mixing).
func TestEndToEndVariants(t *testing.T) {
	n := int64(8 << 20)
	for _, tc := range []struct {
		name string
		a, b stackMaker
	}{
		{"noGSO", fastnetMaker(Options{DisableGSO: true}), fastnetMaker(Options{DisableGSO: true})},
		{"noGRO", fastnetMaker(Options{DisableGRO: true}), fastnetMaker(Options{DisableGRO: true})},
		// Drops at the queue: TCP recovers, content intact.
		{"tinyQueue", fastnetMaker(Options{QueueLen: 8, QueueBytes: 128 << 10}), fastnetMaker(Options{QueueLen: 8, QueueBytes: 128 << 10})},
		{"toStock", fastnetMaker(Options{}), stockMaker},
		{"fromStock", stockMaker, fastnetMaker(Options{})},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := newPairMixed(t, tc.a, tc.b)
			c, s := connect(t, a[0], a[1], a[1].v6)
			defer c.Close()
			defer s.Close()
			n := n
			if tc.name == "tinyQueue" {
				n = 1 << 20
			}
			sendVerified(t, c, s, n, 3)
			if d, ok := a[0].tun.(*Device); ok {
				t.Logf("sender: %+v", d.Stats())
			}
		})
	}
}

func newPairMixed(t *testing.T, ma, mb stackMaker) [2]*wgNode {
	first := true
	mk := func(addrs []netip.Addr, mtu int) (tun.Device, tcpNet, error) {
		m := mb
		if first {
			m, first = ma, false
		}
		return m(addrs, mtu)
	}
	a, b := newPair(t, mk)
	return [2]*wgNode{a, b}
}

// TestPingAndUDP: ICMP echo and UDP through the tunnel, as the agent's
// ping and other callers use them.
func TestPingAndUDP(t *testing.T) {
	a, b := newPair(t, fastnetMaker(Options{}))
	an := a.net.(*Net)
	bn := b.net.(*Net)
	for _, v6 := range []bool{false, true} {
		src, dst := a.v4, b.v4
		if v6 {
			src, dst = a.v6, b.v6
		}
		pc, err := an.DialPingAddr(src, dst)
		if err != nil {
			t.Fatal(err)
		}
		typ, reply, proto := icmp.Type(ipv4.ICMPTypeEcho), icmp.Type(ipv4.ICMPTypeEchoReply), 1
		if v6 {
			typ, reply, proto = ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply, 58
		}
		req, _ := (&icmp.Message{Type: typ, Body: &icmp.Echo{ID: 1, Seq: 7, Data: []byte("hello")}}).Marshal(nil)
		pc.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := pc.Write(req); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 1500)
		k, err := pc.Read(buf)
		if err != nil {
			t.Fatalf("%s ping: %v", famName(v6), err)
		}
		m, err := icmp.ParseMessage(proto, buf[:k])
		if err != nil || m.Type != reply || m.Body.(*icmp.Echo).Seq != 7 {
			t.Fatalf("%s ping: reply %v %v", famName(v6), m, err)
		}
		// A read deadline in the past fails a read at once.
		pc.SetReadDeadline(time.Now().Add(-time.Second))
		if _, err := pc.Read(buf); err == nil {
			t.Fatal("read past the deadline succeeded")
		}
		pc.Close()

		// UDP.
		ln, err := bn.ListenUDPAddrPort(netip.AddrPortFrom(dst, 5353))
		if err != nil {
			t.Fatal(err)
		}
		c, err := an.DialContext(context.Background(), "udp", netip.AddrPortFrom(dst, 5353).String())
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("datagram"))
		ln.SetDeadline(time.Now().Add(10 * time.Second))
		k, from, err := ln.ReadFrom(buf)
		if err != nil || string(buf[:k]) != "datagram" {
			t.Fatalf("%s UDP: %q %v", famName(v6), buf[:k], err)
		}
		ln.WriteTo([]byte("back"), from)
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if k, err := c.Read(buf); err != nil || string(buf[:k]) != "back" {
			t.Fatalf("%s UDP reply: %q %v", famName(v6), buf[:k], err)
		}
		c.Close()
		ln.Close()
	}
}

// TestDialContext: the networks and address forms node/ uses, and refusals.
func TestDialContext(t *testing.T) {
	a, b := newPair(t, fastnetMaker(Options{}))
	an := a.net.(*Net)
	ln, err := b.net.(*Net).ListenTCPAddrPort(netip.AddrPortFrom(netip.IPv6Unspecified(), 7000))
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("hi"))
			c.Close()
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	for _, tc := range []struct{ network, addr string }{
		{"tcp", "10.77.0.2:7000"},
		{"tcp4", "10.77.0.2:7000"},
		{"tcp", "[fd77::2]:7000"},
		{"tcp6", "[fd77::2]:7000"},
		{"tcp", "[::ffff:10.77.0.2]:7000"},
	} {
		c, err := an.DialContext(ctx, tc.network, tc.addr)
		if err != nil {
			t.Fatalf("%s %s: %v", tc.network, tc.addr, err)
		}
		b, _ := io.ReadAll(c)
		c.Close()
		if string(b) != "hi" {
			t.Fatalf("%s %s: read %q", tc.network, tc.addr, b)
		}
	}
	for _, tc := range []struct{ network, addr string }{
		{"tcp", "example.com:80"},
		{"tcp6", "10.77.0.2:7000"},
		{"tcp4", "[fd77::2]:7000"},
		{"sctp", "10.77.0.2:7000"},
		{"tcp", "10.77.0.2"},
		{"tcp", "10.77.0.2:99999"},
	} {
		if c, err := an.DialContext(ctx, tc.network, tc.addr); err == nil {
			c.Close()
			t.Errorf("%s %s: dialed", tc.network, tc.addr)
		}
	}
	// A closed port is refused (RST), not left to time out.
	if _, err := an.DialContext(ctx, "tcp", "10.77.0.2:7001"); err == nil || ctx.Err() != nil {
		t.Errorf("closed port: %v (ctx %v)", err, ctx.Err())
	}
}

// TestCloseUnblocksRead: Close wakes a blocked Read and Read then fails.
func TestCloseUnblocksRead(t *testing.T) {
	d, _, err := New([]netip.Addr{v4a}, testMTU, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if ev := <-d.Events(); ev != tun.EventUp {
		t.Fatalf("event %v", ev)
	}
	done := make(chan error, 1)
	go func() {
		bufs := [][]byte{make([]byte, 2000)}
		_, err := d.Read(bufs, make([]int, 1), 0)
		done <- err
	}()
	time.Sleep(10 * time.Millisecond)
	d.Close()
	if err := <-done; err == nil {
		t.Fatal("Read after Close succeeded")
	}
	if _, ok := <-d.Events(); ok {
		t.Fatal("events not closed")
	}
	d.Close() // twice is fine
}

// TestEndToEndLoss: with 1% of packets lost each way, retransmissions go
// through GSO splitting and GRO (and its hole tracking) and the stream
// arrives intact.
func TestEndToEndLoss(t *testing.T) {
	a, b := newPair(t, lossyMaker(fastnetMaker(Options{}), 0.01, 7))
	for _, dst := range []netip.Addr{b.v4, b.v6} {
		c, s := connect(t, a, b, dst)
		start := time.Now()
		sendVerified(t, c, s, 4<<20, 5)
		ts := a.tun.(*lossyTUN).Device.(*Device).stack.Stats().TCP
		t.Logf("%v: 4 MiB in %v; sender so far: %d retransmissions, %d timeouts", dst, time.Since(start).Round(time.Millisecond), ts.Retransmits.Value(), ts.Timeouts.Value())
		c.Close()
		s.Close()
	}
}
