// Package privsock creates Unix sockets that only their owner can connect
// to: the coordinator's admin socket, the agent's control socket and its
// WireGuard UAPI socket.
package privsock

import (
	"net"
	"os"
	"sync"
	"syscall"
)

// umaskMu serialises the umask changes: the umask belongs to the process,
// and `meshctl server` creates the coordinator's admin socket and its
// embedded proxy agent's sockets at the same time, so two unserialised
// changes could restore each other's and leave a socket created with the
// process's normal umask.
var umaskMu sync.Mutex

// Listen listens on a Unix socket at path, created 0600 with no moment of
// wider access (the umask is 0177 while it is made).
func Listen(path string) (net.Listener, error) {
	umaskMu.Lock()
	old := syscall.Umask(0o177)
	ln, err := net.Listen("unix", path)
	syscall.Umask(old)
	umaskMu.Unlock()
	if err != nil {
		return nil, err
	}
	if err := os.Chmod(path, 0o600); err != nil { // whatever the umask was
		ln.Close()
		return nil, err
	}
	return ln, nil
}
