//go:build linux

package main

import (
	"fmt"
	"io"
	"math"
	"strings"
)

// coordSection reports the coordinator-at-scale run (bench/coordload).
func (s *session) coordSection(w io.Writer) {
	p := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }
	p("## Coordinator at scale\n\n")
	p("bench/coordload, after the data plane runs (its processes stopped):\n")
	p("a coordinator in a child process with a fresh SQLite store (durable\n")
	p("commits) and the soft memory limit `meshctl server` ships with (%s);\n", coordMemoryLimit)
	p("simulated nodes that enroll for real (own token, TLS, CSR, keys) and then\n")
	p("each hold a long-poll over mTLS, as `meshctl up` does. A revocation is\n")
	p("timed until the **last** watcher that could see the node has a netmap\n")
	p("without it. See [bench/coordload/README.md](../bench/coordload/README.md).\n\n")
	topos := s.coord.Topologies
	header := []string{""}
	for _, t := range topos {
		header = append(header, t.Topology)
	}
	row := func(label string, f func(i int) string) []string {
		r := []string{label}
		for i := range topos {
			r = append(r, f(i))
		}
		return r
	}
	rows := [][]string{
		row("nodes + proxies", func(i int) string { return fmt.Sprintf("%d + %d", topos[i].Nodes, topos[i].Proxies) }),
		row("enrolled (errors)", func(i int) string {
			return fmt.Sprintf("%d (%d)", topos[i].Enroll.Count, topos[i].Enroll.Errors)
		}),
		row("enrollments/s", func(i int) string { return num(topos[i].Enroll.PerSecond) }),
		row("enrollment latency p50 / p99, ms", func(i int) string {
			return num(topos[i].Enroll.P50ms) + " / " + num(topos[i].Enroll.P99ms)
		}),
		row("watchers parked (errors)", func(i int) string {
			return fmt.Sprintf("%d (%d)", topos[i].Watch.Count, topos[i].Watch.Errors)
		}),
		row("revocations timed", func(i int) string { return fmt.Sprint(len(topos[i].Revocations)) }),
		row("revocation → last watcher p50 / p99 / max, ms", func(i int) string {
			c := topos[i].Change
			return num(c.LastP50Ms) + " / " + num(c.LastP99Ms) + " / " + num(c.LastMaxMs)
		}),
		row("answers per change", func(i int) string { return num(topos[i].Change.Answers) }),
		row("bytes per change (all watchers)", func(i int) string { return bytesText(topos[i].Change.Bytes) }),
		row("coordinator CPU per change, s", func(i int) string { return num(topos[i].Change.CoordCPU) }),
		row("coordinator RSS settled (peak), MiB", func(i int) string {
			return num(topos[i].Memory.RSSMiB) + " (" + num(topos[i].Memory.PeakRSSMiB) + ")"
		}),
	}
	mdTable(w, strings.Repeat("r", len(header)), header, rows)
}

func bytesText(b float64) string {
	switch {
	case b >= 1e9:
		return num(b/1e9) + " GB"
	case b >= 1e6:
		return num(b/1e6) + " MB"
	case b >= 1e3:
		return num(b/1e3) + " kB"
	}
	return num(b) + " B"
}

// target is one line of the targets, checked against this run.
type target struct {
	what, figure string
	met          bool
	known        bool   // false: not measured in this run
	gap          string // how far off, when not met
}

// targetsSection checks this run's figures against the targets of the
// data plane and the coordinator, and says how far off each miss is.
func (s *session) targetsSection(w io.Writer) {
	var ts []target
	ratio := func(metric, row, base string) float64 {
		return median(ratios(s.res.get(metric, row), s.res.get(metric, base)))
	}
	atLeast := func(what string, v, want float64, unit string) {
		t := target{what: what, figure: num(v) + unit, known: !math.IsNaN(v), met: v >= want}
		if t.known && !t.met {
			t.gap = fmt.Sprintf("%.0f%% short", 100*(1-v/want))
		}
		ts = append(ts, t)
	}
	atMost := func(what string, v, want float64, unit string) {
		t := target{what: what, figure: num(v) + unit, known: !math.IsNaN(v), met: v <= want}
		if t.known && !t.met {
			t.gap = fmt.Sprintf("%.0f%% over", 100*(v/want-1))
		}
		ts = append(ts, t)
	}
	atLeast("1 KiB, proxy → mesh → node: ≥ 0.8× the tuned ReverseProxy", ratio("1k.rps", "mesh", "revproxy"), 0.8, "×")
	atLeast("1 MiB, proxy → mesh → node, netstack both ends: ≥ 300 MB/s", median(s.res.get("1m.mbps", "mesh")), 300, " MB/s")
	if len(s.tunPhase) > 0 {
		atLeast("1 MiB with the proxy on a kernel TUN: aim for 789 MB/s (frp)", median(s.res.get("1m.mbps", "tunproxy")), 789, " MB/s")
	} else {
		ts = append(ts, target{what: "1 MiB with the proxy on a kernel TUN: aim for 789 MB/s (frp)", figure: "not measured (needs root)"})
	}
	atLeast("bulk TCP through the tunnel, netstack both ends (1 stream): ≥ 400 MB/s", median(s.res.get("bulk1.mbps", "mesh")), 400, " MB/s")
	// maxRSS is the highest VmRSS of the nodes with the default budget over
	// phases, and that sample's RssAnon.
	maxRSS := func(phases ...string) (rss, anon float64) {
		rss, anon = math.NaN(), math.NaN()
		for _, n := range s.nodes {
			if n.noLimit {
				continue
			}
			for _, ph := range phases {
				if v, ok := s.mem.get(ph, n.proc); ok && (math.IsNaN(rss) || float64(v) > rss) {
					a, _ := s.mem.get(ph+".anon", n.proc)
					rss, anon = float64(v), float64(a)
				}
			}
		}
		return rss / (1 << 20), anon / (1 << 20)
	}
	rssTarget := func(what string, want float64, phases ...string) {
		rss, anon := maxRSS(phases...)
		atMost(what, rss, want, " MiB")
		if !math.IsNaN(anon) {
			ts[len(ts)-1].figure += fmt.Sprintf(" (anon %s)", num(anon))
		}
	}
	rssTarget("node agent RSS under sustained load (every node with the default budget, max): ≤ 64 MiB", 64, "http", "bulk")
	rssTarget(fmt.Sprintf("node agent RSS %s after the load: ≤ 32 MiB", s.o.after), 32, "after")
	rssTarget("node agent RSS idle: ≤ 25 MiB", 25, "idle")
	if s.coord != nil {
		for _, t := range s.coord.Topologies {
			atLeast(fmt.Sprintf("coordinator, %s: 10,000 nodes enrolled and watching", t.Topology), float64(min(t.Enroll.Count, t.Watch.Count)), 10000, " nodes")
			atMost(fmt.Sprintf("coordinator, %s: revocation → last watcher p99 < 1 s", t.Topology), t.Change.LastP99Ms, 999.999, " ms")
			atLeast(fmt.Sprintf("coordinator, %s: ≥ 500 enrollments/s (SQLite, durable commits)", t.Topology), t.Enroll.PerSecond, 500, "/s")
			atMost(fmt.Sprintf("coordinator, %s: RSS < 512 MiB (peak)", t.Topology), t.Memory.PeakRSSMiB, 511.999, " MiB")
		}
	} else {
		ts = append(ts, target{what: "coordinator targets", figure: "not run (-coord-nodes 0)"})
	}
	fmt.Fprintf(w, "## Targets\n\n")
	fmt.Fprintf(w, "The targets of the data plane and the coordinator, checked against the\n")
	fmt.Fprintf(w, "figures above (medians of this run). Where a figure falls short,\n")
	fmt.Fprintf(w, "[docs/performance.md](performance.md) says where the time or the memory\n")
	fmt.Fprintf(w, "goes, as measured.\n\n")
	var rows [][]string
	for _, t := range ts {
		verdict := "–"
		switch {
		case !t.known:
		case t.met:
			verdict = "met"
		default:
			verdict = "**not met** (" + t.gap + ")"
		}
		rows = append(rows, []string{t.what, t.figure, verdict})
	}
	mdTable(w, "lrl", []string{"target", "this run", ""}, rows)
}
