//go:build linux

package tundev

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshctl/meshctl/internal/netnstest"
	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/tun"
)

// Root tests run this test binary again as a child, inside a network
// namespace (Go switches namespaces per thread, so a whole process is the
// safe unit) or as an unprivileged user. TestHelperProcess is what the
// child runs.
const (
	helperEnv   = "TUNDEV_HELPER"
	netnsInoEnv = "TUNDEV_NETNS_INO"
)

func runHelper(t *testing.T, cmd *exec.Cmd, mode string, extraEnv ...string) {
	t.Helper()
	cmd.Args = append(cmd.Args, "-test.run=^TestHelperProcess$", "-test.v", "-test.timeout=45s")
	// GORACE: a -race binary otherwise sleeps a second at exit.
	cmd.Env = append(append(os.Environ(), "GORACE=atexit_sleep_ms=0", helperEnv+"="+mode), extraEnv...)
	out, err := cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "--- PASS: TestHelperProcess") {
		t.Fatalf("child (%s): %v\n%s", mode, err, out)
	}
	t.Logf("child (%s):\n%s", mode, out)
}

func requireTUN(t *testing.T) {
	t.Helper()
	netnstest.RequireRoot(t)
	if _, err := os.Stat(cloneDevice); err != nil {
		netnstest.SkipOrFail(t, "no %s: %v", cloneDevice, err)
	}
}

// TestCreateInNetns creates the TUN inside a fresh network namespace and
// checks addresses, routes, link state, the name-taken and cleanup error
// paths, and the Filter on the real device.
func TestCreateInNetns(t *testing.T) {
	requireTUN(t)
	lab := netnstest.New(t, "node")
	var st syscall.Stat_t
	if err := syscall.Stat("/var/run/netns/"+lab.NS("node"), &st); err != nil {
		t.Fatal(err)
	}
	runHelper(t, lab.Command("node", os.Args[0]), "create", fmt.Sprintf("%s=%d", netnsInoEnv, st.Ino))
}

// TestCreateNotRoot runs Create as user nobody (uid 65534, no
// capabilities) and checks the error a user gets.
func TestCreateNotRoot(t *testing.T) {
	netnstest.RequireRoot(t) // to become nobody
	// go test's build directory is private to root: give nobody a copy
	// of the test binary.
	dir, err := os.MkdirTemp("", "tundev")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "tundev.test")
	if err := copyFile(os.Args[0], bin); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin)
	cmd.Dir = dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	runHelper(t, cmd, "notroot")
}

func copyFile(from, to string) error {
	src, err := os.Open(from)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := os.OpenFile(to, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o755)
	if err != nil {
		return err
	}
	if _, err := io.Copy(dst, src); err != nil {
		dst.Close()
		return err
	}
	return dst.Close()
}

func TestOptionsCheck(t *testing.T) {
	v4 := netip.MustParsePrefix("198.18.5.5/16")
	v6 := netip.MustParsePrefix("fd00:6440::5/48")
	bad := map[string]Options{
		"no name":          {IPv4: v4},
		"name too long":    {Name: "abcdefghijklmnop", IPv4: v4},
		"slash":            {Name: "a/b"},
		"colon":            {Name: "a:b"},
		"percent pattern":  {Name: "tun%d"},
		"space":            {Name: "a b"},
		"dot":              {Name: "."},
		"MTU too small v6": {Name: "m", MTU: 1279, IPv6: v6},
		"MTU too small":    {Name: "m", MTU: 575},
		"MTU too large":    {Name: "m", MTU: 65536},
		"IPv6 as IPv4":     {Name: "m", IPv4: v6},
		"IPv4 as IPv6":     {Name: "m", IPv6: v4},
		"v4-mapped IPv6":   {Name: "m", IPv6: netip.MustParsePrefix("::ffff:198.18.5.5/120")},
	}
	for name, o := range bad {
		if _, err := o.check(); err == nil {
			t.Errorf("%s: accepted", name)
		}
		// Create rejects them before touching the system.
		if dev, err := Create(o); err == nil {
			dev.Close()
			t.Errorf("%s: Create succeeded", name)
		}
	}
	o, err := Options{Name: "abcdefghijklmno", IPv4: v4, IPv6: v6}.check()
	if err != nil || o.MTU != DefaultMTU {
		t.Errorf("15-byte name, default MTU: %+v, %v", o, err)
	}
	if _, err := (Options{Name: "m", MTU: 576, IPv4: v4}).check(); err != nil {
		t.Errorf("IPv4-only with MTU 576: %v", err)
	}
}

// TestHelperProcess is not a test: it is what the child process runs.
func TestHelperProcess(t *testing.T) {
	switch os.Getenv(helperEnv) {
	case "":
		return
	case "create":
		helperCreate(t)
	case "notroot":
		helperNotRoot(t)
	default:
		t.Fatalf("unknown helper mode %q", os.Getenv(helperEnv))
	}
}

func helperNotRoot(t *testing.T) {
	if os.Geteuid() == 0 || hasNetAdmin() {
		t.Fatalf("child still privileged: euid %d", os.Geteuid())
	}
	const want = "--tun needs root (or CAP_NET_ADMIN); run without --tun to use the userspace network stack"
	o := Options{Name: "mtnr0", IPv4: netip.MustParsePrefix("198.18.5.5/16")}
	dev, err := Create(o)
	if err == nil {
		dev.Close()
		t.Fatal("Create succeeded without privileges")
	}
	t.Logf("Create as nobody: %v", err)
	if !errors.Is(err, ErrNeedRoot) || !strings.Contains(err.Error(), want) {
		t.Errorf("error %q: want ErrNeedRoot with %q", err, want)
	}
	// Without our up-front check the kernel refuses (here: opening
	// /dev/net/tun, or TUNSETIFF), and that maps to the same error.
	dev, err = create(o, func() bool { return true })
	if err == nil {
		dev.Close()
		t.Fatal("create succeeded without privileges")
	}
	t.Logf("kernel's refusal: %v", err)
	if !errors.Is(err, ErrNeedRoot) {
		t.Errorf("kernel refusal %q not reported as ErrNeedRoot", err)
	}
	if ok, _ := linkExists(o.Name); ok {
		t.Error("an interface was left behind")
	}
}

// ipJSON runs `ip -j args...` and decodes its output.
func ipJSON(t *testing.T, v any, args ...string) {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"-j"}, args...)...).Output()
	if err != nil {
		t.Fatalf("ip -j %s: %v", strings.Join(args, " "), err)
	}
	if err := json.Unmarshal(out, v); err != nil {
		t.Fatalf("ip -j %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

type ipLink struct {
	Ifname   string           `json:"ifname"`
	Flags    []string         `json:"flags"`
	MTU      int              `json:"mtu"`
	AddrInfo []map[string]any `json:"addr_info"`
}

type ipRoute struct {
	Dst      string `json:"dst"`
	Protocol string `json:"protocol"`
	Scope    string `json:"scope"`
	Prefsrc  string `json:"prefsrc"`
}

func has(list []string, x string) bool {
	for _, v := range list {
		if v == x {
			return true
		}
	}
	return false
}

// checkLink checks the interface as `ip` sees it.
func checkLink(t *testing.T, o Options) {
	t.Helper()
	var links []ipLink
	ipJSON(t, &links, "addr", "show", "dev", o.Name)
	if len(links) != 1 {
		t.Fatalf("ip addr show dev %s: %d links", o.Name, len(links))
	}
	l := links[0]
	if !has(l.Flags, "UP") || !has(l.Flags, "LOWER_UP") {
		t.Errorf("link flags %v: want UP and LOWER_UP", l.Flags)
	}
	if l.MTU != o.MTU {
		t.Errorf("MTU %d, want %d", l.MTU, o.MTU)
	}
	found := map[string]map[string]any{}
	for _, a := range l.AddrInfo {
		found[fmt.Sprintf("%v/%v", a["local"], a["prefixlen"])] = a
	}
	a4, ok := found[o.IPv4.String()]
	if !ok || a4["family"] != "inet" {
		t.Errorf("IPv4 address %s missing: %v", o.IPv4, l.AddrInfo)
	}
	a6, ok := found[o.IPv6.String()]
	if !ok || a6["family"] != "inet6" {
		t.Errorf("IPv6 address %s missing: %v", o.IPv6, l.AddrInfo)
	} else if a6["nodad"] != true || a6["tentative"] == true || a6["dadfailed"] == true {
		t.Errorf("IPv6 address %s: want nodad and not tentative: %v", o.IPv6, a6)
	}

	var r4, r6 []ipRoute
	ipJSON(t, &r4, "-4", "route", "show", "dev", o.Name)
	ipJSON(t, &r6, "-6", "route", "show", "dev", o.Name)
	pool4, pool6 := o.IPv4.Masked().String(), o.IPv6.Masked().String()
	var ok4, ok6 bool
	for _, r := range r4 {
		ok4 = ok4 || (r.Dst == pool4 && r.Protocol == "kernel" && r.Scope == "link" && r.Prefsrc == o.IPv4.Addr().String())
	}
	for _, r := range r6 {
		ok6 = ok6 || (r.Dst == pool6 && r.Protocol == "kernel")
	}
	if !ok4 {
		t.Errorf("no kernel route for the IPv4 pool %s: %+v", pool4, r4)
	}
	if !ok6 {
		t.Errorf("no kernel route for the IPv6 pool %s: %+v", pool6, r6)
	}
}

func helperCreate(t *testing.T) {
	// Safety: only ever run inside the namespace the parent made.
	var self syscall.Stat_t
	if err := syscall.Stat("/proc/self/ns/net", &self); err != nil {
		t.Fatal(err)
	}
	if want := os.Getenv(netnsInoEnv); want == "" || strconv.FormatUint(self.Ino, 10) != want {
		t.Fatalf("not in the test's network namespace (inode %d, want %s)", self.Ino, want)
	}

	o := Options{
		Name: "mesh0",
		MTU:  1400,
		IPv4: netip.MustParsePrefix("198.18.5.5/16"),
		IPv6: netip.MustParsePrefix("fd00:6440::5/48"),
	}
	dev, err := Create(o)
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	closed := false
	t.Cleanup(func() {
		if !closed {
			dev.Close()
		}
	})
	if name, err := dev.Name(); err != nil || name != o.Name {
		t.Errorf("Name() = %q, %v", name, err)
	}
	if mtu, err := dev.MTU(); err != nil || mtu != o.MTU {
		t.Errorf("MTU() = %d, %v", mtu, err)
	}
	checkLink(t, o)

	t.Run("name taken", func(t *testing.T) {
		_, err := Create(Options{Name: o.Name, IPv4: netip.MustParsePrefix("198.18.6.6/16")})
		if !errors.Is(err, ErrNameTaken) || !strings.Contains(err.Error(), `"mesh0"`) {
			t.Errorf("second Create of mesh0: %v; want ErrNameTaken naming it", err)
		}
		checkLink(t, o) // the existing device is untouched

		// Another kind of interface (a veth; not every kernel has
		// dummy) is not touched either.
		veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vx0"}, PeerName: "vx1"}
		if err := netlink.LinkAdd(veth); err != nil {
			t.Fatal(err)
		}
		defer netlink.LinkDel(veth)
		if _, err := Create(Options{Name: "vx0"}); !errors.Is(err, ErrNameTaken) {
			t.Errorf("Create over a veth: %v; want ErrNameTaken", err)
		}
		if l, err := netlink.LinkByName("vx0"); err != nil || l.Type() != "veth" {
			t.Errorf("veth after the failed Create: %v, %v", l, err)
		}
	})

	t.Run("filter on the real device", func(t *testing.T) { filterOnRealTUN(t, dev, o) })

	closed = true
	if err := dev.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if ok, _ := linkExists(o.Name); ok {
		t.Error("interface still there after Close")
	}

	t.Run("failure removes the device", func(t *testing.T) {
		// With IPv6 disabled for new interfaces, adding the IPv6
		// address fails after the device exists.
		const knob = "/proc/sys/net/ipv6/conf/default/disable_ipv6"
		if err := os.WriteFile(knob, []byte("1"), 0o644); err != nil {
			t.Fatal(err)
		}
		defer os.WriteFile(knob, []byte("0"), 0o644)
		o1 := o
		o1.Name = "mesh1"
		dev, err := Create(o1)
		if err == nil {
			dev.Close()
			t.Fatal("Create succeeded with IPv6 disabled")
		}
		t.Logf("Create with IPv6 disabled: %v", err)
		if errors.Is(err, ErrNeedRoot) || !strings.Contains(err.Error(), "add IPv6 address") || !strings.Contains(err.Error(), "disable_ipv6") {
			t.Errorf("error %q: want the IPv6 address step and the disable_ipv6 hint, not ErrNeedRoot", err)
		}
		if ok, _ := linkExists(o1.Name); ok {
			t.Error("failed Create left the interface behind")
		}
		// IPv4 alone still works.
		o1.IPv6 = netip.Prefix{}
		dev, err = Create(o1)
		if err != nil {
			t.Fatalf("IPv4-only Create: %v", err)
		}
		dev.Close()
	})
}

// tunReader reads what the host sends into the TUN (through the filter)
// on its own goroutine, as wireguard-go does.
type tunReader struct {
	pkts chan []byte
	done sync.WaitGroup
}

func startReader(t *testing.T, f *Filter) *tunReader {
	r := &tunReader{pkts: make(chan []byte, 1024)}
	bufs := make([][]byte, f.BatchSize())
	sizes := make([]int, len(bufs))
	for i := range bufs {
		bufs[i] = make([]byte, wgOffset+65535)
	}
	r.done.Add(1)
	go func() {
		defer r.done.Done()
		for {
			n, err := f.Read(bufs, sizes, wgOffset)
			for i := 0; i < n; i++ {
				select {
				case r.pkts <- append([]byte(nil), bufs[i][wgOffset:wgOffset+sizes[i]]...):
				default:
				}
			}
			if errors.Is(err, tun.ErrTooManySegments) {
				continue
			}
			if err != nil {
				return // closed
			}
		}
	}()
	return r
}

// expect waits for a packet matching want. It fails the test if one
// matching bad comes first.
func (r *tunReader) expect(t *testing.T, what string, want, bad func(parsed) bool) parsed {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case p := <-r.pkts:
			pp, ok := parsePkt(p)
			if !ok {
				continue
			}
			if bad != nil && bad(pp) {
				t.Fatalf("%s: got a forbidden packet first: %+v", what, pp)
			}
			if want(pp) {
				return pp
			}
		case <-deadline:
			t.Fatalf("%s: no such packet from the host", what)
			return parsed{}
		}
	}
}

// inject writes packets "from peers" through the filter, as wireguard-go
// does.
func inject(t *testing.T, f *Filter, pkts ...[]byte) {
	t.Helper()
	bufs := make([][]byte, len(pkts))
	for i, p := range pkts {
		bufs[i] = atOffset(p)
	}
	if _, err := f.Write(bufs, wgOffset); err != nil {
		t.Fatalf("Write to the TUN: %v", err)
	}
}

func filterOnRealTUN(t *testing.T, dev tun.Device, o Options) {
	// Packets the host answers come back out of the TUN, so a
	// Filter around the real device sees both directions.
	f := NewFilter(dev, AllowTCPPorts(8080))
	r := startReader(t, f)
	defer func() {
		// Closing the device ends the reader; the caller checks Close.
		dev.Close()
		r.done.Wait()
	}()

	// Check the raw device's Write count on a single packet, for the
	// record (Linux's NativeTun reports bytes, not packets).
	probe := icmpPkt("198.18.9.9", o.IPv4.Addr().String(), 8)
	n, err := dev.Write([][]byte{atOffset(probe)}, wgOffset)
	t.Logf("NativeTun.Write of one %d-byte packet returned %d, %v", len(probe), n, err)

	for _, fam := range []struct {
		name          string
		local, remote string
	}{
		{"IPv4", o.IPv4.Addr().String(), "198.18.9.9"},
		{"IPv6", o.IPv6.Addr().String(), "fd00:6440::9"},
	} {
		t.Run(fam.name, func(t *testing.T) {
			L, R := addr(fam.local), addr(fam.remote)
			for _, port := range []string{"8080", "9090"} {
				ln, err := net.Listen("tcp", net.JoinHostPort(fam.local, port)) // works at once: no DAD
				if err != nil {
					t.Fatal(err)
				}
				defer ln.Close()
			}
			from := func(sport uint16, dst netip.Addr, dport uint16) func(parsed) bool {
				return func(p parsed) bool { return p.src == L && p.dst == dst && p.sport == sport && p.dport == dport }
			}
			_, dropped0 := f.Stats()

			// A SYN to a listener the policy does not expose is
			// dropped; one to an exposed listener is answered. The
			// kernel handles both in order, so an answer from 9090
			// would come first.
			inject(t, f,
				tcpPkt(fam.remote, fam.local, 40001, 9090, synOnly),
				tcpPkt(fam.remote, fam.local, 40002, 8080, synOnly))
			sa := r.expect(t, "SYN-ACK from 8080", from(8080, R, 40002),
				func(p parsed) bool { return p.proto == protoTCP && p.sport == 9090 })
			if sa.flags&(tcpFlagSYN|tcpFlagACK) != tcpFlagSYN|tcpFlagACK {
				t.Errorf("answer to SYN has flags %#x", sa.flags)
			}
			if _, d := f.Stats(); d != dropped0+1 {
				t.Errorf("dropped %d packets, want 1", d-dropped0)
			}

			// A stray non-SYN to a closed port gets through and earns
			// a RST.
			inject(t, f, tcpPkt(fam.remote, fam.local, 40003, 7070, ackOnly))
			if rst := r.expect(t, "RST from 7070", from(7070, R, 40003), nil); rst.flags&rstOnly == 0 {
				t.Errorf("answer to a stray ACK has flags %#x", rst.flags)
			}

			// Ping.
			inject(t, f, icmpPkt(fam.remote, fam.local, map[bool]uint8{false: 8, true: 128}[L.Is6()]))
			wantType := map[bool]uint8{false: 0, true: 129}[L.Is6()]
			r.expect(t, "echo reply", func(p parsed) bool {
				return p.src == L && p.dst == R && (p.proto == protoICMP || p.proto == protoICMPv6) && p.typ == wantType
			}, nil)

			// UDP: only answers to what the host sent.
			c1, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(L, 0)))
			if err != nil {
				t.Fatal(err)
			}
			defer c1.Close()
			c2, err := net.ListenUDP("udp", net.UDPAddrFromAddrPort(netip.AddrPortFrom(L, 0)))
			if err != nil {
				t.Fatal(err)
			}
			defer c2.Close()
			p1 := uint16(c1.LocalAddr().(*net.UDPAddr).Port)
			p2 := uint16(c2.LocalAddr().(*net.UDPAddr).Port)
			if _, err := c1.WriteToUDPAddrPort([]byte("query"), netip.AddrPortFrom(R, 5353)); err != nil {
				t.Fatal(err)
			}
			r.expect(t, "outbound UDP query", from(p1, R, 5353), nil)
			inject(t, f,
				udpPkt(fam.remote, fam.local, 5354, p1, "wrong port"),
				udpPkt(fam.remote, fam.local, 5353, p2, "unsolicited"),
				udpPkt(fam.remote, fam.local, 5353, p1, "answer"))
			buf := make([]byte, 100)
			c1.SetReadDeadline(time.Now().Add(5 * time.Second))
			n, from53, err := c1.ReadFromUDPAddrPort(buf)
			if err != nil || string(buf[:n]) != "answer" || from53.Port() != 5353 {
				t.Errorf("c1 got %q from %v, %v; want the answer from port 5353 (and nothing before it)", buf[:n], from53, err)
			}
			// The unsolicited datagram was injected before the answer,
			// so had it passed it would be queued by now.
			c2.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
			if n, _, err := c2.ReadFromUDPAddrPort(buf); err == nil {
				t.Errorf("c2 got unsolicited %q", buf[:n])
			}
		})
	}
	al, dr := f.Stats()
	t.Logf("filter stats: %d allowed, %d dropped", al, dr)
}
