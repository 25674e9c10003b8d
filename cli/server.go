package cli

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/meshctl/meshctl/coordinator"
	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/proxy"
	"github.com/meshctl/meshctl/wire"
	"github.com/urfave/cli/v2"
	"golang.org/x/crypto/ssh"
)

func serverCommand() *cli.Command {
	return &cli.Command{
		Name:  "server",
		Usage: "run coordinator and proxy in one process (foreground): the embedded default",
		Description: `Runs the coordinator (enrollment, addresses, netmaps, revocation) with its
state in --data-dir (SQLite, the CA, the SSH CA, the API certificate, the admin
socket), and a proxy that serves <node>.DOMAIN to browsers through the mesh.
Everything is created on first start; the proxy enrolls itself (no token).

Devices must reach the API at --public-host (a name or address, optionally
host:port); it goes into every enroll line and into the API's certificate.
Nodes behind NAT keep alive to the proxy's WireGuard endpoint, --wg-endpoint
(default: the public host with the --wg-listen port).

Example (local, no root):
  meshctl server --data-dir ./data --domain localhost --http :8080
  meshctl token create --data-dir ./data      # in another terminal
  # … enroll a node, run meshctl up --expose web=127.0.0.1:3000,public on it,
  # then open http://NODE.localhost:8080/`,
		Flags: append([]cli.Flag{
			dataDirFlag(),
			&cli.StringFlag{Name: "listen", Value: coordinator.DefaultListen, EnvVars: env("listen"), Usage: "address the coordinator API listens on (HTTPS)"},
			&cli.StringFlag{Name: "public-host", EnvVars: env("public-host"),
				Usage: "host name or address devices use to reach the API (default: this machine's first LAN IPv4 address)"},
			&cli.StringFlag{Name: "cidr", Value: coordinator.DefaultIPv4Pool.String(), EnvVars: env("cidr"), Usage: "IPv4 pool for overlay addresses"},
			&cli.DurationFlag{Name: "quarantine", Value: coordinator.DefaultQuarantine, EnvVars: env("quarantine"), Usage: "how long a revoked node's addresses are held back before reuse"},
			&cli.DurationFlag{Name: "cert-ttl", Value: coordinator.DefaultCertValidity, EnvVars: env("cert-ttl"), Usage: "lifetime of node client certificates (nodes renew them automatically)"},
			&cli.StringFlag{Name: "ssh-listen", Value: ":2222", EnvVars: env("ssh-listen"), Usage: "SSH server: the relay for nodes with no direct path to each other, and the reverse-tunnel fallback for nodes whose UDP is blocked (\"\" = off: neither)"},
			&cli.StringFlag{Name: "topology", Value: coordinator.TopologyMesh, EnvVars: env("topology"),
				Usage: "mesh: every node sees every other; hub: nodes see only the proxy and cannot reach each other (small netmaps for fleets reached only through the proxy); tags: nodes see the proxy and the nodes that share a tag with them (meshctl token create --tag)"},
			&cli.StringFlag{Name: "ssh-endpoint", EnvVars: env("ssh-endpoint"), Usage: "the SSH fallback as nodes reach it, HOST:PORT (default: --public-host with the --ssh-listen port; set it to a standalone proxy's when that serves the fallback)"},
			&cli.BoolFlag{Name: "tls-local", EnvVars: env("tls-local"), Usage: "serve --https with a certificate for *.DOMAIN from this server's own CA (for local use; install DATA_DIR/ca.crt in browsers)"},
			&cli.StringFlag{Name: "wg-endpoint", EnvVars: env("wg-endpoint"), Usage: "the proxy's WireGuard endpoint as nodes reach it, HOST:PORT (default: --public-host with the --wg-listen port)"},
			&cli.StringFlag{Name: "memory-limit", Value: "480MiB", EnvVars: env("memory-limit"),
				Usage: "soft memory limit of the server, e.g. 256MiB or 2GiB; 0 = none (GOMEMLIMIT, if set, wins). The default keeps 10,000 nodes under 512 MiB"},
		}, append(proxyFlags(), logFlags()...)...),
		Action: runServer,
	}
}

func runServer(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	log, err := newLogger(c)
	if err != nil {
		return err
	}
	pool, err := netip.ParsePrefix(c.String("cidr"))
	if err != nil {
		return usageError("--cidr %q is not a prefix like 100.64.0.0/16: %v", c.String("cidr"), err)
	}
	if c.Duration("quarantine") < 0 {
		return usageError("--quarantine must not be negative")
	}
	limit, err := parseSize(c.String("memory-limit"))
	if err != nil {
		return usageError("--memory-limit: %v", err)
	}
	node.SetMemoryLimit(limit)
	dir := c.String("data-dir")
	wgPort, err := udpPort(c.String("wg-listen"))
	if err != nil {
		return err
	}
	if wgPort == 0 {
		return usageError("--wg-listen needs a fixed port: nodes must know the proxy's WireGuard endpoint")
	}
	wgEndpoint := c.String("wg-endpoint")
	if wgEndpoint == "" {
		host := hostOf(c.String("public-host"))
		if host == "" {
			host = hostOf(c.String("listen"))
		}
		if host == "" || host == "0.0.0.0" || host == "::" {
			host = "" // the coordinator picks its default public host; resolved below
		}
		if host != "" {
			wgEndpoint = net.JoinHostPort(host, strconv.Itoa(wgPort))
		}
	}
	sshPort := 0
	if l := c.String("ssh-listen"); l != "" {
		_, port, err := net.SplitHostPort(l)
		if sshPort, _ = strconv.Atoi(port); err != nil || sshPort <= 0 || sshPort > 65535 {
			return usageError("--ssh-listen %q must be [HOST]:PORT with a fixed port, e.g. :2222", l)
		}
	}
	srv, err := coordinator.New(coordinator.Options{
		DataDir:       dir,
		Listen:        c.String("listen"),
		PublicHost:    c.String("public-host"),
		IPv4Pool:      pool,
		Quarantine:    c.Duration("quarantine"),
		CertValidity:  c.Duration("cert-ttl"),
		WGEndpoint:    wgEndpoint,
		EmbeddedProxy: embeddedProxyName,
		SSHPort:       sshPort,
		Topology:      c.String("topology"),
		SSHEndpoint:   c.String("ssh-endpoint"),
		WGPort:        wgPort,
		Domain:        c.String("domain"),
		Version:       version(),
		Logger:        log,
	})
	if err != nil {
		return err
	}
	if err := srv.Start(); err != nil {
		srv.Close()
		return err
	}
	defer srv.Close()
	w := c.App.Writer
	fmt.Fprintf(w, "meshctl %s coordinator running\n", version())
	fmt.Fprintf(w, "  API:          %s (listening on %s)\n", srv.URL(), srv.Addr())
	fmt.Fprintf(w, "  CA pin:       %s\n", srv.CAPin())
	fmt.Fprintf(w, "  data dir:     %s\n", dir)
	fmt.Fprintf(w, "  admin socket: %s\n", srv.AdminSocket())
	px, err := startEmbeddedProxy(c, srv, log)
	if err != nil {
		return err
	}
	defer px.Close()
	fmt.Fprintln(w)
	fmt.Fprintf(w, "Enroll a device: run `meshctl token create --data-dir %s` here,\nthen the printed `meshctl enroll …` line on the device.\n", dir)
	if c.String("public-host") == "" {
		fmt.Fprintf(w, "Devices must reach %s; if they cannot, restart with --public-host NAME-OR-ADDRESS.\n", srv.URL())
	}

	return waitForSignal(c, log, px.Agent())
}

// embeddedProxyName is the mesh name of the server's own proxy.
const embeddedProxyName = "proxy"

// startEmbeddedProxy enrolls the server's own proxy on first start (a
// proxy token made in-process, never printed) and starts it, talking to
// the coordinator over loopback.
func startEmbeddedProxy(c *cli.Context, srv *coordinator.Server, log *slog.Logger) (*proxy.Proxy, error) {
	dir := proxyStateDir(c.String("data-dir"))
	local := srv.LocalURL()
	if _, err := node.LoadState(dir); errors.Is(err, node.ErrNotEnrolled) {
		// The coordinator may hold a proxy of this name whose identity was
		// never saved here (a first start cut short): retire it.
		if _, err := srv.RetireProxy(c.Context, embeddedProxyName, "server:embedded-proxy"); err != nil {
			return nil, fmt.Errorf("embedded proxy: %w", err)
		}
		tok, err := srv.CreateToken(c.Context, wire.TokenCreateRequest{Role: wire.RoleProxy, TTL: wire.Duration(time.Minute)}, "server:embedded-proxy")
		if err != nil {
			return nil, fmt.Errorf("embedded proxy: %w", err)
		}
		if _, _, err := node.Enroll(c.Context, node.EnrollOptions{
			Coordinator: local, Token: tok.Token, CAPin: srv.CAPin(), Name: embeddedProxyName, StateDir: dir, Role: wire.RoleProxy,
		}); err != nil {
			return nil, fmt.Errorf("embedded proxy: enroll: %w", err)
		}
	} else if err != nil {
		return nil, fmt.Errorf("embedded proxy: %w", err)
	}
	var localTLS *tls.Config
	var err error
	if c.Bool("tls-local") {
		domain := strings.ToLower(c.String("domain"))
		cert, err := srv.CA().IssueServerCert([]string{"*." + domain, domain}, time.Now(), 90*24*time.Hour)
		if err != nil {
			return nil, fmt.Errorf("--tls-local: %w", err)
		}
		localTLS = &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}}
		fmt.Fprintf(c.App.Writer, "  HTTPS:        *.%s with a certificate from this server's CA (%s); browsers must trust that CA\n",
			domain, filepath.Join(c.String("data-dir"), pki.CACertFile))
	}
	var sshOpts *proxy.SSHOptions
	if l := c.String("ssh-listen"); l != "" {
		if sshOpts, err = embeddedSSH(c, srv, dir, l); err != nil {
			return nil, err
		}
	}
	return startProxy(c, dir, local, localTLS, sshOpts, log)
}

// embeddedSSH prepares the SSH fallback of the all-in-one server: a host key
// kept in the proxy's state dir, certified at every start by the server's
// SSH CA for the names nodes connect to.
func embeddedSSH(c *cli.Context, srv *coordinator.Server, dir, listen string) (*proxy.SSHOptions, error) {
	hostKey, err := pki.LoadOrCreateSSHKey(filepath.Join(dir, "ssh_host_ed25519_key"))
	if err != nil {
		return nil, fmt.Errorf("SSH host key: %w", err)
	}
	principals := []string{"localhost", "127.0.0.1", "::1", strings.ToLower(c.String("domain"))}
	if h := hostOf(srv.URL()[len("https://"):]); h != "" {
		principals = append(principals, h)
	}
	cert, err := pki.SignSSHHostCert(srv.SSHCA(), hostKey.PublicKey(), principals, time.Now(), 365*24*time.Hour)
	if err != nil {
		return nil, err
	}
	signer, err := ssh.NewCertSigner(cert, hostKey)
	if err != nil {
		return nil, err
	}
	return &proxy.SSHOptions{Listen: listen, HostSigner: signer, UserCA: srv.SSHCA().PublicKey()}, nil
}

func hostOf(hostport string) string {
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		return h
	}
	return hostport
}

func logFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "log-format", Value: "text", EnvVars: env("log-format"), Usage: "log format: text or json"},
		&cli.StringFlag{Name: "log-level", Value: "info", EnvVars: env("log-level"), Usage: "log level: debug, info, warn or error"},
	}
}

// newLogger builds the slog logger (on stderr) the log flags describe.
func newLogger(c *cli.Context) (*slog.Logger, error) {
	var level slog.Level
	if err := level.UnmarshalText([]byte(c.String("log-level"))); err != nil {
		return nil, usageError("--log-level %q: use debug, info, warn or error", c.String("log-level"))
	}
	opts := &slog.HandlerOptions{Level: level}
	switch c.String("log-format") {
	case "text":
		return slog.New(slog.NewTextHandler(c.App.ErrWriter, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(c.App.ErrWriter, opts)), nil
	}
	return nil, usageError("--log-format %q: use text or json", c.String("log-format"))
}
