package fastnet

import (
	"io"
	"runtime"
	"runtime/debug"
	"syscall"
	"testing"
	"time"
)

// BenchmarkBulkTCP measures one TCP stream through two wireguard-go devices
// on 127.0.0.1 (MTU 1420), each end on a userspace stack: wireguard-go's
// stock tun/netstack, then fastnet as the agent runs it, with 64 KiB GSO
// packets instead of six segments' worth, with GSO and GRO each off to show
// what they give, and with 4 MiB TCP windows instead of 1 MiB. One op moves 64 MiB; MB/s is the throughput. peak-RSS-MiB is
// the process's peak resident set during the sub-benchmark (both nodes and
// the benchmark itself), drops/op the packets dropped at full queues,
// cpu-ns/B the process's CPU time (user and system) per byte moved: what
// the tunnel costs, less sensitive than MB/s to other load on the machine.
//
//	go test -run '^$' -bench BulkTCP -benchtime 3x ./node/fastnet/
func BenchmarkBulkTCP(b *testing.B) {
	for _, bc := range []struct {
		name string
		mk   stackMaker
	}{
		{"stock", stockMaker},
		{"fastnet", fastnetMaker(Options{})},
		{"fastnet-gso64k", fastnetMaker(Options{GSOMaxSize: 65535})},
		{"fastnet-noGRO", fastnetMaker(Options{DisableGRO: true})},
		{"fastnet-noGSO", fastnetMaker(Options{DisableGSO: true})},
		{"fastnet-noGSO-noGRO", fastnetMaker(Options{DisableGSO: true, DisableGRO: true})},
		{"fastnet-gso12seg", fastnetMaker(Options{GSOMaxSize: 12 * testMTU})},
		{"fastnet-window1m", fastnetMaker(Options{TCPMaxSendBuffer: 1 << 20, TCPMaxReceiveBuffer: 1 << 20})},
	} {
		b.Run(bc.name, func(b *testing.B) { benchBulk(b, bc.mk) })
	}
}

const benchOpBytes = 64 << 20

func benchBulk(b *testing.B, mk stackMaker) {
	runtime.GC()
	debug.FreeOSMemory()
	resetPeakRSS()
	a, bn := newPair(b, mk)
	c, s := connect(b, a, bn, bn.v4)
	defer c.Close()
	defer s.Close()

	// The receiver reports every benchOpBytes received.
	got := make(chan error, 1)
	go func() {
		buf := make([]byte, 256<<10)
		var n int64
		for {
			k, err := s.Read(buf)
			n += int64(k)
			if n >= benchOpBytes {
				n -= benchOpBytes
				got <- nil
			}
			if err != nil {
				if err != io.EOF {
					got <- err
				}
				return
			}
		}
	}()
	src := make([]byte, 1<<20)
	for i := range src {
		src[i] = byte(i * 31)
	}
	// Warm up: open the congestion window.
	send := func() {
		for sent := 0; sent < benchOpBytes; sent += len(src) {
			if _, err := c.Write(src); err != nil {
				b.Fatal(err)
			}
		}
		if err := <-got; err != nil {
			b.Fatal(err)
		}
	}
	send()
	b.SetBytes(benchOpBytes)
	cpu0 := cpuTime()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		send()
	}
	b.StopTimer()
	b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N)/benchOpBytes, "cpu-ns/B")
	b.ReportMetric(float64(peakRSS())/(1<<20), "peak-RSS-MiB")
	if d, ok := a.tun.(*Device); ok {
		b.ReportMetric(float64(d.Stats().QueueDrops+bn.tun.(*Device).Stats().QueueDrops)/float64(b.N+1), "drops/op")
	}
}

// cpuTime is the process's user and system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
