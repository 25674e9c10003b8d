package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshctl/meshctl/internal/netnstest"
	"github.com/meshctl/meshctl/internal/syncbuf"
)

// meshctlBin is the binary TestMain builds; buildErr says why it could not.
var (
	meshctlBin string
	buildErr   error
)

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "meshctl-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, "e2e: temp dir:", err)
		os.Exit(1)
	}
	meshctlBin, buildErr = buildMeshctl(dir)
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// buildMeshctl runs `go build -o DIR/meshctl .` in this package's directory.
func buildMeshctl(dir string) (string, error) {
	goBin, err := exec.LookPath("go")
	if err != nil {
		// `go test` may run us with a PATH that lacks go; try the toolchain
		// this test binary was built with.
		goBin = filepath.Join(runtime.GOROOT(), "bin", "go")
		if _, serr := os.Stat(goBin); serr != nil {
			return "", fmt.Errorf("the go command is not available (not on PATH, not at %s): %v", goBin, err)
		}
	}
	out := filepath.Join(dir, "meshctl")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, goBin, "build", "-o", out, ".")
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build -o %s . failed: %v\n%s", out, err, b)
	}
	return out, nil
}

// needBinary fails the test clearly when the binary could not be built.
func needBinary(t *testing.T) {
	t.Helper()
	if buildErr != nil {
		t.Fatalf("cannot run end-to-end tests: %v", buildErr)
	}
}

// cleanEnv is the environment for meshctl subprocesses: ours without any
// MESHCTL_* variable (which would silently change flag defaults), plus extra.
func cleanEnv(extra ...string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "MESHCTL_") {
			env = append(env, kv)
		}
	}
	return append(env, extra...)
}

// result is what one meshctl run produced.
type result struct {
	args   []string
	code   int
	stdout string
	stderr string
}

func (r result) String() string {
	return fmt.Sprintf("meshctl %s\nexit %d\nstdout:\n%s\nstderr:\n%s", strings.Join(r.args, " "), r.code, r.stdout, r.stderr)
}

// meshctl runs the binary to completion (30s at most) with extra env vars.
func meshctl(t *testing.T, env []string, args ...string) result {
	t.Helper()
	return runMeshctl(t, env, nil, args...)
}

// runMeshctl is meshctl with stdin (nil: none).
func runMeshctl(t *testing.T, env []string, stdin io.Reader, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, meshctlBin, args...)
	cmd.Env = cleanEnv(env...)
	cmd.Stdin = stdin
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := result{args: args, stdout: stdout.String(), stderr: stderr.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case ctx.Err() != nil:
		t.Fatalf("meshctl %s did not finish within 30s\n%s", strings.Join(args, " "), r)
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	default:
		t.Fatalf("run meshctl %s: %v", strings.Join(args, " "), err)
	}
	return r
}

// mustOK runs meshctl and fails unless it exits 0.
func mustOK(t *testing.T, env []string, args ...string) result {
	t.Helper()
	r := meshctl(t, env, args...)
	if r.code != 0 {
		t.Fatalf("want exit 0:\n%s", r)
	}
	return r
}

// mustFail runs meshctl and fails unless it exits with a non-zero code and
// stderr contains every string in want.
func mustFail(t *testing.T, env []string, want []string, args ...string) result {
	t.Helper()
	r := meshctl(t, env, args...)
	if r.code == 0 {
		t.Fatalf("want a non-zero exit:\n%s", r)
	}
	for _, w := range want {
		if !strings.Contains(r.stderr, w) {
			t.Errorf("stderr lacks %q:\n%s", w, r)
		}
	}
	return r
}

// decode parses JSON output into v.
func decode(t *testing.T, r result, v any) {
	t.Helper()
	if err := json.Unmarshal([]byte(r.stdout), v); err != nil {
		t.Fatalf("output is not the expected JSON: %v\n%s", err, r)
	}
}

// syncBuffer is a log capture safe to read while it is written.
type syncBuffer = syncbuf.Buffer

// proc is a long-running meshctl process.
type proc struct {
	cmd            *exec.Cmd
	stdout, stderr *syncBuffer
	done           chan struct{} // closed when it has exited
	err            error         // Wait's result, valid after done
}

// start starts meshctl in the background; t.Cleanup kills it if it is
// still running.
func start(t *testing.T, env []string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(meshctlBin, args...), stdout: &syncBuffer{}, stderr: &syncBuffer{}, done: make(chan struct{})}
	p.cmd.Env = cleanEnv(env...)
	p.cmd.Stdout, p.cmd.Stderr = p.stdout, p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("start meshctl %s: %v", strings.Join(args, " "), err)
	}
	go func() {
		p.err = p.cmd.Wait()
		close(p.done)
	}()
	t.Cleanup(func() {
		if !p.exited() {
			p.cmd.Process.Kill()
			<-p.done
		}
	})
	return p
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// wait waits up to d for the process to exit and returns its exit code.
func (p *proc) wait(t *testing.T, d time.Duration) int {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(d):
		t.Fatalf("meshctl %s still running after %v\nstdout:\n%s\nstderr:\n%s", strings.Join(p.cmd.Args[1:], " "), d, p.stdout, p.stderr)
	}
	var ee *exec.ExitError
	switch {
	case p.err == nil:
		return 0
	case errors.As(p.err, &ee):
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			t.Fatalf("meshctl was killed by %v\nstderr:\n%s", ws.Signal(), p.stderr)
		}
		return ee.ExitCode()
	}
	t.Fatalf("wait for meshctl: %v", p.err)
	return -1
}

// eventually polls cond every 20ms until it holds or timeout passes.
func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(20 * time.Millisecond) // poll interval, not synchronisation
	}
}

// freePort returns a loopback TCP port that was free a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return strconv.Itoa(ln.Addr().(*net.TCPAddr).Port)
}

// server is a running `meshctl server`.
type server struct {
	*proc
	dataDir string
	addr    string // 127.0.0.1:PORT
	http    string // the embedded proxy's 127.0.0.1:PORT
	ssh     string // its SSH fallback's 127.0.0.1:PORT
}

// startServer runs `meshctl server` on dataDir at 127.0.0.1:port and waits
// until its admin socket answers.
func startServer(t *testing.T, dataDir, port string) *server {
	t.Helper()
	addr := net.JoinHostPort("127.0.0.1", port)
	httpAddr := net.JoinHostPort("127.0.0.1", freePort(t))
	sshAddr := net.JoinHostPort("127.0.0.1", freePort(t))
	p := start(t, nil, "server", "--data-dir", dataDir, "--listen", addr, "--public-host", "127.0.0.1",
		"--http", httpAddr, "--wg-listen", net.JoinHostPort("127.0.0.1", freeUDPPort(t)), "--ssh-listen", sshAddr)
	s := &server{proc: p, dataDir: dataDir, addr: addr, http: httpAddr, ssh: sshAddr}
	eventually(t, 20*time.Second, "the server's admin socket to answer", func() bool {
		if p.exited() {
			t.Fatalf("meshctl server exited early (%v)\nstdout:\n%s\nstderr:\n%s", p.err, p.stdout, p.stderr)
		}
		return meshctl(t, nil, "nodes", "list", "--data-dir", dataDir, "--json").code == 0
	})
	return s
}

// freeUDPPort returns a UDP port that was free a moment ago on 127.0.0.1.
func freeUDPPort(t *testing.T) string {
	t.Helper()
	c, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return strconv.Itoa(c.LocalAddr().(*net.UDPAddr).Port)
}

// labTools finds the programs a namespace test runs (curl, python3, …) by
// their paths, or skips the test (fails it with CI=true as root).
func labTools(t *testing.T, names ...string) map[string]string {
	t.Helper()
	tools := map[string]string{}
	for _, name := range names {
		p, err := exec.LookPath(name)
		if err != nil {
			netnstest.SkipOrFail(t, "%s not found: %v", name, err)
		}
		tools[name] = p
	}
	return tools
}

// needTUN skips the test where the kernel has no TUN device (fails it
// with CI=true as root).
func needTUN(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		netnstest.SkipOrFail(t, "no TUN support: %v", err)
	}
}
