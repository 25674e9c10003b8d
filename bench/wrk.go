//go:build linux

package main

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

// wrkScript makes wrk print its summary as one JSON line after its usual
// report, so nothing depends on the text format.
const wrkScript = `done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests":%d,"bytes":%d,"duration_us":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.bytes, summary.duration, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99)))
end
`

// wrkResult is one wrk run's summary.
type wrkResult struct {
	Requests   int64 `json:"requests"`
	Bytes      int64 `json:"bytes"`
	DurationUS int64 `json:"duration_us"`
	Connect    int64 `json:"connect"`
	Read       int64 `json:"read"`
	Write      int64 `json:"write"`
	Status     int64 `json:"status"` // responses that were not 2xx/3xx
	Timeout    int64 `json:"timeout"`
	P50US      int64 `json:"p50_us"`
	P99US      int64 `json:"p99_us"`
}

func (r wrkResult) seconds() float64 { return float64(r.DurationUS) / 1e6 }
func (r wrkResult) errors() int64 {
	return r.Connect + r.Read + r.Write + r.Status + r.Timeout
}

// errNoWrk is the error when wrk is not installed.
var errNoWrk = errors.New("wrk not found in PATH: install it (Debian/Ubuntu: apt-get install wrk)")

// wrk runs the load generator the same way for every path: 64
// connections on 2 threads for d, latency percentiles on, a 10 s request
// timeout (1 MiB bodies over a slow path take longer than wrk's default
// 2 s at 64 connections, and a timeout would hide them from the figures).
type wrk struct {
	bin    string
	script string // path of wrkScript on disk
}

func newWrk(dir string) (*wrk, error) {
	bin, err := exec.LookPath("wrk")
	if err != nil {
		return nil, errNoWrk
	}
	script := dir + "/report.lua"
	if err := os.WriteFile(script, []byte(wrkScript), 0o644); err != nil {
		return nil, err
	}
	return &wrk{bin: bin, script: script}, nil
}

// args is the command line for one run (host "" sends none of its own).
func (w *wrk) args(url, host string, d time.Duration) []string {
	a := []string{"-c64", "-t2", "-d" + d.String(), "--latency", "--timeout", "10s", "-s", w.script}
	if host != "" {
		a = append(a, "-H", "Host: "+host)
	}
	return append(a, url)
}

// run runs wrk once and returns its summary.
func (w *wrk) run(ctx context.Context, url, host string, d time.Duration) (wrkResult, error) {
	cmd := exec.CommandContext(ctx, w.bin, w.args(url, host, d)...)
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.CombinedOutput()
	if err != nil {
		return wrkResult{}, fmt.Errorf("wrk %s: %w\n%s", url, err, out)
	}
	return parseWrk(string(out))
}

// parseWrk finds wrkScript's line in wrk's output.
func parseWrk(out string) (wrkResult, error) {
	sc := bufio.NewScanner(strings.NewReader(out))
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "WRKJSON "); ok {
			var r wrkResult
			if err := json.Unmarshal([]byte(rest), &r); err != nil {
				return r, fmt.Errorf("wrk summary %q: %w", rest, err)
			}
			if r.DurationUS == 0 {
				return r, fmt.Errorf("wrk ran for no time:\n%s", out)
			}
			return r, nil
		}
	}
	return wrkResult{}, fmt.Errorf("no summary in wrk's output (is it wrk 4 with Lua?):\n%s", out)
}
