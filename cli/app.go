// Package cli is meshctl's command line: one file per command group, built
// on urfave/cli/v2. Every flag has a MESHCTL_* environment variable.
//
// urfave/cli v2 stops reading flags at the first positional argument, so
// flags go first: `meshctl nodes revoke --data-dir D pi1`. Commands that
// take positional arguments refuse stray flags after them with a message
// that shows the right order.
package cli

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"strings"

	"github.com/urfave/cli/v2"
)

// Version is set at build time with -ldflags "-X github.com/meshctl/meshctl/cli.Version=v1.2.3".
var Version = ""

// Exit codes.
const (
	ExitError = 1
	ExitUsage = 2
)

// NewApp builds the meshctl command tree writing to the given streams.
func NewApp(stdout, stderr io.Writer) *cli.App {
	app := &cli.App{
		Name:  "meshctl",
		Usage: "reach a fleet of devices behind NAT over a WireGuard mesh",
		Description: `meshctl is one binary with several roles:

  server       coordinator (enrollment, addresses, netmaps, revocation) and proxy in one process
  proxy serve  a standalone proxy: <node>.DOMAIN for browsers, WireGuard endpoint for nodes
  token …      enrollment tokens (admin)
  nodes …      list, revoke, rename nodes; set services public or private (admin)
  audit        the audit log (admin)
  admin-key …  keys for remote admin access
  access-key … sign-in keys for private services at the proxy (admin)
  enroll       join this device to a mesh (node)
  up           run this node: WireGuard device, published services (node)
  status       this node's addresses, coordinator, peers, services (node)
  ping, nc     reach a peer over the mesh (node)
  wg show      the WireGuard device, like wg show (node)
  ssh-config   stock OpenSSH command for the SSH fallback (node)
  netmap       fetch this node's current view of the mesh (node)

Admin commands talk to a local server through the Unix socket in its data dir
(--data-dir, default /var/lib/meshctl-server), or to a remote one with
--coordinator URL and MESHCTL_ADMIN_KEY. Node commands keep their state in
--state-dir (default /var/lib/meshctl).

Flags go before positional arguments: meshctl nodes revoke --data-dir ./data pi1.
Every flag can also be set with the MESHCTL_* variable shown in its help.`,
		Version:                   version(),
		Writer:                    stdout,
		ErrWriter:                 stderr,
		DisableSliceFlagSeparator: true,
		Suggest:                   true,
		HideVersion:               true,
		Commands: []*cli.Command{
			serverCommand(),
			tokenCommand(),
			enrollCommand(),
			nodesCommand(),
			auditCommand(),
			adminKeyCommand(),
			accessKeyCommand(),
			proxyCommand(),
			upCommand(),
			statusCommand(),
			pingCommand(),
			ncCommand(),
			wgCommand(),
			sshConfigCommand(),
			netmapCommand(),
			versionCommand(),
		},
		ExitErrHandler: func(*cli.Context, error) {}, // Main prints and exits
	}
	return app
}

// Main runs meshctl with os.Args and exits.
func Main() {
	os.Exit(Run(os.Args, os.Stdout, os.Stderr))
}

// Run runs meshctl with args and returns the process exit code.
func Run(args []string, stdout, stderr io.Writer) int {
	err := startPprof()
	if err == nil {
		err = NewApp(stdout, stderr).Run(args)
	}
	if err == nil {
		return 0
	}
	code := ExitError
	var ec cli.ExitCoder
	if errors.As(err, &ec) {
		code = ec.ExitCode()
	}
	if msg := err.Error(); msg != "" {
		fmt.Fprintf(stderr, "meshctl: %s\n", msg)
	}
	return code
}

func version() string {
	if Version != "" {
		return Version
	}
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "devel"
	}
	v := bi.Main.Version
	if v == "" || v == "(devel)" {
		v = "devel"
	}
	for _, s := range bi.Settings {
		if s.Key == "vcs.revision" && len(s.Value) >= 12 {
			v += "+" + s.Value[:12]
		}
		if s.Key == "vcs.modified" && s.Value == "true" {
			v += "-dirty"
		}
	}
	return v
}

func versionCommand() *cli.Command {
	return &cli.Command{
		Name:  "version",
		Usage: "print meshctl's version (--modules: and the Go version and every module it was built from)",
		Description: `With --modules, the Go toolchain and each module compiled into this binary
follow, one per line ("path version", with "=> replacement" where one
applies), so that a build can be checked against vulnerability databases,
e.g. govulncheck -mode binary ./meshctl where its database is reachable.`,
		Flags: []cli.Flag{&cli.BoolFlag{Name: "modules", EnvVars: env("modules"), Usage: "also print the Go version and the modules in this build"}},
		Action: func(c *cli.Context) error {
			if err := noArgs(c); err != nil {
				return err
			}
			fmt.Fprintf(c.App.Writer, "meshctl %s\n", version())
			if !c.Bool("modules") {
				return nil
			}
			bi, ok := debug.ReadBuildInfo()
			if !ok {
				return errors.New("this binary carries no build information (built without module support)")
			}
			fmt.Fprintf(c.App.Writer, "go %s\n", bi.GoVersion)
			for _, m := range bi.Deps {
				line := m.Path + " " + m.Version
				if m.Replace != nil {
					line += " => " + m.Replace.Path + " " + m.Replace.Version
				}
				fmt.Fprintln(c.App.Writer, line)
			}
			return nil
		},
	}
}

// env returns the MESHCTL_* variable list for a flag name.
func env(name string) []string {
	return []string{"MESHCTL_" + strings.ToUpper(strings.ReplaceAll(name, "-", "_"))}
}

// usageError is a mistake on the command line (exit code 2).
func usageError(format string, args ...any) error {
	return cli.Exit(fmt.Sprintf(format, args...), ExitUsage)
}

// positional returns exactly n positional arguments (named for messages),
// refusing flags that were written after them.
func positional(c *cli.Context, names ...string) ([]string, error) {
	args := c.Args().Slice()
	usage := fmt.Sprintf("%s [flags] %s", c.Command.HelpName, strings.ToUpper(strings.Join(names, " ")))
	for _, a := range args {
		if strings.HasPrefix(a, "-") {
			return nil, usageError("flag %s comes after the arguments; flags go first: %s", a, usage)
		}
	}
	if len(args) != len(names) {
		return nil, usageError("expected %d argument(s) (%s), got %d: %s", len(names), strings.Join(names, ", "), len(args), usage)
	}
	return args, nil
}

// noArgs refuses positional arguments on commands that take none (usually
// a flag whose value was forgotten, or a flag typed after a stray word).
func noArgs(c *cli.Context) error {
	if c.Args().Len() > 0 {
		return usageError("unexpected argument %q (flags go first; see %s --help)", c.Args().First(), c.Command.HelpName)
	}
	return nil
}
