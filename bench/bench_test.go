//go:build linux

package main

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestMain lets the test binary play the bench's helper roles, as the
// bench binary does when it re-executes itself.
func TestMain(m *testing.M) {
	if role := os.Getenv(roleEnv); role != "" {
		os.Exit(runRole(role, os.Args[1:]))
	}
	os.Exit(m.Run())
}

func TestParseWrk(t *testing.T) {
	out := `Running 2s test @ http://127.0.0.1:1/1k
  2 threads and 64 connections
  Latency Distribution
     50%  1.00ms
WRKJSON {"requests":1000,"bytes":1200000,"duration_us":2000000,"connect":0,"read":0,"write":0,"status":3,"timeout":1,"p50_us":1000,"p99_us":5000}
`
	r, err := parseWrk(out)
	if err != nil {
		t.Fatal(err)
	}
	if r.Requests != 1000 || r.seconds() != 2 || r.errors() != 4 || r.P99US != 5000 {
		t.Errorf("parsed %+v", r)
	}
	if _, err := parseWrk("Running 2s test\n"); err == nil {
		t.Error("output without the summary line parsed")
	}
}

// TestQuick runs the whole bench in -quick mode through the real binary.
// It only runs with MESHCTL_BENCH=1: benchmarks are not tests, and CI must
// not spend minutes on them. It asserts nothing about the figures.
func TestQuick(t *testing.T) {
	if os.Getenv("MESHCTL_BENCH") != "1" {
		t.Skip("set MESHCTL_BENCH=1 to run the bench in -quick mode")
	}
	out := filepath.Join(t.TempDir(), "benchmarks.md")
	o := options{out: out, log: testWriter{t}, coordNodes: 200}
	o.setQuick()
	if err := run(context.Background(), o); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"## Machine", "mesh: proxy → pi1", "## Bulk TCP", "## Memory", "## Coordinator at scale", "## Targets"} {
		if !strings.Contains(string(b), want) {
			t.Errorf("report lacks %q:\n%s", want, b)
		}
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// TestTargetsVerdicts checks the targets table against figures made up for
// the purpose: one target met, one missed by a known amount.
func TestTargetsVerdicts(t *testing.T) {
	s := &session{o: options{after: 30 * time.Second}, res: results{}, mem: newMemory()}
	for i, v := range []float64{9000, 8500, 8800} { // mesh at 0.9×, 0.85×, 0.88×
		s.res.add("1k.rps", "revproxy", i, 10000)
		s.res.add("1k.rps", "mesh", i, v)
	}
	for i := range 3 {
		s.res.add("1m.mbps", "mesh", i, 150) // half the 300 MB/s target
	}
	var b strings.Builder
	s.targetsSection(&b)
	out := b.String()
	for _, want := range []string{
		"| 1 KiB, proxy → mesh → node: ≥ 0.8× the tuned ReverseProxy | 0.880× | met |",
		"| 1 MiB, proxy → mesh → node, netstack both ends: ≥ 300 MB/s | 150 MB/s | **not met** (50% short) |",
		"coordinator targets | not run",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("targets lack %q:\n%s", want, out)
		}
	}
}
