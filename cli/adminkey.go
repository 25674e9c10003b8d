package cli

import (
	"fmt"
	"time"

	"github.com/meshctl/meshctl/wire"
	"github.com/urfave/cli/v2"
)

func adminKeyCommand() *cli.Command {
	return &cli.Command{
		Name:  "admin-key",
		Usage: "create, list and revoke keys for remote admin access",
		Description: `An admin key lets admin commands reach a coordinator from another machine:

  MESHCTL_ADMIN_KEY=meshctl-admin-… meshctl nodes list --coordinator https://HOST:7443 --ca-pin sha256:…

Only a hash is stored on the server; the key is shown once, at creation.`,
		Subcommands: []*cli.Command{
			{
				Name:  "create",
				Usage: "create an admin key",
				Flags: append(adminFlags(), jsonFlag(),
					&cli.DurationFlag{Name: "ttl", EnvVars: env("ttl"), Usage: "expire the key after this long (default: never)"}),
				Action: func(c *cli.Context) error {
					if err := noArgs(c); err != nil {
						return err
					}
					if c.Duration("ttl") < 0 {
						return usageError("--ttl must not be negative")
					}
					ac, err := newAdminClient(c)
					if err != nil {
						return err
					}
					var resp wire.AdminKeyCreateResponse
					if err := ac.call(c.Context, "POST", wire.PathAdminKeys, wire.AdminKeyCreateRequest{TTL: wire.Duration(c.Duration("ttl"))}, &resp); err != nil {
						return err
					}
					if c.Bool("json") {
						return printJSON(c.App.Writer, resp)
					}
					fmt.Fprintf(c.App.Writer, "Admin key %s (shown only now; keep it secret):\n\n  %s\n\nUse it from another machine:\n\n  export MESHCTL_ADMIN_KEY=%s\n  meshctl nodes list --coordinator %s --ca-pin %s\n",
						resp.ID, resp.Key, resp.Key, resp.Coordinator, resp.CAPin)
					return nil
				},
			},
			{
				Name:  "list",
				Usage: "list admin keys (never their secrets)",
				Flags: append(adminFlags(), jsonFlag()),
				Action: func(c *cli.Context) error {
					if err := noArgs(c); err != nil {
						return err
					}
					ac, err := newAdminClient(c)
					if err != nil {
						return err
					}
					var ks []wire.AdminKey
					if err := ac.call(c.Context, "GET", wire.PathAdminKeys, nil, &ks); err != nil {
						return err
					}
					if c.Bool("json") {
						return printJSON(c.App.Writer, ks)
					}
					now := time.Now()
					rows := [][]string{{"ID", "CREATED", "EXPIRES", "STATUS", "CREATED BY"}}
					for _, k := range ks {
						exp, status := "never", "active"
						if !k.Expires.IsZero() {
							exp = until(k.Expires, now)
						}
						if k.Revoked {
							status = "revoked"
						} else if !k.Expires.IsZero() && !now.Before(k.Expires) {
							status = "expired"
						}
						rows = append(rows, []string{k.ID, k.Created.Local().Format(time.DateTime), exp, status, k.CreatedBy})
					}
					return table(c.App.Writer, rows)
				},
			},
			{
				Name:      "revoke",
				Usage:     "revoke an admin key",
				ArgsUsage: "ID",
				Flags:     adminFlags(),
				Action:    revokeByID("admin key", wire.PathAdminKeyRevoke, "meshctl admin-key list", ""),
			},
		},
	}
}
