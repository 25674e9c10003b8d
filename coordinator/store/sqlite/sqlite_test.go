package sqlite

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
	"github.com/meshctl/meshctl/coordinator/store/storetest"
)

func openT(t *testing.T, path string) *Store {
	t.Helper()
	s, err := Open(path, Options{})
	if err != nil {
		t.Fatalf("Open(%s): %v", path, err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

func TestConformance(t *testing.T) {
	storetest.Run(t, func(t *testing.T, dir string) store.Store {
		return openT(t, filepath.Join(dir, "meshctl.db"))
	})
}

func TestFileMode(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meshctl.db")
	s := openT(t, path)
	ctx := t.Context()
	// Write something so the WAL file exists.
	if _, err := s.SetMetaIfAbsent(ctx, "k", "v"); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{path, path + "-wal", path + "-shm"} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatalf("stat: %v", err)
		}
		if m := fi.Mode().Perm(); m != 0o600 {
			t.Errorf("%s has mode %v, want 0600", filepath.Base(p), m)
		}
	}
}

func TestExistingFileModeWarning(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meshctl.db")
	openT(t, path).Close()
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	s, err := Open(path, Options{Logger: slog.New(slog.NewTextHandler(&buf, nil))})
	if err != nil {
		t.Fatal(err)
	}
	s.Close()
	if !strings.Contains(buf.String(), "chmod 600") {
		t.Errorf("no warning about a world-readable database; log: %q", buf.String())
	}
}

func TestPragmas(t *testing.T) {
	s := openT(t, filepath.Join(t.TempDir(), "meshctl.db"))
	ctx := t.Context()
	want := map[string]string{
		"journal_mode": "wal",
		"foreign_keys": "1",
		"synchronous":  "2", // FULL
		"busy_timeout": "10000",
	}
	for _, c := range []struct {
		name string
		db   queryRower
	}{{"writer", s.writer}, {"reader", s.reader}} {
		for pragma, w := range want {
			var got string
			if err := c.db.QueryRowContext(ctx, "PRAGMA "+pragma).Scan(&got); err != nil {
				t.Fatalf("%s: PRAGMA %s: %v", c.name, pragma, err)
			}
			if got != w {
				t.Errorf("%s: PRAGMA %s = %s, want %s", c.name, pragma, got, w)
			}
		}
	}
	// Inside a write transaction too (the connection is the same, but check
	// that transactions do not lose the settings).
	err := s.write(ctx, func(tx *sql.Tx) error {
		var fk int
		if err := tx.QueryRowContext(ctx, "PRAGMA foreign_keys").Scan(&fk); err != nil {
			return err
		}
		if fk != 1 {
			t.Errorf("foreign_keys in a write transaction = %d", fk)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// The reader pool is read-only.
	if _, err := s.reader.ExecContext(ctx, `INSERT INTO meta (key, value) VALUES ('x', 'y')`); err == nil {
		t.Error("write through the reader pool succeeded")
	}
}

func TestForeignKeysEnforced(t *testing.T) {
	s := openT(t, filepath.Join(t.TempDir(), "meshctl.db"))
	_, err := s.writer.ExecContext(t.Context(), `INSERT INTO nodes (id, name, role, ipv4, ipv6, wg_key, token_id, created)
		VALUES ('n', 'n', 'node', '10.0.0.1', 'fd00::a00:1', 'k', 'no-such-token', 1)`)
	if err == nil {
		t.Error("node with an unknown token_id inserted; foreign keys not enforced")
	}
}

func TestAuditAppendOnly(t *testing.T) {
	s := openT(t, filepath.Join(t.TempDir(), "meshctl.db"))
	ctx := t.Context()
	if err := s.Audit(ctx, store.AuditEntry{Time: time.Unix(1, 0), Actor: "a", Action: "x"}); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{`UPDATE audit SET actor = 'b'`, `DELETE FROM audit`} {
		if _, err := s.writer.ExecContext(ctx, q); err == nil || !strings.Contains(err.Error(), "append-only") {
			t.Errorf("%s: %v, want append-only error", q, err)
		}
	}
}

func TestFutureSchemaRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meshctl.db")
	s := openT(t, path)
	migs, err := loadMigrations()
	if err != nil {
		t.Fatal(err)
	}
	known := len(migs)
	if _, err := s.writer.ExecContext(t.Context(),
		`INSERT INTO schema_migrations (version, name, applied) VALUES (?, 'from-the-future.sql', 0)`, known+5); err != nil {
		t.Fatal(err)
	}
	s.Close()

	_, err = Open(path, Options{})
	if err == nil {
		t.Fatal("Open of a database from a newer meshctl succeeded")
	}
	want := "database schema version " + strconv.Itoa(known+5) + " is newer than this meshctl (knows " + strconv.Itoa(known) + "); upgrade meshctl"
	if !strings.Contains(err.Error(), want) {
		t.Errorf("error %q does not contain %q", err, want)
	}
}

func TestReopenKeepsVersion(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meshctl.db")
	openT(t, path).Close()
	s := openT(t, path)
	var n, maxV int
	if err := s.reader.QueryRowContext(t.Context(), `SELECT count(*), max(version) FROM schema_migrations`).Scan(&n, &maxV); err != nil {
		t.Fatal(err)
	}
	migs, _ := loadMigrations()
	if n != len(migs) || maxV != len(migs) {
		t.Errorf("schema_migrations has %d rows, max %d; want %d, %d", n, maxV, len(migs), len(migs))
	}
}

func TestCorruptFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meshctl.db")
	garbage := bytes.Repeat([]byte("this is not a database, just some garbage bytes\n"), 200)
	if err := os.WriteFile(path, garbage, 0o600); err != nil {
		t.Fatal(err)
	}
	s, err := Open(path, Options{})
	if err == nil {
		s.Close()
		t.Fatal("Open of a garbage file succeeded")
	}
	if !strings.Contains(err.Error(), "is not a SQLite database") {
		t.Errorf("error %q does not say the file is not a database", err)
	}
	if got, _ := os.ReadFile(path); !bytes.Equal(got, garbage) {
		t.Error("Open modified the garbage file")
	}
}

func TestForeignDatabaseRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "other.db")
	s := openT(t, path)
	if _, err := s.writer.ExecContext(t.Context(), `DROP TABLE schema_migrations`); err != nil {
		t.Fatal(err)
	}
	s.Close()
	_, err := Open(path, Options{})
	if err == nil || !strings.Contains(err.Error(), "not a meshctl one") {
		t.Errorf("Open of a non-meshctl SQLite database: %v", err)
	}
}

func TestBadPaths(t *testing.T) {
	dir := t.TempDir()
	for _, p := range []string{"", ":memory:", "file:x.db", filepath.Join(dir, "a?b.db"), filepath.Join(dir, "missing", "x.db"), dir} {
		if s, err := Open(p, Options{}); err == nil {
			s.Close()
			t.Errorf("Open(%q) succeeded", p)
		}
	}
}

func TestCloseIdempotent(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "meshctl.db"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if _, err := s.ListNodes(context.Background()); err == nil {
		t.Error("ListNodes after Close succeeded")
	}
}

func TestEnrollRejectsBadParams(t *testing.T) {
	s := openT(t, filepath.Join(t.TempDir(), "meshctl.db"))
	if _, err := s.Enroll(t.Context(), store.EnrollParams{}); err == nil || errors.Is(err, store.ErrTokenInvalid) {
		t.Errorf("Enroll(zero params) = %v, want a parameter error", err)
	}
}

// TestWriteTransactionsAreImmediate checks that a write transaction holds
// the database's write lock from BEGIN, so it can never fail later with
// SQLITE_BUSY when upgrading a read lock.
func TestWriteTransactionsAreImmediate(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meshctl.db")
	s := openT(t, path)
	other, err := sql.Open("sqlite", path+"?_pragma=busy_timeout(0)")
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	ctx := t.Context()
	err = s.write(ctx, func(tx *sql.Tx) error {
		// Nothing written yet in this transaction.
		_, err := other.ExecContext(ctx, `INSERT INTO meta (key, value) VALUES ('x', 'y')`)
		if err == nil || !strings.Contains(err.Error(), "locked") {
			t.Errorf("write from another connection during a write transaction: %v, want database locked", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := other.ExecContext(ctx, `INSERT INTO meta (key, value) VALUES ('x', 'y')`); err != nil {
		t.Errorf("write after the transaction: %v", err)
	}
}
