package cli

import (
	"fmt"
	"strings"
	"time"

	"github.com/meshctl/meshctl/wire"
	"github.com/urfave/cli/v2"
)

func nodesCommand() *cli.Command {
	return &cli.Command{
		Name:  "nodes",
		Usage: "list, revoke and rename nodes, set their tags; make their services public or private",
		Subcommands: []*cli.Command{
			addSSHCommand(),
			{
				Name:  "list",
				Usage: "list nodes with their addresses and state",
				Description: `--json prints an array of objects with id, name, ipv4, ipv6, tags,
created, last_seen, online and revoked (among others).`,
				Flags:  append(adminFlags(), jsonFlag(), &cli.BoolFlag{Name: "all", EnvVars: env("all"), Usage: "include revoked nodes in the table (--json always includes them)"}),
				Action: nodesList,
			},
			{
				Name:      "revoke",
				Usage:     "revoke a node: its certificate is refused and every peer drops it",
				ArgsUsage: "NAME",
				Description: `Revocation is written to disk before this command returns, and every node
watching the netmap drops the revoked node at once. Its overlay addresses are
not reused for the quarantine period (--quarantine on the server).

Example: meshctl nodes revoke --data-dir ./data pi1`,
				Flags:  adminFlags(),
				Action: nodesRevoke,
			},
			{
				Name:      "rename",
				Usage:     "rename a node",
				ArgsUsage: "OLD NEW",
				Flags:     adminFlags(),
				Action:    nodesRename,
			},
			{
				Name:      "set-tags",
				Usage:     "replace a node's tags (none: clear them)",
				ArgsUsage: "NODE [TAG...]",
				Description: `A node's tags come from the token it enrolled with (meshctl token create
--tag). With meshctl server --topology tags, two nodes see each other when
they share a tag, so this changes whom the node sees, and who sees it, at
once: every affected netmap changes, the node's WireGuard peers follow, and
the relay forwards only between nodes that see each other. In the other
topologies tags are labels only.

Examples:
  meshctl nodes set-tags --data-dir ./data pi1 cameras lab
  meshctl nodes set-tags --data-dir ./data pi1            # no tags`,
				Flags:  adminFlags(),
				Action: nodesSetTags,
			},
			{
				Name:      "set-public",
				Usage:     "make a node's service public: browsers open it through the proxy without signing in",
				ArgsUsage: "NODE SERVICE",
				Description: `A public service is open to anyone who can reach the proxy, at
https://NODE.DOMAIN/ (or https://SERVICE--NODE.DOMAIN/). This overrides what the
node itself reports (meshctl up --expose NAME=ADDR,public), now and later,
and every member's netmap changes at once. The service need not be published
yet: the setting applies when it is.

Undo it with meshctl nodes set-private NODE SERVICE.

Example: meshctl nodes set-public --data-dir ./data pi web`,
				Flags:  adminFlags(),
				Action: func(c *cli.Context) error { return nodesSetVisibility(c, true) },
			},
			{
				Name:      "set-private",
				Usage:     "make a node's service private: browsers must sign in with an access key",
				ArgsUsage: "NODE SERVICE",
				Description: `A private service first shows a sign-in page at the proxy that asks for an
access key (create one with meshctl access-key create). This overrides what
the node itself reports, now and later, and every member's netmap changes at
once. The service need not be published yet: the setting applies when it is.

Example: meshctl nodes set-private --data-dir ./data pi web`,
				Flags:  adminFlags(),
				Action: func(c *cli.Context) error { return nodesSetVisibility(c, false) },
			},
		},
	}
}

func nodesSetVisibility(c *cli.Context, public bool) error {
	args, err := positional(c, "node", "service")
	if err != nil {
		return err
	}
	var n wire.Node
	if err := nodeCall(c, args[0], wire.PathAdminVisibility, wire.VisibilityRequest{Node: args[0], Service: args[1], Public: public}, &n); err != nil {
		return err
	}
	w := c.App.Writer
	if public {
		fmt.Fprintf(w, "service %s of node %s is now public: anyone who reaches the proxy can open it without signing in\n", args[1], n.Name)
	} else {
		fmt.Fprintf(w, "service %s of node %s is now private: browsers must sign in with an access key (meshctl access-key create)\n", args[1], n.Name)
	}
	published := false
	for _, s := range n.Services {
		published = published || s.Name == args[1]
	}
	if !published {
		fmt.Fprintf(w, "(node %s does not publish a service %q yet; the setting applies when it does)\n", n.Name, args[1])
	}
	return nil
}

func nodesList(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	ac, err := newAdminClient(c)
	if err != nil {
		return err
	}
	var nodes []wire.Node
	if err := ac.call(c.Context, "GET", wire.PathAdminNodes, nil, &nodes); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, nodes)
	}
	now := time.Now()
	rows := [][]string{{"NAME", "ID", "IPV4", "IPV6", "STATE", "LAST SEEN", "TAGS"}}
	hidden := 0
	for _, n := range nodes {
		state := "offline"
		switch {
		case n.Revoked:
			if !c.Bool("all") {
				hidden++
				continue
			}
			state = "revoked"
		case n.Online:
			state = "online"
		}
		rows = append(rows, []string{n.Name, n.ID, n.IPv4, n.IPv6, state, agoPtr(n.LastSeen, now), orDash(strings.Join(n.Tags, ","))})
	}
	switch {
	case len(rows) == 1 && hidden > 0:
		fmt.Fprintln(c.App.Writer, "No active nodes.")
	case len(rows) == 1:
		fmt.Fprintln(c.App.Writer, "No nodes yet. Create a token with `meshctl token create` and run the printed line on a device.")
	default:
		if err := table(c.App.Writer, rows); err != nil {
			return err
		}
	}
	if hidden > 0 {
		fmt.Fprintf(c.App.Writer, "(%d revoked node(s) not shown; --all shows them)\n", hidden)
	}
	return nil
}

func nodesRevoke(c *cli.Context) error {
	args, err := positional(c, "name")
	if err != nil {
		return err
	}
	var n wire.Node
	if err := nodeCall(c, args[0], wire.PathAdminNodeRevoke, wire.NameRequest{Name: args[0]}, &n); err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "node %s (%s, %s) revoked\n", n.Name, n.ID, n.IPv4)
	return nil
}

func nodesRename(c *cli.Context) error {
	args, err := positional(c, "old", "new")
	if err != nil {
		return err
	}
	var n wire.Node
	if err := nodeCall(c, args[0], wire.PathAdminNodeRename, wire.NameRequest{Name: args[0], NewName: args[1]}, &n); err != nil {
		return err
	}
	fmt.Fprintf(c.App.Writer, "node %s renamed to %s\n", args[0], n.Name)
	return nil
}

func nodesSetTags(c *cli.Context) error {
	const usage = "meshctl nodes set-tags [flags] NODE [TAG...]"
	for _, a := range c.Args().Slice() {
		if strings.HasPrefix(a, "-") {
			return usageError("flag %s comes after the arguments; flags go first: %s", a, usage)
		}
	}
	if c.NArg() < 1 {
		return usageError("give the node, then its tags (none clears them): %s", usage)
	}
	name, tags := c.Args().First(), c.Args().Tail()
	var n wire.Node
	if err := nodeCall(c, name, wire.PathAdminNodeTags, wire.NodeTagsRequest{Name: name, Tags: tags}, &n); err != nil {
		return err
	}
	if len(n.Tags) == 0 {
		fmt.Fprintf(c.App.Writer, "node %s has no tags now\n", n.Name)
	} else {
		fmt.Fprintf(c.App.Writer, "node %s tags: %s\n", n.Name, strings.Join(n.Tags, ", "))
	}
	return nil
}

func agoPtr(t *time.Time, now time.Time) string {
	if t == nil {
		return "never"
	}
	return ago(*t, now)
}

// nodeCall sends an admin request about the node named name, turning "not
// found" into a message that says where to look.
func nodeCall(c *cli.Context, name, path string, in, out any) error {
	ac, err := newAdminClient(c)
	if err != nil {
		return err
	}
	if err := ac.call(c.Context, "POST", path, in, out); err != nil {
		if wire.IsCode(err, wire.CodeNotFound) {
			return fmt.Errorf("no active node named %q (see meshctl nodes list)", name)
		}
		return err
	}
	return nil
}
