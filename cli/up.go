package cli

import (
	"fmt"
	"net"
	"net/netip"
	"os"
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

If UDP to the proxy is blocked (no WireGuard handshake within
--fallback-timeout), the node serves its services through an SSH reverse
tunnel to the proxy instead, authenticated by the SSH certificate from
enrollment, and returns to WireGuard as soon as a handshake succeeds.
meshctl status says which path is in use and why.

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
				Usage: "SSH fallback when UDP to the proxy is blocked: auto (after --fallback-timeout without a WireGuard handshake), off, or always"},
			&cli.DurationFlag{Name: "fallback-timeout", Value: node.DefaultFallbackTimeout, EnvVars: env("fallback-timeout"),
				Usage: "how long to wait for a WireGuard handshake with the proxy before falling back to SSH"},
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
