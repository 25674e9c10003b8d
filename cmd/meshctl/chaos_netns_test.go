package main

// Root-only roaming test (netnstest.NATLab): a node behind a NAT changes
// its underlay address, then its router gets a new public address (an
// ISP's new lease, every mapping lost). Requests through the proxy must
// work again within a deadline; the test logs how long each took. Then
// 10% loss each way on the node's link. The NAT lab's own test
// (natlab_netns_test.go) covers router restarts, symmetric NAT, blocked
// UDP and 10% loss one way.

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/internal/netnstest"
)

func TestRoamingInNetns(t *testing.T) {
	needBinary(t)
	testStart := time.Now()
	lab := netnstest.NewNATLab(t, netnstest.SiteSpec{Name: "pi1", Mode: netnstest.EndpointIndependent})
	tools := labTools(t, "curl", "python3")
	site := lab.Sites["pi1"]
	srvIP := lab.ServerAddr.String()
	const httpPort, webPort = "8080", "8081"
	base := meshtest.ShortTempDir(t)
	dataDir := filepath.Join(base, "d")
	stateDir := filepath.Join(base, "pi1")

	srv := labProc(t, lab.Lab, lab.Server, "", "server", "--data-dir", dataDir, "--listen", srvIP+":7443",
		"--public-host", srvIP, "--domain", "localhost", "--http", srvIP+":"+httpPort,
		"--wg-listen", srvIP+":51830", "--ssh-listen", srvIP+":2222")
	stopGracefully(t, srv)
	eventually(t, agentDeadline, "the server's admin socket to answer", func() bool {
		if srv.exited() {
			t.Fatalf("meshctl server exited early (%v)\nstderr:\n%s", srv.err, srv.stderr)
		}
		return meshctl(t, nil, "nodes", "list", "--data-dir", dataDir, "--json").code == 0
	})
	tc := createToken(t, dataDir)
	if r := runInNS(t, lab.Lab, "pi1", 30*time.Second, meshctlBin, "enroll", "--coordinator", tc.Coordinator, "--token", tc.Token,
		"--ca-pin", tc.CAPin, "--name", "pi1", "--state-dir", stateDir); r.code != 0 {
		t.Fatalf("enroll pi1 behind its NAT:\n%s", r)
	}
	www := filepath.Join(base, "www")
	if err := os.Mkdir(www, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(www, "index.html"), []byte("hello from pi1"), 0o644); err != nil {
		t.Fatal(err)
	}
	web := labProc(t, lab.Lab, "pi1", tools["python3"], "-m", "http.server", webPort, "--bind", "127.0.0.1", "--directory", www)
	stopGracefully(t, web)
	up := labProc(t, lab.Lab, "pi1", "", "up", "--state-dir", stateDir, "--listen-port", "51900",
		"--expose", "web=127.0.0.1:"+webPort+",public")
	stopGracefully(t, up)
	// The agent's UAPI socket (in /var/run/wireguard as root) is removed by
	// a graceful stop; only an agent killed by the harness leaves it.
	var uapi string
	t.Cleanup(func() {
		if uapi == "" || strings.HasPrefix(uapi, base) {
			return
		}
		if c, err := net.Dial("unix", uapi); err == nil {
			c.Close()
			return
		}
		os.Remove(uapi)
	})

	logs := func() string {
		return fmt.Sprintf("\nserver stderr:\n%s\npi1 stderr:\n%s\nrouter mappings: %v",
			tail(srv.stderr.String(), 5000), tail(up.stderr.String(), 5000), site.Router.Mappings(t))
	}
	served := func(timeout string) result {
		return runInNS(t, lab.Lab, lab.Server, 45*time.Second, tools["curl"], "-s", "-S", "-m", timeout,
			"--resolve", "pi1.localhost:"+httpPort+":"+srvIP, "http://pi1.localhost:"+httpPort+"/")
	}
	waitServed := func(t *testing.T, within time.Duration, what string) time.Duration {
		t.Helper()
		start := time.Now()
		waitFor(t, within, what, func() (bool, string) {
			if up.exited() || srv.exited() {
				t.Fatalf("a meshctl process exited%s", logs())
			}
			r := served("3")
			return r.code == 0 && r.stdout == "hello from pi1", r.String() + logs()
		})
		return time.Since(start)
	}
	// proxyEndpoint is where the server's proxy sends pi1's packets.
	proxyEndpoint := func() string {
		r := meshctl(t, nil, "status", "--state-dir", filepath.Join(dataDir, "proxy"), "--json")
		var st agentStatusJSON
		if r.code != 0 {
			return "(" + strings.TrimSpace(r.stderr) + ")"
		}
		decode(t, r, &st)
		p, _ := st.peer("pi1")
		return p.Endpoint
	}
	waitServed(t, agentDeadline, "the proxy to serve pi1 through its NAT")
	if st, r, ok := func() (agentStatusJSON, result, bool) {
		r := runInNS(t, lab.Lab, "pi1", 30*time.Second, meshctlBin, "status", "--state-dir", stateDir, "--json")
		var st agentStatusJSON
		if r.code != 0 {
			return st, r, false
		}
		decode(t, r, &st)
		return st, r, true
	}(); ok {
		uapi = st.UAPISocket
	} else {
		t.Fatalf("status of pi1:\n%s", r)
	}
	t.Logf("pi1 served through its NAT after %v; the proxy sends to %s", time.Since(testStart).Round(time.Millisecond), proxyEndpoint())

	// (a) pi1's own address changes (a new DHCP lease on its LAN): the
	// agent's socket stays, its packets leave from 10.1.0.3, and the
	// router maps them to a new public port.
	var addrAfter time.Duration
	step(t, "NodeAddressChanges", func(t *testing.T) {
		before := proxyEndpoint()
		oldAddr, newAddr := site.Addr, netip.AddrFrom4([4]byte{10, 1, 0, 3})
		gw := netip.AddrFrom4([4]byte{10, 1, 0, 1})
		lab.Sysctl(t, "pi1", "net.ipv4.conf."+site.If+".promote_secondaries", "1")
		lab.Run(t, "pi1", "ip", "addr", "add", newAddr.String()+"/24", "dev", site.If)
		lab.Run(t, "pi1", "ip", "addr", "del", oldAddr.String()+"/24", "dev", site.If)
		lab.Run(t, "pi1", "ip", "route", "replace", "default", "via", gw.String(), "src", newAddr.String())
		changed := time.Now()
		waitServed(t, 45*time.Second, "the proxy to serve pi1 again after its address changed")
		addrAfter = time.Since(changed)
		after := proxyEndpoint()
		t.Logf("pi1's address %s → %s: served through the proxy again after %v; the proxy's endpoint for it %s → %s",
			oldAddr, newAddr, addrAfter.Round(time.Millisecond), before, after)
		if after == before {
			t.Errorf("the proxy still sends to %s: the NAT should have given 10.1.0.3 a new mapping", before)
		}
	})

	// (b) The router's public address changes and it forgets every
	// mapping: pi1 now appears from another public IP.
	var wanAfter time.Duration
	step(t, "RouterPublicAddressChanges", func(t *testing.T) {
		before := proxyEndpoint()
		r := site.Router
		oldPub, newPub := site.Public, netip.AddrFrom4([4]byte{198, 18, 0, 50})
		lab.Sysctl(t, r.NS, "net.ipv4.conf."+r.WANIf+".promote_secondaries", "1")
		lab.Run(t, r.NS, "ip", "addr", "add", newPub.String()+"/24", "dev", r.WANIf)
		lab.Run(t, r.NS, "ip", "addr", "del", oldPub.String()+"/24", "dev", r.WANIf)
		dropped := r.Restart(t)
		changed := time.Now()
		waitServed(t, 45*time.Second, "the proxy to serve pi1 again after its router's public address changed")
		wanAfter = time.Since(changed)
		after := proxyEndpoint()
		t.Logf("router's public address %s → %s (%d mappings dropped): served again after %v; the proxy's endpoint for pi1 %s → %s",
			oldPub, newPub, dropped, wanAfter.Round(time.Millisecond), before, after)
		if !strings.HasPrefix(after, newPub.String()+":") {
			t.Errorf("the proxy sends pi1's packets to %s, want the router's new address %s", after, newPub)
		}
	})

	// (c) 10% loss both ways on pi1's link (its egress and its router's
	// egress towards it; the NAT lab's own test drops one way): requests
	// through the proxy, no retries, two at a time; all must succeed.
	var lossOK, lossFailed int
	var lossTook time.Duration
	step(t, "PacketLossBothWays", func(t *testing.T) {
		r := site.Router
		how := lab.Loss(t, "pi1", site.If, 10)
		lab.Loss(t, r.NS, r.LANIf, 10)
		defer lab.ClearLoss(t, "pi1", site.If)
		defer lab.ClearLoss(t, r.NS, r.LANIf)
		const n, conc = 40, 2
		var mu sync.Mutex
		var failures []string
		var slowest time.Duration
		start := time.Now()
		var wg sync.WaitGroup
		for w := 0; w < conc; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < n/conc; i++ {
					reqStart := time.Now()
					res := served("30") // a patient browser's timeout; no retries
					d := time.Since(reqStart)
					mu.Lock()
					slowest = max(slowest, d)
					if res.code == 0 && res.stdout == "hello from pi1" {
						lossOK++
					} else {
						lossFailed++
						failures = append(failures, fmt.Sprintf("exit %d, %q, %s", res.code, res.stdout, strings.TrimSpace(res.stderr)))
					}
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		lossTook = time.Since(start)
		t.Logf("10%% loss each way on pi1's link (%s): %d/%d requests through the proxy succeeded, %d failed, in %v (slowest %v)",
			how, lossOK, n, lossFailed, lossTook.Round(time.Millisecond), slowest.Round(time.Millisecond))
		if lossFailed > 0 {
			t.Errorf("%d/%d requests failed under 10%% loss each way:\n%s%s", lossFailed, n, strings.Join(failures, "\n"), logs())
		}
	})

	step(t, "Shutdown", func(t *testing.T) {
		if code := sigterm(t, up, 15*time.Second); code != 0 {
			t.Errorf("pi1's agent exited %d on SIGTERM\nstderr:\n%s", code, up.stderr)
		}
		if code := sigterm(t, srv, 15*time.Second); code != 0 {
			t.Errorf("meshctl server exited %d on SIGTERM\nstderr:\n%s", code, srv.stderr)
		}
	})
	t.Logf("summary: served again %v after the node's address changed, %v after its router's public address changed; %d/%d requests under 10%% loss each way in %v; %v in all",
		addrAfter.Round(time.Millisecond), wanAfter.Round(time.Millisecond), lossOK, lossOK+lossFailed, lossTook.Round(time.Millisecond), time.Since(testStart).Round(time.Millisecond))
}
