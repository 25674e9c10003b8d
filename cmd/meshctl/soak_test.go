package main

// Load through the real binary on loopback: bounded concurrent HTTP load
// through the embedded proxy of `meshctl server` while nodes join, leave
// and are revoked. 30 s here; MESHCTL_SOAK=1 runs it for 5 minutes.
// docs/reliability.md reports the figures.

import (
	"bufio"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshctl/meshctl/internal/meshtest"
)

// soakDuration is how long TestSoakLoad keeps the load on.
func soakDuration() time.Duration {
	if soak() {
		return 5 * time.Minute
	}
	return 30 * time.Second
}

// pprofGoroutines reads the goroutine count of the process serving
// MESHCTL_PPROF at addr.
func pprofGoroutines(addr string) (int, error) {
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + addr + "/debug/pprof/goroutine?debug=1")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	line, err := bufio.NewReader(resp.Body).ReadString('\n')
	if err != nil {
		return 0, err
	}
	io.Copy(io.Discard, resp.Body)
	n, ok := strings.CutPrefix(strings.TrimSpace(line), "goroutine profile: total ")
	if !ok {
		return 0, fmt.Errorf("unexpected first line %q", line)
	}
	return strconv.Atoi(n)
}

// pprofHeapLive reads HeapAlloc (bytes) of the process serving
// MESHCTL_PPROF at addr right after its second garbage collection (gc=1,
// twice: the first only moves sync.Pool contents, such as wireguard-go's
// message buffers, to the victim cache; the second frees them): about its
// live heap. (HeapInuse would add fragmentation.)
func pprofHeapLive(addr string) (int, error) {
	if _, err := pprofHeapOnce(addr); err != nil {
		return 0, err
	}
	return pprofHeapOnce(addr)
}

func pprofHeapOnce(addr string) (int, error) {
	c := &http.Client{Timeout: 30 * time.Second}
	resp, err := c.Get("http://" + addr + "/debug/pprof/heap?debug=1&gc=1")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "# HeapAlloc = "); ok {
			return strconv.Atoi(v)
		}
	}
	return 0, fmt.Errorf("no HeapAlloc in the heap profile (%v)", sc.Err())
}

// saveHeapProfile writes the heap profile (after a GC) of the process
// serving MESHCTL_PPROF at addr to path, for `go tool pprof -diff_base`.
func saveHeapProfile(addr, path string) error {
	c := &http.Client{Timeout: 30 * time.Second}
	resp, err := c.Get("http://" + addr + "/debug/pprof/heap?gc=1")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	return os.WriteFile(path, b, 0o644)
}

// vmRSS reads a process's resident set (KiB) from /proc.
func vmRSS(pid int) (int, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			return strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// TestSoakLoad: 6 clients (each at most one request per 5 ms) fetch pages
// of two steady nodes, and of whichever churning node is live, through the
// proxy, while churning nodes enroll, come up, serve, and then either
// leave (agent stopped) or are revoked. Every request to a steady node
// must succeed, and every request to a churning node while it is live;
// clients stop asking for it just before it goes, and a request still in
// flight then may fail (404, 502, 504, a timeout). At the end (churned
// nodes revoked, client connections closed) the server's goroutines must
// be back within 25 of where they were after warm-up, its live heap after
// a collection within 1.5× + 8 MiB, and its RSS (which the runtime returns
// to the OS only lazily) within 1.5× + 48 MiB.
func TestSoakLoad(t *testing.T) {
	needBinary(t)
	testStart := time.Now()
	base := meshtest.ShortTempDir(t)
	dataDir := filepath.Join(base, "d")
	pprofAddr := net.JoinHostPort("127.0.0.1", freePort(t))
	srvAddr := net.JoinHostPort("127.0.0.1", freePort(t))
	httpAddr := net.JoinHostPort("127.0.0.1", freePort(t))
	srv := startServerAt(t, t, []string{"MESHCTL_PPROF=" + pprofAddr}, dataDir, srvAddr, httpAddr,
		net.JoinHostPort("127.0.0.1", freePort(t)), net.JoinHostPort("127.0.0.1", freeUDPPort(t)))
	pid := srv.cmd.Process.Pid
	port := portOf(httpAddr)

	steady := []*chaosNode{newChaosNode(t, t, base, dataDir, "s1"), newChaosNode(t, t, base, dataDir, "s2")}
	for _, n := range steady {
		n.start(t)
	}
	c := newProxyClient(t, nil)
	c.Transport.(*http.Transport).MaxIdleConnsPerHost = 16
	fetch := func(name string) (int, error) {
		st, body, err := get(c, "http://"+name+".localhost:"+port+"/", nil)
		if err == nil && st == 200 && body != "hello from "+name {
			return st, fmt.Errorf("%s answered %q", name, body)
		}
		return st, err
	}
	for _, n := range steady {
		waitFor(t, agentDeadline, "the proxy to serve "+n.name, func() (bool, string) {
			st, err := fetch(n.name)
			return st == 200 && err == nil, fmt.Sprint(st, err, "\n", srv.stderr.String())
		})
	}
	// Warm-up: a burst like the load's, then the baseline.
	for i := 0; i < 200; i++ {
		fetch(steady[i%2].name)
	}
	c.Transport.(*http.Transport).CloseIdleConnections()
	g0, err := pprofGoroutines(pprofAddr)
	if err != nil {
		t.Fatalf("read the server's goroutines from MESHCTL_PPROF: %v", err)
	}
	rss0, err := vmRSS(pid)
	if err != nil {
		t.Fatal(err)
	}
	heap0, err := pprofHeapLive(pprofAddr)
	if err != nil {
		t.Fatal(err)
	}
	// MESHCTL_SOAK_PROFILES=DIR keeps the server's heap profiles from
	// before and after the load there (heap-before.pb.gz, heap-after.pb.gz).
	profDir := os.Getenv("MESHCTL_SOAK_PROFILES")
	if profDir != "" {
		if err := saveHeapProfile(pprofAddr, filepath.Join(profDir, "heap-before.pb.gz")); err != nil {
			t.Fatal(err)
		}
	}

	dur := soakDuration()
	stop := make(chan struct{})
	var live atomic.Pointer[string] // the churning node clients may ask for
	type tally struct {
		mu        sync.Mutex
		lat       []time.Duration // steady nodes' successful requests
		steadyOK  int
		churnOK   int
		churnGone int // 404/502 from a churning node
		errs      []string
	}
	var tl tally
	var wg sync.WaitGroup
	const clients = 6
	for w := 0; w < clients; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			pace := time.NewTicker(5 * time.Millisecond)
			defer pace.Stop()
			for {
				select {
				case <-stop:
					return
				case <-pace.C:
				}
				name, churn := steady[rand.IntN(2)].name, false
				if p := live.Load(); p != nil && rand.IntN(3) == 0 {
					name, churn = *p, true
				}
				start := time.Now()
				st, err := fetch(name)
				d := time.Since(start)
				now := live.Load()
				gone := now == nil || *now != name // for a churning node
				tl.mu.Lock()
				switch {
				case !churn && st == 200 && err == nil:
					tl.steadyOK++
					tl.lat = append(tl.lat, d)
				case churn && st == 200 && err == nil:
					tl.churnOK++
				case churn && gone:
					// The node left or was revoked while this request
					// was in flight: 404, 502, 504 or the client's
					// timeout (a vanished node never answers).
					tl.churnGone++
				default:
					if len(tl.errs) < 50 {
						tl.errs = append(tl.errs, fmt.Sprintf("%s after %v: %d %v", name, time.Since(testStart).Round(time.Millisecond), st, err))
					} else {
						tl.errs[49] = "… and more"
					}
				}
				tl.mu.Unlock()
			}
		}()
	}

	// Churn: enroll, start, serve for a moment, then leave or be revoked.
	var joined, left, revoked int
	var churned []string
	deadline := time.Now().Add(dur)
	func() {
		defer func() { close(stop); wg.Wait() }()
		for i := 1; time.Now().Before(deadline); i++ {
			n := newChaosNode(t, t, base, dataDir, fmt.Sprintf("c%d", i))
			n.start(t)
			churned = append(churned, n.name)
			waitFor(t, 30*time.Second, "the proxy to serve the new node "+n.name, func() (bool, string) {
				st, err := fetch(n.name)
				return st == 200 && err == nil, fmt.Sprint(st, err)
			})
			joined++
			name := n.name
			live.Store(&name)
			time.Sleep(2 * time.Second) // pacing: the node serves under load for a while
			live.Store(nil)             // clients stop asking for it; requests in flight may fail
			if i%2 == 0 {
				mustOK(t, nil, "nodes", "revoke", "--data-dir", dataDir, n.name)
				revoked++
				waitFor(t, proxyDeadline, n.name+" to be 404 after its revocation", func() (bool, string) {
					st, err := fetch(n.name)
					return st == 404 && err == nil, fmt.Sprint(st, err)
				})
				if code := n.up.wait(t, proxyDeadline); code != 3 {
					t.Errorf("%s's agent exited %d after its revocation, want 3", n.name, code)
				}
			} else {
				n.stop(t)
				left++
			}
		}
	}()
	elapsed := time.Since(deadline.Add(-dur))

	// Decommission the nodes that left, so that the server carries the
	// same members as at the baseline.
	for i, name := range churned {
		if (i+1)%2 == 1 {
			mustOK(t, nil, "nodes", "revoke", "--data-dir", dataDir, name)
		}
	}
	c.Transport.(*http.Transport).CloseIdleConnections()
	for _, n := range steady {
		if st, err := fetch(n.name); st != 200 || err != nil {
			t.Errorf("%s after the load: %d %v", n.name, st, err)
		}
	}
	c.Transport.(*http.Transport).CloseIdleConnections()
	var g1 int
	waitFor(t, 30*time.Second, "the server's goroutines to settle back near the baseline", func() (bool, string) {
		g1, err = pprofGoroutines(pprofAddr)
		return err == nil && g1 <= g0+25, fmt.Sprintf("goroutines %d after the load, %d at the baseline (%v)", g1, g0, err)
	})
	rss1, err := vmRSS(pid)
	if err != nil {
		t.Fatal(err)
	}
	heap1, err := pprofHeapLive(pprofAddr)
	if err != nil {
		t.Fatal(err)
	}
	if profDir != "" {
		if err := saveHeapProfile(pprofAddr, filepath.Join(profDir, "heap-after.pb.gz")); err != nil {
			t.Fatal(err)
		}
	}

	slices.Sort(tl.lat)
	pct := func(p float64) time.Duration {
		if len(tl.lat) == 0 {
			return 0
		}
		return tl.lat[min(len(tl.lat)-1, int(p*float64(len(tl.lat))))]
	}
	total := tl.steadyOK + tl.churnOK + tl.churnGone + len(tl.errs)
	t.Logf("load for %v with %d clients: %d requests (%.0f/s): steady nodes %d ok, churning nodes %d ok and %d failed in flight as they went; %d errors; latency of steady requests p50 %v, p99 %v, max %v",
		elapsed.Round(time.Millisecond), clients, total, float64(total)/elapsed.Seconds(), tl.steadyOK, tl.churnOK, tl.churnGone, len(tl.errs),
		pct(0.50).Round(time.Microsecond), pct(0.99).Round(time.Microsecond), pct(1).Round(time.Microsecond))
	t.Logf("churn: %d joined, %d left, %d revoked; server goroutines %d → %d, live heap after GC %.1f → %.1f MiB, VmRSS %d → %d KiB; %v in all",
		joined, left, revoked, g0, g1, float64(heap0)/(1<<20), float64(heap1)/(1<<20), rss0, rss1, time.Since(testStart).Round(time.Millisecond))
	if len(tl.errs) > 0 {
		t.Errorf("%d unexpected errors:\n%s", len(tl.errs), strings.Join(tl.errs, "\n"))
	}
	if tl.steadyOK == 0 || joined < 2 || revoked < 1 || left < 1 {
		t.Errorf("too little happened: %d steady requests, %d joined, %d left, %d revoked", tl.steadyOK, joined, left, revoked)
	}
	if p99 := pct(0.99); p99 > 2*time.Second {
		t.Errorf("p99 latency %v through the proxy on loopback, want under 2s", p99)
	}
	if heap1 > heap0*3/2+8<<20 {
		t.Errorf("server live heap after GC grew from %d to %d bytes (more than 1.5× + 8 MiB)", heap0, heap1)
	}
	if rss1 > rss0*3/2+48*1024 {
		t.Errorf("server VmRSS grew from %d to %d KiB (more than 1.5× + 48 MiB)", rss0, rss1)
	}
}
