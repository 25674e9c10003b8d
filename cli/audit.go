package cli

import (
	"fmt"
	"time"

	"github.com/meshctl/meshctl/wire"
	"github.com/urfave/cli/v2"
)

func auditCommand() *cli.Command {
	return &cli.Command{
		Name:  "audit",
		Usage: "show the audit log: who created tokens, enrolled, revoked, renamed",
		Flags: append(adminFlags(), jsonFlag(),
			&cli.IntFlag{Name: "limit", Value: 100, EnvVars: env("limit"), Usage: "show the newest N entries (0 = all)"}),
		Action: func(c *cli.Context) error {
			if err := noArgs(c); err != nil {
				return err
			}
			if c.Int("limit") < 0 {
				return usageError("--limit must be ≥ 0")
			}
			ac, err := newAdminClient(c)
			if err != nil {
				return err
			}
			var es []wire.AuditEntry
			if err := ac.call(c.Context, "GET", fmt.Sprintf("%s?limit=%d", wire.PathAdminAudit, c.Int("limit")), nil, &es); err != nil {
				return err
			}
			if c.Bool("json") {
				return printJSON(c.App.Writer, es)
			}
			rows := [][]string{{"TIME", "ACTOR", "ACTION", "TARGET", "DETAIL"}}
			for _, e := range es {
				rows = append(rows, []string{e.Time.Local().Format(time.DateTime), e.Actor, e.Action, e.Target, orDash(e.Detail)})
			}
			return table(c.App.Writer, rows)
		},
	}
}
