// Command coordload loads a meshctl coordinator with lightweight simulated
// nodes and measures what issue 7 ("coordinator at scale") asks about:
// enrollment throughput, holding one long-poll watcher per node, how long
// a revocation takes to reach the last watcher, the bytes and coordinator
// CPU each change costs, and the coordinator's memory, in the mesh and the
// hub topology.
//
// The documented target run (10,000 nodes, both topologies, about three
// minutes on a 2-core machine; results in README.md):
//
//	go build -o /tmp/coordload ./bench/coordload && /tmp/coordload -spawn
//
// Variants:
//
//	/tmp/coordload                      # coordinator in this process if file descriptors allow (see "CPU and memory" below)
//	/tmp/coordload -n 1000 -spawn       # quick run, about 20 seconds
//	/tmp/coordload -spawn -coord-gomemlimit 480MiB   # GOMEMLIMIT for the coordinator only
//	/tmp/coordload -topology mesh -revocations 20 -json > mesh.json
//	/tmp/coordload -url https://HOST:7443 -ca-pin sha256:… -admin-key mk_… -topology mesh
//	/tmp/coordload -spawn -profile /tmp/prof   # CPU profiles of each phase, heap profile
//
// Each simulated node is real where the coordinator can tell: it enrolls
// with its own one-time token over its own TLS connection to the pinned
// CA, with a fresh ECDSA P-256 key and CSR, WireGuard key and SSH key
// (generated before the clock starts), and then long-polls the netmap over
// mTLS with its client certificate, through its own http.Client (one
// Transport, one connection: MaxConnsPerHost 1), exactly as node.Client
// does (since=VERSION&delta=1). It runs no WireGuard engine and keeps no
// netmap: it decodes small answers (deltas) and only scans large full
// netmaps for the fields it needs, so that 10,000 of them fit in one
// process.
//
// Per topology the run is:
//
//  1. start a coordinator with a fresh data directory (the embedded SQLite
//     store with its durable commits; long-poll wait -longpoll);
//  2. create one single-use token per node over the admin API, then enroll
//     -n nodes and -proxies proxies, -c at a time: enrollments/s;
//  3. start a watcher per node and wait until every one has a long-poll
//     parked at the coordinator;
//  4. measure the coordinator's RSS and Go heap;
//  5. -revocations times: revoke one node over the admin API and time how
//     long until the LAST watcher that had it in its netmap (mesh: every
//     node; hub: the proxies, the only members that see other nodes) has
//     received a netmap without it. Per change it also reports the bytes
//     the watchers received (TLS and HTTP included) and the CPU time spent
//     until the watchers are parked again.
//
// CPU and memory: with -spawn the coordinator runs as "coordload serve" in
// a child process, so its CPU time (getrusage) and its RSS and Go heap are
// its own; that is the mode the targets are checked in. It is also what
// the tool does when this process's file descriptor limit cannot hold both
// ends of every watcher's connection (it raises RLIMIT_NOFILE first, but a
// container may cap the hard limit: at 20,000, a 10,000-node run needs the
// child), and it says so. In the in-process mode coordinator.New runs in
// this process, and CPU time is
// split with CPU profile labels (side=coordinator on every goroutine the
// coordinator starts, side=client on the simulated nodes'; unlabeled time,
// mostly the garbage collector, is shown apart), while RSS and heap are the
// whole process's. An external coordinator (-url) is measured from the
// outside only; -coord-pid adds its CPU time and RSS if it runs on this
// machine.
//
// The output is a readable summary, or JSON with -json.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshctl/meshctl/wire"
)

type config struct {
	n, proxies, conc, revocations int
	topologies                    []string
	longPoll                      time.Duration
	dir                           string
	spawn                         bool
	url, caPin                    string
	adminKey, adminSocket         string
	coordPID                      int
	jsonOut                       bool
	profileDir                    string
	quiet                         time.Duration
	timeout                       time.Duration
	prefix                        string
	hold                          time.Duration
	coordMemLimit                 string
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "serve" {
		serveMain(os.Args[2:])
		return
	}
	var cfg config
	var topologies string
	flag.IntVar(&cfg.n, "n", 10000, "number of simulated nodes (the target is 10,000; -n 1000 is a quick run)")
	flag.IntVar(&cfg.proxies, "proxies", 2, "number of simulated proxies (role proxy) on top of -n; in the hub topology they are the watchers that see revocations")
	flag.IntVar(&cfg.conc, "c", 64, "enrollments (and token creations, and watcher connection set-ups) in flight at once")
	flag.IntVar(&cfg.revocations, "revocations", 9, "revocations to time per topology")
	flag.StringVar(&topologies, "topology", "mesh,hub", "comma-separated topologies to run (an external coordinator: the one it runs)")
	flag.DurationVar(&cfg.longPoll, "longpoll", 5*time.Minute, "long-poll wait of the coordinator this tool starts (long, so that 304 renewals do not blur the measurements)")
	flag.StringVar(&cfg.dir, "dir", "", "where the temporary data directories go (default: the system temp dir)")
	flag.BoolVar(&keepData, "keep", false, "keep the data directories")
	flag.BoolVar(&cfg.spawn, "spawn", false, "run the coordinator in a child process (exact coordinator CPU, RSS and heap); also chosen when this process's file descriptor limit cannot hold both ends of every watcher's connection")
	flag.StringVar(&cfg.url, "url", "", "load an external coordinator at this URL instead of starting one")
	flag.StringVar(&cfg.caPin, "ca-pin", "", "external coordinator: its CA pin")
	flag.StringVar(&cfg.adminKey, "admin-key", "", "external coordinator: an admin key (tokens, revocations)")
	flag.StringVar(&cfg.adminSocket, "admin-socket", "", "external coordinator: its admin socket, instead of -admin-key")
	flag.IntVar(&cfg.coordPID, "coord-pid", 0, "external coordinator: its process id on this machine, for CPU time and RSS")
	flag.StringVar(&cfg.prefix, "prefix", "", "node name prefix (default: \"ld\" and 4 random hex digits with -url, else none)")
	flag.BoolVar(&cfg.jsonOut, "json", false, "print the results as JSON")
	flag.StringVar(&cfg.profileDir, "profile", "", "write CPU profiles of each phase and a heap profile of the coordinator here")
	flag.DurationVar(&cfg.quiet, "quiet", 300*time.Millisecond, "a change is over when no watcher has had an answer for this long")
	flag.DurationVar(&cfg.timeout, "timeout", 3*time.Minute, "give up on a phase after this long")
	flag.StringVar(&cfg.coordMemLimit, "coord-gomemlimit", "", "with -spawn: GOMEMLIMIT for the coordinator process only (e.g. 400MiB)")
	flag.DurationVar(&cfg.hold, "hold", 0, "hold the parked watchers this long before the revocations (steady state; long-poll renewals)")
	flag.Parse()
	cfg.topologies = strings.Split(topologies, ",")
	if cfg.url != "" && len(cfg.topologies) != 1 {
		fatalf("with -url, pass the one -topology the coordinator runs")
	}
	if cfg.prefix == "" && cfg.url != "" {
		cfg.prefix = fmt.Sprintf("ld%04x-", rand.IntN(1<<16))
	}
	if cfg.profileDir != "" {
		if err := os.MkdirAll(cfg.profileDir, 0o755); err != nil {
			fatalf("%v", err)
		}
	}
	limit := raiseFDLimit(1 << 20)
	// File descriptors: a watcher holds one connection; in-process, both
	// of its ends are in this process.
	need := uint64(cfg.n+cfg.proxies) + uint64(2*cfg.conc) + 512
	var fdNote string
	switch {
	case need > limit:
		fatalf("%d watchers need about %d file descriptors per process and the limit is %d (raising it failed): lower -n", cfg.n+cfg.proxies, need, limit)
	case cfg.url == "" && !cfg.spawn && 2*need > limit:
		cfg.spawn = true
		fdNote = fmt.Sprintf("coordinator spawned: in-process needs about %d file descriptors and the limit is %d", 2*need, limit)
		logf("%s", fdNote)
	}
	res := result{Nodes: cfg.n, Proxies: cfg.proxies, Concurrency: cfg.conc, GOMAXPROCS: runtime.GOMAXPROCS(0),
		CPUs: runtime.NumCPU(), FDLimit: limit, GoVersion: runtime.Version(), Started: time.Now().UTC()}
	ctx := context.Background()
	for _, topo := range cfg.topologies {
		var tr *topoResult
		var err error
		pprof.Do(ctx, pprof.Labels("side", "client"), func(ctx context.Context) {
			tr, err = runTopology(ctx, &cfg, topo)
		})
		if err != nil {
			fatalf("%s: %v", topo, err)
		}
		if fdNote != "" {
			tr.Notes = append(tr.Notes, fdNote)
		}
		res.Topologies = append(res.Topologies, *tr)
		if !cfg.jsonOut {
			printTopology(os.Stdout, tr)
		}
	}
	if cfg.jsonOut {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		enc.Encode(res)
	}
}

func fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "coordload: "+format+"\n", args...)
	os.Exit(1)
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "%s "+format+"\n", append([]any{time.Now().Format("15:04:05.000")}, args...)...)
}

type result struct {
	Nodes       int          `json:"nodes"`
	Proxies     int          `json:"proxies"`
	Concurrency int          `json:"concurrency"`
	GOMAXPROCS  int          `json:"gomaxprocs"`
	CPUs        int          `json:"cpus"`
	FDLimit     uint64       `json:"fd_limit"`
	GoVersion   string       `json:"go_version"`
	Started     time.Time    `json:"started"`
	Topologies  []topoResult `json:"topologies"`
}

type topoResult struct {
	Topology string `json:"topology"`
	Mode     string `json:"coordinator"`
	Nodes    int    `json:"nodes"`
	Proxies  int    `json:"proxies"`

	KeygenSeconds float64 `json:"keygen_seconds"`
	TokenSeconds  float64 `json:"token_seconds"`
	Enroll        struct {
		Count     int      `json:"count"`
		Errors    int      `json:"errors"`
		FirstErr  string   `json:"first_error,omitempty"`
		Seconds   float64  `json:"seconds"`
		PerSecond float64  `json:"per_second"`
		P50ms     float64  `json:"latency_p50_ms"`
		P99ms     float64  `json:"latency_p99_ms"`
		CPU       cpuSplit `json:"cpu"`
		BytesIn   int64    `json:"bytes_received"` // by the enrolling nodes
	} `json:"enroll"`
	Watch struct {
		Count        int      `json:"count"`
		Seconds      float64  `json:"seconds"` // until every watcher is parked
		Answers      int64    `json:"answers"`
		Full         int64    `json:"full_netmaps"`
		Deltas       int64    `json:"deltas"`
		BytesIn      int64    `json:"bytes_received"`
		CPU          cpuSplit `json:"cpu"`
		Errors       int64    `json:"errors"`
		BaseErrors   int64    `json:"delta_base_errors"`
		LastErr      string   `json:"last_error,omitempty"`
		NotModified  int64    `json:"not_modified"`
		ParkedAtEnd  int64    `json:"parked_at_end"`
		RevokedNodes int64    `json:"revoked_watchers"`
	} `json:"watch"`
	Memory      memStats      `json:"memory"`
	Revocations []revResult   `json:"revocations"`
	Change      changeSummary `json:"per_change"`
	Notes       []string      `json:"notes,omitempty"`
}

type cpuSplit struct {
	Method      string  `json:"method"`
	Coordinator float64 `json:"coordinator_seconds"`
	Client      float64 `json:"client_seconds,omitempty"`
	Unlabeled   float64 `json:"unlabeled_seconds,omitempty"` // in-process: GC and runtime work nobody is labeled for
	Process     float64 `json:"process_seconds"`             // this process (in-process: coordinator and clients)
	Known       bool    `json:"known"`
}

type revResult struct {
	Victim    string   `json:"victim"`
	Affected  int      `json:"affected_watchers"`
	Reached   int      `json:"reached"`
	LastMs    float64  `json:"last_watcher_ms"`
	P50Ms     float64  `json:"watcher_p50_ms"`
	P99Ms     float64  `json:"watcher_p99_ms"`
	Answers   int64    `json:"answers"`
	Bytes     int64    `json:"bytes"`
	BodyBytes int64    `json:"body_bytes"`
	SettleMs  float64  `json:"settle_ms"`
	CPU       cpuSplit `json:"cpu"`
}

type changeSummary struct {
	LastP50Ms    float64 `json:"last_watcher_p50_ms"`
	LastP99Ms    float64 `json:"last_watcher_p99_ms"`
	LastMaxMs    float64 `json:"last_watcher_max_ms"`
	WatcherP50Ms float64 `json:"watcher_p50_ms"`
	WatcherP99Ms float64 `json:"watcher_p99_ms"`
	Answers      float64 `json:"answers"`
	Bytes        float64 `json:"bytes"`
	CoordCPU     float64 `json:"coordinator_cpu_seconds"`
	ClientCPU    float64 `json:"client_cpu_seconds"`
	UnlabeledCPU float64 `json:"unlabeled_cpu_seconds"`
	ProcessCPU   float64 `json:"process_cpu_seconds"`
	CPUMethod    string  `json:"cpu_method"`
	Incomplete   int     `json:"incomplete"`
}

// meter measures the CPU time of one phase.
type meter struct {
	t         *target
	cfg       *config
	name      string
	prof      bytes.Buffer
	profiling bool
	childProf bool
	self      time.Duration
	coord     time.Duration
	coordOK   bool
}

func startMeter(t *target, cfg *config, name string) *meter {
	m := &meter{t: t, cfg: cfg, name: name}
	if t.srv != nil {
		m.profiling = pprof.StartCPUProfile(&m.prof) == nil
	} else if t.debug != "" && cfg.profileDir != "" {
		if resp, err := http.Get(t.debug + "/cpuprofile/start"); err == nil {
			resp.Body.Close()
			m.childProf = resp.StatusCode == http.StatusOK
		}
	}
	m.self = selfCPU()
	m.coord, m.coordOK = t.cpuTime()
	return m
}

func (m *meter) stop() cpuSplit {
	self := selfCPU() - m.self
	out := cpuSplit{Process: self.Seconds()}
	if c, ok := m.t.cpuTime(); ok && m.coordOK {
		out.Method = "coordinator process getrusage"
		out.Coordinator, out.Client, out.Known = (c - m.coord).Seconds(), self.Seconds(), true
	}
	if m.profiling {
		pprof.StopCPUProfile()
		if by, err := cpuByLabel(m.prof.Bytes(), "side"); err == nil {
			out.Method = "CPU profile labels (in-process)"
			out.Coordinator, out.Client, out.Unlabeled = by["coordinator"].Seconds(), by["client"].Seconds(), by[""].Seconds()
			out.Known = true
		}
		m.save(m.prof.Bytes())
	}
	if m.childProf {
		if resp, err := http.Get(m.t.debug + "/cpuprofile/stop"); err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			m.save(b)
		}
	}
	return out
}

func (m *meter) save(b []byte) {
	if m.cfg.profileDir == "" {
		return
	}
	os.WriteFile(filepath.Join(m.cfg.profileDir, m.t.topology+"-"+m.name+".pprof"), b, 0o644)
}

func runTopology(ctx context.Context, cfg *config, topo string) (*topoResult, error) {
	var (
		t   *target
		err error
	)
	switch {
	case cfg.url != "":
		t, err = startExternal(cfg, topo)
	case cfg.spawn:
		t, err = startSpawned(ctx, cfg, topo)
	default:
		t, err = startInProcess(ctx, cfg, topo)
	}
	if err != nil {
		return nil, err
	}
	defer t.close()
	res := &topoResult{Topology: topo, Mode: t.mode, Nodes: cfg.n, Proxies: cfg.proxies}
	logf("%s: coordinator %s at %s", topo, t.mode, t.url)
	if t.debug != "" {
		logf("%s: coordinator's pprof at %s/debug/pprof/ (stats at %s/stats)", topo, t.debug, t.debug)
	}

	// Key material, before the clock starts.
	total := cfg.n + cfg.proxies
	ids := make([]*identity, total)
	start := time.Now()
	parallel(total, runtime.GOMAXPROCS(0), func(i int) error {
		name, role := fmt.Sprintf("%sn%05d", cfg.prefix, i), wire.RoleNode
		if i >= cfg.n {
			name, role = fmt.Sprintf("%sproxy%d", cfg.prefix, i-cfg.n), wire.RoleProxy
		}
		var err error
		ids[i], err = newIdentity(name, role)
		return err
	})
	res.KeygenSeconds = time.Since(start).Seconds()

	// One single-use token per node.
	tokens := make([]string, total)
	start = time.Now()
	if err := parallel(total, cfg.conc, func(i int) error {
		var resp wire.TokenCreateResponse
		err := t.adminCall(ctx, http.MethodPost, wire.PathAdminTokens,
			wire.TokenCreateRequest{MaxUses: 1, Role: ids[i].role, TTL: wire.Duration(24 * time.Hour)}, &resp)
		tokens[i] = resp.Token
		return err
	}); err != nil {
		return nil, fmt.Errorf("create tokens: %w", err)
	}
	res.TokenSeconds = time.Since(start).Seconds()
	logf("%s: %d key sets in %.1fs, %d tokens in %.1fs", topo, total, res.KeygenSeconds, total, res.TokenSeconds)

	// Enrollment.
	var enrollCnt, watchCnt counters
	nodes := make([]*simNode, total)
	lat := make([]float64, total)
	var errs atomic.Int64
	var firstErr atomic.Pointer[string]
	var progress atomic.Int64
	m := startMeter(t, cfg, "enroll")
	start = time.Now()
	stopProgress := ticker(5*time.Second, func() {
		logf("%s: enrolled %d/%d (%.0f/s)", topo, progress.Load(), total, float64(progress.Load())/time.Since(start).Seconds())
	})
	parallel(total, cfg.conc, func(i int) error {
		t0 := time.Now()
		info, err := enroll(ctx, t, ids[i], tokens[i], &enrollCnt)
		lat[i] = float64(time.Since(t0)) / 1e6
		if err == nil {
			nodes[i], err = newSimNode(t, i, ids[i], info, &watchCnt)
		}
		if err != nil {
			errs.Add(1)
			s := err.Error()
			firstErr.CompareAndSwap(nil, &s)
			return nil
		}
		progress.Add(1)
		return nil
	})
	el := time.Since(start)
	stopProgress()
	res.Enroll.CPU = m.stop()
	res.Enroll.Count = int(progress.Load())
	res.Enroll.Errors = int(errs.Load())
	if p := firstErr.Load(); p != nil {
		res.Enroll.FirstErr = *p
	}
	res.Enroll.Seconds = el.Seconds()
	res.Enroll.PerSecond = float64(res.Enroll.Count) / el.Seconds()
	slices.Sort(lat)
	res.Enroll.P50ms, res.Enroll.P99ms = pct(lat, 50), pct(lat, 99)
	res.Enroll.BytesIn = enrollCnt.read.Load()
	logf("%s: enrolled %d in %.1fs: %.0f/s (%d errors)", topo, res.Enroll.Count, el.Seconds(), res.Enroll.PerSecond, res.Enroll.Errors)
	if res.Enroll.Errors > 0 {
		logf("%s: first enrollment error: %s", topo, res.Enroll.FirstErr)
	}
	var live []*simNode
	for i, n := range nodes {
		if n != nil {
			n.affected = topo == "mesh" || ids[i].role == wire.RoleProxy
			live = append(live, n)
		}
	}
	for i, n := range live {
		n.idx = i
	}

	// Watchers.
	var st watchStats
	wctx, cancel := context.WithCancel(ctx)
	var wg, connected sync.WaitGroup
	sem := make(chan struct{}, cfg.conc)
	m = startMeter(t, cfg, "watch")
	start = time.Now()
	connected.Add(len(live))
	for _, n := range live {
		wg.Go(func() { n.watch(wctx, t, &st, sem, &connected) })
	}
	defer func() {
		cancel()
		wg.Wait()
	}()
	stopProgress = ticker(5*time.Second, func() {
		logf("%s: watchers: %d parked, %d answers (%d full, %d deltas), %.0f MB received, %d errors",
			topo, st.inflight.Load(), st.responses.Load(), st.full.Load(), st.delta.Load(), float64(watchCnt.read.Load())/1e6, st.errors.Load())
	})
	connected.Wait()
	ok := waitQuiet(&st, int64(len(live)), cfg.quiet, cfg.timeout)
	stopProgress()
	res.Watch.CPU = m.stop()
	res.Watch.Count = len(live)
	res.Watch.Seconds = time.Since(start).Seconds() - cfg.quiet.Seconds()
	res.Watch.Answers, res.Watch.Full, res.Watch.Deltas = st.responses.Load(), st.full.Load(), st.delta.Load()
	res.Watch.BytesIn = watchCnt.read.Load()
	if !ok {
		res.Notes = append(res.Notes, fmt.Sprintf("watchers did not all park within %v", cfg.timeout))
	}
	logf("%s: %d watchers parked in %.1fs (%d answers, %.0f MB)", topo, len(live), res.Watch.Seconds, res.Watch.Answers, float64(res.Watch.BytesIn)/1e6)

	// Memory with every node enrolled and watching: after a GC, and once
	// the runtime has returned the freed pages (RSS stable for a second).
	gc := func() {
		if t.debug != "" {
			if resp, err := http.Get(t.debug + "/gc"); err == nil {
				resp.Body.Close()
			}
		} else if t.srv != nil {
			runtime.GC()
		}
	}
	gc()
	afterGC := t.memory().RSSMiB
	last := afterGC
	for deadline, stable := time.Now().Add(15*time.Second), 0; time.Now().Before(deadline) && stable < 4; {
		time.Sleep(250 * time.Millisecond)
		gc()
		if r := t.memory().RSSMiB; r > last-1 && r < last+1 {
			stable++
		} else {
			last, stable = r, 0
		}
	}
	res.Memory = t.memory()
	res.Memory.RSSAfterGCMiB = afterGC
	if t.srv == nil {
		res.Memory.FDs = 0
		if t.pid != 0 {
			if ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", t.pid)); err == nil {
				res.Memory.FDs = len(ents)
			}
		}
	}
	if cfg.profileDir != "" {
		if t.debug != "" {
			if resp, err := http.Get(t.debug + "/debug/pprof/heap"); err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				os.WriteFile(filepath.Join(cfg.profileDir, topo+"-heap.pprof"), b, 0o644)
			}
		} else if f, err := os.Create(filepath.Join(cfg.profileDir, topo+"-heap.pprof")); err == nil {
			pprof.WriteHeapProfile(f)
			f.Close()
		}
	}

	if cfg.hold > 0 {
		logf("%s: holding %d watchers for %v", topo, len(live), cfg.hold)
		time.Sleep(cfg.hold)
		logf("%s: after %v: %d parked, %d answers, %d not modified, %d errors", topo, cfg.hold,
			st.inflight.Load(), st.responses.Load(), st.notModified.Load(), st.errors.Load())
	}

	// Revocations: regular nodes, spread over the enrollment order.
	var regular []*simNode
	for _, n := range live {
		if n.id.role == wire.RoleNode {
			regular = append(regular, n)
		}
	}
	gone := map[int]bool{}
	for r := range min(cfg.revocations, len(regular)) {
		victim := regular[(r*7919+len(regular)/2)%len(regular)]
		for gone[victim.idx] {
			victim = regular[(victim.idx+1)%len(regular)]
		}
		gone[victim.idx] = true
		rr := revoke(ctx, t, cfg, &st, &watchCnt, live, victim, gone, fmt.Sprintf("revoke%d", r))
		res.Revocations = append(res.Revocations, rr)
		logf("%s: revocation %d: last of %d watchers after %.0f ms (%d answers, %.1f kB, coordinator CPU %.3fs)",
			topo, r+1, rr.Affected, rr.LastMs, rr.Answers, float64(rr.Bytes)/1e3, rr.CPU.Coordinator)
	}
	res.Watch.Errors, res.Watch.BaseErrors, res.Watch.NotModified = st.errors.Load(), st.baseErrors.Load(), st.notModified.Load()
	res.Watch.ParkedAtEnd, res.Watch.RevokedNodes = st.inflight.Load(), st.revoked.Load()
	if p := st.lastErr.Load(); p != nil {
		res.Watch.LastErr = *p
	}
	res.Change = summarize(res.Revocations)
	return res, nil
}

// revoke revokes victim and measures until every affected watcher has a
// netmap without it and the watchers are parked again.
func revoke(ctx context.Context, t *target, cfg *config, st *watchStats, cnt *counters, live []*simNode,
	victim *simNode, gone map[int]bool, name string) revResult {
	rev := &revocation{victim: victim.nodeID, needle: []byte(`"` + victim.nodeID + `"`),
		seen: make([]atomic.Int64, len(live)), done: make(chan struct{})}
	affected := 0
	for _, n := range live {
		if n.affected && !gone[n.idx] {
			affected++
		}
	}
	rev.left.Store(int64(affected))
	if affected == 0 {
		close(rev.done)
	}
	bytes0, body0, ans0 := cnt.read.Load(), st.bodyBytes.Load(), st.responses.Load()
	m := startMeter(t, cfg, name)
	rev.start = time.Now()
	currentRev.Store(rev)
	var out revResult
	out.Victim, out.Affected = victim.id.name, affected
	if err := t.adminCall(ctx, http.MethodPost, wire.PathAdminNodeRevoke, wire.NameRequest{Name: victim.id.name}, nil); err != nil {
		fatalf("revoke %s: %v", victim.id.name, err)
	}
	select {
	case <-rev.done:
	case <-time.After(cfg.timeout):
	}
	reachedAt := time.Since(rev.start)
	// Watchers that were woken re-poll; the change is over when they are
	// all parked again (the victim's watcher has stopped).
	waitQuiet(st, int64(len(live)-len(gone)), cfg.quiet, cfg.timeout)
	out.SettleMs = float64(time.Since(rev.start)-cfg.quiet) / 1e6
	out.CPU = m.stop()
	currentRev.Store(nil)
	out.Bytes, out.BodyBytes, out.Answers = cnt.read.Load()-bytes0, st.bodyBytes.Load()-body0, st.responses.Load()-ans0
	var lat []float64
	for i := range rev.seen {
		if v := rev.seen[i].Load(); v > 0 {
			lat = append(lat, float64(v)/1e6)
		}
	}
	slices.Sort(lat)
	out.Reached = len(lat)
	if out.Reached < affected {
		out.LastMs = float64(reachedAt) / 1e6 // timed out: at least this
	} else if len(lat) > 0 {
		out.LastMs = lat[len(lat)-1]
	}
	out.P50Ms, out.P99Ms = pct(lat, 50), pct(lat, 99)
	return out
}

// waitQuiet waits until want watchers have a request in flight and no
// answer has come for quiet.
func waitQuiet(st *watchStats, want int64, quiet, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		last := time.Unix(0, st.lastAnswer.Load())
		if st.inflight.Load() >= want && time.Since(last) >= quiet {
			return true
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

func summarize(revs []revResult) changeSummary {
	var s changeSummary
	if len(revs) == 0 {
		return s
	}
	var last, w50, w99 []float64
	for _, r := range revs {
		last = append(last, r.LastMs)
		w50 = append(w50, r.P50Ms)
		w99 = append(w99, r.P99Ms)
		s.Answers += float64(r.Answers)
		s.Bytes += float64(r.Bytes)
		s.CoordCPU += r.CPU.Coordinator
		s.ClientCPU += r.CPU.Client
		s.UnlabeledCPU += r.CPU.Unlabeled
		s.ProcessCPU += r.CPU.Process
		s.CPUMethod = r.CPU.Method
		if r.Reached < r.Affected {
			s.Incomplete++
		}
	}
	k := float64(len(revs))
	s.Answers, s.Bytes, s.CoordCPU, s.ClientCPU, s.UnlabeledCPU, s.ProcessCPU =
		s.Answers/k, s.Bytes/k, s.CoordCPU/k, s.ClientCPU/k, s.UnlabeledCPU/k, s.ProcessCPU/k
	slices.Sort(last)
	slices.Sort(w50)
	slices.Sort(w99)
	s.LastP50Ms, s.LastP99Ms, s.LastMaxMs = pct(last, 50), pct(last, 99), last[len(last)-1]
	s.WatcherP50Ms, s.WatcherP99Ms = pct(w50, 50), pct(w99, 99)
	return s
}

// pct is the nearest-rank percentile of sorted values.
func pct(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p/100*float64(len(sorted))+0.5) - 1
	return sorted[max(0, min(i, len(sorted)-1))]
}

// parallel runs fn(0..n-1) with at most conc at once and returns the
// first error.
func parallel(n, conc int, fn func(i int) error) error {
	var next atomic.Int64
	var first atomic.Pointer[error]
	var wg sync.WaitGroup
	for range max(1, min(conc, n)) {
		wg.Go(func() {
			for {
				i := int(next.Add(1) - 1)
				if i >= n || first.Load() != nil {
					return
				}
				if err := fn(i); err != nil {
					first.CompareAndSwap(nil, &err)
				}
			}
		})
	}
	wg.Wait()
	if p := first.Load(); p != nil {
		return *p
	}
	return nil
}

// ticker calls fn every d until the returned stop is called.
func ticker(d time.Duration, fn func()) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(d)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
				fn()
			}
		}
	})
	return func() { close(done); wg.Wait() }
}

func printTopology(w io.Writer, r *topoResult) {
	p := func(format string, args ...any) { fmt.Fprintf(w, format+"\n", args...) }
	p("== %s topology: %d nodes + %d proxies, coordinator %s ==", r.Topology, r.Nodes, r.Proxies, r.Mode)
	p("enroll      %d in %.1fs: %.0f enrollments/s (latency p50 %.0f ms, p99 %.0f ms, %d errors)",
		r.Enroll.Count, r.Enroll.Seconds, r.Enroll.PerSecond, r.Enroll.P50ms, r.Enroll.P99ms, r.Enroll.Errors)
	if r.Enroll.FirstErr != "" {
		p("            first error: %s", r.Enroll.FirstErr)
	}
	p("            %s; %.1f MB to the enrolling nodes; (keys %.1fs, tokens %.1fs, not counted)",
		cpuLine(r.Enroll.CPU, r.Enroll.Count, "enrollment"), float64(r.Enroll.BytesIn)/1e6, r.KeygenSeconds, r.TokenSeconds)
	p("watch       %d watchers parked in %.1fs: %d answers (%d full, %d deltas), %.1f MB; %s",
		r.Watch.Count, r.Watch.Seconds, r.Watch.Answers, r.Watch.Full, r.Watch.Deltas, float64(r.Watch.BytesIn)/1e6, cpuLine(r.Watch.CPU, 0, ""))
	p("memory      RSS %.0f MiB settled (%.0f after the first GC, peak %.0f), Go heap live %.0f MiB, in use %.0f MiB, free %.0f MiB, stacks %.0f MiB, Go total %.0f MiB, %d goroutines, %d fds [%s]",
		r.Memory.RSSMiB, r.Memory.RSSAfterGCMiB, r.Memory.PeakRSSMiB, r.Memory.HeapLiveMiB, r.Memory.HeapInUseMiB, r.Memory.HeapFreeMiB, r.Memory.StacksMiB,
		r.Memory.GoTotalMiB, r.Memory.Goroutines, r.Memory.FDs, r.Memory.Scope)
	c := r.Change
	p("revoke      %d revocations: last watcher p50 %.0f ms, p99 %.0f ms, max %.0f ms (per watcher: p50 %.0f ms, p99 %.0f ms)%s",
		len(r.Revocations), c.LastP50Ms, c.LastP99Ms, c.LastMaxMs, c.WatcherP50Ms, c.WatcherP99Ms,
		map[bool]string{true: fmt.Sprintf(" — %d INCOMPLETE", c.Incomplete), false: ""}[c.Incomplete > 0])
	p("per change  %.0f answers, %.1f kB received (%.0f B per answer); coordinator CPU %.3fs, simulated nodes %.3fs, unlabeled %.3fs, process %.3fs [%s]",
		c.Answers, c.Bytes/1e3, c.Bytes/max(c.Answers, 1), c.CoordCPU, c.ClientCPU, c.UnlabeledCPU, c.ProcessCPU, c.CPUMethod)
	if r.Watch.Errors > 0 || r.Watch.BaseErrors > 0 {
		p("errors      %d watcher errors, %d delta base mismatches; last: %s", r.Watch.Errors, r.Watch.BaseErrors, r.Watch.LastErr)
	}
	for _, n := range r.Notes {
		p("note        %s", n)
	}
	p("")
}

func cpuLine(c cpuSplit, per int, unit string) string {
	if !c.Known {
		return fmt.Sprintf("process CPU %.2fs (coordinator CPU unknown)", c.Process)
	}
	s := fmt.Sprintf("coordinator CPU %.2fs", c.Coordinator)
	if per > 0 {
		s += fmt.Sprintf(" (%.2f ms per %s)", c.Coordinator/float64(per)*1e3, unit)
	}
	s += fmt.Sprintf(", simulated nodes %.2fs", c.Client)
	if c.Unlabeled > 0 {
		s += fmt.Sprintf(", unlabeled %.2fs", c.Unlabeled)
	}
	return s
}
