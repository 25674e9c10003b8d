package privsock

import (
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
)

// TestConcurrentListensAreAllPrivate creates sockets from many goroutines
// at once under a permissive umask: every one must be 0600, and the
// process's umask must be what it was.
func TestConcurrentListensAreAllPrivate(t *testing.T) {
	old := syscall.Umask(0o002)
	defer syscall.Umask(old)
	dir := t.TempDir()
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for i := range 64 {
		wg.Go(func() {
			path := filepath.Join(dir, fmt.Sprintf("s%d.sock", i))
			ln, err := Listen(path)
			if err != nil {
				errs <- err
				return
			}
			defer ln.Close()
			fi, err := os.Stat(path)
			if err != nil {
				errs <- err
				return
			}
			if m := fi.Mode().Perm(); m != 0o600 {
				errs <- fmt.Errorf("%s is %o, want 600", path, m)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if got := syscall.Umask(0o002); got != 0o002 {
		t.Errorf("umask after the listens is %o, want 002 restored", got)
	}
}
