//go:build linux

package main

import (
	"debug/buildinfo"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"time"
)

// machine describes where the figures were taken.
type machine struct {
	rows [][2]string // label, value
}

// machineInfo reads the CPU, memory, kernel and OS from /proc and /etc,
// and the Go version and module versions from the meshctl binary's build
// information; src describes the source it was built from ("" = ask the
// build information).
func machineInfo(meshctl, src, wrkBin, loadStart string) (machine, error) {
	var m machine
	add := func(k, v string) { m.rows = append(m.rows, [2]string{k, v}) }
	cpu := "unknown"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				cpu = strings.TrimSpace(v)
				break
			}
		}
	}
	add("CPU", fmt.Sprintf("%s, %d cores", cpu, runtime.NumCPU()))
	if b, err := os.ReadFile("/proc/meminfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if rest, ok := strings.CutPrefix(line, "MemTotal:"); ok {
				kb, _ := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
				add("Memory", fmt.Sprintf("%.1f GiB", float64(kb)/(1<<20)))
			}
		}
	}
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		add("Kernel", "Linux "+strings.TrimSpace(string(b)))
	}
	if b, err := os.ReadFile("/etc/os-release"); err == nil {
		for line := range strings.Lines(string(b)) {
			if v, ok := strings.CutPrefix(strings.TrimSpace(line), "PRETTY_NAME="); ok {
				add("OS", strings.Trim(v, `"`))
			}
		}
	}
	bi, err := buildinfo.ReadFile(meshctl)
	if err != nil {
		return m, fmt.Errorf("build info of %s: %w", meshctl, err)
	}
	add("Go", bi.GoVersion)
	if src == "" {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				src = "commit " + s.Value
			}
		}
	}
	if src != "" {
		add("meshctl", src)
	}
	mods := map[string]string{"golang.zx2c4.com/wireguard": "wireguard-go", "gvisor.dev/gvisor": "gVisor"}
	for _, d := range bi.Deps {
		if name, ok := mods[d.Path]; ok {
			if d.Replace != nil {
				d = d.Replace
			}
			add(name, d.Path+" "+d.Version)
		}
	}
	out, _ := exec.Command(wrkBin, "-v").CombinedOutput()
	if first, _, _ := strings.Cut(string(out), "\n"); first != "" {
		add("wrk", strings.TrimSpace(strings.SplitN(first, "Copyright", 2)[0]))
	}
	user := "not root (TUN rows skipped)"
	if os.Geteuid() == 0 {
		user = "root"
	}
	add("Run as", user)
	add("Load average (1, 5, 15 min)", "at the start "+loadStart+"; at the end "+loadAverage())
	return m, nil
}

// loadAverage is the first three fields of /proc/loadavg.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); err == nil && len(f) >= 3 {
		return strings.Join(f[:3], " ")
	}
	return "unknown"
}

// report writes the Markdown report.
func (s *session) report(w io.Writer, mach machine) {
	p := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }
	p("# Benchmarks\n\n")
	p("How meshctl's data plane compares with plain loopback: HTTP through the\n")
	p("proxy and the mesh, bulk TCP through the tunnel, and the processes' memory.\n")
	p("Produce it with `go run ./bench -out docs/benchmarks.md` from the repository\n")
	p("(as root for the TUN rows and the SSH fallback with UDP blocked; `-quick` is a\n")
	p("smoke run). The package documentation, [bench/doc.go](../bench/doc.go), says\n")
	p("what each figure measures.\n\n")
	p("This report: `%s`, %s, %s in all.\n\n", s.command(), time.Now().UTC().Format("2006-01-02 15:04 UTC"), s.elapsed.Round(time.Second))
	p("Everything ran on 127.0.0.1 of one machine, so these figures compare paths\n")
	p("with each other, not with a network: all processes and wrk share the same\n")
	p("%d cores. wrk: 64 connections, 2 threads, %s per run.\n\n", runtime.NumCPU(), s.o.duration)
	if s.o.runs == 1 {
		p("Each figure is from **one run** (a smoke run, not for comparisons).\n")
	} else {
		p("Each figure is the **median of %d runs (min–max)**, interleaved: run 1 of\n", s.o.runs)
		p("every path, then run 2 of every path, and so on, each after a %s pause.\n", settle)
	}
	p("A ratio (×) divides a path's figure by its baseline's **in the same run**;\n")
	p("the tables show the median of those per-run ratios.\n\n")

	p("## Machine\n\n")
	rows := [][]string{}
	for _, r := range mach.rows {
		rows = append(rows, []string{r[0], r[1]})
	}
	mdTable(w, "ll", []string{"", ""}, rows)

	p("## HTTP, 1 KiB body\n\n")
	s.httpTable(w, "Requests per second", "req/s", "1k.rps")
	s.httpTable(w, "Latency, median (p50)", "ms", "1k.p50")
	s.httpTable(w, "Latency, 99th percentile (p99)", "ms", "1k.p99")
	p("## HTTP, 1 MiB body\n\n")
	s.httpTable(w, "Throughput (every byte wrk read)", "MB/s", "1m.mbps")

	p("### The way the proxy reached each node\n\n")
	p("Observed in every measured run from the node's WireGuard byte counters\n")
	p("(`meshctl status --json`, before and after): if they grew by at least half\n")
	p("the bytes served, WireGuard carried the requests, otherwise the node's SSH\n")
	p("forward did.\n\n")
	rows = nil
	for _, t := range s.http {
		if t.node != nil {
			rows = append(rows, []string{t.label, seenText(t.seen), t.wgPath})
		}
	}
	mdTable(w, "lll", []string{"path", "carried by", "WireGuard path (node's `meshctl status` after the checks)"}, rows)
	p("The proxy uses a node's SSH forward only when it does not reach the node\n")
	p("directly over UDP (`proxy/sshfallback.go`): with `--fallback always` and\n")
	p("UDP open, the forward exists but WireGuard still carries the requests.\n")
	p("The TUN row's proxy is the server's, on its userspace netstack; only the\n")
	p("node's end is a kernel TUN. The proxy on a kernel TUN has a section of\n")
	p("its own, below.\n\n")
	s.proxyTUNSection(w)

	p("## Bulk TCP through the tunnel\n\n")
	p("A byte source (in the backend process) writes as fast as the client\n")
	p("reads; the client (a process of its own) counts the bytes it received in\n")
	p("%s. The mesh row goes from node pi2's SOCKS5 listener over WireGuard to\n", s.o.bulk)
	p("node pi1's exposed service `bulk` and on to the source: node to node, no\n")
	p("proxy. CPU-s/GB: utime+stime from /proc per GB (10^9 bytes) received;\n")
	p("*meshctl* sums every meshctl process, *total* adds the source and the\n")
	p("client, so that it compares with the loopback baseline.\n\n")
	for _, n := range streamCounts {
		s.bulkTable(w, n)
	}
	rows = nil
	for _, b := range s.bulk {
		if b.via != nil {
			rows = append(rows, []string{b.label, seenText(b.seen), b.wgPath})
		}
	}
	p("Carried by (from the WireGuard counters of the SOCKS5 node, or pi5 for TUN):\n\n")
	mdTable(w, "lll", []string{"path", "carried by", "WireGuard path (`meshctl status`)"}, rows)

	p("## Memory (RSS)\n\n")
	p("VmRSS from /proc/PID/status, MiB: *idle* %s after every path was checked,\n", min(idleWait, s.o.after))
	p("before any load; the maximum of samples every 200 ms during all 1 MiB\n")
	p("HTTP runs, and during all bulk runs; and %s after the last load. In\n", s.o.after)
	p("brackets: RssAnon at that sample, the process's own memory (heap, stacks);\n")
	p("the rest is mostly pages of the meshctl binary, shared by every meshctl\n")
	p("process on the machine and reclaimable.\n\n")
	s.memTable(w)

	if s.coord != nil {
		s.coordSection(w)
	}
	s.targetsSection(w)

	p("## Commands\n\n")
	p("The ports are those of this run (picked free each time). The work\n")
	p("directory is a fresh temporary directory.\n\n```sh\n")
	for _, c := range s.mesh.cmds {
		p("%s\n", c)
	}
	for _, t := range append(slices.Clone(s.http), s.tunPhase...) {
		if t.cmd != "" {
			p("%s\n", t.cmd)
		}
	}
	for _, b := range s.bulk {
		p("%s=%s bench -streams N -duration %s %s\n", roleEnv, roleBulk, s.o.bulk, shellJoin(b.args))
	}
	if s.coord != nil {
		p("go build -o coordload ./bench/coordload && ./coordload %s\n", strings.Join(s.o.coordArgs(), " "))
	}
	p("```\n\n")
	p("The backend (`%s=%s bench`) serves `%s` and `%s` (Go net/http, fixed\n", roleEnv, roleBackend, path1K, path1M)
	p("bodies) and the byte source; the reverse proxy baseline (`%s=%s`) is\n", roleEnv, roleRevProxy)
	p("httputil.ReverseProxy with Rewrite and MaxIdleConnsPerHost 256. The\n")
	p("server logs every proxied request (its default, level info) to a file.\n")
	if notes := s.allNotes(); len(notes) > 0 {
		p("\n## Notes\n\n")
		for _, n := range notes {
			p("- %s\n", n)
		}
	}
}

// command is how this report was produced, for its first line.
func (s *session) command() string {
	c := "go run ./bench"
	if s.o.quick {
		c += " -quick"
	}
	if s.o.out != "" {
		c += " -out " + s.o.out
	}
	return c
}

// allNotes are the session's notes plus one for each row with wrk errors.
func (s *session) allNotes() []string {
	notes := slices.Clone(s.notes)
	for _, sz := range sizes {
		for _, t := range append(slices.Clone(s.http), s.tunPhase...) {
			errs := s.res.get(sz.key+".errors", t.key)
			var sum float64
			for _, e := range valid(errs) {
				sum += e
			}
			if sum > 0 {
				notes = append(notes, fmt.Sprintf("%s, %s: wrk counted %.0f errors (socket errors, timeouts or non-2xx responses) over %d runs.", t.label, sz.label, sum, len(errs)))
			}
		}
	}
	return notes
}

// proxyTUNSection reports the last phase: the proxy on a kernel TUN,
// beside the reverse proxy baseline and the server's netstack proxy
// measured again in that phase.
func (s *session) proxyTUNSection(w io.Writer) {
	p := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }
	p("### The proxy on a kernel TUN\n\n")
	if len(s.tunPhase) == 0 {
		p("Not measured: it needs root (a TUN interface).\n\n")
		return
	}
	p("A last phase, after the bulk rows: the TUN node pi5 stopped (one meshctl\n")
	p("TUN per host: each routes the overlay pool), a standalone `meshctl proxy\n")
	p("serve --tun %s` joined the mesh, and its runs were interleaved with the\n", proxyTUNName)
	p("reverse proxy baseline and the server's netstack proxy, both measured\n")
	p("again in this phase so that every ratio is from the same runs. Only the\n")
	p("proxy's end changes: pi1 stays on its netstack.\n\n")
	rp, ns := "tunphase-revproxy", "tunphase-mesh"
	var rows [][]string
	for _, t := range s.tunPhase {
		rps, mbps := s.res.get("1k.rps", t.key), s.res.get("1m.mbps", t.key)
		rows = append(rows, []string{t.label,
			rangeText(rps), ratioText(rps, s.res.get("1k.rps", rp)), ratioText(rps, s.res.get("1k.rps", ns)),
			rangeText(mbps), ratioText(mbps, s.res.get("1m.mbps", rp)), ratioText(mbps, s.res.get("1m.mbps", ns))})
	}
	mdTable(w, "lrrrrrr", []string{"path", "1 KiB req/s", "× reverse proxy", "× netstack proxy", "1 MiB MB/s", "× reverse proxy", "× netstack proxy"}, rows)
	for _, t := range s.tunPhase {
		if t.key == "tunproxy" {
			p("Carried by: %s.\n\n", seenText(t.seen))
		}
	}
}

// httpTable is one metric over the HTTP paths, with ratios to both
// baselines.
func (s *session) httpTable(w io.Writer, title, unit, metric string) {
	fmt.Fprintf(w, "### %s\n\n", title)
	direct, rp := s.res.get(metric, "direct"), s.res.get(metric, "revproxy")
	var rows [][]string
	for _, t := range s.http {
		v := s.res.get(metric, t.key)
		rows = append(rows, []string{t.label, rangeText(v), ratioText(v, direct), ratioText(v, rp)})
	}
	mdTable(w, "lrrr", []string{"path", unit, "× direct", "× reverse proxy"}, rows)
}

func (s *session) bulkTable(w io.Writer, n int) {
	key := "bulk" + strconv.Itoa(n)
	streams := "1 stream"
	if n > 1 {
		streams = strconv.Itoa(n) + " streams"
	}
	fmt.Fprintf(w, "### %s\n\n", streams)
	base, baseCPU := s.res.get(key+".mbps", "loopback"), s.res.get(key+".totalcpu", "loopback")
	var rows [][]string
	for _, b := range s.bulk {
		v, cpu := s.res.get(key+".mbps", b.key), s.res.get(key+".totalcpu", b.key)
		rows = append(rows, []string{b.label, rangeText(v), ratioText(v, base),
			rangeText(s.res.get(key+".meshcpu", b.key)), rangeText(cpu), ratioText(cpu, baseCPU)})
	}
	mdTable(w, "lrrrrr", []string{"path", "MB/s", "× loopback", "meshctl CPU-s/GB", "total CPU-s/GB", "total × loopback"}, rows)
}

func (s *session) memTable(w io.Writer) {
	mib := func(phase string, p *proc) string {
		v, ok := s.mem.get(phase, p)
		if !ok {
			return "–"
		}
		anon, _ := s.mem.get(phase+".anon", p)
		return fmt.Sprintf("%.1f (%.1f)", float64(v)/(1<<20), float64(anon)/(1<<20))
	}
	var rows [][]string
	for _, p := range s.meshProcs() {
		rows = append(rows, []string{p.name, mib("idle", p), mib("http", p), mib("bulk", p), mib("after", p)})
	}
	mdTable(w, "lrrrr", []string{"process", "idle", "max, 1 MiB HTTP", "max, bulk TCP", s.o.after.String() + " after"}, rows)
	fmt.Fprintf(w, "Nodes: %s.\n\n", s.nodeRoles())
}

// nodeRoles says what each node does.
func (s *session) nodeRoles() string {
	roles := map[string]string{
		"pi1": "netstack, serves the HTTP backend and the byte source",
		"pi2": "netstack, SOCKS5 client of the bulk runs",
		"pi3": "netstack, --fallback always",
		"pi4": "netstack, --fallback always with its UDP dropped",
		"pi5": "--tun " + tunName,
		"pi6": "netstack, --memory-limit 0, SOCKS5 client of its bulk row",
		"pi7": "netstack, --memory-limit 0, serves the backend and the source like pi1",
	}
	var parts []string
	for _, n := range s.nodes {
		parts = append(parts, n.name+" "+roles[n.name])
	}
	return strings.Join(parts, "; ")
}

// seenText summarises the observed paths, e.g. "WireGuard (6 of 6 runs)".
func seenText(seen map[string]int) string {
	total := 0
	for _, n := range seen {
		total += n
	}
	var parts []string
	for _, k := range []string{pathWG, pathSSH} {
		if n := seen[k]; n > 0 {
			parts = append(parts, fmt.Sprintf("%s (%d of %d runs)", k, n, total))
		}
	}
	if len(parts) == 0 {
		return "–"
	}
	return strings.Join(parts, ", ")
}

// mdTable writes a Markdown table; align has an l or r for each column.
func mdTable(w io.Writer, align string, header []string, rows [][]string) {
	line := func(cells []string) { fmt.Fprintf(w, "| %s |\n", strings.Join(cells, " | ")) }
	line(header)
	sep := make([]string, len(header))
	for i := range sep {
		sep[i] = "---"
		if i < len(align) && align[i] == 'r' {
			sep[i] = "---:"
		}
	}
	line(sep)
	for _, r := range rows {
		line(r)
	}
	fmt.Fprintln(w)
}

// shellJoin quotes the arguments that need it for a shell.
func shellJoin(args []string) string {
	out := make([]string, len(args))
	for i, a := range args {
		if a == "" || strings.ContainsAny(a, " \t\"'$&|;<>()*?") {
			a = "'" + strings.ReplaceAll(a, "'", `'\''`) + "'"
		}
		out[i] = a
	}
	return strings.Join(out, " ")
}
