// Command bench measures meshctl's data plane against plain loopback
// baselines and writes the results as Markdown (docs/benchmarks.md):
//
//	go run ./bench -out docs/benchmarks.md     # as root for the TUN and SSH rows
//	go run ./bench -quick                      # a smoke run: short, one run each
//
// Everything runs on 127.0.0.1 as real processes: a freshly built meshctl
// binary (`meshctl server`, `meshctl enroll`, `meshctl up`), wrk, and the
// bench binary itself re-executed in helper roles (the backend, the tuned
// reverse proxy and the bulk client; see roles.go), so that every party's
// CPU time and memory can be read from /proc. Ports are picked free, every
// process started is stopped at the end (also on Ctrl-C), and nothing
// outside the loopback interface is touched. MTUs are left as they are.
//
// # Measurements
//
// HTTP (wrk -c64 -t2 --latency, a 10 s run per figure, after a 2 s
// uncounted warm-up of every path) for a 1 KiB body
// (requests/s, p50 and p99 latency) and a 1 MiB body (MB/s of every byte
// wrk read, so that responses still in flight at the end count too; MB =
// 10^6 bytes), on these paths to one backend (Go net/http serving fixed
// bodies, its own process):
//
//   - direct: wrk → backend (baseline).
//   - reverse proxy: wrk → httputil.ReverseProxy with MaxIdleConnsPerHost
//     256 → backend (baseline: what any Go reverse proxy costs).
//   - mesh: wrk → `meshctl server`'s proxy (Host pi1.localhost) →
//     WireGuard over UDP loopback → `meshctl up` node pi1 (netstack at both
//     ends) → backend.
//   - SSH fallback: the same to node pi3 with `--fallback always`. The
//     proxy prefers a node's SSH forward only when it does not reach the
//     node directly over UDP, so on loopback it still uses WireGuard; the
//     path the bytes took is observed from the node's WireGuard counters
//     and printed with the table. As root a second row, pi4, also has its
//     WireGuard UDP port dropped by an nftables rule (that port only,
//     removed at the end): UDP blocked, the case the fallback exists for,
//     so the proxy must use the SSH forward.
//   - TUN (root): node pi5 with `meshctl up --tun`; the server's proxy
//     stays on its netstack, so this row is netstack → TUN.
//   - The proxy on a kernel TUN (root), a last phase after the bulk rows:
//     pi5 is stopped (one meshctl TUN per host: each routes the overlay
//     pool), a standalone `meshctl proxy serve --tun` joins, and its rows
//     to pi1 (1 KiB and 1 MiB) run interleaved with the reverse proxy and
//     the server's netstack proxy, measured again so that the ratios come
//     from the same phase (bench/tunproxy.go).
//   - mesh without the memory budget: the mesh row to pi7, which runs with
//     `--memory-limit 0`, to show what the default 64 MiB limit costs.
//
// Bulk TCP (1 and 4 streams, 10 s): a byte source in the backend process
// sends a fixed pattern as fast as the receiver reads; a client process
// counts the bytes it receives. Paths: loopback (baseline, straight to the
// source); mesh (node pi2's SOCKS5 listener → WireGuard → pi1's exposed
// service → the source: node to node, netstack both ends, no proxy); the
// same between pi6 and pi7, both with `--memory-limit 0`; and, as root, TUN (the host's kernel → pi5's TUN → WireGuard → pi1).
// Each row gives MB/s and CPU-seconds per GB moved: the utime+stime of
// all meshctl processes (from /proc/PID/stat, before and after the run),
// and that plus the two endpoints' (source process, client process), so
// the total compares with the loopback baseline, which has only the
// endpoints.
//
// Memory: VmRSS of every meshctl process (server and nodes) once idle
// (15 s after set-up and the path checks, before any load), its maximum
// sampled every 200 ms during the 1 MiB HTTP runs and during the bulk
// runs, and again 30 s after the last load; beside each, RssAnon at that
// sample (the process's own memory; the rest of VmRSS is mostly the
// binary's pages, shared and reclaimable).
//
// Coordinator at scale: once the data plane is measured and its processes
// are stopped, bench/coordload runs (-coord-nodes, default 10,000; 1,000
// with -quick; 0 skips it) against a coordinator of its own in a child
// process with the server's default soft memory limit: enrollments/s,
// revocation to the last watcher, bytes and CPU per change, RSS, in the
// mesh and the hub topology.
//
// Targets: the report ends with the targets, each checked against
// this run's medians (met, or how far off).
//
// # Runs and ratios
//
// Each figure is measured in 3 runs, interleaved: run 1 of every path,
// then run 2 of every path, and so on (A1 B1 C1 A2 B2 C2 …), so that
// drift on the machine hits every path alike; each run starts after a 1 s
// pause, so that the previous one's aftermath is not billed to it. A
// table shows the median of the 3 and their min–max. A ratio compares a
// path with a baseline within the same run: for run i it is
// value(path, i) ÷ value(baseline, i), and the table shows the median of
// those per-run ratios (for latencies and CPU a ratio above 1 is worse,
// for throughput below 1).
//
// Before measuring, each path is checked to serve exactly the expected
// bytes (both HTTP bodies, and the source's pattern through every bulk
// path); a run in which wrk reports non-2xx responses or socket errors is
// reported with its error count.
package main
