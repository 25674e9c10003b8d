package sqlite

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
)

// Access keys and service visibility overrides.

// CreateAccessKey stores a new access key and its "accesskey.create" audit
// row.
func (s *Store) CreateAccessKey(ctx context.Context, k store.AccessKey, actor string) error {
	if k.ID == "" {
		return errors.New("create access key: empty id")
	}
	if k.Created.IsZero() || k.Expires.IsZero() {
		return fmt.Errorf("create access key %s: creation or expiry time missing", k.ID)
	}
	for _, c := range []struct {
		what string
		t    time.Time
	}{{"created", k.Created}, {"expires", k.Expires}, {"revoked", k.RevokedAt}} {
		if err := checkTime(c.what, c.t); err != nil {
			return fmt.Errorf("create access key %s: %w", k.ID, err)
		}
	}
	err := s.write(ctx, func(tx *sql.Tx) error {
		_, err := tx.ExecContext(ctx, `INSERT INTO access_keys (`+accessKeyCols+`) VALUES (?, ?, ?, ?, ?, ?, ?, ?)`,
			k.ID, k.SecretHash[:], nullString(k.Node), nullString(k.Service),
			timeArg(k.Created), timeArg(k.Expires), timeArg(k.RevokedAt), k.CreatedBy)
		if isUnique(err, "access_keys.id") {
			return errors.New("an access key with this id already exists")
		}
		if err != nil {
			return err
		}
		return insertAudit(ctx, tx, k.Created, actor, "accesskey.create", k.ID,
			fmt.Sprintf("node=%s service=%s expires=%s", orStar(k.Node), orStar(k.Service), k.Expires.UTC().Format(time.RFC3339)))
	})
	if err != nil {
		return fmt.Errorf("create access key %s: %w", k.ID, err)
	}
	return nil
}

// GetAccessKey returns the access key with this id, whatever its state.
func (s *Store) GetAccessKey(ctx context.Context, id string) (store.AccessKey, error) {
	k, err := scanAccessKey(s.reader.QueryRowContext(ctx, `SELECT `+accessKeyCols+` FROM access_keys WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return store.AccessKey{}, fmt.Errorf("access key %s: %w", id, store.ErrNotFound)
	}
	if err != nil {
		return store.AccessKey{}, fmt.Errorf("get access key %s: %w", id, err)
	}
	return k, nil
}

// ListAccessKeys returns all access keys, oldest first.
func (s *Store) ListAccessKeys(ctx context.Context) ([]store.AccessKey, error) {
	l, err := queryAll(ctx, s.reader, scanAccessKey, `SELECT `+accessKeyCols+` FROM access_keys ORDER BY created, rowid`)
	if err != nil {
		return nil, fmt.Errorf("list access keys: %w", err)
	}
	return l, nil
}

// RevokeAccessKey revokes an access key, like RevokeToken.
func (s *Store) RevokeAccessKey(ctx context.Context, id string, now time.Time, actor string) error {
	if err := s.revoke(ctx, "access_keys", "accesskey.revoke", id, now, actor); err != nil {
		return fmt.Errorf("revoke access key %s: %w", id, err)
	}
	return nil
}

// SetServiceVisibility records whether service on the active node
// nodeNameOrID is public, with its audit row, and returns the node.
func (s *Store) SetServiceVisibility(ctx context.Context, nodeNameOrID, service string, public bool, now time.Time, actor string) (store.Node, error) {
	if service == "" {
		return store.Node{}, fmt.Errorf("set visibility on node %q: empty service name", nodeNameOrID)
	}
	if err := checkTime("time", now); err != nil {
		return store.Node{}, fmt.Errorf("set visibility on node %q: %w", nodeNameOrID, err)
	}
	var n store.Node
	err := s.write(ctx, func(tx *sql.Tx) error {
		old, err := findActiveAny(ctx, tx, nodeNameOrID)
		if err != nil {
			return err
		}
		if old.Role == store.RoleSSH {
			if err := setSSHVisibility(ctx, tx, old, service, public); err != nil {
				return err
			}
			if err := insertAudit(ctx, tx, auditTime(now), actor, "service.visibility", old.Name,
				fmt.Sprintf("service=%s public=%t", service, public)); err != nil {
				return err
			}
			n, err = getSSHNode(ctx, tx, old.ID)
			return err
		}
		if _, err := tx.ExecContext(ctx, `INSERT INTO service_visibility (node_id, service, public) VALUES (?, ?, ?)
			ON CONFLICT (node_id, service) DO UPDATE SET public = excluded.public`, old.ID, service, public); err != nil {
			return err
		}
		if err := insertAudit(ctx, tx, auditTime(now), actor, "service.visibility", old.Name,
			fmt.Sprintf("service=%s public=%t", service, public)); err != nil {
			return err
		}
		n, err = getNode(ctx, tx, old.ID)
		return err
	})
	if err != nil {
		return store.Node{}, fmt.Errorf("set visibility of %s on node %q: %w", service, nodeNameOrID, err)
	}
	return n, nil
}

// nodeVisibility returns the visibility overrides of the node with this id
// (never nil).
func nodeVisibility(ctx context.Context, q querier, id string) (map[string]bool, error) {
	all, err := loadVisibility(ctx, q, `SELECT node_id, service, public FROM service_visibility WHERE node_id = ?`, id)
	if err != nil {
		return nil, err
	}
	if v := all[id]; v != nil {
		return v, nil
	}
	return map[string]bool{}, nil
}

// allVisibility returns every node's visibility overrides by node id.
func allVisibility(ctx context.Context, q querier) (map[string]map[string]bool, error) {
	return loadVisibility(ctx, q, `SELECT node_id, service, public FROM service_visibility`)
}

func loadVisibility(ctx context.Context, q querier, query string, args ...any) (map[string]map[string]bool, error) {
	rows, err := q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, fmt.Errorf("load service visibility: %w", err)
	}
	defer rows.Close()
	out := map[string]map[string]bool{}
	for rows.Next() {
		var (
			id, svc string
			public  bool
		)
		if err := rows.Scan(&id, &svc, &public); err != nil {
			return nil, fmt.Errorf("load service visibility: %w", err)
		}
		if out[id] == nil {
			out[id] = map[string]bool{}
		}
		out[id][svc] = public
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("load service visibility: %w", err)
	}
	return out, nil
}

const accessKeyCols = `id, secret_hash, node, service, created, expires, revoked_at, created_by`

func scanAccessKey(r scanner) (store.AccessKey, error) {
	var (
		k                         store.AccessKey
		hash                      []byte
		node, service             sql.NullString
		created, expires, revoked sql.NullInt64
		err                       error
	)
	if err := r.Scan(&k.ID, &hash, &node, &service, &created, &expires, &revoked, &k.CreatedBy); err != nil {
		return k, err
	}
	if k.SecretHash, err = hashVal(hash); err != nil {
		return k, fmt.Errorf("access key %s: %w", k.ID, err)
	}
	k.Node, k.Service = node.String, service.String
	k.Created, k.Expires, k.RevokedAt = timeVal(created), timeVal(expires), timeVal(revoked)
	return k, nil
}

// nullString stores the empty string as NULL.
func nullString(s string) any {
	if s == "" {
		return nil
	}
	return s
}

func orStar(s string) string {
	if s == "" {
		return "*"
	}
	return s
}
