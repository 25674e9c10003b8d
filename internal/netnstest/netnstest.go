// Package netnstest is a test harness for root tests that need several
// hosts: each host is a Linux network namespace, joined to others by veth
// pairs. Everything it creates lives inside those namespaces (tests use
// addresses from 198.18.0.0/15 or 192.168.x.0/24 there) and is deleted when
// the test ends, also when it fails or panics.
//
//	lab := netnstest.New(t, "a", "b")
//	lab.Link("a", "b", netip.MustParsePrefix("198.18.0.1/24"), netip.MustParsePrefix("198.18.0.2/24"))
//	srv := lab.Command("b", os.Args[0], "-test.run=^TestHelper$")
//	out := lab.Run(t, "a", "ip", "-j", "addr", "show")
//
// Go switches network namespaces per OS thread, so code that must run in a
// namespace runs as a separate process there: Command and Run use
// `ip netns exec`, and a test typically runs its own binary (os.Args[0])
// with -test.run and an environment marker.
//
// Root-only tests skip when not run as root. When CI=true and running as
// root, a missing feature (no `ip`, no namespaces) fails the test instead of
// skipping it, so it cannot hide; see SkipOrFail.
package netnstest

import (
	"bytes"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// RequireRoot skips t when the process is not root (also under CI=true:
// the CI runs as root, so a non-root run is a developer's).
func RequireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (network namespaces)")
	}
}

// SkipOrFail skips t with the message, except when CI=true and running as
// root, where the missing feature fails the test.
func SkipOrFail(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") == "true" && os.Geteuid() == 0 {
		t.Fatalf("CI=true as root, so this may not skip: "+format, args...)
	}
	t.Skipf(format, args...)
}

// Lab is a set of network namespaces created for one test.
type Lab struct {
	t  testing.TB
	ns map[string]string // logical name → real netns name

	mu     sync.Mutex
	cmds   []*exec.Cmd
	ifs    map[string]map[string]bool // real ns → interface names made by Link
	peers  map[[2]string]string       // {ns, peer} → first interface in ns towards peer
	lastIf map[string]string          // real ns → the interface newIfName made last
}

// runDir is where `ip netns` keeps its named namespaces.
const runDir = "/var/run/netns"

// nameRE matches the names New makes: "mt", the creating process's pid
// (6 hex digits) and 5 random hex digits.
var nameRE = regexp.MustCompile(`^mt([0-9a-f]{6})[0-9a-f]{5}$`)

// New creates one network namespace per name, each with a unique short
// real name ("mt" + pid + random, 13 bytes) and lo up, and deletes them at
// t.Cleanup (which the testing package runs also on failure and panic).
// It skips when not root, and skips (fails under CI=true) when `ip` is
// missing or namespaces cannot be made. It also deletes namespaces that
// an earlier test process left behind when it was killed before its
// cleanup could run (its pid is in the name; only empty namespaces of dead
// processes are touched).
func New(t *testing.T, names ...string) *Lab {
	t.Helper()
	RequireRoot(t)
	if _, err := exec.LookPath("ip"); err != nil {
		SkipOrFail(t, "`ip` (iproute2) not found: %v", err)
	}
	removeStale()
	l := &Lab{
		t:      t,
		ns:     make(map[string]string),
		ifs:    make(map[string]map[string]bool),
		peers:  make(map[[2]string]string),
		lastIf: make(map[string]string),
	}
	for _, name := range names {
		if name == "" {
			t.Fatal("netnstest: empty namespace name")
		}
		if _, dup := l.ns[name]; dup {
			t.Fatalf("netnstest: namespace %q named twice", name)
		}
		real, err := addNetns()
		if err != nil {
			SkipOrFail(t, "cannot create a network namespace: %v", err)
		}
		t.Cleanup(func() {
			if out, err := exec.Command("ip", "netns", "delete", real).CombinedOutput(); err != nil {
				t.Errorf("netnstest: delete namespace %s (%s): %v: %s", real, name, err, out)
			}
		})
		l.ns[name] = real
		l.ifs[real] = make(map[string]bool)
		l.ip("-n", real, "link", "set", "lo", "up")
	}
	// Cleanups run last-registered first: kill the lab's processes before
	// the namespaces go.
	t.Cleanup(l.killCommands)
	return l
}

// addNetns makes a namespace under a fresh name.
func addNetns() (string, error) {
	var lastErr error
	for try := 0; try < 10; try++ {
		var b [4]byte
		_, _ = rand.Read(b[:])
		name := fmt.Sprintf("mt%06x%05x", os.Getpid()&0xffffff, binary.BigEndian.Uint32(b[:])&0xfffff)
		if _, err := os.Lstat(filepath.Join(runDir, name)); err == nil {
			continue
		}
		out, err := exec.Command("ip", "netns", "add", name).CombinedOutput()
		if err == nil {
			return name, nil
		}
		lastErr = fmt.Errorf("ip netns add %s: %v: %s", name, err, bytes.TrimSpace(out))
		if !bytes.Contains(out, []byte("exists")) {
			break
		}
	}
	return "", lastErr
}

// removeStale deletes namespaces named by New in a process that is gone.
func removeStale() {
	ents, err := os.ReadDir(runDir)
	if err != nil {
		return
	}
	for _, e := range ents {
		m := nameRE.FindStringSubmatch(e.Name())
		if m == nil {
			continue
		}
		pid, _ := strconv.ParseInt(m[1], 16, 64)
		if int(pid) == os.Getpid()&0xffffff {
			continue
		}
		if pid > 0 && !errors.Is(syscall.Kill(int(pid), 0), syscall.ESRCH) {
			continue // the owner (or a process reusing its pid) is alive
		}
		out, err := exec.Command("ip", "netns", "pids", e.Name()).Output()
		if err != nil || len(bytes.TrimSpace(out)) != 0 {
			continue
		}
		_ = exec.Command("ip", "netns", "delete", e.Name()).Run()
	}
}

// NS returns the real name of the namespace called name in New. It
// panics for a name New was not given.
func (l *Lab) NS(name string) string {
	real, ok := l.ns[name]
	if !ok {
		panic(fmt.Sprintf("netnstest: no namespace %q in this lab", name))
	}
	return real
}

// Link joins namespaces a and b with a veth pair, adds aAddr to a's end and
// bAddr to b's end (a zero Prefix adds none; IPv6 addresses skip duplicate
// address detection), and sets both ends and lo up. The end in a is named
// IfName(a, b). Call it from the test's goroutine: it fails the test on
// error.
func (l *Lab) Link(a, b string, aAddr, bAddr netip.Prefix) {
	l.t.Helper()
	ra, rb := l.NS(a), l.NS(b)
	if ra == rb {
		l.t.Fatalf("netnstest: Link(%q, %q): same namespace", a, b)
	}
	l.mu.Lock()
	ia, ib := l.newIfName(ra, b), l.newIfName(rb, a)
	l.mu.Unlock()
	l.ip("-n", ra, "link", "add", ia, "type", "veth", "peer", "name", ib, "netns", rb)
	ends := []struct {
		ns, ifname string
		addr       netip.Prefix
	}{{ra, ia, aAddr}, {rb, ib, bAddr}}
	// Links first, then addresses: an IPv6 address added before the link
	// has carrier can cost the first connection a SYN retransmission.
	for _, end := range ends {
		l.ip("-n", end.ns, "link", "set", "lo", "up")
		l.ip("-n", end.ns, "link", "set", end.ifname, "up")
	}
	for _, end := range ends {
		if end.addr.IsValid() {
			args := []string{"-n", end.ns, "addr", "add", end.addr.String(), "dev", end.ifname}
			if end.addr.Addr().Is6() && !end.addr.Addr().Is4In6() {
				args = append(args, "nodad")
			}
			l.ip(args...)
		}
	}
}

// IfName returns the name of the interface in namespace ns made by the
// first Link between ns and peer, or "" if there is none.
func (l *Lab) IfName(ns, peer string) string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.peers[[2]string{l.NS(ns), peer}]
}

// newIfName picks an unused interface name in real namespace ns for the
// end towards peer: "to-<peer>" when it fits, else "veth<n>".
func (l *Lab) newIfName(ns, peer string) string {
	used := l.ifs[ns]
	name := "to-" + peer
	if len(name) > 15 || strings.ContainsAny(name, "/:% \t\n") || used[name] {
		for n := len(used); ; n++ {
			name = "veth" + strconv.Itoa(n)
			if !used[name] {
				break
			}
		}
	}
	used[name] = true
	l.lastIf[ns] = name
	if k := [2]string{ns, peer}; l.peers[k] == "" {
		l.peers[k] = name
	}
	return name
}

// Run runs a command inside namespace ns (ip netns exec) and returns its
// standard output. It fails t with the command's output if it fails.
func (l *Lab) Run(t *testing.T, ns string, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", l.NS(ns), name}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("in namespace %s: %s %s: %v\nstdout:\n%s\nstderr:\n%s",
			ns, name, strings.Join(args, " "), err, stdout.Bytes(), stderr.Bytes())
	}
	return stdout.String()
}

// Command returns a command that runs inside namespace ns, for long-running
// processes: the caller starts, stops and waits for it. Any that is still
// running when the test ends is killed before the namespaces are deleted
// (start it from the test's goroutine, or synchronize, so the cleanup sees
// its process).
func (l *Lab) Command(ns, name string, args ...string) *exec.Cmd {
	cmd := exec.Command("ip", append([]string{"netns", "exec", l.NS(ns), name}, args...)...)
	l.mu.Lock()
	l.cmds = append(l.cmds, cmd)
	l.mu.Unlock()
	return cmd
}

func (l *Lab) killCommands() {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, c := range l.cmds {
		if c.Process != nil {
			// ip netns exec execs the command, so this is the command
			// itself. Killing a process that was already waited for is
			// a no-op (os.ErrProcessDone).
			_ = c.Process.Kill()
		}
	}
}

// ip runs `ip args...` and fails the test on error.
func (l *Lab) ip(args ...string) {
	l.t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		l.t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
}
