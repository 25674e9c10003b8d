package cli

import (
	"fmt"
	"net"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
	"github.com/urfave/cli/v2"
)

func sshConfigCommand() *cli.Command {
	return &cli.Command{
		Name:  "ssh-config",
		Usage: "print the stock OpenSSH command and ssh_config block that serve this node's services through the proxy's SSH fallback",
		Description: `For networks that block UDP: with the printed command, the device's services
are reachable at http://NODE.DOMAIN through an SSH reverse tunnel, using only
OpenSSH. The tunnel authenticates with the SSH certificate this node got at
enrollment (STATE_DIR/ssh/); the proxy is verified through the coordinator's
SSH CA (a @cert-authority known_hosts line written to STATE_DIR/ssh/known_hosts),
never by trust on first use. --expose also reports the services to the
coordinator, as meshctl up would.

Forwards name the service, not a port on the proxy: -R pi1:80:localhost:3000
publishes pi1's default service, -R web--pi1:80:localhost:3000 the service
"web"; the 80 only completes OpenSSH's syntax, no port is bound.

The certificate lasts as long as the node's TLS certificate (24 h by default)
and is renewed by meshctl up; without meshctl running, re-run this command
after renewing (meshctl netmap renews nothing: use meshctl up).

Example:
  meshctl ssh-config --state-dir ./pi1 --expose web=127.0.0.1:3000,public`,
		Flags: []cli.Flag{stateDirFlag(),
			&cli.StringSliceFlag{Name: "expose", EnvVars: env("expose"), Usage: "a local service to publish: NAME=HOST:PORT[,public] (repeatable)"},
		},
		Action: runSSHConfig,
	}
}

func runSSHConfig(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	dir, err := filepath.Abs(c.String("state-dir"))
	if err != nil {
		return err
	}
	st, err := node.LoadState(dir)
	if err != nil {
		return err
	}
	if st.SSHCertificate == "" {
		return fmt.Errorf("%s has no SSH certificate (enrolled before the SSH fallback existed?): enroll again with --force", dir)
	}
	nm, err := node.LoadNetmap(dir)
	if err != nil {
		return fmt.Errorf("cached netmap: %w (run meshctl netmap --state-dir %s once)", err, dir)
	}
	var svcs []node.Service
	for _, e := range fieldsOf(c.StringSlice("expose")) {
		svc, err := node.ParseExpose(e)
		if err != nil {
			return usageError("%v", err)
		}
		svcs = append(svcs, svc)
	}
	cl, err := node.NewClient(dir)
	if err != nil {
		return err
	}
	defer cl.Close()
	if fresh, err := cl.Netmap(c.Context, 0); err == nil && fresh != nil {
		nm = fresh
		node.SaveNetmap(dir, nm)
	}
	if nm.ProxySSH == "" {
		return fmt.Errorf("the coordinator announces no SSH fallback endpoint (its server runs without --ssh-listen)")
	}
	host, port, err := net.SplitHostPort(nm.ProxySSH)
	if err != nil {
		return fmt.Errorf("SSH endpoint %q: %w", nm.ProxySSH, err)
	}
	if len(svcs) > 0 {
		ws := make([]wire.Service, 0, len(svcs))
		for _, s := range svcs {
			ws = append(ws, wire.Service{Name: s.Name, Port: s.Port, Public: s.Public})
		}
		if err := cl.Update(c.Context, wire.UpdateRequest{Services: &ws}); err != nil {
			return fmt.Errorf("report services: %w", err)
		}
	} else {
		for _, s := range nm.Self.Services {
			svcs = append(svcs, node.Service{Name: s.Name, Port: s.Port, Target: "localhost:" + strconv.Itoa(int(s.Port))})
		}
	}
	if len(svcs) == 0 {
		return usageError("no services to forward: pass --expose NAME=HOST:PORT")
	}
	sshDir := filepath.Join(dir, node.SSHDir)
	khPath := filepath.Join(sshDir, "known_hosts")
	pattern := host
	if port != "22" {
		pattern = "[" + host + "]:" + port
	}
	kh := "@cert-authority " + pattern + " " + strings.TrimSpace(st.SSHCA) + "\n"
	if err := pki.WriteFileAtomic(khPath, []byte(kh), 0o600); err != nil {
		return err
	}
	key, cert := filepath.Join(sshDir, "id_ed25519"), filepath.Join(sshDir, "id_ed25519-cert.pub")
	var forwards []string
	for i, s := range svcs {
		bind := s.Name + "--" + st.Name
		if i == 0 {
			bind = st.Name
		}
		forwards = append(forwards, fmt.Sprintf("%s:80:%s", bind, s.Target))
	}
	w := c.App.Writer
	fmt.Fprintf(w, "# known_hosts (written to %s):\n%s\n", khPath, kh)
	fmt.Fprintf(w, "# ~/.ssh/config block:\nHost meshctl-%s\n  HostName %s\n  Port %s\n  User %s\n  IdentityFile %s\n  CertificateFile %s\n  UserKnownHostsFile %s\n  StrictHostKeyChecking yes\n  ExitOnForwardFailure yes\n  ServerAliveInterval 25\n",
		st.Name, host, port, st.Name, key, cert, khPath)
	for _, f := range forwards {
		parts := strings.SplitN(f, ":", 3)
		fmt.Fprintf(w, "  RemoteForward %s:%s %s\n", parts[0], parts[1], parts[2])
	}
	fmt.Fprintf(w, "\n# or in one command:\nssh -i %s -o CertificateFile=%s -o UserKnownHostsFile=%s -o StrictHostKeyChecking=yes -o ExitOnForwardFailure=yes -p %s -N", key, cert, khPath, port)
	for _, f := range forwards {
		fmt.Fprintf(w, " -R %s", f)
	}
	fmt.Fprintf(w, " %s@%s\n", st.Name, host)
	if nm.Domain != "" {
		fmt.Fprintf(w, "\n# then open http://%s.%s/ (on the proxy's HTTP port)\n", st.Name, nm.Domain)
	}
	return nil
}
