package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"net/netip"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
)

// Times are stored as INTEGER unix nanoseconds, NULL for the zero time.

func timeArg(t time.Time) any {
	if t.IsZero() {
		return nil
	}
	return t.UnixNano()
}

func timeVal(v sql.NullInt64) time.Time {
	if !v.Valid {
		return time.Time{}
	}
	return time.Unix(0, v.Int64).UTC()
}

// checkTime rejects times that do not fit in int64 nanoseconds (years
// before 1678 or after 2262), which would otherwise be stored wrapped.
func checkTime(what string, t time.Time) error {
	if t.IsZero() {
		return nil
	}
	if !time.Unix(0, t.UnixNano()).Equal(t) {
		return fmt.Errorf("%s %v is out of range", what, t)
	}
	return nil
}

// strList encodes a string list as a JSON array; nil becomes "[]".
func strList(l []string) (string, error) {
	if l == nil {
		return "[]", nil
	}
	b, err := json.Marshal(l)
	if err != nil {
		return "", err
	}
	return string(b), nil
}

// parseStrList decodes a JSON array of strings, never returning nil.
func parseStrList(col, s string) ([]string, error) {
	l := []string{}
	if err := json.Unmarshal([]byte(s), &l); err != nil {
		return nil, fmt.Errorf("column %s: %w", col, err)
	}
	if l == nil { // "null"
		l = []string{}
	}
	return l, nil
}

// hashVal copies a 32-byte BLOB into an array.
func hashVal(b []byte) ([32]byte, error) {
	var h [32]byte
	if len(b) != len(h) {
		return h, fmt.Errorf("secret hash has %d bytes, want %d", len(b), len(h))
	}
	copy(h[:], b)
	return h, nil
}

// scanner is *sql.Row or *sql.Rows.
type scanner interface {
	Scan(dest ...any) error
}

const tokenCols = `id, secret_hash, role, tags, max_uses, uses, created, expires, revoked_at, created_by`

func scanToken(r scanner) (store.Token, error) {
	var (
		t                         store.Token
		hash                      []byte
		tags                      string
		created, expires, revoked sql.NullInt64
		err                       error
	)
	if err := r.Scan(&t.ID, &hash, &t.Role, &tags, &t.MaxUses, &t.Uses, &created, &expires, &revoked, &t.CreatedBy); err != nil {
		return t, err
	}
	if t.SecretHash, err = hashVal(hash); err != nil {
		return t, fmt.Errorf("token %s: %w", t.ID, err)
	}
	if t.Tags, err = parseStrList("tokens.tags", tags); err != nil {
		return t, fmt.Errorf("token %s: %w", t.ID, err)
	}
	t.Created, t.Expires, t.RevokedAt = timeVal(created), timeVal(expires), timeVal(revoked)
	return t, nil
}

const nodeCols = `id, name, role, ipv4, ipv6, wg_key, tags, services, endpoints, disco_key, coalesce(token_id, ''), created, last_seen, revoked_at`

func scanNode(r scanner) (store.Node, error) {
	var (
		n                           store.Node
		ipv4, ipv6, tags, endpoints string
		created, lastSeen, revoked  sql.NullInt64
		err                         error
	)
	if err := r.Scan(&n.ID, &n.Name, &n.Role, &ipv4, &ipv6, &n.WireGuardKey, &tags, &n.ServicesJSON, &endpoints,
		&n.DiscoKey, &n.TokenID, &created, &lastSeen, &revoked); err != nil {
		return n, err
	}
	if n.IPv4, err = netip.ParseAddr(ipv4); err != nil {
		return n, fmt.Errorf("node %s: column ipv4: %w", n.ID, err)
	}
	if n.IPv6, err = netip.ParseAddr(ipv6); err != nil {
		return n, fmt.Errorf("node %s: column ipv6: %w", n.ID, err)
	}
	if n.Tags, err = parseStrList("nodes.tags", tags); err != nil {
		return n, fmt.Errorf("node %s: %w", n.ID, err)
	}
	if n.Endpoints, err = parseStrList("nodes.endpoints", endpoints); err != nil {
		return n, fmt.Errorf("node %s: %w", n.ID, err)
	}
	n.Created, n.LastSeen, n.RevokedAt = timeVal(created), timeVal(lastSeen), timeVal(revoked)
	return n, nil
}

const adminKeyCols = `id, secret_hash, created, expires, revoked_at, created_by`

func scanAdminKey(r scanner) (store.AdminKey, error) {
	var (
		k                         store.AdminKey
		hash                      []byte
		created, expires, revoked sql.NullInt64
		err                       error
	)
	if err := r.Scan(&k.ID, &hash, &created, &expires, &revoked, &k.CreatedBy); err != nil {
		return k, err
	}
	if k.SecretHash, err = hashVal(hash); err != nil {
		return k, fmt.Errorf("admin key %s: %w", k.ID, err)
	}
	k.Created, k.Expires, k.RevokedAt = timeVal(created), timeVal(expires), timeVal(revoked)
	return k, nil
}

// queryAll runs a query and scans every row with scan. The result is never
// nil.
func queryAll[T any](ctx context.Context, q interface {
	QueryContext(context.Context, string, ...any) (*sql.Rows, error)
}, scan func(scanner) (T, error), query string, args ...any) ([]T, error) {
	rows, err := q.QueryContext(ctx, query, args...)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	out := []T{}
	for rows.Next() {
		v, err := scan(rows)
		if err != nil {
			return nil, err
		}
		out = append(out, v)
	}
	return out, rows.Err()
}
