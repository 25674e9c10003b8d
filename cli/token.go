package cli

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/meshctl/meshctl/wire"
	"github.com/urfave/cli/v2"
)

func tokenCommand() *cli.Command {
	return &cli.Command{
		Name:  "token",
		Usage: "create, list and revoke enrollment tokens",
		Description: `An enrollment token lets one device join the mesh. It is single-use and
expires after 1 hour unless you say otherwise. Only a hash of it is stored on
the server, so it is shown once, at creation.`,
		Subcommands: []*cli.Command{
			{
				Name:  "create",
				Usage: "create a token and print the enroll line to run on the device",
				Description: `Prints the token and a ready-to-paste line:

  meshctl enroll --coordinator https://HOST:PORT --token … --ca-pin sha256:…

Run that line on the device. The --ca-pin lets the device verify it is
talking to this coordinator before it sends anything.

Examples:
  meshctl token create                      # one device, within 1 hour
  meshctl token create --uses 10 --ttl 24h  # ten devices, within a day
  meshctl token create --reusable --tag lab # any number until it expires`,
				Flags: append(adminFlags(),
					&cli.DurationFlag{Name: "ttl", Value: time.Hour, EnvVars: env("ttl"), Usage: "how long the token can be used (e.g. 30m, 24h)"},
					&cli.IntFlag{Name: "uses", Value: 1, EnvVars: env("uses"), Usage: "how many devices may enroll with it"},
					&cli.BoolFlag{Name: "reusable", EnvVars: env("reusable"), Usage: "any number of enrollments until it expires (instead of --uses)"},
					&cli.StringSliceFlag{Name: "tag", EnvVars: env("tag"), Usage: "tag for nodes enrolled with this token (repeatable); with meshctl server --topology tags, nodes see only the nodes that share a tag with them"},
					&cli.StringFlag{Name: "role", Value: wire.RoleNode, EnvVars: env("role"), Usage: "role of enrolled members: node or proxy"},
					jsonFlag(),
				),
				Action: tokenCreate,
			},
			{
				Name:   "list",
				Usage:  "list tokens (never their secrets)",
				Flags:  append(adminFlags(), jsonFlag()),
				Action: tokenList,
			},
			{
				Name:      "revoke",
				Usage:     "revoke a token so it can no longer be used",
				ArgsUsage: "ID",
				Flags:     adminFlags(),
				Action:    revokeByID("token", wire.PathAdminTokenRevoke, "meshctl token list", ""),
			},
		},
	}
}

func tokenCreate(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	uses, reusable := c.Int("uses"), c.Bool("reusable")
	if reusable {
		if c.IsSet("uses") {
			return usageError("--uses and --reusable exclude each other")
		}
		uses = 0
	} else if uses < 1 {
		return usageError("--uses must be at least 1 (or use --reusable)")
	}
	if c.Duration("ttl") <= 0 {
		return usageError("--ttl must be positive, e.g. 1h")
	}
	ac, err := newAdminClient(c)
	if err != nil {
		return err
	}
	var resp wire.TokenCreateResponse
	if err := ac.call(c.Context, "POST", wire.PathAdminTokens, wire.TokenCreateRequest{
		TTL: wire.Duration(c.Duration("ttl")), MaxUses: uses, Reusable: reusable, Tags: c.StringSlice("tag"), Role: c.String("role"),
	}, &resp); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, resp)
	}
	usesText := strconv.Itoa(resp.MaxUses) + " use(s)"
	if resp.MaxUses == 0 {
		usesText = "reusable"
	}
	w := c.App.Writer
	fmt.Fprintf(w, "Token %s (%s, expires %s, in %s):\n\n  %s\n\n", resp.ID, usesText,
		resp.Expires.Local().Format(time.RFC3339), until(resp.Expires, time.Now()), resp.Token)
	fmt.Fprintf(w, "On the device, run:\n\n  %s --name NAME\n\n", resp.EnrollCommand)
	fmt.Fprintf(w, "(--name defaults to the device's host name.) The token is shown only now; keep it secret.\n")
	return nil
}

func tokenList(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	ac, err := newAdminClient(c)
	if err != nil {
		return err
	}
	var ts []wire.Token
	if err := ac.call(c.Context, "GET", wire.PathAdminTokens, nil, &ts); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, ts)
	}
	now := time.Now()
	rows := [][]string{{"ID", "ROLE", "USES", "EXPIRES", "STATUS", "TAGS"}}
	for _, t := range ts {
		uses := fmt.Sprintf("%d/%d", t.Uses, t.MaxUses)
		if t.MaxUses == 0 {
			uses = fmt.Sprintf("%d/∞", t.Uses)
		}
		status := "usable"
		switch {
		case t.Revoked:
			status = "revoked"
		case !now.Before(t.Expires):
			status = "expired"
		case t.MaxUses > 0 && t.Uses >= t.MaxUses:
			status = "used up"
		}
		rows = append(rows, []string{t.ID, t.Role, uses, until(t.Expires, now), status, orDash(strings.Join(t.Tags, ","))})
	}
	return table(c.App.Writer, rows)
}
