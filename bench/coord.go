//go:build linux

package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
)

// coordMemoryLimit is the soft memory limit `meshctl server` ships with
// (cli/server.go, --memory-limit); the coordinator of the scale run gets
// the same, so that its figures are those of the default configuration.
const coordMemoryLimit = "480MiB"

// coordResult is the part of bench/coordload's JSON the report uses.
type coordResult struct {
	Topologies []struct {
		Topology string `json:"topology"`
		Nodes    int    `json:"nodes"`
		Proxies  int    `json:"proxies"`
		Enroll   struct {
			Count     int     `json:"count"`
			Errors    int     `json:"errors"`
			PerSecond float64 `json:"per_second"`
			P50ms     float64 `json:"latency_p50_ms"`
			P99ms     float64 `json:"latency_p99_ms"`
		} `json:"enroll"`
		Watch struct {
			Count  int   `json:"count"`
			Errors int64 `json:"errors"`
		} `json:"watch"`
		Memory struct {
			RSSMiB     float64 `json:"rss_mib"`
			PeakRSSMiB float64 `json:"peak_rss_mib"`
		} `json:"memory"`
		Revocations []json.RawMessage `json:"revocations"`
		Change      struct {
			LastP50Ms  float64 `json:"last_watcher_p50_ms"`
			LastP99Ms  float64 `json:"last_watcher_p99_ms"`
			LastMaxMs  float64 `json:"last_watcher_max_ms"`
			Answers    float64 `json:"answers"`
			Bytes      float64 `json:"bytes"`
			CoordCPU   float64 `json:"coordinator_cpu_seconds"`
			Incomplete int     `json:"incomplete"`
		} `json:"per_change"`
	} `json:"topologies"`
}

// coordArgs are the flags of the scale run.
func (o options) coordArgs() []string {
	return []string{"-spawn", "-json", "-n", strconv.Itoa(o.coordNodes), "-coord-gomemlimit", coordMemoryLimit}
}

// runCoordLoad builds bench/coordload and runs it against a coordinator
// of its own (a child process with a fresh SQLite store), after the data
// plane is measured and its processes are stopped, so that the two do not
// share the CPU.
func runCoordLoad(ctx context.Context, o options, dir string) (*coordResult, error) {
	root, err := moduleRoot(ctx)
	if err != nil {
		return nil, fmt.Errorf("the coordinator run builds ./bench/coordload: %w, or pass -coord-nodes 0", err)
	}
	bin := filepath.Join(dir, "coordload")
	build := exec.CommandContext(ctx, "go", "build", "-o", bin, "./bench/coordload")
	build.Dir = root
	if b, err := build.CombinedOutput(); err != nil {
		return nil, fmt.Errorf("go build ./bench/coordload: %w\n%s", err, b)
	}
	fmt.Fprintf(o.log, "coordinator at scale: coordload %s (a few minutes at 10,000) …\n", strings.Join(o.coordArgs(), " "))
	cmd := exec.CommandContext(ctx, bin, append(o.coordArgs(), "-dir", dir)...)
	var stdout strings.Builder
	cmd.Stdout = &stdout
	cmd.Stderr = prefixWriter{o.log, "  coordload: "}
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("coordload: %w", err)
	}
	var r coordResult
	if err := json.Unmarshal([]byte(stdout.String()), &r); err != nil {
		return nil, fmt.Errorf("coordload printed %q: %w", stdout.String(), err)
	}
	return &r, nil
}

// prefixWriter passes progress lines on with a prefix.
type prefixWriter struct {
	w      io.Writer
	prefix string
}

func (p prefixWriter) Write(b []byte) (int, error) {
	for line := range strings.Lines(string(b)) {
		fmt.Fprint(p.w, p.prefix+line)
	}
	return len(b), nil
}
