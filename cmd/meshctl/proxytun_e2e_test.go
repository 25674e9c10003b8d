package main

import (
	"bytes"
	"crypto/rand"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/internal/netnstest"
)

// TestProxyOnTUNInNetns runs `meshctl server --tun` (root): the embedded
// proxy's mesh traffic goes through a kernel TUN in the server's namespace,
// so the proxy dials nodes with the kernel's TCP stack. A node on the
// userspace stack in a second namespace is served through it; the node
// cannot reach any port of the server's host through the proxy's overlay
// address; SIGTERM removes the interface.
func TestProxyOnTUNInNetns(t *testing.T) {
	needBinary(t)
	lab := netnstest.New(t, "srv", "pi")
	tools := labTools(t, "curl", "python3")
	needTUN(t)
	lab.Link("srv", "pi", netip.MustParsePrefix("198.18.3.1/24"), netip.MustParsePrefix("198.18.3.2/24"))

	base := meshtest.ShortTempDir(t)
	dataDir, sp := filepath.Join(base, "d"), filepath.Join(base, "pi")
	proxyDir := filepath.Join(dataDir, "proxy")
	// /var/run/wireguard/IFNAME.sock is shared by all namespaces and runs.
	tun := "mp" + randHex(t, 3)
	t.Cleanup(func() { os.Remove("/var/run/wireguard/" + tun + ".sock") }) // only left by a SIGKILL

	srv := labProc(t, lab, "srv", "", "server", "--data-dir", dataDir, "--listen", "198.18.3.1:7443",
		"--public-host", "198.18.3.1", "--http", "198.18.3.1:8080", "--wg-listen", ":51830", "--ssh-listen", "", "--tun", tun)
	stopGracefully(t, srv)
	stProxy := waitAgentUp(t, srv, proxyDir)

	www := filepath.Join(base, "www")
	if err := os.Mkdir(www, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(www, "index.html"), []byte("hello from pi"), 0o644); err != nil {
		t.Fatal(err)
	}
	bulk := make([]byte, 16<<20)
	rand.Read(bulk)
	if err := os.WriteFile(filepath.Join(www, "bulk"), bulk, 0o644); err != nil {
		t.Fatal(err)
	}
	labProc(t, lab, "pi", tools["python3"], "-m", "http.server", "8081", "--bind", "127.0.0.1", "--directory", www)
	// A listener on every address of the server's host, which no node
	// may reach through the proxy's overlay address.
	secret := filepath.Join(base, "secret")
	if err := os.Mkdir(secret, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(secret, "index.html"), []byte("host-only"), 0o644); err != nil {
		t.Fatal(err)
	}
	labProc(t, lab, "srv", tools["python3"], "-m", "http.server", "9999", "--bind", "0.0.0.0", "--directory", secret)

	tc := createToken(t, dataDir)
	if r := runInNS(t, lab, "pi", 30*time.Second, meshctlBin, "enroll", "--coordinator", tc.Coordinator, "--token", tc.Token,
		"--ca-pin", tc.CAPin, "--name", "pi", "--state-dir", sp); r.code != 0 {
		t.Fatalf("enroll:\n%s", r)
	}
	up := labProc(t, lab, "pi", "", "up", "--state-dir", sp, "--expose", "web=127.0.0.1:8081,public")
	stopGracefully(t, up)
	waitAgentUp(t, up, sp)

	// curl in the server's namespace, as a browser of the proxy.
	curl := func(timeout int, args ...string) result {
		t.Helper()
		return runInNS(t, lab, "srv", time.Duration(timeout+5)*time.Second, tools["curl"],
			append([]string{"-sS", "-g", "-m", strconv.Itoa(timeout), "-H", "Host: pi.localhost"}, args...)...)
	}

	step(t, "Status", func(t *testing.T) {
		if stProxy.Mode != "tun" || stProxy.Interface != tun {
			t.Errorf("embedded proxy: mode %q interface %q, want tun, %s", stProxy.Mode, stProxy.Interface, tun)
		}
		out := runInNS(t, lab, "srv", 10*time.Second, "ip", "addr", "show", "dev", tun)
		if out.code != 0 || !strings.Contains(out.stdout, stProxy.IPv4+"/") || !strings.Contains(out.stdout, stProxy.IPv6+"/") {
			t.Errorf("ip addr show dev %s in srv lacks %s and %s:\n%s", tun, stProxy.IPv4, stProxy.IPv6, out)
		}
	})

	step(t, "ServedThroughTUN", func(t *testing.T) {
		start := time.Now()
		waitFor(t, agentDeadline, "the proxy on its TUN to serve pi", func() (bool, string) {
			r := curl(3, "http://198.18.3.1:8080/")
			return r.stdout == "hello from pi", r.String()
		})
		t.Logf("served through the proxy's TUN %s after pi's agent answered", time.Since(start).Round(time.Millisecond))
	})

	t.Run("Bulk", func(t *testing.T) {
		// 16 MiB through the proxy: the kernel hands wireguard-go TSO
		// segments from the proxy's side.
		out := filepath.Join(base, "bulk.got")
		if r := curl(50, "-o", out, "http://198.18.3.1:8080/bulk"); r.code != 0 {
			t.Fatalf("curl of 16 MiB through the proxy:\n%s", r)
		}
		got, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, bulk) {
			t.Fatalf("received %d bytes, not the 16 MiB sent", len(got))
		}
	})

	t.Run("HostPortsClosedToNodes", func(t *testing.T) {
		// The listener answers on the underlay…
		if r := runInNS(t, lab, "pi", 10*time.Second, tools["curl"], "-sS", "-m", "5", "http://198.18.3.1:9999/"); r.stdout != "host-only" {
			t.Fatalf("port 9999 on the underlay:\n%s", r)
		}
		// …but not through the proxy's overlay address: any answer at all
		// (want "") would be a failure.
		if err := ncFetch(sp, "proxy", "9999", "", 5*time.Second); err == nil {
			t.Error("node pi reached port 9999 of the proxy's host over the mesh")
		}
	})

	t.Run("SIGTERMRemovesTUN", func(t *testing.T) {
		if code := sigterm(t, srv, 15*time.Second); code != 0 {
			t.Errorf("meshctl server --tun exited %d on SIGTERM, want 0\nstderr:\n%s", code, srv.stderr)
		}
		if r := runInNS(t, lab, "srv", 10*time.Second, "ip", "link", "show", "dev", tun); r.code == 0 {
			t.Errorf("%s still exists in srv after the server stopped:\n%s", tun, r)
		}
	})
}
