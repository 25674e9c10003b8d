package cli

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
	"github.com/urfave/cli/v2"
)

// DefaultDataDir is the server's data dir, which admin commands also use
// to find its admin socket.
const DefaultDataDir = "/var/lib/meshctl-server"

const adminSocketName = "admin.sock"

func dataDirFlag() cli.Flag {
	return &cli.StringFlag{Name: "data-dir", Value: DefaultDataDir, EnvVars: env("data-dir"),
		Usage: "the server's data dir; admin commands reach the server through its admin socket there"}
}

// adminFlags are shared by every admin command.
func adminFlags() []cli.Flag {
	return []cli.Flag{
		dataDirFlag(),
		&cli.StringFlag{Name: "coordinator", EnvVars: env("coordinator"),
			Usage: "administer a remote coordinator at this https:// URL instead of the local socket (needs an admin key)"},
		&cli.StringFlag{Name: "ca-pin", EnvVars: env("ca-pin"),
			Usage: "with --coordinator: the coordinator's CA pin (sha256:…), unless it has a publicly trusted certificate"},
		&cli.StringFlag{Name: "admin-key-file", EnvVars: env("admin-key-file"),
			Usage: "with --coordinator: file holding the admin key (or set MESHCTL_ADMIN_KEY)"},
	}
}

// adminClient calls the admin API, over the local socket or remotely.
type adminClient struct {
	hc     *http.Client
	base   string
	header http.Header
	where  string // for messages
}

func newAdminClient(c *cli.Context) (*adminClient, error) {
	if coord := c.String("coordinator"); coord != "" {
		return newRemoteAdminClient(c, coord)
	}
	dir := c.String("data-dir")
	sock := filepath.Join(dir, adminSocketName)
	if _, err := os.Stat(sock); err != nil {
		if errors.Is(err, fs.ErrPermission) {
			return nil, fmt.Errorf("cannot open %s: permission denied; run this as the server's user or root (e.g. with sudo)", dir)
		}
		return nil, fmt.Errorf("no meshctl server is running with data dir %s (no %s there): start one with `meshctl server --data-dir %s`, "+
			"or point --data-dir at the server's data dir", dir, adminSocketName, dir)
	}
	tr := &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "unix", sock)
	}}
	return &adminClient{hc: &http.Client{Transport: tr, Timeout: 30 * time.Second}, base: "http://meshctl-admin", where: sock}, nil
}

func newRemoteAdminClient(c *cli.Context, coord string) (*adminClient, error) {
	base, err := node.ParseCoordinatorURL(coord)
	if err != nil {
		return nil, err
	}
	key := strings.TrimSpace(os.Getenv("MESHCTL_ADMIN_KEY"))
	if f := c.String("admin-key-file"); f != "" {
		b, err := pki.ReadPrivateFile(f)
		if err != nil {
			return nil, fmt.Errorf("admin key file: %w", err)
		}
		key = strings.TrimSpace(string(b))
	}
	if key == "" {
		return nil, errors.New("remote admin needs an admin key: set MESHCTL_ADMIN_KEY or --admin-key-file (create one on the server with `meshctl admin-key create`)")
	}
	tlsConf := &tls.Config{MinVersion: tls.VersionTLS12}
	if p := c.String("ca-pin"); p != "" {
		pin, err := pki.ParsePin(p)
		if err != nil {
			return nil, err
		}
		tlsConf = pki.PinnedTLSConfig(pin)
	}
	return &adminClient{
		hc:     &http.Client{Transport: &http.Transport{TLSClientConfig: tlsConf}, Timeout: 30 * time.Second},
		base:   base,
		header: http.Header{"Authorization": {"Bearer " + key}},
		where:  base,
	}, nil
}

func (a *adminClient) call(ctx context.Context, method, path string, in, out any) error {
	err := wire.Call(ctx, a.hc, method, a.base+path, a.header, in, out)
	if err == nil {
		return nil
	}
	var ae *wire.APIError
	if errors.As(err, &ae) {
		return ae
	}
	if errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("the server at %s is not running (connection refused); start it with `meshctl server`", a.where)
	}
	if errors.Is(err, syscall.EACCES) {
		return fmt.Errorf("cannot use %s: permission denied; run this as the server's user or root (e.g. with sudo)", a.where)
	}
	return fmt.Errorf("talk to %s: %w", a.where, err)
}

// revokeByID is the action of `token revoke`, `admin-key revoke` and
// `access-key revoke`: POST {id} to path; what names the thing in messages,
// list the command that lists them, done what happens once it is revoked.
func revokeByID(what, path, list, done string) cli.ActionFunc {
	return func(c *cli.Context) error {
		args, err := positional(c, "id")
		if err != nil {
			return err
		}
		ac, err := newAdminClient(c)
		if err != nil {
			return err
		}
		if err := ac.call(c.Context, "POST", path, wire.IDRequest{ID: args[0]}, nil); err != nil {
			if wire.IsCode(err, wire.CodeNotFound) {
				return fmt.Errorf("no %s with id %q (see %s)", what, args[0], list)
			}
			return err
		}
		fmt.Fprintf(c.App.Writer, "%s %s revoked%s\n", what, args[0], done)
		return nil
	}
}
