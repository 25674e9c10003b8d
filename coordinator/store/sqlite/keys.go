package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
)

// Enrollment tokens and admin keys.

// CreateToken stores a new token and its "token.create" audit row.
func (s *Store) CreateToken(ctx context.Context, t store.Token, actor string) error {
	if t.ID == "" {
		return errors.New("create token: empty id")
	}
	if t.Created.IsZero() || t.Expires.IsZero() {
		return fmt.Errorf("create token %s: creation or expiry time missing", t.ID)
	}
	if t.MaxUses < 0 || t.Uses < 0 {
		return fmt.Errorf("create token %s: negative max uses or uses", t.ID)
	}
	for _, c := range []struct {
		what string
		t    time.Time
	}{{"created", t.Created}, {"expires", t.Expires}, {"revoked", t.RevokedAt}} {
		if err := checkTime(c.what, c.t); err != nil {
			return fmt.Errorf("create token %s: %w", t.ID, err)
		}
	}
	tags, err := strList(t.Tags)
	if err != nil {
		return fmt.Errorf("create token %s: %w", t.ID, err)
	}
	err = s.write(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO tokens (`+tokenCols+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
			t.ID, t.SecretHash[:], t.Role, tags, t.MaxUses, t.Uses,
			timeArg(t.Created), timeArg(t.Expires), timeArg(t.RevokedAt), t.CreatedBy)
		if isUnique(err, "tokens.id") {
			return errors.New("a token with this id already exists")
		}
		if err != nil {
			return err
		}
		return insertAudit(ctx, tx, t.Created, actor, "token.create", t.ID,
			fmt.Sprintf("role=%s tags=%s max_uses=%d expires=%s", t.Role, tags, t.MaxUses, t.Expires.UTC().Format(time.RFC3339)))
	})
	if err != nil {
		return fmt.Errorf("create token %s: %w", t.ID, err)
	}
	return nil
}

// ListTokens returns all tokens, oldest first.
func (s *Store) ListTokens(ctx context.Context) ([]store.Token, error) {
	l, err := queryAll(ctx, s.reader, scanToken, `SELECT `+tokenCols+` FROM tokens ORDER BY created, rowid`)
	if err != nil {
		return nil, fmt.Errorf("list tokens: %w", err)
	}
	return l, nil
}

// RevokeToken revokes a token. Revoking a revoked token changes nothing and
// succeeds; an unknown id is ErrNotFound.
func (s *Store) RevokeToken(ctx context.Context, id string, now time.Time, actor string) error {
	err := s.revoke(ctx, "tokens", "token.revoke", id, now, actor)
	if err != nil {
		return fmt.Errorf("revoke token %s: %w", id, err)
	}
	return nil
}

// CreateAdminKey stores a new admin key and its "adminkey.create" audit row.
func (s *Store) CreateAdminKey(ctx context.Context, k store.AdminKey, actor string) error {
	if k.ID == "" {
		return errors.New("create admin key: empty id")
	}
	if k.Created.IsZero() {
		return fmt.Errorf("create admin key %s: creation time missing", k.ID)
	}
	for _, c := range []struct {
		what string
		t    time.Time
	}{{"created", k.Created}, {"expires", k.Expires}, {"revoked", k.RevokedAt}} {
		if err := checkTime(c.what, c.t); err != nil {
			return fmt.Errorf("create admin key %s: %w", k.ID, err)
		}
	}
	err := s.write(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO admin_keys (`+adminKeyCols+`) VALUES (?, ?, ?, ?, ?, ?)`,
			k.ID, k.SecretHash[:], timeArg(k.Created), timeArg(k.Expires), timeArg(k.RevokedAt), k.CreatedBy)
		if isUnique(err, "admin_keys.id") {
			return errors.New("an admin key with this id already exists")
		}
		if err != nil {
			return err
		}
		detail := "expires=never"
		if !k.Expires.IsZero() {
			detail = "expires=" + k.Expires.UTC().Format(time.RFC3339)
		}
		return insertAudit(ctx, tx, k.Created, actor, "adminkey.create", k.ID, detail)
	})
	if err != nil {
		return fmt.Errorf("create admin key %s: %w", k.ID, err)
	}
	return nil
}

// GetAdminKey returns the admin key with this id, revoked or not.
func (s *Store) GetAdminKey(ctx context.Context, id string) (store.AdminKey, error) {
	k, err := scanAdminKey(s.reader.QueryRowContext(ctx, `SELECT `+adminKeyCols+` FROM admin_keys WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return k, fmt.Errorf("admin key %s: %w", id, store.ErrNotFound)
	}
	if err != nil {
		return k, fmt.Errorf("get admin key %s: %w", id, err)
	}
	return k, nil
}

// ListAdminKeys returns all admin keys, oldest first.
func (s *Store) ListAdminKeys(ctx context.Context) ([]store.AdminKey, error) {
	l, err := queryAll(ctx, s.reader, scanAdminKey, `SELECT `+adminKeyCols+` FROM admin_keys ORDER BY created, rowid`)
	if err != nil {
		return nil, fmt.Errorf("list admin keys: %w", err)
	}
	return l, nil
}

// RevokeAdminKey revokes an admin key, like RevokeToken.
func (s *Store) RevokeAdminKey(ctx context.Context, id string, now time.Time, actor string) error {
	err := s.revoke(ctx, "admin_keys", "adminkey.revoke", id, now, actor)
	if err != nil {
		return fmt.Errorf("revoke admin key %s: %w", id, err)
	}
	return nil
}

// revoke sets revoked_at on the row of table (tokens or admin_keys) with
// this id and writes the audit row, unless it is already revoked.
func (s *Store) revoke(ctx context.Context, table, action, id string, now time.Time, actor string) error {
	if now.IsZero() {
		return errors.New("zero revocation time")
	}
	if err := checkTime("revocation time", now); err != nil {
		return err
	}
	return s.write(ctx, func(tx *sql.Tx) error {
		var revoked sql.NullInt64
		err := tx.QueryRowContext(ctx, `SELECT revoked_at FROM `+table+` WHERE id = ?`, id).Scan(&revoked)
		if errors.Is(err, sql.ErrNoRows) {
			return store.ErrNotFound
		}
		if err != nil {
			return err
		}
		if revoked.Valid {
			return nil // already revoked: keep the first time, no second audit row
		}
		if _, err := tx.ExecContext(ctx, `UPDATE `+table+` SET revoked_at = ? WHERE id = ?`, now.UnixNano(), id); err != nil {
			return err
		}
		return insertAudit(ctx, tx, now, actor, action, id, "")
	})
}
