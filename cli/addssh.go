package cli

import (
	"fmt"
	"net"
	"os"
	"strings"
	"time"

	"github.com/meshctl/meshctl/wire"
	"github.com/urfave/cli/v2"
)

func addSSHCommand() *cli.Command {
	return &cli.Command{
		Name:      "add-ssh",
		Usage:     "add an SSH-only node: a device with only OpenSSH, reachable through the proxy's SSH fallback",
		ArgsUsage: "NAME",
		Description: `Certifies the device's SSH public key for NAME with the coordinator's SSH CA
and prints the certificate and the exact ssh command to run on the device.
The node has no WireGuard key and no overlay address; it is listed and
revocable like any node, and may forward only its own services:
  -R NAME:80:localhost:PORT       its default service (web, else the first)
  -R SERVICE--NAME:80:localhost:PORT
(the 80 only completes OpenSSH's syntax: the proxy binds no port).

Run it again for the same NAME before the certificate expires (--ttl) to
re-certify, also with a new key. Services are private until made public
(meshctl nodes set-public NAME SERVICE).

Example:
  meshctl nodes add-ssh --data-dir ./data --ssh-pubkey cam1_ed25519.pub --service web cam1`,
		Flags: append(adminFlags(), jsonFlag(),
			&cli.StringFlag{Name: "ssh-pubkey", EnvVars: env("ssh-pubkey"), Usage: "the device's SSH public key file (ed25519 or ecdsa-sha2-nistp256)", Required: true},
			&cli.DurationFlag{Name: "ttl", Value: 7 * 24 * time.Hour, EnvVars: env("ttl"), Usage: "certificate lifetime"},
			&cli.StringSliceFlag{Name: "service", EnvVars: env("service"), Usage: "a service name the device may forward (repeatable; default web)"},
		),
		Action: runAddSSH,
	}
}

func runAddSSH(c *cli.Context) error {
	args, err := positional(c, "name")
	if err != nil {
		return err
	}
	keyFile := c.String("ssh-pubkey")
	key, err := os.ReadFile(keyFile)
	if err != nil {
		return fmt.Errorf("--ssh-pubkey: %w", err)
	}
	if strings.Contains(string(key), "PRIVATE KEY") {
		return usageError("--ssh-pubkey %s holds a PRIVATE key: pass the .pub file; the private key never leaves the device", keyFile)
	}
	ac, err := newAdminClient(c)
	if err != nil {
		return err
	}
	var resp wire.AddSSHResponse
	if err := ac.call(c.Context, "POST", wire.PathAdminNodeAddSSH, wire.AddSSHRequest{
		Name: args[0], SSHKey: string(key), TTL: wire.Duration(c.Duration("ttl")), Services: fieldsOf(c.StringSlice("service")),
	}, &resp); err != nil {
		return err
	}
	if c.Bool("json") {
		return printJSON(c.App.Writer, resp)
	}
	name := resp.Node.Name
	priv := strings.TrimSuffix(keyFile, ".pub")
	host, port := "PROXY-HOST", "2222"
	if h, p, err := net.SplitHostPort(resp.ProxySSH); err == nil {
		host, port = h, p
	}
	pattern := host
	if port != "22" {
		pattern = "[" + host + "]:" + port
	}
	w := c.App.Writer
	fmt.Fprintf(w, "SSH-only node %q (id %s). On the device, save the certificate as %s-cert.pub:\n\n%s\n", name, resp.Node.ID, priv, strings.TrimSpace(resp.Certificate))
	fmt.Fprintf(w, "and this line as known_hosts (it verifies the proxy through the coordinator's SSH CA):\n\n@cert-authority %s %s\n\n", pattern, strings.TrimSpace(resp.SSHCA))
	svc := "web"
	if len(resp.Node.Services) > 0 {
		svc = resp.Node.Services[0].Name
	}
	fmt.Fprintf(w, "Then run (replace localhost:80 with the device's %s service):\n\n", svc)
	fmt.Fprintf(w, "  ssh -i %s -o CertificateFile=%s-cert.pub -o UserKnownHostsFile=known_hosts -o StrictHostKeyChecking=yes -o ExitOnForwardFailure=yes -o ServerAliveInterval=25 -p %s -N -R %s:80:localhost:80 %s@%s\n",
		priv, priv, port, name, name, host)
	if resp.Domain != "" {
		fmt.Fprintf(w, "\nand open http://%s.%s/ through the proxy (private until: meshctl nodes set-public %s %s).\n", name, resp.Domain, name, svc)
	}
	if resp.ProxySSH == "" {
		fmt.Fprintln(w, "\nNote: the server runs without --ssh-listen, so there is no SSH fallback to connect to yet.")
	}
	return nil
}
