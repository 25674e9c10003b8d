package cli

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/node/wgconf"
	"github.com/urfave/cli/v2"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// signalContext ends when a signal arrives (logged) or the command's
// context ends.
func signalContext(c *cli.Context, sig <-chan os.Signal, log *slog.Logger) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(c.Context)
	go func() {
		select {
		case s := <-sig:
			log.Info("shutting down", "signal", s.String())
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, cancel
}

func statusCommand() *cli.Command {
	return &cli.Command{
		Name:  "status",
		Usage: "show this node's state: addresses, coordinator, peers, services",
		Description: `Asks the running agent (meshctl up) through its control socket in the state
dir. --json prints one object with name, public_key, ipv4, ipv6,
coordinator_reachable, services and peers (name, public_key, ipv4, ipv6,
endpoint, last_handshake, rx_bytes, tx_bytes, path, path_reason).

PATH is how packets reach each peer: "direct" (UDP to ENDPOINT, confirmed
by an answered probe) or "relay" (still encrypted, through the proxy's
relay); the lines under the table say why.`,
		Flags: []cli.Flag{stateDirFlag(), jsonFlag()},
		Action: func(c *cli.Context) error {
			st, err := agentStatus(c)
			if err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(c.App.Writer, st)
			}
			return printStatus(c.App.Writer, st, time.Now())
		},
	}
}

func printStatus(w io.Writer, st node.Status, now time.Time) error {
	fmt.Fprintf(w, "Node %s  %s  %s\n", st.Name, st.IPv4, st.IPv6)
	fmt.Fprintf(w, "  WireGuard: %s on %s, UDP port %d, key %s\n", st.Mode, st.Interface, st.ListenPort, st.PublicKey)
	if st.CoordinatorReachable {
		fmt.Fprintf(w, "  Coordinator: %s reachable (since %s)\n", st.Coordinator, ago(st.CoordinatorSince, now))
	} else {
		fmt.Fprintf(w, "  Coordinator: %s NOT reachable since %s: %s\n    (tunnels keep working on the last netmap)\n", st.Coordinator, ago(st.CoordinatorSince, now), st.CoordinatorError)
	}
	if text := st.FallbackText(); text != "" {
		fmt.Fprintf(w, "  Path to the proxy: %s\n", text)
	}
	fmt.Fprintf(w, "  Certificate valid until %s\n", st.CertificateExpires.Local().Format(time.DateTime))
	if len(st.Services) == 0 {
		fmt.Fprintln(w, "  Services: none published (meshctl up --expose NAME=HOST:PORT)")
	}
	for _, s := range st.Services {
		vis := "private"
		if s.Public {
			vis = "public"
		}
		fmt.Fprintf(w, "  Service %s: port %d → %s (%s)\n", s.Name, s.Port, s.Target, vis)
	}
	fmt.Fprintln(w)
	if len(st.Peers) == 0 {
		fmt.Fprintln(w, "No peers yet.")
		return nil
	}
	rows := [][]string{{"PEER", "IPV4", "ENDPOINT", "LAST HANDSHAKE", "RECEIVED", "SENT", "PATH"}}
	for _, p := range st.Peers {
		hs := "never"
		if t, err := time.Parse(time.RFC3339, p.LastHandshake); err == nil {
			hs = ago(t, now)
		}
		rows = append(rows, []string{p.Name, p.IPv4, orDash(p.Endpoint), hs, bytesText(p.RxBytes), bytesText(p.TxBytes), p.Path})
	}
	if err := table(w, rows); err != nil {
		return err
	}
	fmt.Fprintln(w)
	for _, p := range st.Peers {
		if p.PathReason != "" {
			fmt.Fprintf(w, "  %s: %s (%s)\n", p.Name, p.Path, p.PathReason)
		}
	}
	return nil
}

func bytesText(n int64) string {
	switch {
	case n < 1<<10:
		return strconv.FormatInt(n, 10) + " B"
	case n < 1<<20:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	case n < 1<<30:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
}

func pingCommand() *cli.Command {
	return &cli.Command{
		Name:      "ping",
		Usage:     "ping a peer over the mesh and print the round-trip time and path",
		ArgsUsage: "PEER",
		Flags: []cli.Flag{stateDirFlag(),
			&cli.IntFlag{Name: "count", Aliases: []string{"c"}, Value: 4, EnvVars: env("count"), Usage: "number of pings"}},
		Action: func(c *cli.Context) error {
			args, err := positional(c, "peer")
			if err != nil {
				return err
			}
			cl, err := node.NewCtlClient(c.String("state-dir"))
			if err != nil {
				return err
			}
			failed, lastVia := 0, ""
			for i := range c.Int("count") {
				if i > 0 {
					time.Sleep(time.Second) // the interval between pings, as ping(8)
				}
				res, err := cl.Ping(c.Context, args[0])
				if err != nil {
					failed++
					fmt.Fprintf(c.App.Writer, "%v\n", err)
					continue
				}
				via := res.Path
				if res.Endpoint != "" {
					via += " " + res.Endpoint
				}
				fmt.Fprintf(c.App.Writer, "pong from %s (%s) via %s in %s\n", res.Peer, res.Addr, via, res.RTT.Round(10*time.Microsecond))
				if res.PathReason != "" && via != lastVia { // why, whenever the path changes
					fmt.Fprintf(c.App.Writer, "  %s: %s\n", res.Path, res.PathReason)
				}
				lastVia = via
			}
			if failed == c.Int("count") {
				return fmt.Errorf("no answer from %s", args[0])
			}
			return nil
		},
	}
}

func ncCommand() *cli.Command {
	return &cli.Command{
		Name:      "nc",
		Usage:     "connect stdin/stdout to PEER:PORT over the mesh (for ssh ProxyCommand)",
		ArgsUsage: "PEER PORT",
		Description: `Opens a TCP connection to a peer's published port through the running agent
and copies stdin/stdout, so ssh can reach a device over the mesh:

  ssh -o ProxyCommand='meshctl nc --state-dir /var/lib/meshctl %h %p' pi@pi1`,
		Flags: []cli.Flag{stateDirFlag()},
		Action: func(c *cli.Context) error {
			args, err := positional(c, "peer", "port")
			if err != nil {
				return err
			}
			port, err := strconv.ParseUint(args[1], 10, 16)
			if err != nil || port == 0 {
				return usageError("port %q is not 1-65535", args[1])
			}
			cl, err := node.NewCtlClient(c.String("state-dir"))
			if err != nil {
				return err
			}
			conn, err := cl.Dial(c.Context, args[0], uint16(port))
			if err != nil {
				return err
			}
			defer conn.Close()
			return pipe(conn, os.Stdin, c.App.Writer)
		},
	}
}

// pipe copies in → conn and conn → out; it returns when the remote side is
// done, half-closing conn when in ends.
func pipe(conn net.Conn, in io.Reader, out io.Writer) error {
	go func() {
		io.Copy(conn, in)
		if cw, ok := conn.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		}
	}()
	_, err := io.Copy(out, conn)
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

func wgCommand() *cli.Command {
	return &cli.Command{
		Name:  "wg",
		Usage: "WireGuard device tools",
		Subcommands: []*cli.Command{{
			Name:  "show",
			Usage: "show the agent's WireGuard device like `wg show` (works without root)",
			Description: `Reads the device through its UAPI socket. When the agent could create it in
/var/run/wireguard (root), the stock ` + "`wg show`" + ` works too.`,
			Flags: []cli.Flag{stateDirFlag()},
			Action: func(c *cli.Context) error {
				st, err := agentStatus(c)
				if err != nil {
					return err
				}
				dev, err := readUAPI(st.UAPISocket)
				if err != nil {
					return err
				}
				names := map[wgtypes.Key]string{}
				for _, p := range st.Peers {
					if k, err := wgtypes.ParseKey(p.PublicKey); err == nil {
						names[k] = p.Name
					}
				}
				return wgconf.FormatShow(c.App.Writer, st.Interface, dev, names, time.Now())
			},
		}},
	}
}

// readUAPI asks a WireGuard UAPI socket for its state.
func readUAPI(path string) (wgconf.DeviceState, error) {
	conn, err := net.DialTimeout("unix", path, 5*time.Second)
	if err != nil {
		return wgconf.DeviceState{}, fmt.Errorf("WireGuard UAPI socket: %w", err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(conn, "get=1\n\n"); err != nil {
		return wgconf.DeviceState{}, err
	}
	// The answer is key=value lines ending with errno=N and a blank line.
	var b strings.Builder
	sc := bufio.NewScanner(conn)
	for sc.Scan() && sc.Text() != "" {
		b.WriteString(sc.Text())
		b.WriteByte('\n')
	}
	if err := sc.Err(); err != nil {
		return wgconf.DeviceState{}, fmt.Errorf("read WireGuard UAPI socket: %w", err)
	}
	return wgconf.ParseGet(strings.NewReader(b.String()))
}

// agentStatus asks the agent of --state-dir for its status (commands
// without positional arguments).
func agentStatus(c *cli.Context) (node.Status, error) {
	if err := noArgs(c); err != nil {
		return node.Status{}, err
	}
	cl, err := node.NewCtlClient(c.String("state-dir"))
	if err != nil {
		return node.Status{}, err
	}
	return cl.Status(c.Context)
}
