package cli

import (
	"fmt"
	"os"
	"strings"

	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/pki"
	"github.com/urfave/cli/v2"
)

func stateDirFlag() cli.Flag {
	return &cli.StringFlag{Name: "state-dir", Value: node.DefaultStateDir, EnvVars: env("state-dir"),
		Usage: "this node's state dir (identity, keys, cached netmap)"}
}

func enrollCommand() *cli.Command {
	return &cli.Command{
		Name:  "enroll",
		Usage: "join this device to a mesh with a token from `meshctl token create`",
		Description: `Generates this device's WireGuard key and TLS key locally (private keys
never leave it), proves the token to the coordinator, and saves the identity
in --state-dir (0700; files 0600).

The coordinator is verified by --ca-pin before the token is sent. Paste the
line that ` + "`meshctl token create`" + ` printed; to keep the token out of the
process list, use --token-file or MESHCTL_TOKEN instead of --token.

Example:
  meshctl enroll --coordinator https://10.0.0.5:7443 --token meshctl-enroll-… \
    --ca-pin sha256:… --name pi1 --state-dir /var/lib/meshctl`,
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "coordinator", EnvVars: env("coordinator"), Usage: "coordinator URL (https://HOST:PORT)"},
			&cli.StringFlag{Name: "token", EnvVars: env("token"), Usage: "enrollment token"},
			&cli.StringFlag{Name: "token-file", EnvVars: env("token-file"), Usage: "read the enrollment token from this file"},
			&cli.StringFlag{Name: "ca-pin", EnvVars: env("ca-pin"), Usage: "the coordinator CA's pin (sha256:…); needed unless its certificate is publicly trusted"},
			&cli.StringFlag{Name: "name", EnvVars: env("name"), Usage: "node name, a lower-case DNS label (default: this host's name)"},
			stateDirFlag(),
			&cli.BoolFlag{Name: "force", EnvVars: env("force"), Usage: "replace an existing identity in --state-dir"},
		},
		Action: runEnroll,
	}
}

func runEnroll(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	token, err := tokenFromFlags(c)
	if err != nil {
		return err
	}
	name := c.String("name")
	if name == "" {
		if name, err = defaultNodeName(); err != nil {
			return err
		}
	}
	dir := c.String("state-dir")
	st, resp, err := node.Enroll(c.Context, node.EnrollOptions{
		Coordinator: c.String("coordinator"),
		Token:       token,
		CAPin:       c.String("ca-pin"),
		Name:        name,
		StateDir:    dir,
		Force:       c.Bool("force"),
	})
	if err != nil {
		return err
	}
	w := c.App.Writer
	fmt.Fprintf(w, "Enrolled %s as node %q (id %s)\n", st.Coordinator, st.Name, st.NodeID)
	fmt.Fprintf(w, "  overlay addresses: %s, %s\n", st.IPv4, st.IPv6)
	fmt.Fprintf(w, "  peers in the mesh: %d\n", len(resp.Netmap.Peers))
	fmt.Fprintf(w, "  state saved in:    %s\n", dir)
	fmt.Fprintf(w, "  certificate valid until %s (renewed automatically)\n", st.ClientCert().Leaf.NotAfter.Local().Format("2006-01-02 15:04"))
	return nil
}

// defaultNodeName derives a node name from the host name: lower-cased,
// first label only, characters outside [a-z0-9-] turned into '-'. The
// coordinator still validates it; an explicit --name is never rewritten.
func defaultNodeName() (string, error) {
	h, err := os.Hostname()
	if err != nil || h == "" {
		return "", fmt.Errorf("cannot read this host's name; pass --name")
	}
	h, _, _ = strings.Cut(strings.ToLower(h), ".")
	var b strings.Builder
	for _, r := range h {
		if r >= 'a' && r <= 'z' || r >= '0' && r <= '9' {
			b.WriteRune(r)
		} else {
			b.WriteByte('-')
		}
	}
	n := strings.Trim(b.String(), "-")
	for strings.Contains(n, "--") {
		n = strings.ReplaceAll(n, "--", "-")
	}
	if n == "" {
		return "", fmt.Errorf("host name %q does not make a node name; pass --name", h)
	}
	if len(n) > 63 {
		n = strings.TrimRight(n[:63], "-")
	}
	return n, nil
}

// readSecretFile reads a file holding a secret (refusing one readable by
// others) and trims white space.
func readSecretFile(path string) (string, error) {
	b, err := pki.ReadPrivateFile(path)
	if err != nil {
		return "", err
	}
	return strings.TrimSpace(string(b)), nil
}
