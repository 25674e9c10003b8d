package node

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"syscall"
)

// SystemUAPIDir is where wireguard-tools' `wg` looks for userspace devices.
const SystemUAPIDir = "/var/run/wireguard"

// startUAPI exposes the device's UAPI on a Unix socket so that the stock
// `wg show IFNAME` works: in /var/run/wireguard when that is writable
// (root), else in the state dir (read with `meshctl wg show`).
func (a *Agent) startUAPI() error {
	dir := a.opts.UAPIDir
	if dir == "" {
		dir = SystemUAPIDir
		if os.MkdirAll(dir, 0o755) != nil || syscall.Access(dir, 2 /* W_OK */) != nil {
			dir = a.opts.StateDir
		}
	}
	path := filepath.Join(dir, a.ifname+".sock")
	if dir == a.opts.StateDir {
		path = filepath.Join(dir, "wg.sock")
	}
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		a.log.Warn("a WireGuard device with this name is already running; UAPI socket in the state dir instead", "name", a.ifname)
		path = filepath.Join(a.opts.StateDir, "wg.sock")
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	ln, err := listenPrivateUnix(path)
	if err != nil {
		return fmt.Errorf("WireGuard UAPI socket: %w", err)
	}
	a.uapiLn, a.uapiPath = ln, path
	a.goLoop(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go a.dev.IpcHandle(c)
		}
	})
	return nil
}
