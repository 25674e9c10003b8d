package netnstest

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"
)

// helperEnv selects what TestHelperProcess does when the test binary runs
// itself as a child.
const helperEnv = "NETNSTEST_HELPER"

func nsExists(real string) bool {
	_, err := os.Lstat(filepath.Join(runDir, real))
	return err == nil
}

// helper returns a command that runs this test binary's TestHelperProcess
// in the given mode.
func helper(cmd *exec.Cmd, mode string, args ...string) *exec.Cmd {
	// GORACE: a -race binary otherwise sleeps a second at exit.
	cmd.Env = append(os.Environ(), "GORACE=atexit_sleep_ms=0", helperEnv+"="+mode, "NETNSTEST_ARGS="+strings.Join(args, ","))
	return cmd
}

func helperArgs() []string {
	return []string{"-test.run=^TestHelperProcess$", "-test.v"}
}

func TestLabLinkRunCommand(t *testing.T) {
	lab := New(t, "a", "b")
	ra, rb := lab.NS("a"), lab.NS("b")
	for _, r := range []string{ra, rb} {
		if len(r) > 15 || !strings.HasPrefix(r, "mt") || !nameRE.MatchString(r) {
			t.Errorf("real name %q: want mt + hex, at most 15 bytes", r)
		}
		if !nsExists(r) {
			t.Errorf("namespace %s does not exist", r)
		}
	}
	if ra == rb {
		t.Fatal("two namespaces share a name")
	}
	lab.Link("a", "b", netip.MustParsePrefix("198.18.0.1/24"), netip.MustParsePrefix("198.18.0.2/24"))
	lab.Link("a", "b", netip.MustParsePrefix("fd00:198:18::1/64"), netip.MustParsePrefix("fd00:198:18::2/64"))
	if lab.IfName("a", "b") != "to-b" || lab.IfName("b", "a") != "to-a" {
		t.Errorf("IfName: %q, %q", lab.IfName("a", "b"), lab.IfName("b", "a"))
	}

	// The addresses, up links and lo are there, in the namespaces only.
	var links []struct {
		Ifname   string   `json:"ifname"`
		Flags    []string `json:"flags"`
		AddrInfo []struct {
			Local     string `json:"local"`
			Prefixlen int    `json:"prefixlen"`
		} `json:"addr_info"`
	}
	if err := json.Unmarshal([]byte(lab.Run(t, "a", "ip", "-j", "addr", "show")), &links); err != nil {
		t.Fatal(err)
	}
	got := map[string][]string{}
	for _, l := range links {
		if !contains(l.Flags, "UP") {
			t.Errorf("%s in a is not up: %v", l.Ifname, l.Flags)
		}
		for _, a := range l.AddrInfo {
			got[l.Ifname] = append(got[l.Ifname], fmt.Sprintf("%s/%d", a.Local, a.Prefixlen))
		}
	}
	if !contains(got["to-b"], "198.18.0.1/24") {
		t.Errorf("a's addresses: %v", got)
	}
	var v6 bool
	for name, addrs := range got {
		v6 = v6 || (strings.HasPrefix(name, "veth") && contains(addrs, "fd00:198:18::1/64"))
	}
	if !v6 || !contains(got["lo"], "127.0.0.1/8") {
		t.Errorf("a's addresses: %v", got)
	}

	// Traffic flows between the namespaces: a TCP echo server in b
	// (Command), a client in a (Run), over IPv4 and IPv6.
	for _, dst := range []string{"198.18.0.2", "fd00:198:18::2"} {
		srv := helper(lab.Command("b", os.Args[0], helperArgs()...), "echo", net.JoinHostPort(dst, "7777"))
		stdout, err := srv.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		srv.Stderr = os.Stderr
		if err := srv.Start(); err != nil {
			t.Fatal(err)
		}
		if !waitLine(stdout, "LISTENING", 10*time.Second) {
			srv.Process.Kill()
			srv.Wait()
			t.Fatalf("echo server in b did not start")
		}
		cli := helper(lab.Command("a", os.Args[0], helperArgs()...), "dial", net.JoinHostPort(dst, "7777"))
		out, err := cli.CombinedOutput()
		if err != nil || !strings.Contains(string(out), "ECHO hello from a") {
			t.Errorf("client in a → %s: %v\n%s", dst, err, out)
		}
		if err := srv.Wait(); err != nil {
			t.Errorf("echo server: %v", err)
		}
	}
}

func waitLine(r io.Reader, want string, timeout time.Duration) bool {
	found := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			if strings.Contains(sc.Text(), want) {
				found <- true
				io.Copy(io.Discard, r)
				return
			}
		}
		found <- false
	}()
	select {
	case ok := <-found:
		return ok
	case <-time.After(timeout):
		return false
	}
}

func contains(s []string, x string) bool {
	for _, v := range s {
		if v == x {
			return true
		}
	}
	return false
}

func TestCleanupDeletesNamespacesAndKillsCommands(t *testing.T) {
	RequireRoot(t)
	var names []string
	var cmd *exec.Cmd
	t.Run("lab", func(t *testing.T) {
		lab := New(t, "x", "y")
		lab.Link("x", "y", netip.MustParsePrefix("192.168.77.1/24"), netip.MustParsePrefix("192.168.77.2/24"))
		names = []string{lab.NS("x"), lab.NS("y")}
		cmd = lab.Command("y", "sleep", "60")
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// Neither killed nor waited for: the cleanup must do it.
	})
	if len(names) != 2 {
		t.Fatal("subtest did not run")
	}
	for _, n := range names {
		if nsExists(n) {
			t.Errorf("namespace %s left behind", n)
		}
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		var ee *exec.ExitError
		if !errors.As(err, &ee) || ee.ProcessState.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
			t.Errorf("long-running command ended with %v, want killed", err)
		}
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		t.Fatal("long-running command still running after cleanup")
	}
}

// TestCleanupOnFailureAndPanic runs a child test that creates a lab and
// then fails or panics, and checks that its namespaces are gone.
func TestCleanupOnFailureAndPanic(t *testing.T) {
	RequireRoot(t)
	for _, mode := range []string{"fatal", "panic"} {
		t.Run(mode, func(t *testing.T) {
			out, err := helper(exec.Command(os.Args[0], helperArgs()...), mode).CombinedOutput()
			if err == nil {
				t.Fatalf("child test did not fail:\n%s", out)
			}
			m := regexp.MustCompile(`NAMESPACES=(\S+)`).FindSubmatch(out)
			if m == nil {
				t.Fatalf("child did not report its namespaces:\n%s", out)
			}
			for _, n := range strings.Split(string(m[1]), ",") {
				if nsExists(n) {
					t.Errorf("namespace %s left behind after %s", n, mode)
					exec.Command("ip", "netns", "delete", n).Run()
				}
			}
			if mode == "panic" && !strings.Contains(string(out), "deliberate panic") {
				t.Errorf("child output lacks the panic:\n%s", out)
			}
		})
	}
}

func TestRemoveStale(t *testing.T) {
	RequireRoot(t)
	// A namespace named like New's by a process that is gone...
	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Skip("cannot run true:", err)
	}
	stale := fmt.Sprintf("mt%06x%05x", dead.Process.Pid&0xffffff, 0xabcde)
	// ...and one by a live process (pid 1), which must stay.
	live := fmt.Sprintf("mt%06x%05x", 1, 0xabcde)
	for _, n := range []string{stale, live} {
		if out, err := exec.Command("ip", "netns", "add", n).CombinedOutput(); err != nil {
			SkipOrFail(t, "ip netns add: %v: %s", err, out)
		}
		t.Cleanup(func() {
			if nsExists(n) {
				exec.Command("ip", "netns", "delete", n).Run()
			}
		})
	}
	New(t, "z")
	if nsExists(stale) {
		t.Error("stale namespace of a dead process not removed")
	}
	if !nsExists(live) {
		t.Error("namespace of a live process removed")
	}
}

func TestSkipOrFail(t *testing.T) {
	RequireRoot(t)
	for _, ci := range []string{"true", ""} {
		cmd := helper(exec.Command(os.Args[0], helperArgs()...), "skiporfail")
		cmd.Env = append(cmd.Env, "CI="+ci)
		out, err := cmd.CombinedOutput()
		if ci == "true" {
			if err == nil || !strings.Contains(string(out), "may not skip") {
				t.Errorf("CI=true as root: SkipOrFail did not fail: %v\n%s", err, out)
			}
		} else if err != nil || !strings.Contains(string(out), "--- SKIP") {
			t.Errorf("CI unset: SkipOrFail did not skip: %v\n%s", err, out)
		}
	}
}

func TestNSUnknownPanics(t *testing.T) {
	lab := &Lab{ns: map[string]string{"a": "mt0"}}
	defer func() {
		if recover() == nil {
			t.Error("NS of an unknown name did not panic")
		}
	}()
	lab.NS("b")
}

// TestHelperProcess is not a test: it is what the test binary does when a
// test above runs it as a child with NETNSTEST_HELPER set.
func TestHelperProcess(t *testing.T) {
	mode := os.Getenv(helperEnv)
	if mode == "" {
		return
	}
	args := strings.Split(os.Getenv("NETNSTEST_ARGS"), ",")
	switch mode {
	case "echo": // serve one TCP echo connection on args[0]
		ln, err := net.Listen("tcp", args[0])
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		fmt.Println("LISTENING")
		ln.(*net.TCPListener).SetDeadline(time.Now().Add(20 * time.Second))
		c, err := ln.Accept()
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		fmt.Fprint(c, "ECHO "+line)
	case "dial":
		c, err := net.DialTimeout("tcp", args[0], 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprint(c, "hello from a\n")
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		fmt.Print(line)
	case "fatal", "panic":
		lab := New(t, "p", "q")
		lab.Link("p", "q", netip.MustParsePrefix("198.18.1.1/30"), netip.MustParsePrefix("198.18.1.2/30"))
		fmt.Printf("NAMESPACES=%s,%s\n", lab.NS("p"), lab.NS("q"))
		if mode == "panic" {
			panic("deliberate panic")
		}
		t.Fatal("deliberate failure")
	case "skiporfail":
		SkipOrFail(t, "feature missing")
	default:
		t.Fatalf("unknown helper mode %q", mode)
	}
}
