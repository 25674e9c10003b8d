package fastnet

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/crypto/curve25519"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun"
	"golang.zx2c4.com/wireguard/tun/netstack"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
)

// A pair of wireguard-go devices talking over 127.0.0.1, each on its own
// userspace stack: the data path of two meshctl netstack nodes.

const testMTU = 1420

// tcpNet is what the harness needs of a stack, offered by both *Net and
// the stock *netstack.Net.
type tcpNet interface {
	ListenTCPAddrPort(netip.AddrPort) (*gonet.TCPListener, error)
	DialContextTCPAddrPort(context.Context, netip.AddrPort) (*gonet.TCPConn, error)
}

type stackMaker func(addrs []netip.Addr, mtu int) (tun.Device, tcpNet, error)

func fastnetMaker(opts Options) stackMaker {
	return func(addrs []netip.Addr, mtu int) (tun.Device, tcpNet, error) {
		return New(addrs, mtu, opts)
	}
}

func stockMaker(addrs []netip.Addr, mtu int) (tun.Device, tcpNet, error) {
	return netstack.CreateNetTUN(addrs, nil, mtu)
}

type wgNode struct {
	tun    tun.Device
	net    tcpNet
	dev    *device.Device
	v4, v6 netip.Addr
	priv   [32]byte
	pub    [32]byte
	port   int
}

func newKey(tb testing.TB) (priv, pub [32]byte) {
	if _, err := rand.Read(priv[:]); err != nil {
		tb.Fatal(err)
	}
	priv[0] &= 248
	priv[31] = priv[31]&127 | 64
	p, err := curve25519.X25519(priv[:], curve25519.Basepoint)
	if err != nil {
		tb.Fatal(err)
	}
	copy(pub[:], p)
	return priv, pub
}

// newPair starts two nodes, 10.77.0.1/fd77::1 and 10.77.0.2/fd77::2, peered
// over 127.0.0.1.
func newPair(tb testing.TB, mk stackMaker) (a, b *wgNode) {
	tb.Helper()
	nodes := [2]*wgNode{startNode(tb, 1, mk), startNode(tb, 2, mk)}
	for i, n := range nodes {
		p := nodes[1-i]
		cfg := fmt.Sprintf("public_key=%s\nendpoint=127.0.0.1:%d\nallowed_ip=%s/32\nallowed_ip=%s/128\n",
			hex.EncodeToString(p.pub[:]), p.port, p.v4, p.v6)
		if err := n.dev.IpcSet(cfg); err != nil {
			tb.Fatal(err)
		}
	}
	return nodes[0], nodes[1]
}

func listenPort(tb testing.TB, d *device.Device) int {
	s, err := d.IpcGet()
	if err != nil {
		tb.Fatal(err)
	}
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "listen_port="); ok {
			p, err := strconv.Atoi(v)
			if err != nil {
				tb.Fatal(err)
			}
			return p
		}
	}
	tb.Fatal("no listen_port")
	return 0
}

// connect opens a TCP connection from a to b's address dst and returns
// both ends.
func connect(tb testing.TB, a, b *wgNode, dst netip.Addr) (client, server net.Conn) {
	tb.Helper()
	ln, err := b.net.ListenTCPAddrPort(netip.AddrPortFrom(dst, 5001))
	if err != nil {
		tb.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			accepted <- nil
			return
		}
		accepted <- c
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	client, err = a.net.DialContextTCPAddrPort(ctx, netip.AddrPortFrom(dst, 5001))
	if err != nil {
		tb.Fatal(err)
	}
	server = <-accepted
	if server == nil {
		tb.Fatal("accept failed")
	}
	return client, server
}

// stream is a reproducible byte stream for content checks.
func stream(seed uint64) io.Reader {
	var s [32]byte
	s[0] = byte(seed)
	return mrand.NewChaCha8(s)
}

// sendVerified sends n bytes of stream(seed) from c to s and checks them.
func sendVerified(tb testing.TB, c, s net.Conn, n int64, seed uint64) {
	tb.Helper()
	errc := make(chan error, 1)
	go func() {
		_, err := io.Copy(c, io.LimitReader(stream(seed), n))
		if err == nil {
			err = c.(interface{ CloseWrite() error }).CloseWrite()
		}
		errc <- err
	}()
	want := stream(seed)
	got := make([]byte, 256<<10)
	exp := make([]byte, 256<<10)
	var total int64
	for {
		k, err := s.Read(got)
		if k > 0 {
			if total+int64(k) > n {
				tb.Fatalf("received more than the %d bytes sent", n)
			}
			if _, err := io.ReadFull(want, exp[:k]); err != nil {
				tb.Fatal(err)
			}
			if !bytes.Equal(got[:k], exp[:k]) {
				tb.Fatalf("stream differs within bytes %d..%d", total, total+int64(k))
			}
			total += int64(k)
		}
		if err == io.EOF {
			break
		}
		if err != nil {
			tb.Fatalf("read after %d bytes: %v", total, err)
		}
	}
	if total != n {
		tb.Fatalf("received %d bytes, sent %d", total, n)
	}
	if err := <-errc; err != nil {
		tb.Fatalf("send: %v", err)
	}
}

// peakRSS returns the process's peak resident set (VmHWM) in bytes, and
// resetPeakRSS restarts that peak from the current RSS.
func peakRSS() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmHWM:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}

func resetPeakRSS() { os.WriteFile("/proc/self/clear_refs", []byte("5"), 0) }

// lossyTUN drops a fraction of the packets a device hands wireguard-go, as
// a lossy path would.
type lossyTUN struct {
	tun.Device
	p  float64
	mu sync.Mutex
	r  *mrand.Rand
}

func (l *lossyTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	n, err := l.Device.Read(bufs, sizes, offset)
	l.mu.Lock()
	defer l.mu.Unlock()
	for i := 0; i < n; i++ {
		if l.r.Float64() < l.p {
			// wireguard-go skips empty packets. (bufs must stay where they
			// are: each is the buffer of wireguard-go's i-th element.)
			sizes[i] = 0
		}
	}
	return n, err
}

func lossyMaker(mk stackMaker, p float64, seed uint64) stackMaker {
	return func(addrs []netip.Addr, mtu int) (tun.Device, tcpNet, error) {
		d, n, err := mk(addrs, mtu)
		seed++
		return &lossyTUN{Device: d, p: p, r: mrand.New(mrand.NewPCG(seed, 1))}, n, err
	}
}
