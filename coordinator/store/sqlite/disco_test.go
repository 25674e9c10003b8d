package sqlite

import (
	"net/netip"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
)

// TestUpgradeFrom0003 opens a database whose nodes table has no disco_key
// column (as written by an older meshctl) and checks that the enrolled
// nodes are kept, with no disco key, and can report one.
func TestUpgradeFrom0003(t *testing.T) {
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
	eps := []string{"192.0.2.1:51820"}
	if _, err := s.UpdateNode(ctx, n.ID, store.NodeUpdate{Endpoints: &eps}); err != nil {
		t.Fatal(err)
	}
	for _, q := range []string{`DROP INDEX nodes_quarantined`, `ALTER TABLE nodes DROP COLUMN disco_key`, `DELETE FROM schema_migrations WHERE version >= 4`} {
		if _, err := s.writer.ExecContext(ctx, q); err != nil {
			t.Fatalf("%s: %v", q, err)
		}
	}
	s.Close()

	s = openT(t, path)
	got, err := s.GetNode(ctx, n.ID)
	if err != nil || got.Name != "alpha" || got.DiscoKey != "" || !slices.Equal(got.Endpoints, eps) {
		t.Errorf("node after the upgrade = %+v, %v; want alpha with its endpoints and no disco key", got, err)
	}
	k := "AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA="
	if got, err := s.UpdateNode(ctx, n.ID, store.NodeUpdate{DiscoKey: &k}); err != nil || got.DiscoKey != k {
		t.Errorf("UpdateNode disco key after the upgrade = %q, %v", got.DiscoKey, err)
	}
}
