package coordinator_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator"
	"github.com/meshctl/meshctl/internal/meshtest"
)

// TestStartupErrorsAreReturned: a start-up that fails after the data dir
// is locked (here: a database file that is not a database) returns the
// error that says what is wrong, releases the lock, and does not panic.
// (New used to clean up through its named result, which is nil on error:
// every such failure was a nil-pointer panic instead of its message.)
func TestStartupErrorsAreReturned(t *testing.T) {
	dir := filepath.Join(meshtest.ShortTempDir(t), "d")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	db := filepath.Join(dir, coordinator.DBFile)
	if err := os.WriteFile(db, []byte("this is not a SQLite database, not at all"), 0o600); err != nil {
		t.Fatal(err)
	}
	opts := coordinator.Options{DataDir: dir, Listen: "127.0.0.1:0", PublicHost: "127.0.0.1", LongPoll: 2 * time.Second}
	for range 2 { // the second time: the first one released the lock
		srv, err := coordinator.New(opts)
		if err == nil {
			srv.Close()
			t.Fatal("New accepted a corrupt database")
		}
		if !strings.Contains(err.Error(), "not a SQLite database") || !strings.Contains(err.Error(), db) {
			t.Fatalf("New: %v, want the corrupt-database message naming %s", err, db)
		}
	}
}
