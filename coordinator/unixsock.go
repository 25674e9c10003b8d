package coordinator

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"syscall"

	"github.com/meshctl/meshctl/pki"

	"github.com/meshctl/meshctl/internal/privsock"
)

// lockDir takes the data dir's lock so that two coordinators never share
// one data dir (and one SQLite file, and one admin socket).
func lockDir(dir string) (*os.File, error) {
	f, err := pki.LockDir(dir)
	if errors.Is(err, pki.ErrLocked) {
		return nil, fmt.Errorf("another meshctl server is already running with data dir %s (stop it first, or use another --data-dir)", dir)
	}
	return f, err
}

// listenUnixPrivate listens on a Unix socket that only the owner can use
// (0600). A stale socket file from an earlier run is replaced; the data-dir
// lock guarantees that no live server owns it.
func listenUnixPrivate(path string) (net.Listener, error) {
	if len(path) >= 108 {
		return nil, fmt.Errorf("socket path %s is %d bytes; Unix sockets allow at most 107: use a shorter --data-dir", path, len(path))
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, err
	}
	// Created with no group/other bits from the start, so there is no
	// window in which someone else could connect.
	return privsock.Listen(path)
}

type peerCredKey struct{}

// peerCred is the identity of the process on the other end of an admin
// socket connection, as the kernel reports it.
type peerCred struct {
	uid, pid int
	ok       bool
}

// withPeerCred records the peer's credentials in the connection context.
func withPeerCred(ctx context.Context, c net.Conn) context.Context {
	uc, ok := c.(*net.UnixConn)
	if !ok {
		return ctx
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		return ctx
	}
	var cred *syscall.Ucred
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = syscall.GetsockoptUcred(int(fd), syscall.SOL_SOCKET, syscall.SO_PEERCRED)
	}); err != nil || credErr != nil {
		return ctx
	}
	return context.WithValue(ctx, peerCredKey{}, peerCred{uid: int(cred.Uid), pid: int(cred.Pid), ok: true})
}

func peerCredFrom(ctx context.Context) peerCred {
	pc, _ := ctx.Value(peerCredKey{}).(peerCred)
	return pc
}
