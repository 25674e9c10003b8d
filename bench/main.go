//go:build linux

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// options are the command-line flags.
type options struct {
	out        string        // the Markdown report ("" = stdout)
	quick      bool          // short runs, one of each
	runs       int           // interleaved runs per figure
	duration   time.Duration // one wrk run
	bulk       time.Duration // one bulk TCP run
	after      time.Duration // wait after the load before the last RSS sample
	meshctl    string        // a meshctl binary to use instead of building one
	keep       bool          // keep the work directory (logs, state)
	coordNodes int           // simulated nodes of the coordinator run (0 = skip it)
	log        io.Writer     // progress
}

func main() {
	if role := os.Getenv(roleEnv); role != "" {
		os.Exit(runRole(role, os.Args[1:]))
	}
	o := options{log: os.Stderr}
	flag.StringVar(&o.out, "out", "", "write the Markdown report to this file (default: stdout)")
	flag.BoolVar(&o.quick, "quick", false, "a smoke run: 2 s per figure, one run, 5 s wait before the last memory sample")
	flag.IntVar(&o.runs, "runs", 3, "interleaved runs per figure")
	flag.DurationVar(&o.duration, "duration", 10*time.Second, "duration of one wrk run")
	flag.DurationVar(&o.bulk, "bulk-duration", 10*time.Second, "duration of one bulk TCP run")
	flag.DurationVar(&o.after, "after", 30*time.Second, "wait after the last load before the final memory sample")
	flag.StringVar(&o.meshctl, "meshctl", "", "use this meshctl binary instead of building ./cmd/meshctl")
	flag.BoolVar(&o.keep, "keep", false, "keep the work directory (logs and state) and print its path")
	flag.IntVar(&o.coordNodes, "coord-nodes", 10000, "simulated nodes of the coordinator-at-scale run (bench/coordload; -quick: 1000; 0 = skip it)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), `Usage: go run ./bench [flags]

Measures HTTP through meshctl's proxy and mesh, bulk TCP through the
tunnel and the processes' memory against loopback baselines, on 127.0.0.1
only, and writes a Markdown report. Run it from the repository; as root it
adds the TUN rows and the SSH fallback with UDP blocked. Needs wrk.

Flags:
`)
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() > 0 {
		flag.Usage()
		os.Exit(2)
	}
	if o.quick {
		o.setQuick()
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, o); err != nil {
		if ctx.Err() != nil {
			err = errors.New("interrupted; every process it started is stopped")
		}
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// setQuick makes o a smoke run: 2 s per figure, one run each.
func (o *options) setQuick() {
	o.quick, o.runs, o.duration, o.bulk, o.after = true, 1, 2*time.Second, 2*time.Second, 5*time.Second
	if o.coordNodes > 1000 {
		o.coordNodes = 1000
	}
}

// run runs the whole benchmark and writes the report.
func run(ctx context.Context, o options) (err error) {
	if o.runs < 1 {
		return errors.New("-runs must be at least 1")
	}
	start := time.Now()
	dir, err := os.MkdirTemp("", "meshbench")
	if err != nil {
		return err
	}
	if o.keep {
		fmt.Fprintf(o.log, "work directory: %s\n", dir)
	} else {
		defer os.RemoveAll(dir)
	}
	w, err := newWrk(dir)
	if err != nil {
		return err
	}
	load := loadAverage()
	bin, src := o.meshctl, ""
	if bin == "" {
		if bin, src, err = buildMeshctl(ctx, dir, o.log); err != nil {
			return err
		}
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	s := &session{o: o, w: w, ps: &procs{}, self: self, dir: dir, res: results{}, mem: newMemory()}
	defer s.tearDown()
	if err := s.setUp(ctx, bin); err != nil {
		return err
	}
	if err := s.measure(ctx); err != nil {
		return err
	}
	if err := s.measureProxyTUN(ctx); err != nil {
		return err
	}
	s.tearDown() // the coordinator run gets the machine to itself
	if o.coordNodes > 0 {
		if s.coord, err = runCoordLoad(ctx, o, dir); err != nil {
			return err
		}
	}
	info, err := machineInfo(bin, src, w.bin, load)
	if err != nil {
		return err
	}
	s.elapsed = time.Since(start)
	var buf strings.Builder
	s.report(&buf, info)
	if o.out == "" {
		_, err = io.WriteString(os.Stdout, buf.String())
		return err
	}
	if err := os.WriteFile(o.out, []byte(buf.String()), 0o644); err != nil {
		return err
	}
	fmt.Fprintf(o.log, "wrote %s (%s)\n", o.out, s.elapsed.Round(time.Second))
	return nil
}

// buildMeshctl builds ./cmd/meshctl of the module the bench runs in. It
// also returns the source it built, as git describes it ("" outside git).
func buildMeshctl(ctx context.Context, dir string, log io.Writer) (bin, src string, err error) {
	root, err := moduleRoot(ctx)
	if err != nil {
		return "", "", fmt.Errorf("%w, or pass -meshctl", err)
	}
	bin = filepath.Join(dir, "meshctl")
	fmt.Fprintln(log, "building ./cmd/meshctl …")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", bin, "./cmd/meshctl")
	cmd.Dir = root
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", "", fmt.Errorf("go build ./cmd/meshctl: %w\n%s", err, out)
	}
	return bin, gitSource(ctx, root), nil
}

// moduleRoot is the directory of the module the bench runs in, from which
// it builds meshctl and bench/coordload.
func moduleRoot(ctx context.Context) (string, error) {
	out, err := exec.CommandContext(ctx, "go", "env", "GOMOD").Output()
	mod := strings.TrimSpace(string(out))
	if err != nil || mod == "" || mod == os.DevNull {
		return "", fmt.Errorf("run the bench inside the meshctl repository (go env GOMOD: %q, %v)", mod, err)
	}
	return filepath.Dir(mod), nil
}

// gitSource names the commit in root and the files changed since (the
// bench's own files and docs aside, which do not go into meshctl).
func gitSource(ctx context.Context, root string) string {
	git := func(args ...string) string {
		cmd := exec.CommandContext(ctx, "git", args...)
		cmd.Dir = root
		out, _ := cmd.Output()
		return string(out) // not trimmed: porcelain lines start with a space
	}
	rev := strings.TrimSpace(git("rev-parse", "--short=12", "HEAD"))
	if rev == "" {
		return ""
	}
	var changed []string
	for line := range strings.Lines(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!bench", ":!docs", ":!*.md")) {
		if len(line) > 3 {
			changed = append(changed, strings.TrimSpace(line[3:])) // "XY path\n"
		}
	}
	if len(changed) == 0 {
		return "commit " + rev
	}
	if len(changed) > 8 {
		changed = append(changed[:8], "…")
	}
	return fmt.Sprintf("commit %s with uncommitted changes to %s", rev, strings.Join(changed, ", "))
}
