//go:build linux

package main

import (
	"context"
	"fmt"
	"math"
	"strconv"
	"sync"
	"time"
)

// Bulk TCP stream counts.
var streamCounts = []int{1, 4}

// settle is the pause before each measured run, so that one run's
// aftermath (connections closing, garbage collection) does not bill the
// next.
const settle = time.Second

// warmUp is how long each HTTP path is loaded, uncounted, before the
// measured runs (not in -quick mode): connection pools fill up and the
// processes' heaps grow to their working size.
const warmUp = 2 * time.Second

// idleWait is the pause between the path checks and the idle memory
// sample (at most -after).
const idleWait = 15 * time.Second

// measure runs every figure: memory while idle, the HTTP rows, the bulk
// rows, then memory again after the load.
func (s *session) measure(ctx context.Context) error {
	procs := s.meshProcs()
	// Idle: once the path checks' traffic has calmed down for long enough
	// that the agents gave their memory back (they trim after a calm 5 s
	// window that follows a busy one).
	idle := min(idleWait, s.o.after)
	fmt.Fprintf(s.o.log, "waiting %s for the idle memory sample …\n", idle)
	if err := pause(ctx, idle); err != nil {
		return err
	}
	s.mem.snapshot("idle", procs)
	stop := s.mem.sample(procs)
	defer stop()
	if err := s.httpRows(ctx, s.http); err != nil {
		return err
	}
	for i := range s.o.runs {
		for _, n := range streamCounts {
			for _, b := range s.bulk {
				if err := s.bulkRun(ctx, i, n, b); err != nil {
					return err
				}
			}
		}
	}
	stop()
	fmt.Fprintf(s.o.log, "waiting %s after the load for the last memory sample …\n", s.o.after)
	if err := pause(ctx, s.o.after); err != nil {
		return err
	}
	s.mem.snapshot("after", procs)
	return nil
}

// httpRows warms every target up (not in -quick mode), then runs the
// measured runs, interleaved: run 1 of every target and size, then run 2…
func (s *session) httpRows(ctx context.Context, targets []*httpTarget) error {
	if !s.o.quick {
		fmt.Fprintf(s.o.log, "warming up every HTTP path (%s each, not counted) …\n", warmUp)
		for _, sz := range sizes {
			for _, t := range targets {
				if _, err := s.w.run(ctx, t.url+sz.path, t.host, warmUp); err != nil {
					return err
				}
			}
		}
	}
	for i := range s.o.runs {
		for _, sz := range sizes {
			for _, t := range targets {
				if err := s.httpRun(ctx, i, sz, t); err != nil {
					return err
				}
			}
		}
	}
	return nil
}

// pause waits for d or until ctx ends.
func pause(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

// httpRun is run i of wrk on t for one body size.
func (s *session) httpRun(ctx context.Context, i int, sz bodySize, t *httpTarget) error {
	if err := pause(ctx, settle); err != nil {
		return err
	}
	if t.cmd == "" {
		t.cmd = "wrk " + shellJoin(s.w.args(t.url+path1K, t.host, s.o.duration))
	}
	before, err := s.wgBytes(ctx, t)
	if err != nil {
		return err
	}
	if sz.key == "1m" {
		s.mem.setPhase("http")
	}
	r, err := s.w.run(ctx, t.url+sz.path, t.host, s.o.duration)
	s.mem.setPhase("")
	if err != nil {
		return err
	}
	after, err := s.wgBytes(ctx, t)
	if err != nil {
		return err
	}
	if t.node != nil {
		if t.seen == nil {
			t.seen = map[string]int{}
		}
		t.seen[pathOf(after-before, r.Bytes)]++
	}
	sec := r.seconds()
	s.res.add(sz.key+".errors", t.key, i, float64(r.errors()))
	if r.Requests == 0 {
		s.notes = append(s.notes, fmt.Sprintf("%s, %s, run %d: no request completed in %s.", t.label, sz.label, i+1, s.o.duration))
	}
	if sz.key == "1k" {
		s.res.add("1k.rps", t.key, i, float64(r.Requests)/sec)
		p50, p99 := float64(r.P50US)/1e3, float64(r.P99US)/1e3
		if r.Requests == 0 {
			p50, p99 = math.NaN(), math.NaN()
		}
		s.res.add("1k.p50", t.key, i, p50)
		s.res.add("1k.p99", t.key, i, p99)
		fmt.Fprintf(s.o.log, "run %d/%d  1 KiB  %-58s %8.0f req/s  p50 %6.2f ms  p99 %7.2f ms  errors %d\n",
			i+1, s.o.runs, t.label, float64(r.Requests)/sec, p50, p99, r.errors())
	} else {
		// Every byte wrk read, so that responses still in flight when the
		// run ends count too (64 of them at a time, each up to 1 MiB).
		mbps := float64(r.Bytes) / sec / 1e6
		s.res.add("1m.mbps", t.key, i, mbps)
		fmt.Fprintf(s.o.log, "run %d/%d  1 MiB  %-58s %8.1f MB/s  errors %d\n", i+1, s.o.runs, t.label, mbps, r.errors())
	}
	return nil
}

// bulkRun is run i of the bulk client on b with n streams. It reads the
// CPU time of every meshctl process and of the byte source before and
// after; the client's own comes from its rusage.
func (s *session) bulkRun(ctx context.Context, i, n int, b *bulkPath) error {
	if err := pause(ctx, settle); err != nil {
		return err
	}
	procs := s.meshProcs()
	meshBefore, srcBefore := sumCPU(procs), sumCPU(nil, s.backPID)
	var wgBefore int64
	if b.via != nil {
		var err error
		if wgBefore, err = s.mesh.wgBytes(ctx, b.via); err != nil {
			return err
		}
	}
	s.mem.setPhase("bulk")
	var r bulkResult
	err := s.runBulkClient(ctx, append([]string{"-streams", strconv.Itoa(n), "-duration", s.o.bulk.String()}, b.args...), &r)
	s.mem.setPhase("")
	if err != nil {
		return fmt.Errorf("bulk %s, %d streams: %w", b.label, n, err)
	}
	meshCPU := sumCPU(procs) - meshBefore
	srcCPU := sumCPU(nil, s.backPID) - srcBefore
	if b.via != nil {
		wgAfter, err := s.mesh.wgBytes(ctx, b.via)
		if err != nil {
			return err
		}
		if b.seen == nil {
			b.seen = map[string]int{}
		}
		b.seen[pathOf(wgAfter-wgBefore, r.Bytes)]++
	}
	gb := float64(r.Bytes) / 1e9
	key := "bulk" + strconv.Itoa(n)
	mbps := float64(r.Bytes) / r.Seconds / 1e6
	s.res.add(key+".mbps", b.key, i, mbps)
	s.res.add(key+".meshcpu", b.key, i, meshCPU/gb)
	s.res.add(key+".totalcpu", b.key, i, (meshCPU+srcCPU+r.cpu)/gb)
	fmt.Fprintf(s.o.log, "run %d/%d  bulk %d stream(s)  %-46s %8.1f MB/s  meshctl %.2f CPU-s/GB  total %.2f CPU-s/GB\n",
		i+1, s.o.runs, n, b.label, mbps, meshCPU/gb, (meshCPU+srcCPU+r.cpu)/gb)
	return nil
}

// sumCPU is the CPU seconds of procs and of the extra process IDs; a
// process that cannot be read counts 0.
func sumCPU(procs []*proc, pids ...int) float64 {
	for _, p := range procs {
		pids = append(pids, p.pid())
	}
	var sum float64
	for _, pid := range pids {
		if c, err := cpuSeconds(pid); err == nil {
			sum += c
		}
	}
	return sum
}

// memory holds RSS figures of the meshctl processes by phase: "idle" and
// "after" are snapshots; "http" and "bulk" are maxima of the samples
// taken every 200 ms while that phase was set.
type memory struct {
	mu    sync.Mutex
	phase string
	rss   map[string]map[*proc]int64 // phase → process → bytes
}

func newMemory() *memory { return &memory{rss: map[string]map[*proc]int64{}} }

func (m *memory) setPhase(p string) {
	m.mu.Lock()
	m.phase = p
	m.mu.Unlock()
}

// snapshot records every process's RSS now under phase.
func (m *memory) snapshot(phase string, procs []*proc) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.record(phase, procs)
}

func (m *memory) record(phase string, procs []*proc) {
	if m.rss[phase] == nil {
		m.rss[phase] = map[*proc]int64{}
	}
	if m.rss[phase+".anon"] == nil {
		m.rss[phase+".anon"] = map[*proc]int64{}
	}
	for _, p := range procs {
		if v, anon, err := rssBytes(p.pid()); err == nil && v > m.rss[phase][p] {
			m.rss[phase][p] = v
			m.rss[phase+".anon"][p] = anon // at the sample of the highest VmRSS
		}
	}
}

// sample samples while a phase is set, until the returned function is
// called (more than once is fine).
func (m *memory) sample(procs []*proc) (stop func()) {
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Go(func() {
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-done:
				return
			case <-t.C:
			}
			m.mu.Lock()
			if m.phase != "" {
				m.record(m.phase, procs)
			}
			m.mu.Unlock()
		}
	})
	var once sync.Once
	return func() {
		once.Do(func() { close(done) })
		wg.Wait()
	}
}

func (m *memory) get(phase string, p *proc) (int64, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	v, ok := m.rss[phase][p]
	return v, ok
}
