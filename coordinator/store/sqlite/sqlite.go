// Package sqlite is the SQLite backend of store.Store, built on the pure-Go
// driver modernc.org/sqlite.
//
// The database runs in WAL mode with synchronous=FULL, so a committed
// transaction survives a power cut. Writes go through a single connection
// (and BEGIN IMMEDIATE), so write transactions in this process queue instead
// of failing with SQLITE_BUSY; plain reads use a separate pool and never
// wait for writers.
package sqlite

import (
	"context"
	"database/sql"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/url"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"

	sqlite "modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

var _ store.Store = (*Store)(nil)

// Options configure Open.
type Options struct {
	// Logger receives migration and housekeeping messages; nil discards them.
	Logger *slog.Logger
}

// Store is a store.Store backed by one SQLite database file. It is safe for
// concurrent use.
type Store struct {
	path   string
	log    *slog.Logger
	writer *sql.DB // one connection: every write and every transaction that writes
	reader *sql.DB // pool for plain reads

	// Group commit of enrollments (enroll.go).
	enrollMu      sync.Mutex
	enrollQueue   []*enrollReq
	enrollRunning bool
	// addrIx indexes the held addresses (addrs.go); addrMu is held for the
	// whole of every transaction that uses it.
	addrMu sync.Mutex
	addrIx *addrIndex

	closeOnce sync.Once
	closeErr  error
}

// Pragmas set on every connection. busy_timeout matters for other processes
// (e.g. a backup tool) holding the lock; within this process the single
// writer connection serialises writes.
var pragmas = []string{
	"busy_timeout(10000)",
	"foreign_keys(ON)",
	"journal_mode(WAL)",
	"synchronous(FULL)",
}

//go:embed migrations/*.sql
var migrationFS embed.FS

// Open opens (creating if needed) the database at path and brings its schema
// up to date. It refuses a database written by a newer meshctl.
func Open(path string, opts Options) (*Store, error) {
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if path == "" {
		return nil, errors.New("sqlite: empty database path")
	}
	// The driver cuts the DSN at the first '?', and SQLite would read a
	// leading "file:" as a URI; refuse such names rather than open the
	// wrong file.
	if strings.ContainsRune(path, '?') || strings.HasPrefix(path, "file:") || path == ":memory:" {
		return nil, fmt.Errorf("sqlite: unsupported database path %q: it must be a plain file name without '?'", path)
	}
	migs, err := loadMigrations()
	if err != nil {
		return nil, err
	}
	if err := precreate(path, log); err != nil {
		return nil, err
	}

	s := &Store{path: path, log: log}
	s.writer, err = sql.Open("sqlite", dsn(path, true))
	if err != nil {
		return nil, fmt.Errorf("sqlite: open %s: %w", path, err)
	}
	s.writer.SetMaxOpenConns(1)
	s.writer.SetMaxIdleConns(1)

	ctx := context.Background()
	if err := s.writer.PingContext(ctx); err != nil {
		s.writer.Close()
		return nil, openError(path, err)
	}
	if err := s.migrate(ctx, migs); err != nil {
		s.writer.Close()
		return nil, openError(path, err)
	}

	s.reader, err = sql.Open("sqlite", dsn(path, false))
	if err != nil {
		s.writer.Close()
		return nil, fmt.Errorf("sqlite: open %s: %w", path, err)
	}
	n := max(4, runtime.GOMAXPROCS(0))
	s.reader.SetMaxOpenConns(n)
	s.reader.SetMaxIdleConns(n)
	if err := s.reader.PingContext(ctx); err != nil {
		s.writer.Close()
		s.reader.Close()
		return nil, openError(path, err)
	}
	return s, nil
}

// dsn builds the driver's connection string. The writer begins transactions
// with BEGIN IMMEDIATE, taking the write lock up front, so a transaction
// never has to upgrade a read lock (which can fail with SQLITE_BUSY). Reader
// connections are query_only.
func dsn(path string, writer bool) string {
	q := url.Values{}
	q["_pragma"] = slices.Clone(pragmas)
	if writer {
		q.Set("_txlock", "immediate")
	} else {
		q.Set("_query_only", "1")
	}
	return path + "?" + q.Encode()
}

// precreate creates the database file with mode 0600 if it does not exist:
// SQLite gives the -wal and -shm files the mode of the database file, and
// the database holds token and key hashes.
func precreate(path string, log *slog.Logger) error {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	switch {
	case err == nil:
		if err := f.Close(); err != nil {
			return fmt.Errorf("sqlite: create database file: %w", err)
		}
		return nil
	case errors.Is(err, fs.ErrExist):
		fi, err := os.Stat(path)
		if err != nil {
			return fmt.Errorf("sqlite: database file: %w", err)
		}
		if !fi.Mode().IsRegular() {
			return fmt.Errorf("sqlite: %s is not a regular file", path)
		}
		if fi.Mode().Perm()&0o077 != 0 {
			log.Warn("database file is accessible by other users; consider chmod 600",
				"path", path, "mode", fi.Mode().Perm().String())
		}
		return nil
	default:
		return fmt.Errorf("sqlite: create database file: %w", err)
	}
}

// openError turns driver errors met while opening into messages that say
// what is wrong with the file.
func openError(path string, err error) error {
	var se *sqlite.Error
	if errors.As(err, &se) {
		switch se.Code() & 0xff {
		case sqlite3.SQLITE_NOTADB:
			return fmt.Errorf("sqlite: %s is not a SQLite database (corrupt, or some other kind of file); restore it from a backup or move it away: %w", path, err)
		case sqlite3.SQLITE_CORRUPT:
			return fmt.Errorf("sqlite: database %s is corrupt; restore it from a backup: %w", path, err)
		case sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_READONLY:
			return fmt.Errorf("sqlite: cannot open %s for writing (check the directory exists and its permissions): %w", path, err)
		}
	}
	return fmt.Errorf("sqlite: open %s: %w", path, err)
}

// Close closes the database. It is safe to call more than once.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		var errs []error
		if s.reader != nil {
			errs = append(errs, s.reader.Close())
		}
		if s.writer != nil {
			errs = append(errs, s.writer.Close())
		}
		if err := errors.Join(errs...); err != nil {
			s.closeErr = fmt.Errorf("sqlite: close %s: %w", s.path, err)
		}
	})
	return s.closeErr
}

// migration is one embedded schema change.
type migration struct {
	version int
	name    string
	sql     string
}

// loadMigrations reads the embedded migrations, which must be numbered
// 0001, 0002, ... without gaps.
func loadMigrations() ([]migration, error) {
	entries, err := fs.ReadDir(migrationFS, "migrations")
	if err != nil {
		return nil, fmt.Errorf("sqlite: read embedded migrations: %w", err)
	}
	var migs []migration
	for _, e := range entries { // sorted by name
		num, _, ok := strings.Cut(e.Name(), "_")
		v, err := strconv.Atoi(num)
		if !ok || err != nil || v != len(migs)+1 {
			return nil, fmt.Errorf("sqlite: embedded migration %s is out of sequence (want %04d_*.sql)", e.Name(), len(migs)+1)
		}
		b, err := migrationFS.ReadFile("migrations/" + e.Name())
		if err != nil {
			return nil, fmt.Errorf("sqlite: read embedded migration: %w", err)
		}
		migs = append(migs, migration{version: v, name: e.Name(), sql: string(b)})
	}
	return migs, nil
}

// migrate applies the pending migrations in one transaction.
func (s *Store) migrate(ctx context.Context, migs []migration) error {
	return s.write(ctx, func(tx *sql.Tx) error {
		var hasTable, otherTables int
		err := tx.QueryRowContext(ctx, `SELECT
			count(*) FILTER (WHERE name = 'schema_migrations'),
			count(*) FILTER (WHERE name <> 'schema_migrations' AND name NOT LIKE 'sqlite\_%' ESCAPE '\')
			FROM sqlite_schema WHERE type = 'table'`).Scan(&hasTable, &otherTables)
		if err != nil {
			return fmt.Errorf("read schema: %w", err)
		}
		if hasTable == 0 && otherTables > 0 {
			return errors.New("the file is a SQLite database but not a meshctl one (it has tables but no schema_migrations); point meshctl at another file")
		}
		if _, err := tx.ExecContext(ctx, `CREATE TABLE IF NOT EXISTS schema_migrations (
			version INTEGER PRIMARY KEY NOT NULL,
			name    TEXT    NOT NULL,
			applied INTEGER NOT NULL
		) STRICT`); err != nil {
			return fmt.Errorf("create schema_migrations: %w", err)
		}
		var cur int
		if err := tx.QueryRowContext(ctx, `SELECT coalesce(max(version), 0) FROM schema_migrations`).Scan(&cur); err != nil {
			return fmt.Errorf("read schema version: %w", err)
		}
		if cur > len(migs) {
			return fmt.Errorf("database schema version %d is newer than this meshctl (knows %d); upgrade meshctl", cur, len(migs))
		}
		for _, m := range migs[cur:] {
			if _, err := tx.ExecContext(ctx, m.sql); err != nil {
				return fmt.Errorf("apply migration %s: %w", m.name, err)
			}
			if _, err := tx.ExecContext(ctx, `INSERT INTO schema_migrations (version, name, applied) VALUES (?, ?, ?)`,
				m.version, m.name, time.Now().UnixNano()); err != nil {
				return fmt.Errorf("record migration %s: %w", m.name, err)
			}
			s.log.Info("applied database migration", "path", s.path, "migration", m.name)
		}
		return nil
	})
}

// write runs fn in one write transaction on the writer connection and
// commits if fn returns nil; otherwise it rolls back and returns fn's error.
func (s *Store) write(ctx context.Context, fn func(*sql.Tx) error) (err error) {
	defer func() { err = s.diskFull(err) }() // last: after the rollback
	tx, err := s.writer.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin transaction: %w", err)
	}
	defer func() {
		if err != nil {
			if rerr := tx.Rollback(); rerr != nil && !errors.Is(rerr, sql.ErrTxDone) {
				err = errors.Join(err, fmt.Errorf("rollback: %w", rerr))
			}
		}
	}()
	if err := fn(tx); err != nil {
		return err
	}
	if err := tx.Commit(); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	return nil
}

// diskFull marks err with store.ErrDiskFull, naming the database file,
// when SQLite or the file system ran out of space.
func (s *Store) diskFull(err error) error {
	if err == nil || errors.Is(err, store.ErrDiskFull) {
		return err
	}
	var se *sqlite.Error
	if errors.As(err, &se) && se.Code()&0xff == sqlite3.SQLITE_FULL || errors.Is(err, syscall.ENOSPC) {
		return fmt.Errorf("%w: no space left on the disk holding %s: %w", store.ErrDiskFull, s.path, err)
	}
	return err
}

// read runs fn in one read transaction on the reader pool, so that the
// queries it makes see one consistent state of the database.
func (s *Store) read(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := s.reader.BeginTx(ctx, nil)
	if err != nil {
		return fmt.Errorf("begin read transaction: %w", err)
	}
	defer tx.Rollback() // read-only: nothing to commit
	return fn(tx)
}

// isUnique reports whether err is a UNIQUE or PRIMARY KEY violation whose
// message names one of columns ("table.column").
func isUnique(err error, columns ...string) bool {
	var se *sqlite.Error
	if !errors.As(err, &se) {
		return false
	}
	if c := se.Code(); c != sqlite3.SQLITE_CONSTRAINT_UNIQUE && c != sqlite3.SQLITE_CONSTRAINT_PRIMARYKEY {
		return false
	}
	for _, col := range columns {
		if strings.Contains(se.Error(), col) {
			return true
		}
	}
	return len(columns) == 0
}
