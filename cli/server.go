package cli

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"syscall"

	"github.com/meshctl/meshctl/coordinator"
	"github.com/urfave/cli/v2"
)

func serverCommand() *cli.Command {
	return &cli.Command{
		Name:  "server",
		Usage: "run the coordinator (enrollment, addresses, netmaps, revocation) in the foreground",
		Description: `Runs the coordinator with its state in --data-dir (SQLite, the CA, the SSH CA,
the API certificate, the admin socket). Everything is created on first start.

Devices must reach the API at --public-host (a name or address, optionally
host:port); it goes into every enroll line and into the API's certificate.

Example:
  meshctl server --data-dir ./data --listen 127.0.0.1:7443 --public-host 127.0.0.1
  meshctl token create --data-dir ./data      # in another terminal`,
		Flags: append([]cli.Flag{
			dataDirFlag(),
			&cli.StringFlag{Name: "listen", Value: coordinator.DefaultListen, EnvVars: env("listen"), Usage: "address the coordinator API listens on (HTTPS)"},
			&cli.StringFlag{Name: "public-host", EnvVars: env("public-host"),
				Usage: "host name or address devices use to reach the API (default: this machine's first LAN IPv4 address)"},
			&cli.StringFlag{Name: "cidr", Value: coordinator.DefaultIPv4Pool.String(), EnvVars: env("cidr"), Usage: "IPv4 pool for overlay addresses"},
			&cli.DurationFlag{Name: "quarantine", Value: coordinator.DefaultQuarantine, EnvVars: env("quarantine"), Usage: "how long a revoked node's addresses are held back before reuse"},
			&cli.DurationFlag{Name: "cert-ttl", Value: coordinator.DefaultCertValidity, EnvVars: env("cert-ttl"), Usage: "lifetime of node client certificates (nodes renew them automatically)"},
		}, logFlags()...),
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
	dir := c.String("data-dir")
	srv, err := coordinator.New(coordinator.Options{
		DataDir:      dir,
		Listen:       c.String("listen"),
		PublicHost:   c.String("public-host"),
		IPv4Pool:     pool,
		Quarantine:   c.Duration("quarantine"),
		CertValidity: c.Duration("cert-ttl"),
		Version:      version(),
		Logger:       log,
	})
	if err != nil {
		return err
	}
	if err := srv.Start(); err != nil {
		srv.Close()
		return err
	}
	w := c.App.Writer
	fmt.Fprintf(w, "meshctl %s coordinator running\n", version())
	fmt.Fprintf(w, "  API:          %s (listening on %s)\n", srv.URL(), srv.Addr())
	fmt.Fprintf(w, "  CA pin:       %s\n", srv.CAPin())
	fmt.Fprintf(w, "  data dir:     %s\n", dir)
	fmt.Fprintf(w, "  admin socket: %s\n\n", srv.AdminSocket())
	fmt.Fprintf(w, "Enroll a device: run `meshctl token create --data-dir %s` here,\nthen the printed `meshctl enroll …` line on the device.\n", dir)
	if c.String("public-host") == "" {
		fmt.Fprintf(w, "Devices must reach %s; if they cannot, restart with --public-host NAME-OR-ADDRESS.\n", srv.URL())
	}

	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sig)
	select {
	case s := <-sig:
		log.Info("shutting down", "signal", s.String())
	case <-c.Context.Done():
	}
	return srv.Close()
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
