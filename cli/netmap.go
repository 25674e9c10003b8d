package cli

import (
	"errors"
	"fmt"
	"strings"

	"github.com/meshctl/meshctl/node"
	"github.com/urfave/cli/v2"
)

// ExitRevoked is the exit code of node commands when the coordinator says
// this node was revoked (systemd units list it in RestartPreventExitStatus).
const ExitRevoked = 3

func netmapCommand() *cli.Command {
	return &cli.Command{
		Name:  "netmap",
		Usage: "fetch and show this node's view of the mesh from the coordinator",
		Description: `Authenticates to the coordinator with this node's certificate and prints the
peers it may see. A revoked node is told so (exit code 3).`,
		Flags: []cli.Flag{stateDirFlag(), jsonFlag()},
		Action: func(c *cli.Context) error {
			if err := noArgs(c); err != nil {
				return err
			}
			dir := c.String("state-dir")
			cl, err := node.NewClient(dir)
			if err != nil {
				return err
			}
			defer cl.Close()
			nm, err := cl.Netmap(c.Context, 0)
			if errors.Is(err, node.ErrRevoked) {
				return cli.Exit(err.Error(), ExitRevoked)
			}
			if err != nil {
				return fmt.Errorf("ask %s for the netmap: %w", cl.State().Coordinator, err)
			}
			if err := node.SaveNetmap(dir, nm); err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(c.App.Writer, nm)
			}
			fmt.Fprintf(c.App.Writer, "This node: %s (%s, %s), netmap version %d\n\n", nm.Self.Name, nm.Self.IPv4, nm.Self.IPv6, nm.Version)
			if len(nm.Peers) == 0 {
				fmt.Fprintln(c.App.Writer, "No peers yet.")
				return nil
			}
			rows := [][]string{{"PEER", "IPV4", "IPV6", "PUBLIC KEY", "ENDPOINTS", "SERVICES"}}
			for _, p := range nm.Peers {
				var svcs []string
				for _, s := range p.Services {
					svcs = append(svcs, fmt.Sprintf("%s:%d", s.Name, s.Port))
				}
				rows = append(rows, []string{p.Name, p.IPv4, p.IPv6, p.WireGuardKey, orDash(strings.Join(p.Endpoints, ",")), orDash(strings.Join(svcs, ","))})
			}
			return table(c.App.Writer, rows)
		},
	}
}
