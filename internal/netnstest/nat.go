package netnstest

// A NAT lab: a small internet of namespaces, with a shared public segment
// (a bridge), private segments behind routers that masquerade with
// nftables, and the operations that NAT traversal has to survive: switching
// a router between endpoint-independent and randomised (symmetric-like)
// mappings at runtime, restarting it (all mappings lost), blocking UDP
// through it, and random packet loss on a link.

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Do runs f on an OS thread switched into namespace ns and returns its
// error. Sockets f opens belong to ns and keep working there after Do
// returns, from any goroutine; netlink requests f makes (e.g. with
// github.com/vishvananda/netlink's package functions) go to ns. f must not
// rely on goroutines it starts being in ns: they run on other threads.
func (l *Lab) Do(ns string, f func() error) error {
	path := filepath.Join(runDir, l.NS(ns))
	errc := make(chan error, 1)
	go func() {
		// The thread is never unlocked unless it is back in its own
		// namespace: if restoring fails, the runtime ends the thread
		// with this goroutine.
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netnstest: this thread's network namespace: %w", err)
			return
		}
		defer orig.Close()
		target, err := os.Open(path)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netnstest: namespace %s: %w", ns, err)
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("netnstest: setns %s: %w", ns, err)
			return
		}
		var ferr error
		func() {
			defer func() {
				if p := recover(); p != nil {
					ferr = fmt.Errorf("netnstest: panic in namespace %s: %v", ns, p)
				}
			}()
			ferr = f()
		}()
		if unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET) == nil {
			runtime.UnlockOSThread()
		}
		errc <- ferr
	}()
	return <-errc
}

// Bridge makes a bridge named br in namespace ns, up, with addr on it (a
// zero Prefix adds none). Join namespaces to it with BridgePort.
func (l *Lab) Bridge(t testing.TB, ns, br string, addr netip.Prefix) {
	t.Helper()
	real := l.NS(ns)
	l.mu.Lock()
	used := l.ifs[real][br]
	l.ifs[real][br] = true
	l.mu.Unlock()
	if used {
		t.Fatalf("netnstest: interface %s already exists in %s", br, ns)
	}
	l.ipT(t, "-n", real, "link", "add", br, "type", "bridge")
	l.ipT(t, "-n", real, "link", "set", br, "up")
	if addr.IsValid() {
		l.ipT(t, "-n", real, "addr", "add", addr.String(), "dev", br)
	}
}

// BridgePort joins namespace member to the bridge br in namespace ns (made
// by Bridge): a veth pair whose end in ns is a port of br and whose end in
// member (IfName(member, ns)) gets addr.
func (l *Lab) BridgePort(t testing.TB, ns, br, member string, addr netip.Prefix) {
	t.Helper()
	l.Link(ns, member, netip.Prefix{}, addr)
	// The newest link between them is the last name made for ns.
	l.mu.Lock()
	port := l.lastIf[l.NS(ns)]
	l.mu.Unlock()
	l.ipT(t, "-n", l.NS(ns), "link", "set", port, "master", br)
}

// DefaultRoute sets namespace ns's default IPv4 route via gw.
func (l *Lab) DefaultRoute(t testing.TB, ns string, gw netip.Addr) {
	t.Helper()
	l.ipT(t, "-n", l.NS(ns), "route", "replace", "default", "via", gw.String())
}

// Sysctl sets a sysctl (e.g. net.ipv4.ip_forward) inside namespace ns.
func (l *Lab) Sysctl(t testing.TB, ns, key, value string) {
	t.Helper()
	err := l.Do(ns, func() error {
		return os.WriteFile("/proc/sys/"+strings.ReplaceAll(key, ".", "/"), []byte(value), 0o644)
	})
	if err != nil {
		t.Fatalf("netnstest: sysctl %s=%s in %s: %v", key, value, ns, err)
	}
}

// Nft runs an nftables script (`nft -f -`) in namespace ns, as one
// transaction.
func (l *Lab) Nft(t testing.TB, ns, script string) {
	t.Helper()
	if err := l.nft(ns, script); err != nil {
		t.Fatal(err)
	}
}

func (l *Lab) nft(ns, script string) error {
	cmd := exec.Command("ip", "netns", "exec", l.NS(ns), "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("nft in namespace %s: %v: %s\nscript:\n%s", ns, err, bytes.TrimSpace(out), script)
	}
	return nil
}

// ipT is ip with the caller's t (safe in subtests).
func (l *Lab) ipT(t testing.TB, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, bytes.TrimSpace(out))
	}
}

// NATMode is how a router maps private source addresses to its public
// address.
type NATMode int

const (
	// EndpointIndependent is plain `masquerade`: Linux keeps the source
	// port when it is free, and one private address:port keeps one
	// public port whatever the destination (as long as ports do not
	// clash): the kind of NAT hole punching works through.
	EndpointIndependent NATMode = iota
	// Symmetric is `masquerade fully-random`: every new flow (a new
	// destination, or the same one after a restart) gets a random public
	// port, so a peer cannot predict it.
	Symmetric
)

func (m NATMode) String() string {
	switch m {
	case EndpointIndependent:
		return "endpoint-independent"
	case Symmetric:
		return "symmetric"
	}
	return fmt.Sprintf("NATMode(%d)", int(m))
}

// natTable is the nftables table a Router owns in its namespace.
const natTable = "netnstest_nat"

// Router is a namespace forwarding between a private segment (LANIf) and
// the public one (WANIf), masquerading what leaves on WANIf.
type Router struct {
	lab          *Lab
	NS           string // the router's namespace (logical name)
	WANIf, LANIf string // its interfaces (in NS)

	mu         sync.Mutex
	mode       NATMode
	udpBlocked bool
}

// NewRouter turns namespace ns into a NAT router: IPv4 forwarding on, and
// an nftables table that masquerades traffic leaving on wanIf (mode),
// drops new connections arriving on wanIf, forwarded or for the router
// itself (nothing behind the router is reachable from outside unless it
// started the flow), and can drop forwarded UDP (BlockUDP).
//
// Dropping unsolicited packets for the router itself, as home routers do,
// matters for hole punching: a packet that reached the router's own stack
// would leave a conntrack entry whose reply tuple is the very mapping the
// host behind the router is about to make towards that sender, and Linux
// would then give the host's flow another port.
func (l *Lab) NewRouter(t testing.TB, ns, wanIf, lanIf string, mode NATMode) *Router {
	t.Helper()
	r := &Router{lab: l, NS: ns, WANIf: wanIf, LANIf: lanIf, mode: mode}
	l.Sysctl(t, ns, "net.ipv4.ip_forward", "1")
	l.Nft(t, ns, fmt.Sprintf(`table ip %[1]s {
	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		%[2]s
	}
	chain udpblock {
	}
	chain forward {
		type filter hook forward priority filter; policy accept;
		jump udpblock
		iifname %[3]q ct state new drop
	}
	chain input {
		type filter hook input priority filter; policy accept;
		iifname %[3]q ct state new drop
	}
}
`, natTable, r.masqRule(mode), wanIf))
	return r
}

func (r *Router) masqRule(m NATMode) string {
	rule := fmt.Sprintf("oifname %q masquerade", r.WANIf)
	if m == Symmetric {
		rule += " fully-random"
	}
	return rule
}

// Mode is the router's current NAT mode.
func (r *Router) Mode() NATMode {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.mode
}

// SetMode replaces the masquerade rule (one nftables transaction). As on
// a real router, flows already mapped keep their mapping until they
// expire or the router restarts (Restart); new flows get the new mode.
func (r *Router) SetMode(t testing.TB, m NATMode) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lab.Nft(t, r.NS, fmt.Sprintf("flush chain ip %[1]s postrouting\nadd rule ip %[1]s postrouting %[2]s\n", natTable, r.masqRule(m)))
	r.mode = m
}

// BlockUDP drops (on) or forwards again (off) every UDP packet the router
// forwards, both ways. TCP keeps working.
func (r *Router) BlockUDP(t testing.TB, on bool) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	script := fmt.Sprintf("flush chain ip %s udpblock\n", natTable)
	if on {
		script += fmt.Sprintf("add rule ip %s udpblock meta l4proto udp counter drop\n", natTable)
	}
	r.lab.Nft(t, r.NS, script)
	r.udpBlocked = on
}

// Restart makes the router forget every mapping, as a reboot does: its
// connection-tracking table is flushed (over netlink, like `conntrack
// -F`). The next packet of a flow from behind it gets a new mapping (with
// Symmetric, a new random port); packets from outside to an old mapping
// reach nothing until then. It returns how many entries were dropped.
func (r *Router) Restart(t testing.TB) int {
	t.Helper()
	var n int
	err := r.lab.Do(r.NS, func() error {
		flows, err := netlink.ConntrackTableList(netlink.ConntrackTable, unix.AF_INET)
		if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
			return fmt.Errorf("list: %w", err)
		}
		n = len(flows)
		return netlink.ConntrackTableFlush(netlink.ConntrackTable)
	})
	if err != nil {
		t.Fatalf("netnstest: flush the conntrack table of router %s: %v", r.NS, err)
	}
	return n
}

// Mapping is one connection the router tracks with its NAT binding.
type Mapping struct {
	Proto   string         // "udp", "tcp", …
	Private netip.AddrPort // the source behind the router
	Public  netip.AddrPort // what the outside sees (the reply's destination)
	Remote  netip.AddrPort // the destination
}

func (m Mapping) String() string {
	return fmt.Sprintf("%s %s → %s as %s", m.Proto, m.Private, m.Remote, m.Public)
}

// Mappings lists the connections the router tracks that it translates:
// their private source, public address:port and destination (IPv4).
func (r *Router) Mappings(t testing.TB) []Mapping {
	t.Helper()
	var out []Mapping
	err := r.lab.Do(r.NS, func() error {
		flows, err := netlink.ConntrackTableList(netlink.ConntrackTable, unix.AF_INET)
		if err != nil && !errors.Is(err, netlink.ErrDumpInterrupted) {
			return err
		}
		for _, f := range flows {
			src, _ := netip.AddrFromSlice(f.Forward.SrcIP)
			dst, _ := netip.AddrFromSlice(f.Forward.DstIP)
			pub, _ := netip.AddrFromSlice(f.Reverse.DstIP)
			m := Mapping{
				Proto:   protoName(f.Forward.Protocol),
				Private: netip.AddrPortFrom(src.Unmap(), f.Forward.SrcPort),
				Remote:  netip.AddrPortFrom(dst.Unmap(), f.Forward.DstPort),
				Public:  netip.AddrPortFrom(pub.Unmap(), f.Reverse.DstPort),
			}
			if m.Private == m.Public {
				continue // not translated (e.g. the router's own traffic)
			}
			out = append(out, m)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("netnstest: list the conntrack table of router %s: %v", r.NS, err)
	}
	return out
}

func protoName(p uint8) string {
	switch p {
	case unix.IPPROTO_UDP:
		return "udp"
	case unix.IPPROTO_TCP:
		return "tcp"
	case unix.IPPROTO_ICMP:
		return "icmp"
	}
	return fmt.Sprintf("proto%d", p)
}

// lossTable is the nftables table Loss uses where netem is missing.
const lossTable = "netnstest_loss"

// Loss makes interface ifname in namespace ns drop percent% of the packets
// it sends, at random: with `tc qdisc … netem loss`, or, on kernels built
// without sch_netem, with an nftables rule on the interface's egress hook
// that drops the same share (numgen random) of the frames leaving on it.
// Either way the sender sees no error: the packets just never arrive. It
// returns which it used ("netem" or "nftables"). ClearLoss undoes it.
func (l *Lab) Loss(t testing.TB, ns, ifname string, percent int) string {
	t.Helper()
	if percent <= 0 || percent > 100 {
		t.Fatalf("netnstest: Loss %d%%: want 1-100", percent)
	}
	tcOut, tcErr := exec.Command("ip", "netns", "exec", l.NS(ns), "tc", "qdisc", "replace", "dev", ifname,
		"root", "netem", "loss", fmt.Sprintf("%d%%", percent)).CombinedOutput()
	if tcErr == nil {
		return "netem"
	}
	err := l.nft(ns, fmt.Sprintf(`table netdev %[1]s {
	chain out {
		type filter hook egress device %[2]q priority 0; policy accept;
		numgen random mod 100 < %[3]d counter drop
	}
}
`, lossTable, ifname, percent))
	if err != nil {
		t.Fatalf("netnstest: no way to drop packets on %s in %s: tc netem: %v: %s; nftables: %v",
			ifname, ns, tcErr, bytes.TrimSpace(tcOut), err)
	}
	return "nftables"
}

// ClearLoss removes what Loss installed on ifname in ns.
func (l *Lab) ClearLoss(t testing.TB, ns, ifname string) {
	t.Helper()
	_ = exec.Command("ip", "netns", "exec", l.NS(ns), "tc", "qdisc", "del", "dev", ifname, "root").Run()
	_ = l.nft(ns, fmt.Sprintf("delete table netdev %s\n", lossTable))
	// Either may have had nothing to remove; check that nothing is left.
	out, _ := exec.Command("ip", "netns", "exec", l.NS(ns), "tc", "qdisc", "show", "dev", ifname).CombinedOutput()
	if bytes.Contains(out, []byte("netem")) {
		t.Fatalf("netnstest: netem still on %s in %s: %s", ifname, ns, out)
	}
	out, _ = exec.Command("ip", "netns", "exec", l.NS(ns), "nft", "list", "tables").CombinedOutput()
	if bytes.Contains(out, []byte(lossTable)) {
		t.Fatalf("netnstest: table %s still in %s", lossTable, ns)
	}
}

// SiteSpec describes one private site of a NATLab.
type SiteSpec struct {
	Name string  // the host's namespace; its router's is Name+"-nat"
	Mode NATMode // the router's NAT mode at the start
}

// Site is a host on a private segment behind a router.
type Site struct {
	Name   string     // the host's namespace
	Addr   netip.Addr // the host's private address, 10.N.0.2
	If     string     // the host's interface towards its router
	Public netip.Addr // the router's public address, 198.18.0.N+1
	Router *Router
}

// NATLab is a small internet: a public segment 198.18.0.0/24 (a bridge in
// namespace Server, which holds ServerAddr, 198.18.0.1), and sites, each a
// host (10.N.0.2/24, N = 1, 2, … in the order given) behind its router
// (10.N.0.1 inside, 198.18.0.N+1 outside) that masquerades. Nothing routes
// to the private segments: hosts there reach the public segment only
// through their router's NAT, and each other only through the routers'
// public addresses.
type NATLab struct {
	*Lab
	Server     string
	ServerAddr netip.Addr
	Sites      map[string]*Site
}

// PublicPrefix is the NATLab's public segment.
var PublicPrefix = netip.MustParsePrefix("198.18.0.0/24")

// NewNATLab builds a NATLab (at most 200 sites). It skips, or fails under
// CI=true as root, when nft is missing or does not work in a namespace.
func NewNATLab(t *testing.T, sites ...SiteSpec) *NATLab {
	t.Helper()
	RequireRoot(t)
	if _, err := exec.LookPath("nft"); err != nil {
		SkipOrFail(t, "nft (nftables) not found: %v", err)
	}
	if len(sites) > 200 {
		t.Fatalf("netnstest: %d sites; at most 200", len(sites))
	}
	names := []string{"server"}
	for _, s := range sites {
		names = append(names, s.Name, s.Name+"-nat")
	}
	lab := New(t, names...)
	if out, err := exec.Command("ip", "netns", "exec", lab.NS("server"), "nft", "list", "tables").CombinedOutput(); err != nil {
		SkipOrFail(t, "nftables does not work in a network namespace here: %v: %s", err, out)
	}
	nl := &NATLab{Lab: lab, Server: "server", ServerAddr: netip.MustParseAddr("198.18.0.1"), Sites: map[string]*Site{}}
	lab.Bridge(t, "server", "wan0", netip.PrefixFrom(nl.ServerAddr, 24))
	for i, s := range sites {
		n := i + 1
		rt := s.Name + "-nat"
		pub := netip.AddrFrom4([4]byte{198, 18, 0, byte(n + 1)})
		lan := netip.AddrFrom4([4]byte{10, byte(n), 0, 1})
		host := netip.AddrFrom4([4]byte{10, byte(n), 0, 2})
		lab.BridgePort(t, "server", "wan0", rt, netip.PrefixFrom(pub, 24))
		lab.Link(rt, s.Name, netip.PrefixFrom(lan, 24), netip.PrefixFrom(host, 24))
		lab.DefaultRoute(t, s.Name, lan)
		r := lab.NewRouter(t, rt, lab.IfName(rt, "server"), lab.IfName(rt, s.Name), s.Mode)
		nl.Sites[s.Name] = &Site{Name: s.Name, Addr: host, If: lab.IfName(s.Name, rt), Public: pub, Router: r}
	}
	return nl
}
