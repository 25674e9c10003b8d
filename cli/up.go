package cli

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"strconv"
	"strings"

	"github.com/meshctl/meshctl/node"
	"github.com/urfave/cli/v2"
)

// ExitReenroll is the exit code when the node's certificate expired
// beyond the renewal grace: only `meshctl enroll --force` helps.
const ExitReenroll = 4

// DefaultListenPort is the WireGuard UDP port nodes use unless told.
const DefaultListenPort = 51820

func upCommand() *cli.Command {
	return &cli.Command{
		Name:  "up",
		Usage: "run this node: join the mesh and publish local services (foreground)",
		Description: `Brings up a WireGuard device configured from the coordinator's netmap and
follows every change. By default the device runs on a userspace network
stack: no root, no kernel module; the node's overlay addresses exist only
inside this process. With --tun IFNAME (root) a kernel TUN interface carries
them, so every program on the host uses the mesh directly.

--expose NAME=HOST:PORT publishes a service on this device: peers (and the
proxy) reach it at the node's overlay address on PORT; the agent forwards
each connection to HOST:PORT here. Add ,public to make it reachable through
the proxy without sign-in. Repeat --expose for several services. Nothing else
on the overlay address is reachable.

If the coordinator is unreachable, the node comes up from its cached netmap
and keeps its tunnels while it retries. A revoked node stops (exit code 3).

Peers are reached directly over UDP where probes show a path (NATs are
traversed where they allow it), else through the proxy's relay, still
encrypted end to end. If UDP to the proxy is blocked (no probe answered
within --fallback-timeout), the node serves its services through SSH
reverse tunnels to the proxy, authenticated by the SSH certificate from
enrollment, and stays reachable for peers through the relay on the same
connection; it returns to UDP as soon as a probe is answered. meshctl
status says which path each peer is on and why.

The agent keeps the Go runtime under a soft memory limit (--memory-limit,
default 64MiB; GOMEMLIMIT in the environment wins) and gives memory back to
the system once traffic calms down.

Examples:
  meshctl up --state-dir ./pi1 --expose web=127.0.0.1:3000,public
  meshctl up --state-dir ./pi1 --expose ssh=127.0.0.1:22 --socks5 127.0.0.1:1080
  sudo meshctl up --tun mesh0 --expose web=127.0.0.1:80`,
		Flags: append([]cli.Flag{
			stateDirFlag(),
			&cli.StringSliceFlag{Name: "expose", EnvVars: env("expose"), Usage: "publish a local service: NAME=HOST:PORT[,public] (repeatable; in MESHCTL_EXPOSE separate several with spaces)"},
			&cli.IntFlag{Name: "listen-port", Value: DefaultListenPort, EnvVars: env("listen-port"), Usage: "WireGuard UDP port (0 = any free port)"},
			&cli.StringFlag{Name: "tun", EnvVars: env("tun"), Usage: "use a kernel TUN interface with this name (needs root) instead of the userspace stack"},
			&cli.StringFlag{Name: "socks5", EnvVars: env("socks5"), Usage: "serve a SOCKS5 proxy into the mesh on this local address, e.g. 127.0.0.1:1080"},
			&cli.StringFlag{Name: "fallback", Value: node.FallbackAuto, EnvVars: env("fallback"),
				Usage: "SSH fallback when UDP to the proxy is blocked: auto (after --fallback-timeout without an answer over UDP), off (also no relay), or always"},
			&cli.DurationFlag{Name: "fallback-timeout", Value: node.DefaultFallbackTimeout, EnvVars: env("fallback-timeout"),
				Usage: "how long the proxy may not answer over UDP before the node falls back to SSH"},
			&cli.StringFlag{Name: "memory-limit", Value: "64MiB", EnvVars: env("memory-limit"),
				Usage: "soft memory limit of the agent, e.g. 48MiB or 1GiB; 0 = none (GOMEMLIMIT, if set, wins)"},
			&cli.StringSliceFlag{Name: "endpoint", EnvVars: env("endpoint"), Usage: "advertise this IP:PORT to peers instead of this host's addresses (repeatable; e.g. a forwarded port; spaces separate several in MESHCTL_ENDPOINT)"},
		}, logFlags()...),
		Action: runUp,
	}
}

func runUp(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	log, err := newLogger(c)
	if err != nil {
		return err
	}
	var svcs []node.Service
	for _, e := range fieldsOf(c.StringSlice("expose")) {
		svc, err := node.ParseExpose(e)
		if err != nil {
			return usageError("%v", err)
		}
		svcs = append(svcs, svc)
	}
	var eps []netip.AddrPort
	for _, e := range fieldsOf(c.StringSlice("endpoint")) {
		ap, err := netip.ParseAddrPort(e)
		if err != nil {
			return usageError("--endpoint %q is not IP:PORT", e)
		}
		eps = append(eps, ap)
	}
	limit, err := parseSize(c.String("memory-limit"))
	if err != nil {
		return usageError("--memory-limit: %v", err)
	}
	node.SetMemoryLimit(limit)
	dir := c.String("state-dir")
	a, err := node.NewAgent(node.AgentOptions{
		StateDir:           dir,
		Services:           svcs,
		ListenPort:         c.Int("listen-port"),
		TUN:                c.String("tun"),
		SOCKS5:             c.String("socks5"),
		AdvertiseEndpoints: eps,
		Fallback:           c.String("fallback"),
		FallbackTimeout:    c.Duration("fallback-timeout"),
		Logger:             log,
	})
	if err != nil {
		return err
	}
	if err := a.Start(); err != nil {
		a.Close()
		return err
	}
	defer a.Close()
	st, _ := a.Status()
	w := c.App.Writer
	fmt.Fprintf(w, "meshctl node %q up (%s, interface %s, WireGuard UDP port %d)\n", st.Name, st.Mode, st.Interface, st.ListenPort)
	fmt.Fprintf(w, "  overlay addresses: %s, %s\n", st.IPv4, st.IPv6)
	for _, s := range svcs {
		vis := "private"
		if s.Public {
			vis = "public"
		}
		fmt.Fprintf(w, "  service %s: %s:%d → %s (%s)\n", s.Name, st.IPv4, s.Port, s.Target, vis)
	}
	if s := c.String("socks5"); s != "" {
		fmt.Fprintf(w, "  SOCKS5 into the mesh: %s\n", s)
	}
	fmt.Fprintf(w, "  status: meshctl status --state-dir %s\n", dir)
	return waitForSignal(c, log, a)
}

// parseSize parses a byte size: a number with an optional unit B, KiB,
// MiB, GiB (or K, M, G, KB, MB, GB, all powers of 1024); 0 means none.
func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	i := strings.IndexFunc(t, func(r rune) bool { return (r < '0' || r > '9') && r != '.' })
	num, unit := t, ""
	if i >= 0 {
		num, unit = t[:i], strings.ToLower(strings.TrimSpace(t[i:]))
	}
	n, err := strconv.ParseFloat(num, 64)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("%q is not a size like 64MiB", s)
	}
	mult := map[string]float64{"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10,
		"m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20, "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}[unit]
	if mult == 0 {
		return 0, fmt.Errorf("%q: unknown unit %q (use KiB, MiB or GiB)", s, unit)
	}
	if v := n * mult; v > 0 && v < 8<<20 {
		return 0, fmt.Errorf("%q is below 8MiB, too small for the Go runtime to work in (0 = no limit)", s)
	} else if v >= 1<<63 { // would not fit an int64 (and came back negative)
		return 0, fmt.Errorf("%q is too large (0 = no limit)", s)
	}
	return int64(n * mult), nil
}

// sdNotify tells systemd (Type=notify units) about the service state. It
// does nothing outside systemd.
func sdNotify(state string) {
	sock := os.Getenv("NOTIFY_SOCKET")
	if sock == "" {
		return
	}
	if sock[0] == '@' {
		sock = "\x00" + sock[1:]
	}
	c, err := net.DialUnix("unixgram", nil, &net.UnixAddr{Name: sock, Net: "unixgram"})
	if err != nil {
		return
	}
	defer c.Close()
	c.Write([]byte(state))
}

// fieldsOf splits every value on white space, so that an environment
// variable (which urfave/cli passes as one value, since comma splitting
// is off) can carry several.
func fieldsOf(vals []string) []string {
	var out []string
	for _, v := range vals {
		out = append(out, strings.Fields(v)...)
	}
	return out
}
