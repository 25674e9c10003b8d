package pki

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// WriteFileAtomic writes data to path so that a reader (or a crash) sees
// either the old content or the new, never a torn file: it writes a temp file
// in the same directory with perm, fsyncs it, renames it over path and fsyncs
// the directory.
//
// The temp file has one name per path (".NAME.tmp") and is flock'ed while
// in use, so concurrent writers (goroutines or processes) take turns, and a
// writer killed mid-write leaves at most that one file behind, which the
// next write reuses. Random temp names would pile up with every crash, each
// a stray copy of what may be a secret.
func WriteFileAtomic(path string, data []byte, perm fs.FileMode) (err error) {
	dir := filepath.Dir(path)
	tmp := filepath.Join(dir, "."+filepath.Base(path)+".tmp")
	f, err := lockedTemp(tmp)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	defer f.Close() // after the rename: closing releases the lock
	renamed := false
	defer func() {
		if err != nil && !renamed {
			os.Remove(tmp) // ours while we hold the lock; frees the space on ENOSPC
		}
	}()
	if err = f.Truncate(0); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = f.Chmod(perm); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err = f.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = f.Sync(); err != nil {
		return fmt.Errorf("write %s: sync: %w", path, err)
	}
	if err = os.Rename(tmp, path); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	renamed = true
	removeOldTemps(dir, filepath.Base(path))
	return syncDir(dir)
}

// removeOldTemps removes the temp files that versions before the locked
// ".NAME.tmp" left behind when killed mid-write: ".NAME.tmp-" and the
// random digits os.CreateTemp chose, each a stray copy of what may be a
// secret. Best effort: a file that cannot be removed stays.
func removeOldTemps(dir, base string) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	prefix := "." + base + ".tmp-"
	for _, e := range entries {
		digits, ok := strings.CutPrefix(e.Name(), prefix)
		if ok && digits != "" && strings.Trim(digits, "0123456789") == "" && e.Type().IsRegular() {
			os.Remove(filepath.Join(dir, e.Name()))
		}
	}
}

// lockedTemp opens (creating it 0600 if needed) the temp file tmp and
// takes an exclusive flock on it. A writer that held the lock before us
// has renamed or removed the file we opened; then it starts over with
// the file now at tmp.
func lockedTemp(tmp string) (*os.File, error) {
	for range 1000 {
		f, err := os.OpenFile(tmp, os.O_RDWR|os.O_CREATE|syscall.O_NOFOLLOW, 0o600)
		if err != nil {
			return nil, err
		}
		for {
			err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX)
			if err != syscall.EINTR {
				break
			}
		}
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", tmp, err)
		}
		fi, err1 := f.Stat()
		li, err2 := os.Lstat(tmp)
		if err1 == nil && err2 == nil && os.SameFile(fi, li) {
			return f, nil
		}
		f.Close()
	}
	return nil, fmt.Errorf("lock %s: it keeps being replaced", tmp)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync dir %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync dir %s: %w", dir, err)
	}
	return nil
}

// ErrInsecurePermissions is returned when a secret file or directory is
// readable by group or others.
var ErrInsecurePermissions = errors.New("insecure permissions")

// ReadPrivateFile reads a file holding a secret after checking that only its
// owner can read it. A file readable by group or others is refused with a
// message that says how to fix it; it is never used.
func ReadPrivateFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%s has mode %04o: %w: a key file must be readable by its owner only; fix it with: chmod 600 %s",
			path, st.Mode().Perm(), ErrInsecurePermissions, path)
	}
	return readAll(f, st.Size())
}

func readAll(f *os.File, size int64) ([]byte, error) {
	const max = 1 << 20
	if size > max {
		return nil, fmt.Errorf("%s is %d bytes, larger than any file meshctl writes: is it the right file?", f.Name(), size)
	}
	return io.ReadAll(io.LimitReader(f, max))
}

// EnsurePrivateDir creates dir with mode 0700 (and parents with 0755), or,
// if it exists, tightens its mode to 0700. It refuses a path that exists and
// is not a directory.
func EnsurePrivateDir(dir string) error {
	st, err := os.Stat(dir)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if err := os.MkdirAll(filepath.Dir(dir), 0o755); err != nil {
			return fmt.Errorf("create %s: %w", filepath.Dir(dir), err)
		}
		if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("create %s: %w", dir, err)
		}
		return os.Chmod(dir, 0o700) // umask may have narrowed it; never widened
	case err != nil:
		return fmt.Errorf("state directory %s: %w", dir, err)
	case !st.IsDir():
		return fmt.Errorf("state directory %s exists but is not a directory", dir)
	case st.Mode().Perm() != 0o700:
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("state directory %s has mode %04o and cannot be tightened to 0700: %w", dir, st.Mode().Perm(), err)
		}
	}
	return nil
}

// ErrLocked means another process holds a directory's lock.
var ErrLocked = errors.New("directory locked by another process")

// LockDir takes an exclusive, non-blocking flock on DIR/lock, held until
// the returned file is closed (or the process dies). It returns ErrLocked
// when another process holds it.
func LockDir(dir string) (*os.File, error) {
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, ErrLocked
		}
		return nil, fmt.Errorf("lock %s: %w", dir, err)
	}
	return f, nil
}
