package cli

import (
	"fmt"
	"time"

	"github.com/meshctl/meshctl/coordinator"
	"github.com/meshctl/meshctl/wire"
	"github.com/urfave/cli/v2"
)

// maxAccessKeyTTL mirrors the coordinator's limit, to refuse early.
const maxAccessKeyTTL = 365 * 24 * time.Hour

func accessKeyCommand() *cli.Command {
	return &cli.Command{
		Name:  "access-key",
		Usage: "create, list and revoke access keys: sign-in keys for private services at the proxy",
		Description: `The proxy serves every node's services to browsers at https://NODE.DOMAIN/.
A public service opens for anyone; a private one (the default) first shows a
sign-in page that asks for an access key. An access key opens every private
service, or only one node's (--node), or only one service (--service), or
one service of one node (both), until it expires or is revoked.

Only a hash is stored on the server; the key is shown once, at creation.
Revoking a key ends the browser sessions it opened at once.

Make a service public or private with meshctl nodes set-public / set-private.`,
		Subcommands: []*cli.Command{
			{
				Name:  "create",
				Usage: "create an access key and print it once",
				Description: `Examples:
  meshctl access-key create                           # every private service, for 24 hours
  meshctl access-key create --node pi --ttl 168h      # pi's private services, for a week
  meshctl access-key create --node pi --service web   # only service web on pi

Give the key to the person who should get in. They open the private service
in a browser and paste the key on the sign-in page.`,
				Flags: append(adminFlags(), jsonFlag(),
					&cli.StringFlag{Name: "node", EnvVars: env("node"), Usage: "open only this node's services (default: every node)"},
					&cli.StringFlag{Name: "service", EnvVars: env("service"), Usage: "open only services with this name (default: every service)"},
					&cli.DurationFlag{Name: "ttl", Value: coordinator.DefaultAccessKeyTTL, EnvVars: env("ttl"), Usage: "how long the key works (e.g. 8h, 168h; at most 8760h = 365 days)"},
				),
				Action: accessKeyCreate,
			},
			{
				Name:   "list",
				Usage:  "list access keys (never their secrets)",
				Flags:  append(adminFlags(), jsonFlag()),
				Action: accessKeyList,
			},
			{
				Name:      "revoke",
				Usage:     "revoke an access key: it stops working and its browser sessions end at once",
				ArgsUsage: "ID",
				Description: `ID is the key's id as shown by meshctl access-key list (the 12 hex digits
after "meshctl-access-" in the key).

Example: meshctl access-key revoke 0123456789ab`,
				Flags:  adminFlags(),
				Action: revokeByID("access key", wire.PathAdminAccessKeyRevoke, "meshctl access-key list", "; the proxy ends the browser sessions it opened"),
			},
		},
	}
}

// scopeText says in words what an access key opens.
func scopeText(node, service string) string {
	switch {
	case node == "" && service == "":
		return "every private service"
	case node == "":
		return fmt.Sprintf("private service %q on every node", service)
	case service == "":
		return fmt.Sprintf("every private service of node %s", node)
	}
	return fmt.Sprintf("private service %q of node %s", service, node)
}

func accessKeyCreate(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	ttl := c.Duration("ttl")
	if ttl <= 0 || ttl > maxAccessKeyTTL {
		return usageError("--ttl must be positive and at most 8760h (365 days), e.g. 24h")
	}
	ac, err := newAdminClient(c)
	if err != nil {
		return err
	}
	var resp wire.AccessKeyCreateResponse
	if err := ac.call(c.Context, "POST", wire.PathAdminAccessKeys, wire.AccessKeyCreateRequest{
		Node: c.String("node"), Service: c.String("service"), TTL: wire.Duration(ttl),
	}, &resp); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, resp)
	}
	w := c.App.Writer
	fmt.Fprintf(w, "Access key %s (opens %s; expires %s, in %s):\n\n  %s\n\n", resp.ID, scopeText(resp.Node, resp.Service),
		resp.Expires.Local().Format(time.RFC3339), until(resp.Expires, time.Now()), resp.Key)
	domain, node := resp.Domain, resp.Node
	if domain == "" {
		domain = "DOMAIN"
	}
	if node == "" {
		node = "NODE"
	}
	where := node + "." + domain
	fmt.Fprintf(w, "To use it, open the private service in a browser (%s, through the proxy)\n", where)
	fmt.Fprintf(w, "and paste the key on the sign-in page.\n\n")
	fmt.Fprintf(w, "The key is shown only now; keep it secret. Revoke it with: meshctl access-key revoke %s\n", resp.ID)
	return nil
}

func accessKeyList(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	ac, err := newAdminClient(c)
	if err != nil {
		return err
	}
	var ks []wire.AccessKey
	if err := ac.call(c.Context, "GET", wire.PathAdminAccessKeys, nil, &ks); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, ks)
	}
	if len(ks) == 0 {
		fmt.Fprintln(c.App.Writer, "No access keys yet. Create one with `meshctl access-key create`.")
		return nil
	}
	now := time.Now()
	rows := [][]string{{"ID", "NODE", "SERVICE", "EXPIRES", "STATUS", "CREATED BY"}}
	for _, k := range ks {
		status := "active"
		switch {
		case k.Revoked:
			status = "revoked"
		case !now.Before(k.Expires):
			status = "expired"
		}
		node, svc := k.Node, k.Service
		if node == "" {
			node = "(any)"
		}
		if svc == "" {
			svc = "(any)"
		}
		rows = append(rows, []string{k.ID, node, svc, until(k.Expires, now), status, k.CreatedBy})
	}
	return table(c.App.Writer, rows)
}
