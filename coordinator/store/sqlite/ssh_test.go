package sqlite

import (
	"net/netip"
	"path/filepath"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
)

// TestUpgradeFrom0002 opens a database without the ssh_nodes table (as
// written by an older meshctl) and checks that SSH-only nodes can be added
// and the enrolled nodes are kept.
func TestUpgradeFrom0002(t *testing.T) {
	path := filepath.Join(t.TempDir(), "meshctl.db")
	s := openT(t, path)
	ctx := t.Context()
	t0 := time.Date(2031, 3, 14, 0, 0, 0, 0, time.UTC)
	tok := store.Token{ID: "tk", SecretHash: [32]byte{1}, Role: "node", Created: t0, Expires: t0.Add(time.Hour)}
	if err := s.CreateToken(ctx, tok, "local"); err != nil {
		t.Fatal(err)
	}
	n, err := s.Enroll(ctx, store.EnrollParams{
		TokenID: "tk", VerifyToken: func(store.Token) error { return nil }, NodeID: "n1", Name: "alpha",
		WireGuardKey: "k", Now: t0, IPv4Pool: netip.MustParsePrefix("10.1.0.0/24"), IPv6Pool: netip.MustParsePrefix("fd00:1::/48"),
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{`DROP INDEX nodes_quarantined`, `ALTER TABLE nodes DROP COLUMN disco_key`, `DROP TABLE ssh_nodes`, `DELETE FROM schema_migrations WHERE version >= 3`} {
		if _, err := s.writer.ExecContext(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	s.Close()

	s = openT(t, path)
	if got, err := s.GetNode(ctx, n.ID); err != nil || got.Name != "alpha" {
		t.Errorf("node lost in the upgrade: %+v, %v", got, err)
	}
	if _, _, err := s.AddSSHNode(ctx, store.SSHNodeParams{NodeID: "s1", Name: "alpha", ServicesJSON: "[]", SSHKey: "ssh-ed25519 AAAA", Now: t0}); err == nil {
		t.Error("AddSSHNode with an enrolled node's name after the upgrade succeeded")
	}
	if _, created, err := s.AddSSHNode(ctx, store.SSHNodeParams{NodeID: "s1", Name: "cam", ServicesJSON: "[]", SSHKey: "ssh-ed25519 AAAA", Now: t0}); err != nil || !created {
		t.Errorf("AddSSHNode after the upgrade: %t, %v", created, err)
	}
}
