package main

// Disk full on the coordinator: the server's data dir on a small tmpfs
// that the test mounts (root only), filled to the last byte while the
// server runs.

import (
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/internal/netnstest"
	"github.com/meshctl/meshctl/wire"
)

// mountTmpfs mounts a tmpfs of size (mount's size=) at dir, created 0700,
// and unmounts it when the test ends (after the cleanups registered
// later, such as the server's).
func mountTmpfs(t *testing.T, dir, size string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+size+",mode=0700", "tmpfs", dir).CombinedOutput(); err != nil {
		netnstest.SkipOrFail(t, "cannot mount a tmpfs for the data dir: %v: %s", err, out)
	}
	t.Cleanup(func() {
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", dir, err, out)
			exec.Command("umount", "-l", dir).Run()
		}
	})
}

// fillDisk writes zeros to DIR/filler until the file system says ENOSPC,
// down to the last block, and returns the file's path and size.
func fillDisk(t *testing.T, dir string) (string, int64) {
	t.Helper()
	path := filepath.Join(dir, "filler")
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var size int64
	for _, chunk := range []int{1 << 20, 4 << 10, 512} {
		buf := make([]byte, chunk)
		for range 1 << 16 { // bounded: 64 GiB of the largest chunk
			n, err := f.Write(buf)
			size += int64(n)
			if errors.Is(err, syscall.ENOSPC) {
				break
			}
			if err != nil {
				t.Fatalf("fill %s: %v", path, err)
			}
		}
	}
	return path, size
}

// restartServer starts `meshctl server` again with the arguments of s,
// which has exited: the same data dir and addresses.
func restartServer(t *testing.T, s *server) *server {
	t.Helper()
	p := start(t, nil, s.cmd.Args[1:]...)
	eventually(t, 20*time.Second, "the restarted server's admin socket to answer", func() bool {
		if p.exited() {
			t.Fatalf("meshctl server exited early (%v)\nstdout:\n%s\nstderr:\n%s", p.err, p.stdout, p.stderr)
		}
		return meshctl(t, nil, "nodes", "list", "--data-dir", s.dataDir, "--json").code == 0
	})
	return &server{proc: p, dataDir: s.dataDir, addr: s.addr, http: s.http, ssh: s.ssh}
}

// TestCoordinatorDiskFull: with the coordinator's disk full, enrollments
// and revocations fail with a clear 5xx (no half-written node, the token
// not consumed), the server keeps running and answering reads, and its
// proxy keeps serving an existing route; SIGKILLed, it starts again on
// the full disk. Once space returns, everything
// written before is intact and the refused token enrolls.
func TestCoordinatorDiskFull(t *testing.T) {
	needBinary(t)
	if os.Geteuid() != 0 {
		netnstest.SkipOrFail(t, "mounting a tmpfs for the coordinator's data dir needs root")
	}
	began := time.Now()
	backend := startBackend(t, "hello from pi1")
	base := meshtest.ShortTempDir(t)
	dataDir := filepath.Join(base, "d")
	mountTmpfs(t, dataDir, "16m")
	srv := startServer(t, dataDir, freePort(t))
	stopGracefully(t, srv.proc)
	admin := newAdminAPI(dataDir)
	defer func() {
		if t.Failed() {
			t.Logf("server stderr (tail):\n%s", tail(srv.stderr.String(), 6000))
		}
	}()

	// A node with a public service behind the server's proxy.
	s1 := filepath.Join(base, "pi1")
	enrollNode(t, dataDir, "pi1", s1)
	up := start(t, nil, "up", "--state-dir", s1, "--listen-port", "0", "--expose", "web="+backend+",public")
	stopGracefully(t, up)
	waitAgentUp(t, up, s1)
	served := func() (bool, string) {
		st, body := proxyGet(srv, "pi1.localhost")
		return st == 200 && body == "hello from pi1", fmt.Sprintf("%d %q", st, body)
	}
	waitFor(t, proxyDeadline, "the proxy to serve pi1", served)

	// Tokens for the enrollments to come, and nodes enrolled before.
	var tokens []wire.TokenCreateResponse
	for range 300 {
		var tc wire.TokenCreateResponse
		if err := admin.call(http.MethodPost, wire.PathAdminTokens, wire.TokenCreateRequest{}, &tc); err != nil {
			t.Fatal(err)
		}
		tokens = append(tokens, tc)
	}
	next := 0
	enroll := func(name string) (identity, wire.TokenCreateResponse, enrollAnswer, error) {
		tc := tokens[next]
		next++
		id := newIdentity(t, name)
		ans, err := enrollOnce(tc, tc.Token, id)
		return id, tc, ans, err
	}
	var whole []enrollAnswer // acknowledged: must exist after
	for i := range 5 {
		_, _, ans, err := enroll(fmt.Sprintf("before-%d", i))
		if err != nil {
			t.Fatal(err)
		}
		whole = append(whole, ans)
	}

	cliTok := createToken(t, dataDir) // for meshctl enroll with the disk full
	filler, size := fillDisk(t, dataDir)
	t.Logf("disk filled with %d MiB", size>>20)

	// Enroll until the disk refuses (SQLite may first use space its WAL
	// file already has).
	type failed struct {
		id  identity
		tc  wire.TokenCreateResponse
		err *wire.APIError
	}
	var fails []failed
	okWhileFull := 0
	for i := 0; len(fails) < 3 && next < len(tokens); i++ {
		id, tc, ans, err := enroll(fmt.Sprintf("full-%d", i))
		var ae *wire.APIError
		switch {
		case err == nil:
			okWhileFull++
			whole = append(whole, ans)
		case errors.As(err, &ae):
			fails = append(fails, failed{id, tc, ae})
		default:
			t.Fatalf("enrollment with the disk full: no answer: %v", err)
		}
	}
	if len(fails) == 0 {
		t.Fatalf("%d enrollments succeeded with the disk full and none failed", okWhileFull)
	}
	for _, f := range fails {
		if f.err.Status < 500 || !strings.Contains(f.err.Message, "disk") || !strings.Contains(f.err.Message, "full") {
			t.Errorf("enrollment with the disk full: HTTP %d %s %q, want a 5xx that says the disk is full", f.err.Status, f.err.Code, f.err.Message)
		}
	}
	t.Logf("with the disk full: %d enrollments succeeded (space SQLite already had), then refused: HTTP %d %s %q",
		okWhileFull, fails[0].err.Status, fails[0].err.Code, fails[0].err.Message)

	// As a user sees it: meshctl enroll says why (and, once space returns,
	// the same token works).
	cliState := filepath.Join(base, "cli")
	enrollArgs := []string{"enroll", "--coordinator", cliTok.Coordinator, "--token", cliTok.Token, "--ca-pin", cliTok.CAPin,
		"--name", "cli-node", "--state-dir", cliState}
	r := meshctl(t, nil, enrollArgs...)
	cliRefused := r.code != 0
	if cliRefused {
		if !strings.Contains(r.stderr, "disk is full") {
			t.Errorf("meshctl enroll with the coordinator's disk full does not say so:\n%s", r)
		}
		mustNotExist(t, cliState)
		t.Logf("meshctl enroll with the disk full: exit %d: %s", r.code, strings.TrimSpace(r.stderr))
	}

	// Revocations until the disk refuses one too (a revocation writes
	// less than an enrollment): each is done, or refused as clearly.
	revokedNames := map[string]bool{}
	var refusedRevoke string
	for _, a := range whole {
		var nd wire.Node
		err := admin.call(http.MethodPost, wire.PathAdminNodeRevoke, wire.NameRequest{Name: a.Node.Name}, &nd)
		var ae *wire.APIError
		if err == nil {
			revokedNames[a.Node.Name] = true
			continue
		}
		if !errors.As(err, &ae) || ae.Status != http.StatusServiceUnavailable || !strings.Contains(ae.Message, "disk is full") {
			t.Fatalf("revocation with the disk full: %v, want success or a 503 that says the disk is full", err)
		}
		refusedRevoke = a.Node.Name
		t.Logf("with the disk full: %d revocations succeeded, then refused: HTTP %d %q", len(revokedNames), ae.Status, ae.Message)
		break
	}
	if refusedRevoke == "" {
		t.Logf("with the disk full: all %d revocations succeeded (space SQLite already had)", len(revokedNames))
	}

	// The server runs, reads work, the proxy serves.
	if srv.exited() {
		t.Fatalf("the server exited with the disk full: %v", srv.err)
	}
	var listed []wire.Node
	decode(t, mustOK(t, nil, "nodes", "list", "--data-dir", dataDir, "--json"), &listed)
	for range 5 {
		if ok, detail := served(); !ok {
			t.Errorf("the proxy stopped serving pi1 with the disk full: %s", detail)
		}
	}
	// The log says which disk: the refusals name the database file.
	dbPath := filepath.Join(dataDir, "meshctl.db")
	named := false
	for _, line := range strings.Split(srv.stderr.String(), "\n") {
		named = named || strings.Contains(line, "status=503") && strings.Contains(line, "no space left on the disk holding "+dbPath)
	}
	if !named {
		t.Errorf("no refusal in the server's log names the full disk (holding %s)", dbPath)
	}

	// A crash with the disk still full: the server starts again on the
	// same addresses (nothing at start needs free space), answers reads,
	// still refuses writes clearly, and its proxy serves pi1 again.
	if err := srv.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	<-srv.done
	srv = restartServer(t, srv)
	stopGracefully(t, srv.proc)
	decode(t, mustOK(t, nil, "nodes", "list", "--data-dir", dataDir, "--json"), &listed)
	waitFor(t, proxyDeadline, "the restarted proxy to serve pi1 with the disk full", served)
	if _, _, ans, err := enroll("full-after-restart"); err == nil {
		whole = append(whole, ans) // the WAL had room after all
	} else if !wire.IsCode(err, wire.CodeUnavailable) {
		t.Errorf("enrollment after a restart with the disk full: %v, want a 503 (or success)", err)
	}

	// Space returns: the refused token enrolls, with the same key and name
	// (so no half of the first try is in the way); the revocation works.
	if err := os.Remove(filler); err != nil {
		t.Fatal(err)
	}
	for _, f := range fails {
		ans, err := enrollOnce(f.tc, f.tc.Token, f.id)
		if err != nil {
			t.Fatalf("the token refused with the disk full does not enroll %s after: %v", f.id.name, err)
		}
		whole = append(whole, ans)
	}
	if cliRefused {
		mustOK(t, nil, enrollArgs...)
	}
	if refusedRevoke != "" {
		var nd wire.Node
		if err := admin.call(http.MethodPost, wire.PathAdminNodeRevoke, wire.NameRequest{Name: refusedRevoke}, &nd); err != nil {
			t.Fatalf("revoke %s (refused with the disk full) after space returned: %v", refusedRevoke, err)
		}
		revokedNames[refusedRevoke] = true
	}
	if ok, detail := served(); !ok {
		t.Errorf("the proxy does not serve pi1 after: %s", detail)
	}

	// Everything acknowledged is there, whole; the database is sound.
	var nodes []wire.Node
	decode(t, mustOK(t, nil, "nodes", "list", "--data-dir", dataDir, "--json"), &nodes)
	byID := map[string]wire.Node{}
	for _, nd := range nodes {
		byID[nd.ID] = nd
	}
	for _, a := range whole {
		nd, ok := byID[a.Node.ID]
		if !ok || nd.Name != a.Node.Name || nd.IPv4 != a.Node.IPv4 || nd.IPv6 != a.Node.IPv6 || nd.WireGuardKey != a.Node.WireGuardKey {
			t.Errorf("%s: told %+v, found %+v", a.Node.Name, a.Node, nd)
		}
		if nd.Revoked != revokedNames[a.Node.Name] {
			t.Errorf("%s: revoked %v", nd.Name, nd.Revoked)
		}
	}
	if want := len(whole) + 3; len(nodes) != want { // + pi1, cli-node and the embedded proxy
		t.Errorf("%d nodes listed, want %d", len(nodes), want)
	}
	if code := sigterm(t, srv.proc, 20*time.Second); code != 0 {
		t.Errorf("server exited %d on SIGTERM", code)
	}
	db := readDB(t, dbPath)
	for _, tc := range tokens[:next] {
		n := 0
		for _, r := range db.nodes {
			if r.tokenID == tc.ID {
				n++
			}
		}
		if u := db.tokens[tc.ID].uses; u != n || u > 1 {
			t.Errorf("token %s: uses %d, nodes %d", tc.ID, u, n)
		}
	}
	t.Logf("after: %d nodes whole, integrity_check %s; %v", len(whole), db.integrity, time.Since(began).Round(time.Millisecond))
}
