package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
)

// Audit log and meta table.

// auditTime is t, or the current time if t is zero.
func auditTime(t time.Time) time.Time {
	if t.IsZero() {
		return time.Now()
	}
	return t
}

// insertAudit appends an audit row inside tx.
func insertAudit(ctx context.Context, tx *sql.Tx, t time.Time, actor, action, target, detail string) error {
	if err := checkTime("audit time", t); err != nil {
		return err
	}
	_, err := tx.ExecContext(ctx, `INSERT INTO audit (time, actor, action, target, detail) VALUES (?, ?, ?, ?, ?)`,
		t.UnixNano(), actor, action, target, detail)
	if err != nil {
		return fmt.Errorf("write audit row: %w", err)
	}
	return nil
}

// Audit appends e (its ID is ignored; a zero Time means now).
func (s *Store) Audit(ctx context.Context, e store.AuditEntry) error {
	if e.Action == "" {
		return errors.New("audit: empty action")
	}
	err := s.write(ctx, func(tx *sql.Tx) error {
		return insertAudit(ctx, tx, auditTime(e.Time), e.Actor, e.Action, e.Target, e.Detail)
	})
	if err != nil {
		return fmt.Errorf("audit %s: %w", e.Action, err)
	}
	return nil
}

// ListAudit returns the newest limit entries (all if limit <= 0), oldest
// first.
func (s *Store) ListAudit(ctx context.Context, limit int) ([]store.AuditEntry, error) {
	if limit <= 0 {
		limit = -1 // SQLite: no limit
	}
	l, err := queryAll(ctx, s.reader, scanAudit, `SELECT id, time, actor, action, target, detail FROM
		(SELECT * FROM audit ORDER BY id DESC LIMIT ?) ORDER BY id`, limit)
	if err != nil {
		return nil, fmt.Errorf("list audit: %w", err)
	}
	return l, nil
}

func scanAudit(r scanner) (store.AuditEntry, error) {
	var (
		e store.AuditEntry
		t sql.NullInt64
	)
	err := r.Scan(&e.ID, &t, &e.Actor, &e.Action, &e.Target, &e.Detail)
	e.Time = timeVal(t)
	return e, err
}

// GetMeta returns the value stored under key, or ErrNotFound.
func (s *Store) GetMeta(ctx context.Context, key string) (string, error) {
	var v string
	err := s.reader.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = ?`, key).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return "", fmt.Errorf("meta %s: %w", key, store.ErrNotFound)
	}
	if err != nil {
		return "", fmt.Errorf("get meta %s: %w", key, err)
	}
	return v, nil
}

// SetMetaIfAbsent stores value under key unless the key is set, and returns
// the value stored afterwards.
func (s *Store) SetMetaIfAbsent(ctx context.Context, key, value string) (string, error) {
	var v string
	err := s.write(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING`, key, value); err != nil {
			return err
		}
		return tx.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = ?`, key).Scan(&v)
	})
	if err != nil {
		return "", fmt.Errorf("set meta %s: %w", key, err)
	}
	return v, nil
}
