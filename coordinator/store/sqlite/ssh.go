package sqlite

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
)

// SSH-only nodes live in their own table, ssh_nodes (migration 0003): they
// have no WireGuard key and no overlay address. Names are unique among the
// active nodes of both tables; every method that takes or sets a name checks
// both inside its transaction.

const sshNodeCols = `id, name, services, ssh_key, created, revoked_at`

func scanSSHNode(r scanner) (store.Node, error) {
	var (
		n                store.Node
		created, revoked sql.NullInt64
	)
	if err := r.Scan(&n.ID, &n.Name, &n.ServicesJSON, &n.SSHKey, &created, &revoked); err != nil {
		return n, err
	}
	n.Role = store.RoleSSH
	n.Tags, n.Endpoints, n.Visibility = []string{}, []string{}, map[string]bool{}
	n.Created, n.RevokedAt = timeVal(created), timeVal(revoked)
	return n, nil
}

// getSSHNode returns the SSH-only node with this id.
func getSSHNode(ctx context.Context, q queryRower, id string) (store.Node, error) {
	n, err := scanSSHNode(q.QueryRowContext(ctx, `SELECT `+sshNodeCols+` FROM ssh_nodes WHERE id = ?`, id))
	if errors.Is(err, sql.ErrNoRows) {
		return n, fmt.Errorf("node %s: %w", id, store.ErrNotFound)
	}
	if err != nil {
		return n, fmt.Errorf("get node %s: %w", id, err)
	}
	return n, nil
}

// activeNameTaken reports whether an active node of either table has name.
func activeNameTaken(ctx context.Context, tx *sql.Tx, name string) (bool, error) {
	return exists(ctx, tx, `SELECT 1 FROM nodes WHERE name = ?1 AND revoked_at IS NULL
		UNION ALL SELECT 1 FROM ssh_nodes WHERE name = ?1 AND revoked_at IS NULL`, name)
}

// AddSSHNode adds an SSH-only node or re-certifies the active one with
// this name, in one transaction.
func (s *Store) AddSSHNode(ctx context.Context, p store.SSHNodeParams) (store.Node, bool, error) {
	if err := checkSSHNode(p); err != nil {
		return store.Node{}, false, fmt.Errorf("add SSH-only node %q: %w", p.Name, err)
	}
	var (
		n       store.Node
		created bool
	)
	err := s.write(ctx, func(tx *sql.Tx) error {
		if taken, err := exists(ctx, tx, `SELECT 1 FROM nodes WHERE name = ? AND revoked_at IS NULL`, p.Name); err != nil {
			return fmt.Errorf("check name: %w", err)
		} else if taken {
			return fmt.Errorf("an enrolled node is named %q: %w", p.Name, store.ErrNameTaken)
		}
		old, err := scanSSHNode(tx.QueryRowContext(ctx, `SELECT `+sshNodeCols+` FROM ssh_nodes
			WHERE name = ? AND revoked_at IS NULL`, p.Name))
		switch {
		case err == nil: // re-certify
			services, err := keepPublic(old.ServicesJSON, p.ServicesJSON)
			if err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx, `UPDATE ssh_nodes SET ssh_key = ?, services = ? WHERE id = ?`,
				p.SSHKey, services, old.ID); err != nil {
				return err
			}
			if err := insertAudit(ctx, tx, p.Now, p.Actor, "node.ssh-recertify", p.Name,
				fmt.Sprintf("id=%s key=%s services=%s", old.ID, keySummary(p.SSHKey), services)); err != nil {
				return err
			}
			n, err = getSSHNode(ctx, tx, old.ID)
			return err
		case !errors.Is(err, sql.ErrNoRows):
			return fmt.Errorf("find SSH-only node: %w", err)
		}
		if taken, err := exists(ctx, tx, `SELECT 1 FROM nodes WHERE id = ?`, p.NodeID); err != nil {
			return fmt.Errorf("check id: %w", err)
		} else if taken {
			return errors.New("insert node: node id already exists")
		}
		_, err = tx.ExecContext(ctx, `INSERT INTO ssh_nodes (id, name, services, ssh_key, created, created_by)
			VALUES (?, ?, ?, ?, ?, ?)`, p.NodeID, p.Name, p.ServicesJSON, p.SSHKey, p.Now.UnixNano(), p.Actor)
		switch {
		case isUnique(err, "ssh_nodes.name"):
			return store.ErrNameTaken
		case isUnique(err, "ssh_nodes.id"):
			return fmt.Errorf("insert node: node id already exists: %w", err)
		case err != nil:
			return fmt.Errorf("insert node: %w", err)
		}
		if err := insertAudit(ctx, tx, p.Now, p.Actor, "node.add-ssh", p.Name,
			fmt.Sprintf("id=%s key=%s services=%s", p.NodeID, keySummary(p.SSHKey), p.ServicesJSON)); err != nil {
			return err
		}
		created = true
		n, err = getSSHNode(ctx, tx, p.NodeID)
		return err
	})
	if err != nil {
		return store.Node{}, false, fmt.Errorf("add SSH-only node %q: %w", p.Name, err)
	}
	return n, created, nil
}

func checkSSHNode(p store.SSHNodeParams) error {
	switch {
	case p.NodeID == "":
		return errors.New("empty node id")
	case p.Name == "":
		return errors.New("empty name")
	case strings.TrimSpace(p.SSHKey) == "":
		return errors.New("empty SSH key")
	case p.Now.IsZero():
		return errors.New("zero time")
	}
	if _, err := parseServices(p.ServicesJSON); err != nil {
		return err
	}
	return checkTime("time", p.Now)
}

// keySummary is the type and comment-free fingerprint-ish tail of an
// authorized_keys line, for audit details (the whole key is stored).
func keySummary(key string) string {
	f := strings.Fields(key)
	if len(f) < 2 {
		return "?"
	}
	b := f[1]
	if len(b) > 12 {
		b = "…" + b[len(b)-12:]
	}
	return f[0] + ":" + b
}

// parseServices decodes a JSON array of service objects, keeping every
// field as it is.
func parseServices(servicesJSON string) ([]map[string]any, error) {
	dec := json.NewDecoder(strings.NewReader(servicesJSON))
	dec.UseNumber()
	var l []map[string]any
	if err := dec.Decode(&l); err != nil || l == nil || dec.More() {
		return nil, errors.New("services must be a JSON array of objects")
	}
	return l, nil
}

func marshalServices(l []map[string]any) (string, error) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(l); err != nil {
		return "", err
	}
	return strings.TrimSuffix(b.String(), "\n"), nil
}

// keepPublic returns next with the public flags of the services old made
// public carried over (re-certifying keeps an admin's visibility choices).
func keepPublic(old, next string) (string, error) {
	ol, err := parseServices(old)
	if err != nil {
		return "", fmt.Errorf("stored services: %w", err)
	}
	nl, err := parseServices(next)
	if err != nil {
		return "", err
	}
	changed := false
	for _, o := range ol {
		if o["public"] != true {
			continue
		}
		for _, n := range nl {
			if n["name"] == o["name"] && n["public"] == nil {
				n["public"], changed = true, true
			}
		}
	}
	if !changed {
		return next, nil
	}
	return marshalServices(nl)
}

// setSSHVisibility sets the public flag of service on the SSH-only node n.
func setSSHVisibility(ctx context.Context, tx *sql.Tx, n store.Node, service string, public bool) error {
	l, err := parseServices(n.ServicesJSON)
	if err != nil {
		return fmt.Errorf("stored services: %w", err)
	}
	i := slices.IndexFunc(l, func(m map[string]any) bool { return m["name"] == service })
	if i < 0 {
		return fmt.Errorf("SSH-only node %s was not certified for service %q: %w", n.Name, service, store.ErrSSHOnly)
	}
	if public {
		l[i]["public"] = true
	} else {
		delete(l[i], "public") // wire.Service omits false
	}
	services, err := marshalServices(l)
	if err != nil {
		return err
	}
	_, err = tx.ExecContext(ctx, `UPDATE ssh_nodes SET services = ? WHERE id = ?`, services, n.ID)
	return err
}

// findActiveAny returns the active node, enrolled or SSH-only, whose name
// or id is nameOrID. A string that is one active node's name and another's
// id is refused as ambiguous rather than guessed at.
func findActiveAny(ctx context.Context, tx *sql.Tx, nameOrID string) (store.Node, error) {
	l, err := queryAll(ctx, tx, scanNode, `SELECT `+nodeCols+` FROM nodes
		WHERE revoked_at IS NULL AND (name = ?1 OR id = ?1)`, nameOrID)
	if err != nil {
		return store.Node{}, fmt.Errorf("find node: %w", err)
	}
	sl, err := queryAll(ctx, tx, scanSSHNode, `SELECT `+sshNodeCols+` FROM ssh_nodes
		WHERE revoked_at IS NULL AND (name = ?1 OR id = ?1)`, nameOrID)
	if err != nil {
		return store.Node{}, fmt.Errorf("find node: %w", err)
	}
	l = append(l, sl...)
	switch {
	case len(l) == 0:
		return store.Node{}, fmt.Errorf("no active node %q: %w", nameOrID, store.ErrNotFound)
	case len(l) > 1:
		return store.Node{}, fmt.Errorf("%w: %q is the name of one node and the id of another (%s, %s)",
			store.ErrAmbiguous, nameOrID, l[0].ID, l[1].ID)
	}
	n := l[0]
	if n.Role != store.RoleSSH {
		if n.Visibility, err = nodeVisibility(ctx, tx, n.ID); err != nil {
			return store.Node{}, fmt.Errorf("find node: %w", err)
		}
	}
	return n, nil
}

// revokeSSHNode revokes the active SSH-only node old inside tx.
func revokeSSHNode(ctx context.Context, tx *sql.Tx, old store.Node, now time.Time, actor string) (store.Node, error) {
	if _, err := tx.ExecContext(ctx, `UPDATE ssh_nodes SET revoked_at = ? WHERE id = ?`, now.UnixNano(), old.ID); err != nil {
		return store.Node{}, err
	}
	if err := insertAudit(ctx, tx, now, actor, "node.revoke", old.Name, fmt.Sprintf("id=%s ssh-only", old.ID)); err != nil {
		return store.Node{}, err
	}
	return getSSHNode(ctx, tx, old.ID)
}
