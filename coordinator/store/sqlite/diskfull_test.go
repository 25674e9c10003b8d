package sqlite

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/meshctl/meshctl/coordinator/store"
	"github.com/meshctl/meshctl/internal/netnstest"
)

// TestDiskFull: on a full file system a write fails with ErrDiskFull,
// naming the database file, and writes nothing; the store works again
// once there is space, and the database is intact. The database is on a
// small tmpfs the test mounts (root only; cmd/meshctl's
// TestCoordinatorDiskFull runs the whole server so).
func TestDiskFull(t *testing.T) {
	if os.Geteuid() != 0 {
		netnstest.SkipOrFail(t, "mounting a tmpfs needs root")
	}
	dir := filepath.Join(t.TempDir(), "fs")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", dir).CombinedOutput(); err != nil {
		netnstest.SkipOrFail(t, "mount a tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount: %v: %s", err, out)
		}
	})
	path := filepath.Join(dir, "meshctl.db")
	s := openT(t, path) // closed before the umount (cleanups run last first)
	ctx := t.Context()

	// Fill the file system to the last byte.
	filler := filepath.Join(dir, "filler")
	f, err := os.Create(filler)
	if err != nil {
		t.Fatal(err)
	}
	for _, chunk := range []int{1 << 16, 512} {
		for range 1 << 12 {
			if _, err := f.Write(make([]byte, chunk)); errors.Is(err, syscall.ENOSPC) {
				break
			} else if err != nil {
				t.Fatal(err)
			}
		}
	}
	f.Close()

	// Writes until one fails: the WAL may still have room at first.
	value := strings.Repeat("x", 32<<10)
	var failed string
	for i := range 200 {
		key := "k" + strconv.Itoa(i)
		_, err := s.SetMetaIfAbsent(ctx, key, value)
		if err == nil {
			continue
		}
		if !errors.Is(err, store.ErrDiskFull) || !strings.Contains(err.Error(), "no space left on the disk holding "+path) {
			t.Fatalf("write on a full disk: %v, want ErrDiskFull naming %s", err, path)
		}
		failed = key
		break
	}
	if failed == "" {
		t.Fatal("200 writes of 32 KiB succeeded on a full 4 MiB file system")
	}
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	// Nothing of the failed write was kept: the key is still free.
	if got, err := s.SetMetaIfAbsent(ctx, failed, "after"); err != nil || got != "after" {
		t.Fatalf("after space returned: %q, %v", got, err)
	}
	var ok string
	if err := s.writer.QueryRowContext(ctx, `PRAGMA integrity_check`).Scan(&ok); err != nil || ok != "ok" {
		t.Fatalf("integrity_check: %q, %v", ok, err)
	}
}
