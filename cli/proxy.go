package cli

import (
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/proxy"
	"github.com/meshctl/meshctl/wire"
	"github.com/urfave/cli/v2"
	"golang.org/x/crypto/ssh"
)

// Defaults of the proxy's listeners.
const (
	DefaultHTTP     = ":80"
	DefaultHTTPS    = ":443"
	DefaultWGListen = ":51820"
	DefaultDomain   = "localhost"
)

// proxyFlags are shared by `proxy serve` and the all-in-one `server`.
func proxyFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "domain", Value: DefaultDomain, EnvVars: env("domain"),
			Usage: "serve <node>.DOMAIN and <service>--<node>.DOMAIN (localhost works locally: browsers resolve *.localhost)"},
		&cli.StringFlag{Name: "http", Value: DefaultHTTP, EnvVars: env("http"), Usage: "plain-HTTP listen address (\"\" = off; with TLS it only redirects to HTTPS)"},
		&cli.StringFlag{Name: "https", Value: DefaultHTTPS, EnvVars: env("https"), Usage: "HTTPS listen address, used when a certificate is given (--tls-cert/--tls-key)"},
		&cli.StringFlag{Name: "tls-cert", EnvVars: env("tls-cert"), Usage: "PEM certificate for HTTPS (e.g. a wildcard for *.DOMAIN)"},
		&cli.StringFlag{Name: "tls-key", EnvVars: env("tls-key"), Usage: "PEM private key of --tls-cert (must be 0600)"},
		&cli.StringFlag{Name: "wg-listen", Value: DefaultWGListen, EnvVars: env("wg-listen"), Usage: "UDP address of the proxy's WireGuard endpoint (nodes behind NAT keep alive to it)"},
		&cli.StringFlag{Name: "tun", EnvVars: env("tun"),
			Usage: "carry the proxy's mesh traffic on a kernel TUN interface of this name (needs root; faster than the userspace stack). Nodes reach no port of this host through it; one meshctl TUN per host"},
		&cli.StringFlag{Name: "metrics", EnvVars: env("metrics"), Usage: "serve Prometheus metrics at http://ADDR/metrics (off by default; keep it private, e.g. 127.0.0.1:9090)"},
		&cli.BoolFlag{Name: "acme", EnvVars: env("acme"), Usage: "HTTPS with certificates from Let's Encrypt (or --acme-directory) for the hosts of enrolled nodes; needs --http on port 80 reachable from the internet"},
		&cli.StringFlag{Name: "acme-directory", Value: "https://acme-v02.api.letsencrypt.org/directory", EnvVars: env("acme-directory"), Usage: "ACME directory URL (another ACME CA)"},
		&cli.StringFlag{Name: "acme-email", EnvVars: env("acme-email"), Usage: "contact e-mail for the ACME account (optional)"},
	}
}

func proxyCommand() *cli.Command {
	return &cli.Command{
		Name:  "proxy",
		Usage: "run a standalone proxy (meshctl server already includes one)",
		Subcommands: []*cli.Command{{
			Name:  "serve",
			Usage: "join the mesh as a proxy and serve <node>.DOMAIN to browsers (foreground)",
			Description: `On first start, enrolls with a proxy token (meshctl token create --role proxy;
an ordinary node token is refused, since a proxy sees every service) and keeps
its identity in --state-dir. Then it runs its own WireGuard endpoint on a
userspace network stack (or, with --tun as root, on a kernel TUN interface,
which moves large responses faster) and routes browsers:

  http://pi1.DOMAIN/          → pi1's default service (the one named web, else the first)
  http://ssh--pi1.DOMAIN/     → pi1's service "ssh"   (one label: one wildcard certificate covers all)

Private services (the default) answer with a sign-in page; public ones
(--expose web=…,public on the node) are served directly.

Example:
  meshctl proxy serve --coordinator https://10.0.0.5:7443 --token meshctl-enroll-… \
    --ca-pin sha256:… --domain mesh.example.com --http :8080`,
			Flags: append(append([]cli.Flag{
				&cli.StringFlag{Name: "coordinator", EnvVars: env("coordinator"), Usage: "coordinator URL (first start only)"},
				&cli.StringFlag{Name: "token", EnvVars: env("token"), Usage: "proxy enrollment token (first start only)"},
				&cli.StringFlag{Name: "token-file", EnvVars: env("token-file"), Usage: "read the token from this file"},
				&cli.StringFlag{Name: "ca-pin", EnvVars: env("ca-pin"), Usage: "the coordinator CA's pin (first start only)"},
				&cli.StringFlag{Name: "name", EnvVars: env("name"), Usage: "the proxy's name in the mesh (first start only; default proxy-HOSTNAME)"},
				&cli.StringFlag{Name: "state-dir", Value: "/var/lib/meshctl-proxy", EnvVars: env("state-dir"), Usage: "the proxy's state dir"},
				&cli.StringFlag{Name: "ssh-listen", Value: ":2222", EnvVars: env("ssh-listen"), Usage: "SSH server: the relay for nodes with no direct path to each other, and the reverse-tunnel fallback for nodes whose UDP is blocked (\"\" = off: neither)"},
				&cli.StringSliceFlag{Name: "ssh-host", EnvVars: env("ssh-host"), Usage: "a name or address nodes use to reach the SSH fallback; its host certificate names it (repeatable; default: the --ssh-listen host, localhost and 127.0.0.1)"},
			}, proxyFlags()...), logFlags()...),
			Action: runProxyServe,
		}},
	}
}

func runProxyServe(c *cli.Context) error {
	if err := noArgs(c); err != nil {
		return err
	}
	log, err := newLogger(c)
	if err != nil {
		return err
	}
	dir := c.String("state-dir")
	if _, err := node.LoadState(dir); errors.Is(err, node.ErrNotEnrolled) {
		token, err := tokenFromFlags(c)
		if err != nil {
			return err
		}
		if token == "" {
			return usageError("%s is not enrolled yet: pass --coordinator, --token (from meshctl token create --role proxy) and --ca-pin", dir)
		}
		name := c.String("name")
		if name == "" {
			host, err := defaultNodeName()
			if err != nil {
				return err
			}
			name = "proxy-" + host
			if len(name) > 63 {
				name = strings.TrimRight(name[:63], "-")
			}
		}
		st, _, err := node.Enroll(c.Context, node.EnrollOptions{
			Coordinator: c.String("coordinator"), Token: token, CAPin: c.String("ca-pin"),
			Name: name, StateDir: dir, Role: wire.RoleProxy,
		})
		if err != nil {
			return err
		}
		fmt.Fprintf(c.App.Writer, "Enrolled as proxy %q (%s) with %s\n", st.Name, st.IPv4, st.Coordinator)
	} else if err != nil {
		return err
	}
	var sshOpts *proxy.SSHOptions
	if l := c.String("ssh-listen"); l != "" {
		if sshOpts, err = standaloneSSH(c, dir, l); err != nil {
			return err
		}
	}
	px, err := startProxy(c, dir, "", nil, sshOpts, log)
	if err != nil {
		return err
	}
	defer px.Close()
	return waitForSignal(c, log, px.Agent())
}

// startProxy builds and starts the proxy whose identity is in dir.
// coordinator overrides the saved coordinator URL when set.
// localTLS, when set, is a certificate from the coordinator CA
// (all-in-one server with --tls-local).
func startProxy(c *cli.Context, dir, coordinator string, localTLS *tls.Config, sshOpts *proxy.SSHOptions, log *slog.Logger) (*proxy.Proxy, error) {
	port, err := udpPort(c.String("wg-listen"))
	if err != nil {
		return nil, err
	}
	tlsConf := localTLS
	if cert, key := c.String("tls-cert"), c.String("tls-key"); cert != "" || key != "" {
		if tlsConf != nil {
			return nil, usageError("--tls-cert and --tls-local exclude each other")
		}
		if tlsConf, err = loadTLS(cert, key); err != nil {
			return nil, err
		}
	}
	var acme *proxy.ACME
	if c.Bool("acme") {
		if tlsConf != nil {
			return nil, usageError("--acme excludes --tls-cert and --tls-local")
		}
		acme = &proxy.ACME{Directory: c.String("acme-directory"), Email: c.String("acme-email"), CacheDir: filepath.Join(dir, "acme")}
	}
	px, err := proxy.New(proxy.Options{
		Domain:  c.String("domain"),
		HTTP:    c.String("http"),
		HTTPS:   c.String("https"),
		TLS:     tlsConf,
		ACME:    acme,
		SSH:     sshOpts,
		Metrics: c.String("metrics"),
		Agent:   node.AgentOptions{StateDir: dir, ListenPort: port, Coordinator: coordinator, TUN: c.String("tun")},
		Logger:  log,
	})
	if err != nil {
		return nil, err
	}
	if err := px.Start(); err != nil {
		return nil, err
	}
	w := c.App.Writer
	for _, a := range px.Addrs() {
		fmt.Fprintf(w, "  proxy:        %s → http://NODE.%s%s/\n", a, c.String("domain"), portSuffix(a))
	}
	fmt.Fprintf(w, "  WireGuard:    UDP %d (nodes behind NAT keep alive to it)\n", port)
	if a := px.SSHAddr(); a != nil {
		fmt.Fprintf(w, "  SSH:          %s (the relay between nodes behind NATs, and the fallback for nodes whose UDP is blocked)\n", a)
	}
	return px, nil
}

func portSuffix(a net.Addr) string {
	if ta, ok := a.(*net.TCPAddr); ok && ta.Port != 80 && ta.Port != 443 {
		return ":" + strconv.Itoa(ta.Port)
	}
	return ""
}

func udpPort(addr string) (int, error) {
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		return 0, usageError("--wg-listen %q must be [HOST]:PORT, e.g. :51820", addr)
	}
	port, err := strconv.Atoi(p)
	if err != nil || port < 0 || port > 65535 {
		return 0, usageError("--wg-listen port %q is not 0-65535", p)
	}
	return port, nil
}

func loadTLS(certFile, keyFile string) (*tls.Config, error) {
	if certFile == "" || keyFile == "" {
		return nil, usageError("--tls-cert and --tls-key go together")
	}
	st, err := os.Stat(keyFile)
	if err != nil {
		return nil, fmt.Errorf("--tls-key: %w", err)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("--tls-key %s has mode %04o: a key file must be readable by its owner only; fix it with: chmod 600 %s", keyFile, st.Mode().Perm(), keyFile)
	}
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("TLS certificate: %w", err)
	}
	return &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{cert}, NextProtos: []string{"h2", "http/1.1"}}, nil
}

// waitForSignal blocks until SIGINT/SIGTERM, or until the agent stops on
// its own (revoked: exit 3; certificate beyond renewal: exit 4).
func waitForSignal(c *cli.Context, log *slog.Logger, a *node.Agent) error {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sig)
	sdNotify("READY=1")
	ctx, cancel := signalContext(c, sig, log)
	defer cancel()
	err := a.Wait(ctx)
	sdNotify("STOPPING=1")
	switch {
	case errors.Is(err, node.ErrRevoked):
		return cli.Exit(fmt.Sprintf("%v\nThis member is no longer part of the mesh; enroll it again with a new token if that was a mistake.", err), ExitRevoked)
	case errors.Is(err, node.ErrCertificateExpired):
		return cli.Exit(err.Error(), ExitReenroll)
	}
	return err
}

// tokenFromFlags reads --token or --token-file (an exported MESHCTL_TOKEN
// yields to an explicit --token-file).
func tokenFromFlags(c *cli.Context) (string, error) {
	token := c.String("token")
	if f := c.String("token-file"); f != "" {
		if token != "" && token != os.Getenv("MESHCTL_TOKEN") {
			return "", usageError("--token and --token-file exclude each other")
		}
		b, err := readSecretFile(f)
		if err != nil {
			return "", fmt.Errorf("token file: %w", err)
		}
		token = b
	}
	return token, nil
}

// proxyStateDir is where the all-in-one server keeps its proxy's identity.
func proxyStateDir(dataDir string) string { return filepath.Join(dataDir, "proxy") }

// standaloneSSH prepares a standalone proxy's SSH fallback: a host key kept
// in its state dir, certified at every start by the coordinator (the proxy
// asks over its mTLS identity), and the coordinator's SSH CA, from
// enrollment, to check nodes' certificates.
func standaloneSSH(c *cli.Context, dir, listen string) (*proxy.SSHOptions, error) {
	host, _, err := net.SplitHostPort(listen)
	if err != nil {
		return nil, usageError("--ssh-listen %q must be [HOST]:PORT, e.g. :2222", listen)
	}
	principals := fieldsOf(c.StringSlice("ssh-host"))
	if len(principals) == 0 {
		principals = []string{"localhost", "127.0.0.1"}
		if host != "" && host != "0.0.0.0" && host != "::" {
			principals = append(principals, host)
		}
	}
	st, err := node.LoadState(dir)
	if err != nil {
		return nil, err
	}
	if st.SSHCA == "" {
		return nil, fmt.Errorf("%s has no SSH CA (enrolled before the SSH fallback existed): enroll the proxy again, or pass --ssh-listen \"\"", dir)
	}
	userCA, _, _, _, err := ssh.ParseAuthorizedKey([]byte(st.SSHCA))
	if err != nil {
		return nil, fmt.Errorf("ssh_ca in %s: %w", dir, err)
	}
	hostKey, err := pki.LoadOrCreateSSHKey(filepath.Join(dir, "ssh_host_ed25519_key"))
	if err != nil {
		return nil, fmt.Errorf("SSH host key: %w", err)
	}
	cl, err := node.NewClient(dir)
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	resp, err := cl.RequestSSHHostCert(c.Context, wire.SSHHostCertRequest{
		HostKey: string(ssh.MarshalAuthorizedKey(hostKey.PublicKey())), Principals: principals,
	})
	if err != nil {
		return nil, fmt.Errorf("certify the SSH host key with the coordinator: %w", err)
	}
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(resp.Certificate))
	if err != nil {
		return nil, fmt.Errorf("SSH host certificate: %w", err)
	}
	cert, ok := pub.(*ssh.Certificate)
	if !ok {
		return nil, errors.New("coordinator sent no SSH host certificate")
	}
	signer, err := ssh.NewCertSigner(cert, hostKey)
	if err != nil {
		return nil, err
	}
	return &proxy.SSHOptions{Listen: listen, HostSigner: signer, UserCA: userCA}, nil
}
