package fastnet

import (
	"bufio"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
)

// TestRSSUnderLoad measures the resident memory of one node as the agent
// runs it: the receiving node is a process of its own (this test binary
// re-run as TestRSSHelper), so its peak RSS (VmHWM) is that of one
// wireguard-go device on fastnet, the Go runtime and a TCP sink, under a
// 512 MiB bulk transfer. The sender's peak is that of this process (one
// node plus the test). Opt-in, as it is a measurement: FASTNET_RSS=1.
func TestRSSUnderLoad(t *testing.T) {
	if os.Getenv("FASTNET_RSS") == "" {
		t.Skip("set FASTNET_RSS=1 to measure")
	}
	runtime.GC()
	resetPeakRSS()
	a := startNode(t, 1, fastnetMaker(Options{}))
	cmd := exec.Command(os.Args[0], "-test.run", "^TestRSSHelper$", "-test.v")
	cmd.Env = append(os.Environ(), fmt.Sprintf("FASTNET_RSS_HELPER=%s:%d", hex.EncodeToString(a.pub[:]), a.port))
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	lines := bufio.NewScanner(out)
	var pub string
	var port int
	for lines.Scan() {
		if _, err := fmt.Sscanf(lines.Text(), "READY %s %d", &pub, &port); err == nil {
			break
		}
	}
	if pub == "" {
		t.Fatal("helper did not start")
	}
	bv4 := netip.MustParseAddr("10.77.0.2")
	if err := a.dev.IpcSet(fmt.Sprintf("public_key=%s\nendpoint=127.0.0.1:%d\nallowed_ip=%s/32\n", pub, port, bv4)); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var c io.WriteCloser
	for c == nil {
		conn, err := a.net.DialContextTCPAddrPort(ctx, netip.AddrPortFrom(bv4, 5001))
		if err != nil {
			if ctx.Err() != nil {
				t.Fatal(err)
			}
			time.Sleep(50 * time.Millisecond)
			continue
		}
		c = conn
	}
	const total = 512 << 20
	src := make([]byte, 1<<20)
	start := time.Now()
	for sent := 0; sent < total; sent += len(src) {
		if _, err := c.Write(src); err != nil {
			t.Fatal(err)
		}
	}
	c.Close()
	for lines.Scan() {
		if v, ok := strings.CutPrefix(lines.Text(), "RSS "); ok {
			t.Logf("%d MiB in %v; receiving node's peak RSS %s, sending node's (with the test) %d MiB",
				total>>20, time.Since(start).Round(time.Millisecond), v, peakRSS()>>20)
			break
		}
	}
	cmd.Wait()
}

// TestRSSHelper is the receiving node of TestRSSUnderLoad.
func TestRSSHelper(t *testing.T) {
	peer := os.Getenv("FASTNET_RSS_HELPER")
	if peer == "" {
		t.Skip("run by TestRSSUnderLoad")
	}
	var apub string
	var aport int
	if _, err := fmt.Sscanf(strings.Replace(peer, ":", " ", 1), "%s %d", &apub, &aport); err != nil {
		t.Fatal(err)
	}
	runtime.GC()
	resetPeakRSS()
	b := startNode(t, 2, fastnetMaker(Options{}))
	if err := b.dev.IpcSet(fmt.Sprintf("public_key=%s\nendpoint=127.0.0.1:%d\nallowed_ip=10.77.0.1/32\n", apub, aport)); err != nil {
		t.Fatal(err)
	}
	ln, err := b.net.ListenTCPAddrPort(netip.AddrPortFrom(b.v4, 5001))
	if err != nil {
		t.Fatal(err)
	}
	fmt.Printf("READY %s %d\n", hex.EncodeToString(b.pub[:]), b.port)
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	n, _ := io.CopyBuffer(io.Discard, c, make([]byte, 256<<10))
	fmt.Printf("RSS %d MiB (%d MiB received)\n", peakRSS()>>20, n>>20)
}

// startNode starts node i (10.77.0.i, fd77::i) with no peers.
func startNode(tb testing.TB, i int, mk stackMaker) *wgNode {
	tb.Helper()
	n := &wgNode{
		v4: netip.AddrFrom4([4]byte{10, 77, 0, byte(i)}),
		v6: netip.MustParseAddr(fmt.Sprintf("fd77::%d", i)),
	}
	var err error
	n.tun, n.net, err = mk([]netip.Addr{n.v4, n.v6}, testMTU)
	if err != nil {
		tb.Fatal(err)
	}
	n.priv, n.pub = newKey(tb)
	n.dev = device.NewDevice(n.tun, conn.NewDefaultBind(), device.NewLogger(device.LogLevelSilent, ""))
	tb.Cleanup(n.dev.Close)
	if err := n.dev.IpcSet(fmt.Sprintf("private_key=%s\nlisten_port=0\n", hex.EncodeToString(n.priv[:]))); err != nil {
		tb.Fatal(err)
	}
	if err := n.dev.Up(); err != nil {
		tb.Fatal(err)
	}
	n.port = listenPort(tb, n.dev)
	return n
}
