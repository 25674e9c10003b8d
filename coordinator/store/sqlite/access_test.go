package sqlite

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
)

// TestUpgradeFrom0001 opens a database that has only the first migration
// (as written by an older meshctl) and checks that the access tables are
// added without touching what was there.
func TestUpgradeFrom0001(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meshctl.db")
	s := openT(t, path)
	ctx := t.Context()
	t0 := time.Date(2031, 3, 14, 0, 0, 0, 0, time.UTC)
	if err := s.CreateAdminKey(ctx, store.AdminKey{ID: "ak", SecretHash: [32]byte{1}, Created: t0}, "local"); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{
		`DROP INDEX nodes_quarantined`,
		`ALTER TABLE nodes DROP COLUMN disco_key`,
		`DROP TABLE ssh_nodes`,
		`DROP TABLE service_visibility`,
		`DROP TABLE access_keys`,
		`DELETE FROM schema_migrations WHERE version >= 2`,
	} {
		if _, err := s.writer.ExecContext(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	s.Close()

	s = openT(t, path)
	if _, err := s.GetAdminKey(ctx, "ak"); err != nil {
		t.Errorf("admin key lost in the upgrade: %v", err)
	}
	k := store.AccessKey{ID: "x", SecretHash: [32]byte{2}, Created: t0, Expires: t0.Add(time.Hour)}
	if err := s.CreateAccessKey(ctx, k, "local"); err != nil {
		t.Errorf("CreateAccessKey after the upgrade: %v", err)
	}
	var v int
	if err := s.reader.QueryRowContext(ctx, `SELECT max(version) FROM schema_migrations`).Scan(&v); err != nil || v < 2 {
		t.Errorf("schema version after the upgrade = %d, %v; want ≥ 2", v, err)
	}
}

func TestServiceVisibilityNeedsNode(t *testing.T) {
	s := openT(t, filepath.Join(t.TempDir(), "meshctl.db"))
	if _, err := s.writer.ExecContext(t.Context(), `INSERT INTO service_visibility (node_id, service, public) VALUES ('nosuch', 'web', 1)`); err == nil {
		t.Error("visibility row for an unknown node inserted; foreign key not enforced")
	}
}
