package sqlite

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"time"

	"github.com/meshctl/meshctl/coordinator/ipam"
	"github.com/meshctl/meshctl/coordinator/store"
)

func checkEnroll(p store.EnrollParams) error {
	switch {
	case p.NodeID == "":
		return errors.New("empty node id")
	case p.Name == "":
		return errors.New("empty name")
	case p.WireGuardKey == "":
		return errors.New("empty WireGuard key")
	case p.Now.IsZero():
		return errors.New("zero time")
	case p.Quarantine < 0:
		return fmt.Errorf("negative quarantine %v", p.Quarantine)
	case !p.IPv4Pool.IsValid() || !p.IPv4Pool.Addr().Is4():
		return fmt.Errorf("IPv4 pool %v is not an IPv4 prefix", p.IPv4Pool)
	}
	if _, err := ipam.IPv6For(p.IPv6Pool, netip.IPv4Unspecified()); err != nil {
		return err
	}
	return checkTime("time", p.Now)
}

// enroll runs one enrollment inside tx (see store.EnrollParams), taking
// addresses from ix. On error the caller rolls back what it did.
func (s *Store) enroll(ctx context.Context, tx *sql.Tx, p store.EnrollParams, ix *addrIndex) (store.Node, error) {
	var none store.Node
	now := p.Now.UnixNano()

	// The token: known, accepted by the caller, and usable now. The UPDATE
	// re-checks in SQL what VerifyToken should have, so a forgetful
	// VerifyToken cannot overspend or revive a token.
	tok, err := scanToken(tx.QueryRowContext(ctx, `SELECT `+tokenCols+` FROM tokens WHERE id = ?`, p.TokenID))
	if errors.Is(err, sql.ErrNoRows) {
		return none, fmt.Errorf("unknown token %q: %w", p.TokenID, store.ErrTokenInvalid)
	}
	if err != nil {
		return none, fmt.Errorf("load token: %w", err)
	}
	if p.VerifyToken == nil {
		return none, fmt.Errorf("token %s: no VerifyToken given: %w", tok.ID, store.ErrTokenInvalid)
	}
	if err := p.VerifyToken(tok); err != nil {
		return none, fmt.Errorf("token %s: %w (%w)", tok.ID, store.ErrTokenInvalid, err)
	}
	res, err := tx.ExecContext(ctx, `UPDATE tokens SET uses = uses + 1
		WHERE id = ? AND revoked_at IS NULL AND expires > ? AND (max_uses = 0 OR uses < max_uses)`, tok.ID, now)
	if err != nil {
		return none, fmt.Errorf("consume token: %w", err)
	}
	if k, err := res.RowsAffected(); err != nil {
		return none, fmt.Errorf("consume token: %w", err)
	} else if k != 1 {
		return none, fmt.Errorf("token %s is expired, revoked or used up: %w", tok.ID, store.ErrTokenInvalid)
	}

	// Name (among active nodes, SSH-only ones included), id and key.
	if taken, err := activeNameTaken(ctx, tx, p.Name); err != nil {
		return none, fmt.Errorf("check name: %w", err)
	} else if taken {
		return none, store.ErrNameTaken
	}
	if taken, err := exists(ctx, tx, `SELECT 1 FROM ssh_nodes WHERE id = ?`, p.NodeID); err != nil {
		return none, fmt.Errorf("check id: %w", err)
	} else if taken {
		return none, errors.New("insert node: node id already exists")
	}
	if taken, err := exists(ctx, tx, `SELECT 1 FROM nodes WHERE wg_key = ?`, p.WireGuardKey); err != nil {
		return none, fmt.Errorf("check key: %w", err)
	} else if taken {
		return none, store.ErrKeyTaken
	}

	// Addresses. Revoked nodes keep theirs until the quarantine has passed.
	if k, err := releaseQuarantined(ctx, tx, ix, p.Now.Add(-p.Quarantine)); err != nil {
		return none, err
	} else if k > 0 {
		s.log.Info("released addresses of revoked nodes after quarantine", "nodes", k)
	}
	v4, v6, err := ix.allocate()
	if err != nil {
		return none, err
	}

	tags, err := strList(tok.Tags)
	if err != nil {
		return none, fmt.Errorf("encode tags: %w", err)
	}
	_, err = tx.ExecContext(ctx, `INSERT INTO nodes (id, name, role, ipv4, ipv6, wg_key, tags, token_id, created)
		VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)`,
		p.NodeID, p.Name, tok.Role, v4.String(), v6.String(), p.WireGuardKey, tags, tok.ID, now)
	if err != nil {
		return none, insertNodeError(err)
	}
	if err := insertAudit(ctx, tx, p.Now, p.Actor, "node.enroll", p.Name,
		fmt.Sprintf("id=%s token=%s ipv4=%s ipv6=%s", p.NodeID, tok.ID, v4, v6)); err != nil {
		return none, err
	}
	return getNode(ctx, tx, p.NodeID)
}

// releaseQuarantined frees the addresses of the nodes revoked at or before
// cutoff, in the table and in ix, and returns how many nodes it released.
func releaseQuarantined(ctx context.Context, tx *sql.Tx, ix *addrIndex, cutoff time.Time) (int, error) {
	rows, err := tx.QueryContext(ctx, `UPDATE nodes SET ip_released = 1
		WHERE revoked_at IS NOT NULL AND revoked_at <= ? AND ip_released = 0
		RETURNING ipv4, ipv6`, cutoff.UnixNano())
	if err != nil {
		return 0, fmt.Errorf("release quarantined addresses: %w", err)
	}
	defer rows.Close()
	var released []netip.Addr
	for rows.Next() {
		var a4, a6 string
		if err := rows.Scan(&a4, &a6); err != nil {
			return 0, fmt.Errorf("release quarantined addresses: %w", err)
		}
		v4, err4 := netip.ParseAddr(a4)
		v6, err6 := netip.ParseAddr(a6)
		if err4 != nil || err6 != nil {
			return 0, fmt.Errorf("release quarantined addresses: stored addresses %q, %q are not addresses", a4, a6)
		}
		released = append(released, v4, v6)
	}
	if err := rows.Err(); err != nil {
		return 0, fmt.Errorf("release quarantined addresses: %w", err)
	}
	for i := 0; i < len(released); i += 2 {
		ix.release(released[i], released[i+1])
	}
	return len(released) / 2, nil
}

// insertNodeError maps constraint violations the explicit checks should
// have caught to the sentinels.
func insertNodeError(err error) error {
	switch {
	case isUnique(err, "nodes.name"):
		return store.ErrNameTaken
	case isUnique(err, "nodes.wg_key"):
		return store.ErrKeyTaken
	case isUnique(err, "nodes.id"):
		return fmt.Errorf("insert node: node id already exists: %w", err)
	}
	return fmt.Errorf("insert node: %w", err)
}

// exists reports whether query returns a row.
func exists(ctx context.Context, tx *sql.Tx, query string, args ...any) (bool, error) {
	var x int
	err := tx.QueryRowContext(ctx, query, args...).Scan(&x)
	if errors.Is(err, sql.ErrNoRows) {
		return false, nil
	}
	return err == nil, err
}

type querier interface {
	QueryContext(context.Context, string, ...any) (*sql.Rows, error)
}

type queryRower interface {
	querier
	QueryRowContext(context.Context, string, ...any) *sql.Row
}

// getNode returns the node with this id with its visibility overrides.
func getNode(ctx context.Context, q queryRower, id string) (store.Node, error) {
	n, err := scanNode(q.QueryRowContext(ctx, `SELECT `+nodeCols+` FROM nodes WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return n, fmt.Errorf("node %s: %w", id, store.ErrNotFound)
	}
	if err != nil {
		return n, fmt.Errorf("get node %s: %w", id, err)
	}
	if n.Visibility, err = nodeVisibility(ctx, q, id); err != nil {
		return n, fmt.Errorf("get node %s: %w", id, err)
	}
	return n, nil
}

// GetNode returns the node (enrolled or SSH-only) with this id, revoked or
// not.
func (s *Store) GetNode(ctx context.Context, id string) (store.Node, error) {
	var n store.Node
	err := s.read(ctx, func(tx *sql.Tx) error {
		var err error
		n, err = getNode(ctx, tx, id)
		if errors.Is(err, store.ErrNotFound) {
			n, err = getSSHNode(ctx, tx, id)
		}
		return err
	})
	return n, err
}

// ListNodes returns all nodes, revoked ones included, in creation order.
func (s *Store) ListNodes(ctx context.Context) ([]store.Node, error) {
	var l []store.Node
	err := s.read(ctx, func(tx *sql.Tx) error {
		var err error
		if l, err = queryAll(ctx, tx, scanNode, `SELECT `+nodeCols+` FROM nodes ORDER BY created, rowid`); err != nil {
			return err
		}
		vis, err := allVisibility(ctx, tx)
		if err != nil {
			return err
		}
		for i := range l {
			if l[i].Visibility = vis[l[i].ID]; l[i].Visibility == nil {
				l[i].Visibility = map[string]bool{}
			}
		}
		sl, err := queryAll(ctx, tx, scanSSHNode, `SELECT `+sshNodeCols+` FROM ssh_nodes ORDER BY created, rowid`)
		if err != nil {
			return err
		}
		if len(sl) > 0 {
			l = append(l, sl...)
			slices.SortStableFunc(l, func(a, b store.Node) int { return a.Created.Compare(b.Created) })
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("list nodes: %w", err)
	}
	return l, nil
}

// RevokeNode revokes the active node (enrolled or SSH-only) with this name
// or id.
func (s *Store) RevokeNode(ctx context.Context, nameOrID string, now time.Time, actor string) (store.Node, error) {
	if now.IsZero() {
		return store.Node{}, fmt.Errorf("revoke node %q: zero time", nameOrID)
	}
	if err := checkTime("time", now); err != nil {
		return store.Node{}, fmt.Errorf("revoke node %q: %w", nameOrID, err)
	}
	var n store.Node
	err := s.write(ctx, func(tx *sql.Tx) error {
		old, err := findActiveAny(ctx, tx, nameOrID)
		if err != nil {
			return err
		}
		if old.Role == store.RoleSSH {
			n, err = revokeSSHNode(ctx, tx, old, now, actor)
			return err
		}
		if _, err := tx.ExecContext(ctx, `UPDATE nodes SET revoked_at = ? WHERE id = ?`, now.UnixNano(), old.ID); err != nil {
			return err
		}
		if err := insertAudit(ctx, tx, now, actor, "node.revoke", old.Name,
			fmt.Sprintf("id=%s ipv4=%s ipv6=%s", old.ID, old.IPv4, old.IPv6)); err != nil {
			return err
		}
		n, err = getNode(ctx, tx, old.ID)
		return err
	})
	if err != nil {
		return store.Node{}, fmt.Errorf("revoke node %q: %w", nameOrID, err)
	}
	return n, nil
}

// RenameNode renames an active node. Renaming a node to its own name
// changes nothing and writes no audit row. SSH-only nodes are refused with
// ErrSSHOnly: their certificate names them.
func (s *Store) RenameNode(ctx context.Context, nameOrID, newName string, now time.Time, actor string) (store.Node, error) {
	if newName == "" {
		return store.Node{}, fmt.Errorf("rename node %q: empty new name", nameOrID)
	}
	var n store.Node
	err := s.write(ctx, func(tx *sql.Tx) error {
		old, err := findActiveAny(ctx, tx, nameOrID)
		if err != nil {
			return err
		}
		if old.Role == store.RoleSSH {
			return fmt.Errorf("%s is an SSH-only node, whose certificate names it (revoke it and add it again under the new name): %w",
				old.Name, store.ErrSSHOnly)
		}
		if old.Name == newName {
			n = old
			return nil
		}
		taken, err := activeNameTaken(ctx, tx, newName)
		if err != nil {
			return fmt.Errorf("check name: %w", err)
		}
		if taken {
			return fmt.Errorf("%q: %w", newName, store.ErrNameTaken)
		}
		if _, err := tx.ExecContext(ctx, `UPDATE nodes SET name = ? WHERE id = ?`, newName, old.ID); err != nil {
			if isUnique(err, "nodes.name") {
				return fmt.Errorf("%q: %w", newName, store.ErrNameTaken)
			}
			return err
		}
		if err := insertAudit(ctx, tx, auditTime(now), actor, "node.rename", old.Name,
			fmt.Sprintf("new=%s id=%s", newName, old.ID)); err != nil {
			return err
		}
		n, err = getNode(ctx, tx, old.ID)
		return err
	})
	if err != nil {
		return store.Node{}, fmt.Errorf("rename node %q to %q: %w", nameOrID, newName, err)
	}
	return n, nil
}

// SetNodeTags replaces the tags of an active node.
func (s *Store) SetNodeTags(ctx context.Context, nameOrID string, tags []string, now time.Time, actor string) (store.Node, error) {
	enc, err := strList(tags)
	if err != nil {
		return store.Node{}, fmt.Errorf("set tags of node %q: encode tags: %w", nameOrID, err)
	}
	var n store.Node
	err = s.write(ctx, func(tx *sql.Tx) error {
		old, err := findActiveAny(ctx, tx, nameOrID)
		if err != nil {
			return err
		}
		if old.Role == store.RoleSSH {
			return fmt.Errorf("%s is an SSH-only node, never a WireGuard peer: %w", old.Name, store.ErrSSHOnly)
		}
		if _, err := tx.ExecContext(ctx, `UPDATE nodes SET tags = ? WHERE id = ?`, enc, old.ID); err != nil {
			return err
		}
		if err := insertAudit(ctx, tx, auditTime(now), actor, "node.tags", old.Name,
			fmt.Sprintf("tags=%s old=%s id=%s", strings.Join(tags, ","), strings.Join(old.Tags, ","), old.ID)); err != nil {
			return err
		}
		n, err = getNode(ctx, tx, old.ID)
		return err
	})
	if err != nil {
		return store.Node{}, fmt.Errorf("set tags of node %q: %w", nameOrID, err)
	}
	return n, nil
}

// UpdateNode sets the services, endpoints and/or disco key of an active
// node.
func (s *Store) UpdateNode(ctx context.Context, id string, u store.NodeUpdate) (store.Node, error) {
	var services, eps, disco any // nil = keep the column
	if u.ServicesJSON != nil {
		var l []json.RawMessage
		if err := json.Unmarshal([]byte(*u.ServicesJSON), &l); err != nil || l == nil {
			return store.Node{}, fmt.Errorf("update node %s: services must be a JSON array", id)
		}
		services = *u.ServicesJSON
	}
	if u.DiscoKey != nil {
		disco = *u.DiscoKey
	}
	if u.Endpoints != nil {
		e, err := strList(*u.Endpoints)
		if err != nil {
			return store.Node{}, fmt.Errorf("update node %s: %w", id, err)
		}
		eps = e
	}
	var n store.Node
	err := s.write(ctx, func(tx *sql.Tx) error {
		old, err := getNode(ctx, tx, id)
		if err != nil {
			return err
		}
		if old.Revoked() {
			return store.ErrRevoked
		}
		if _, err := tx.ExecContext(ctx, `UPDATE nodes SET services = coalesce(?, services), endpoints = coalesce(?, endpoints),
			disco_key = coalesce(?, disco_key) WHERE id = ?`, services, eps, disco, id); err != nil {
			return err
		}
		n, err = getNode(ctx, tx, id)
		return err
	})
	if err != nil {
		return store.Node{}, fmt.Errorf("update node %s: %w", id, err)
	}
	return n, nil
}

// TouchNode records that the node was seen at t.
func (s *Store) TouchNode(ctx context.Context, id string, t time.Time) error {
	if err := checkTime("time", t); err != nil {
		return fmt.Errorf("touch node %s: %w", id, err)
	}
	res, err := s.writer.ExecContext(ctx, `UPDATE nodes SET last_seen = ? WHERE id = ?`, timeArg(t), id)
	if err != nil {
		return fmt.Errorf("touch node %s: %w", id, err)
	}
	if k, err := res.RowsAffected(); err != nil {
		return fmt.Errorf("touch node %s: %w", id, err)
	} else if k == 0 {
		return fmt.Errorf("touch node %s: %w", id, store.ErrNotFound)
	}
	return nil
}
