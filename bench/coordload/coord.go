package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	_ "net/http/pprof" // the spawned coordinator's debug listener
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/metrics"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/meshctl/meshctl/coordinator"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
)

// target is the coordinator under load, wherever it runs.
type target struct {
	mode     string // "in-process", "spawned" or "external"
	url      string
	pin      [32]byte
	topology string

	admin     *http.Client
	adminBase string
	adminKey  string

	srv     *coordinator.Server // in-process only
	dataDir string              // in-process and spawned: removed on close unless -keep
	cmd     *exec.Cmd           // spawned only
	debug   string              // spawned: the child's debug listener (pprof, /stats)
	pid     int                 // the coordinator's process id (0: unknown)
}

// startInProcess runs coordinator.New with a temporary data directory (the
// embedded SQLite store, durable commits) in this process. Every goroutine
// it starts carries the profile label side=coordinator, so that CPU
// profiles tell its work from the simulated nodes'.
func startInProcess(ctx context.Context, cfg *config, topology string) (*target, error) {
	dir, err := os.MkdirTemp(cfg.dir, "coordload-")
	if err != nil {
		return nil, err
	}
	srv, err := coordinator.New(coordinatorOptions(filepath.Join(dir, "d"), topology, cfg.longPoll))
	if err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	pprof.Do(ctx, pprof.Labels("side", "coordinator"), func(context.Context) { err = srv.Start() })
	if err != nil {
		srv.Close()
		os.RemoveAll(dir)
		return nil, err
	}
	pin, _ := pki.ParsePin(srv.CAPin())
	t := &target{mode: "in-process", url: srv.LocalURL(), pin: pin, topology: topology, srv: srv,
		dataDir: dir, pid: os.Getpid()}
	t.admin, t.adminBase = unixClient(srv.AdminSocket()), "http://admin"
	return t, nil
}

func coordinatorOptions(dir, topology string, longPoll time.Duration) coordinator.Options {
	return coordinator.Options{
		DataDir:    dir,
		Listen:     "127.0.0.1:0",
		PublicHost: "127.0.0.1",
		Topology:   topology,
		LongPoll:   longPoll,
		WGEndpoint: "127.0.0.1:51820", // as if a proxy ran: netmaps carry it
		Domain:     "load.test",
		Version:    "coordload",
	}
}

func unixClient(sock string) *http.Client {
	return &http.Client{Timeout: time.Minute, Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
		MaxIdleConnsPerHost: 64,
	}}
}

// spawnInfo is what "coordload serve" prints on its first line.
type spawnInfo struct {
	URL         string `json:"url"`
	CAPin       string `json:"ca_pin"`
	AdminSocket string `json:"admin_socket"`
	Debug       string `json:"debug"`
	PID         int    `json:"pid"`
}

// startSpawned runs this program as "coordload serve" in a child process,
// so that the coordinator's CPU time, RSS and heap are its own.
func startSpawned(ctx context.Context, cfg *config, topology string) (*target, error) {
	dir, err := os.MkdirTemp(cfg.dir, "coordload-")
	if err != nil {
		return nil, err
	}
	exe, err := os.Executable()
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(exe, "serve", "-data", filepath.Join(dir, "d"), "-topology", topology,
		"-longpoll", cfg.longPoll.String())
	cmd.Stderr = os.Stderr
	if cfg.coordMemLimit != "" {
		cmd.Env = append(os.Environ(), "GOMEMLIMIT="+cfg.coordMemLimit)
	}
	stdin, err := cmd.StdinPipe() // the child exits when this closes
	if err != nil {
		return nil, err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	_ = stdin
	line, err := bufio.NewReader(out).ReadBytes('\n')
	if err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		os.RemoveAll(dir)
		return nil, fmt.Errorf("spawned coordinator: %w", err)
	}
	var info spawnInfo
	if err := json.Unmarshal(line, &info); err != nil {
		cmd.Process.Kill()
		cmd.Wait()
		return nil, fmt.Errorf("spawned coordinator said %q: %w", line, err)
	}
	pin, err := pki.ParsePin(info.CAPin)
	if err != nil {
		return nil, err
	}
	t := &target{mode: "spawned", url: info.URL, pin: pin, topology: topology, dataDir: dir, cmd: cmd,
		debug: info.Debug, pid: info.PID}
	t.admin, t.adminBase = unixClient(info.AdminSocket), "http://admin"
	return t, nil
}

// startExternal uses a coordinator someone else runs.
func startExternal(cfg *config, topology string) (*target, error) {
	pin, err := pki.ParsePin(cfg.caPin)
	if err != nil {
		return nil, fmt.Errorf("-ca-pin: %w", err)
	}
	t := &target{mode: "external", url: strings.TrimSuffix(cfg.url, "/"), pin: pin, topology: topology, pid: cfg.coordPID}
	switch {
	case cfg.adminSocket != "":
		t.admin, t.adminBase = unixClient(cfg.adminSocket), "http://admin"
	case cfg.adminKey != "":
		t.admin = &http.Client{Timeout: time.Minute, Transport: &http.Transport{TLSClientConfig: pki.PinnedTLSConfig(pin), MaxIdleConnsPerHost: 64}}
		t.adminBase, t.adminKey = t.url, cfg.adminKey
	default:
		return nil, errors.New("an external coordinator needs -admin-key or -admin-socket (to create tokens and revoke nodes)")
	}
	return t, nil
}

func (t *target) close() {
	switch {
	case t.srv != nil:
		t.srv.Close()
	case t.cmd != nil:
		t.cmd.Process.Signal(syscall.SIGTERM)
		done := make(chan struct{})
		go func() { t.cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.cmd.Process.Kill()
			<-done
		}
	}
	if t.dataDir != "" && !keepData {
		os.RemoveAll(t.dataDir)
	}
}

var keepData bool

// adminCall calls the admin API.
func (t *target) adminCall(ctx context.Context, method, path string, in, out any) error {
	var h http.Header
	if t.adminKey != "" {
		h = http.Header{"Authorization": {"Bearer " + t.adminKey}}
	}
	return wire.Call(ctx, t.admin, method, t.adminBase+path, h, in, out)
}

// cpuTime is the coordinator process's CPU time so far, if it is known
// and not this process (in-process runs use profile labels instead).
func (t *target) cpuTime() (time.Duration, bool) {
	if t.debug != "" {
		var st childStats
		if err := getJSON(t.debug+"/stats", &st); err == nil {
			return time.Duration(st.CPUSeconds * float64(time.Second)), true
		}
	}
	if t.pid != 0 && t.pid != os.Getpid() {
		return procCPU(t.pid)
	}
	return 0, false
}

// memory reports the coordinator's RSS, peak RSS and Go heap. For an
// in-process coordinator these are the whole process's (simulated nodes
// included).
func (t *target) memory() (m memStats) {
	switch {
	case t.debug != "":
		var st childStats
		if err := getJSON(t.debug+"/stats", &st); err == nil {
			m = st.memStats
		}
		m.Scope = "coordinator process"
	case t.srv != nil:
		m = selfMem()
		m.Scope = "whole process: coordinator and simulated nodes"
	case t.pid != 0:
		m.RSSMiB, m.PeakRSSMiB = procRSS(t.pid)
		m.Scope = "coordinator process (RSS only)"
	default:
		m.Scope = "unknown (external coordinator; pass -coord-pid)"
	}
	return m
}

type memStats struct {
	Scope         string  `json:"scope"`
	RSSMiB        float64 `json:"rss_mib"`                // settled: after GCs, once stable
	RSSAfterGCMiB float64 `json:"rss_after_first_gc_mib"` // before the runtime returned freed pages
	PeakRSSMiB    float64 `json:"peak_rss_mib"`
	HeapLiveMiB   float64 `json:"heap_live_mib,omitempty"`  // after the last GC
	HeapInUseMiB  float64 `json:"heap_inuse_mib,omitempty"` // objects + unused slots in spans
	StacksMiB     float64 `json:"stacks_mib,omitempty"`     // goroutine stacks
	HeapFreeMiB   float64 `json:"heap_free_mib,omitempty"`  // free heap not yet returned to the OS
	GoTotalMiB    float64 `json:"go_total_mib,omitempty"`   // everything the Go runtime mapped, less what it released
	Goroutines    int     `json:"goroutines,omitempty"`
	FDs           int     `json:"fds,omitempty"`
}

func selfMem() memStats {
	var m memStats
	m.RSSMiB, m.PeakRSSMiB = procRSS(os.Getpid())
	s := []metrics.Sample{
		{Name: "/gc/heap/live:bytes"},
		{Name: "/memory/classes/heap/objects:bytes"},
		{Name: "/memory/classes/heap/unused:bytes"},
		{Name: "/memory/classes/total:bytes"},
		{Name: "/memory/classes/heap/released:bytes"},
		{Name: "/memory/classes/heap/stacks:bytes"},
		{Name: "/memory/classes/heap/free:bytes"},
	}
	metrics.Read(s)
	u := func(i int) float64 {
		if s[i].Value.Kind() != metrics.KindUint64 {
			return 0
		}
		return float64(s[i].Value.Uint64()) / (1 << 20)
	}
	m.HeapLiveMiB = u(0)
	m.HeapInUseMiB = u(1) + u(2)
	m.GoTotalMiB = u(3) - u(4)
	m.StacksMiB, m.HeapFreeMiB = u(5), u(6)
	m.Goroutines = runtime.NumGoroutine()
	if ents, err := os.ReadDir("/proc/self/fd"); err == nil {
		m.FDs = len(ents)
	}
	return m
}

// procRSS reads VmRSS and VmHWM of a process, in MiB.
func procRSS(pid int) (rss, peak float64) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		kb, _ := strconv.ParseFloat(f[1], 64)
		switch f[0] {
		case "VmRSS:":
			rss = kb / 1024
		case "VmHWM:":
			peak = kb / 1024
		}
	}
	return rss, peak
}

// procCPU reads a process's user+system time from /proc (10 ms ticks).
func procCPU(pid int) (time.Duration, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, false
	}
	// The command name may hold spaces; fields start after its ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0, false
	}
	ut, _ := strconv.ParseInt(f[11], 10, 64)
	st, _ := strconv.ParseInt(f[12], 10, 64)
	return time.Duration(ut+st) * 10 * time.Millisecond, true
}

// selfCPU is this process's user+system CPU time (getrusage).
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func getJSON(url string, v any) error {
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return fmt.Errorf("%s: %s: %s", url, resp.Status, b)
	}
	return json.NewDecoder(resp.Body).Decode(v)
}

// childStats is the spawned coordinator's /stats answer.
type childStats struct {
	memStats
	CPUSeconds float64 `json:"cpu_seconds"`
}

// serveMain is "coordload serve": run a coordinator until stdin closes or
// SIGTERM, with a debug listener for /stats, /cpuprofile and net/http/pprof.
func serveMain(args []string) {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	data := fs.String("data", "", "data directory")
	topology := fs.String("topology", "mesh", "mesh or hub")
	longPoll := fs.Duration("longpoll", 5*time.Minute, "long-poll wait")
	fs.Parse(args)
	raiseFDLimit(1 << 20)
	srv, err := coordinator.New(coordinatorOptions(*data, *topology, *longPoll))
	if err != nil {
		fmt.Fprintln(os.Stderr, "coordload serve:", err)
		os.Exit(1)
	}
	if err := srv.Start(); err != nil {
		fmt.Fprintln(os.Stderr, "coordload serve:", err)
		os.Exit(1)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "coordload serve:", err)
		os.Exit(1)
	}
	var prof bytes.Buffer
	http.HandleFunc("/stats", func(w http.ResponseWriter, r *http.Request) {
		st := childStats{memStats: selfMem(), CPUSeconds: selfCPU().Seconds()}
		json.NewEncoder(w).Encode(st)
	})
	http.HandleFunc("/cpuprofile/start", func(w http.ResponseWriter, r *http.Request) {
		prof.Reset()
		if err := pprof.StartCPUProfile(&prof); err != nil {
			http.Error(w, err.Error(), http.StatusConflict)
		}
	})
	http.HandleFunc("/cpuprofile/stop", func(w http.ResponseWriter, r *http.Request) {
		pprof.StopCPUProfile()
		w.Write(prof.Bytes())
	})
	http.HandleFunc("/gc", func(w http.ResponseWriter, r *http.Request) { runtime.GC() })
	go http.Serve(ln, nil)
	info := spawnInfo{URL: srv.LocalURL(), CAPin: srv.CAPin(), AdminSocket: srv.AdminSocket(),
		Debug: "http://" + ln.Addr().String(), PID: os.Getpid()}
	b, _ := json.Marshal(info)
	os.Stdout.Write(append(b, '\n'))
	done := make(chan struct{})
	go func() { io.Copy(io.Discard, os.Stdin); close(done) }()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, os.Interrupt)
	select {
	case <-done:
	case <-sig:
	}
	srv.Close()
}

// raiseFDLimit raises RLIMIT_NOFILE to want (root may raise the hard
// limit too) and returns the soft limit in force afterwards.
func raiseFDLimit(want uint64) uint64 {
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil {
		return 0
	}
	if lim.Cur >= want {
		return lim.Cur
	}
	next := syscall.Rlimit{Cur: want, Max: max(want, lim.Max)}
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &next); err != nil {
		next = syscall.Rlimit{Cur: lim.Max, Max: lim.Max}
		syscall.Setrlimit(syscall.RLIMIT_NOFILE, &next)
	}
	syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	return lim.Cur
}
