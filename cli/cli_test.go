package cli

// In-process tests of the command line: cli.Run against a real coordinator
// started in this process on loopback.

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator"
	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/wire"
	"github.com/urfave/cli/v2"
)

// out is the result of one cli.Run.
type out struct {
	code           int
	stdout, stderr string
}

func (o out) String() string {
	return fmt.Sprintf("exit %d\nstdout:\n%s\nstderr:\n%s", o.code, o.stdout, o.stderr)
}

// run calls Run with "meshctl" and args.
func run(args ...string) out {
	var stdout, stderr bytes.Buffer
	code := Run(append([]string{"meshctl"}, args...), &stdout, &stderr)
	return out{code: code, stdout: stdout.String(), stderr: stderr.String()}
}

func mustRun(t *testing.T, args ...string) out {
	t.Helper()
	o := run(args...)
	if o.code != 0 {
		t.Fatalf("meshctl %s: want exit 0, got %s", strings.Join(args, " "), o)
	}
	return o
}

// isolateEnv unsets every MESHCTL_* variable for the test, so that the
// environment the tests run in cannot change flag defaults.
func isolateEnv(t *testing.T) {
	t.Helper()
	for _, kv := range os.Environ() {
		if k, _, _ := strings.Cut(kv, "="); strings.HasPrefix(k, "MESHCTL_") {
			t.Setenv(k, "")
			os.Unsetenv(k)
		}
	}
}

// startCoordinator runs a coordinator in-process (real clock) and returns
// it and its data dir.
func startCoordinator(t *testing.T) (*coordinator.Server, string) {
	t.Helper()
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) { o.Now = nil })
	return c.Server, c.Dir
}

func TestFlagsAfterArgumentsRefused(t *testing.T) {
	isolateEnv(t)
	d := meshtest.ShortTempDir(t) // no server: the usage check must come first
	for _, args := range [][]string{
		{"nodes", "revoke", "pi1", "--data-dir", d},
		{"nodes", "rename", "pi1", "pi2", "--data-dir", d},
		{"nodes", "rename", "pi1", "--json", "pi2"},
		{"nodes", "set-tags", "pi1", "cam", "--data-dir", d},
		{"token", "revoke", "0123456789ab", "--data-dir", d},
		{"admin-key", "revoke", "0123456789ab", "--data-dir", d},
		{"nodes", "list", "extra", "--data-dir", d},
		{"token", "list", "extra", "--json"},
		{"audit", "extra", "--json"},
		{"netmap", "extra", "--state-dir", d},
	} {
		o := run(args...)
		if o.code != ExitUsage || !strings.Contains(o.stderr, "flags go first") {
			t.Errorf("meshctl %s: want exit %d and \"flags go first\", got %s", strings.Join(args, " "), ExitUsage, o)
		}
	}
	// The message shows the right order.
	o := run("nodes", "revoke", "pi1", "--data-dir", d)
	if !strings.Contains(o.stderr, "--data-dir") || !strings.Contains(o.stderr, "meshctl nodes revoke [flags] NAME") {
		t.Errorf("message does not name the flag and the right order: %s", o)
	}
	// Wrong argument counts are usage errors too.
	if o := run("nodes", "revoke", "--data-dir", d); o.code != ExitUsage || !strings.Contains(o.stderr, "expected 1 argument") {
		t.Errorf("nodes revoke without NAME: %s", o)
	}
	if o := run("nodes", "rename", "--data-dir", d, "a"); o.code != ExitUsage {
		t.Errorf("nodes rename with one argument: %s", o)
	}
	if o := run("nodes", "set-tags", "--data-dir", d); o.code != ExitUsage || !strings.Contains(o.stderr, "set-tags [flags] NODE [TAG...]") {
		t.Errorf("nodes set-tags without NODE: %s", o)
	}
}

func TestEveryFlagHasEnvVarAndEveryCommandUsage(t *testing.T) {
	app := NewApp(io.Discard, io.Discard)
	flags, cmds := 0, 0
	checkFlags := func(where string, fs []cli.Flag) {
		for _, f := range fs {
			name := f.Names()[0]
			if name == "help" {
				continue
			}
			flags++
			df, ok := f.(cli.DocGenerationFlag)
			if !ok {
				t.Errorf("%s --%s: %T has no EnvVars", where, name, f)
				continue
			}
			envs := df.GetEnvVars()
			if len(envs) == 0 {
				t.Errorf("%s --%s has no MESHCTL_* environment variable", where, name)
			}
			for _, e := range envs {
				if !strings.HasPrefix(e, "MESHCTL_") || strings.ToUpper(e) != e || strings.ContainsAny(e, "- ") {
					t.Errorf("%s --%s: environment variable %q is not MESHCTL_UPPER_CASE", where, name, e)
				}
			}
			if strings.TrimSpace(df.GetUsage()) == "" {
				t.Errorf("%s --%s has no usage text", where, name)
			}
		}
	}
	var walk func(prefix string, cs []*cli.Command)
	walk = func(prefix string, cs []*cli.Command) {
		for _, c := range cs {
			where := prefix + " " + c.Name
			cmds++
			if strings.TrimSpace(c.Usage) == "" {
				t.Errorf("%s has no Usage", where)
			}
			checkFlags(where, c.Flags)
			walk(where, c.Subcommands)
		}
	}
	if app.Usage == "" {
		t.Error("the app has no Usage")
	}
	checkFlags("meshctl", app.Flags)
	walk("meshctl", app.Commands)
	// Guard against a walk that silently visits nothing.
	if cmds < 15 || flags < 40 {
		t.Errorf("walked only %d commands and %d flags", cmds, flags)
	}
}

func TestEnvVarEquivalentToFlag(t *testing.T) {
	isolateEnv(t)
	_, dir := startCoordinator(t)
	o := mustRun(t, "token", "create", "--data-dir", dir, "--json")
	var tc wire.TokenCreateResponse
	if err := json.Unmarshal([]byte(o.stdout), &tc); err != nil {
		t.Fatalf("token create --json: %v\n%s", err, o)
	}

	t.Setenv("MESHCTL_DATA_DIR", dir)
	o = mustRun(t, "token", "list", "--json")
	var ts []wire.Token
	if err := json.Unmarshal([]byte(o.stdout), &ts); err != nil {
		t.Fatalf("token list --json: %v\n%s", err, o)
	}
	if len(ts) != 1 || ts[0].ID != tc.ID {
		t.Errorf("MESHCTL_DATA_DIR token list = %+v, want the token %s", ts, tc.ID)
	}

	// A boolean flag from the environment.
	t.Setenv("MESHCTL_JSON", "true")
	o = mustRun(t, "token", "list")
	if err := json.Unmarshal([]byte(o.stdout), &ts); err != nil {
		t.Errorf("MESHCTL_JSON=true did not select JSON output: %v\n%s", err, o)
	}

	// A flag still beats the environment.
	other := meshtest.ShortTempDir(t)
	if o := run("token", "list", "--data-dir", other); o.code == 0 || !strings.Contains(o.stderr, other) {
		t.Errorf("--data-dir %s did not override MESHCTL_DATA_DIR: %s", other, o)
	}
}

func TestTokenCreateOptions(t *testing.T) {
	isolateEnv(t)
	_, dir := startCoordinator(t)

	// Commas are not separators: "a,b" arrives as one tag and is refused,
	// since tags are DNS labels.
	o := run("token", "create", "--data-dir", dir, "--uses", "3", "--ttl", "2h", "--tag", "lab", "--tag", "a,b", "--json")
	if o.code == 0 || !strings.Contains(o.stderr, `tag name "a,b"`) {
		t.Errorf("--tag a,b: want a refusal naming the tag, got %s", o)
	}
	if o.stdout != "" {
		t.Errorf("a refused token create printed %q", o.stdout)
	}
	var ts []wire.Token
	json.Unmarshal([]byte(mustRun(t, "token", "list", "--data-dir", dir, "--json").stdout), &ts)
	if len(ts) != 0 {
		t.Errorf("a refused token create stored %+v", ts)
	}

	before := time.Now()
	o = mustRun(t, "token", "create", "--data-dir", dir, "--uses", "3", "--ttl", "2h", "--tag", "lab", "--tag", "pi", "--json")
	var tc wire.TokenCreateResponse
	if err := json.Unmarshal([]byte(o.stdout), &tc); err != nil {
		t.Fatalf("token create --json: %v\n%s", err, o)
	}
	if !slices.Equal(tc.Tags, []string{"lab", "pi"}) {
		t.Errorf("tags = %q, want [lab pi]", tc.Tags)
	}
	if tc.MaxUses != 3 {
		t.Errorf("max_uses = %d, want 3", tc.MaxUses)
	}
	if lo, hi := before.Add(2*time.Hour-time.Minute), time.Now().Add(2*time.Hour+time.Minute); tc.Expires.Before(lo) || tc.Expires.After(hi) {
		t.Errorf("expires = %v, want about 2h from now", tc.Expires)
	}
	json.Unmarshal([]byte(mustRun(t, "token", "list", "--data-dir", dir, "--json").stdout), &ts)
	if len(ts) != 1 || ts[0].ID != tc.ID || !slices.Equal(ts[0].Tags, []string{"lab", "pi"}) || ts[0].MaxUses != 3 || ts[0].Uses != 0 {
		t.Errorf("token list = %+v, want the new token with its tags and 0/3 uses", ts)
	}

	// --reusable means unlimited uses.
	o = mustRun(t, "token", "create", "--data-dir", dir, "--reusable", "--json")
	if err := json.Unmarshal([]byte(o.stdout), &tc); err != nil || tc.MaxUses != 0 {
		t.Errorf("--reusable: max_uses = %d (%v), want 0", tc.MaxUses, err)
	}

	// The human-readable form shows the line to paste.
	o = mustRun(t, "token", "create", "--data-dir", dir)
	if !strings.Contains(o.stdout, "meshctl enroll --coordinator https://127.0.0.1:") || !strings.Contains(o.stdout, "--ca-pin sha256:") {
		t.Errorf("token create does not print the enroll line:\n%s", o)
	}
}

func TestTokenCreateUsageErrors(t *testing.T) {
	isolateEnv(t)
	d := meshtest.ShortTempDir(t) // no server needed: these fail before any request
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"--uses", "2", "--reusable"}, "exclude each other"},
		{[]string{"--uses", "0"}, "--uses must be at least 1"},
		{[]string{"--ttl", "0s"}, "--ttl must be positive"},
		{[]string{"--ttl", "-1h"}, "--ttl must be positive"},
	} {
		args := append([]string{"token", "create", "--data-dir", d}, tc.args...)
		o := run(args...)
		if o.code != ExitUsage || !strings.Contains(o.stderr, tc.want) {
			t.Errorf("meshctl %s: want exit %d and %q, got %s", strings.Join(args, " "), ExitUsage, tc.want, o)
		}
	}
}

func TestVersion(t *testing.T) {
	o := mustRun(t, "version")
	if !strings.HasPrefix(o.stdout, "meshctl ") || len(strings.TrimSpace(o.stdout)) <= len("meshctl") {
		t.Errorf("version printed %q, want \"meshctl <version>\"", o.stdout)
	}
	old := Version
	Version = "v1.2.3"
	t.Cleanup(func() { Version = old })
	if o := mustRun(t, "version"); o.stdout != "meshctl v1.2.3\n" {
		t.Errorf("version with Version set printed %q", o.stdout)
	}
}

func TestAdminCommandWithoutServer(t *testing.T) {
	isolateEnv(t)
	empty := meshtest.ShortTempDir(t)
	missing := filepath.Join(empty, "nope")
	for _, d := range []string{empty, missing} {
		for _, args := range [][]string{
			{"nodes", "list", "--data-dir", d},
			{"token", "create", "--data-dir", d},
			{"audit", "--data-dir", d},
		} {
			o := run(args...)
			if o.code == 0 || !strings.Contains(o.stderr, "no meshctl server is running") || !strings.Contains(o.stderr, d) {
				t.Errorf("meshctl %s: want an error saying no server runs with %s, got %s", strings.Join(args, " "), d, o)
			}
		}
	}
	if _, err := os.Stat(missing); err == nil {
		t.Error("an admin command created the data dir")
	}
}

func TestEnrollRenameRevokeInProcess(t *testing.T) {
	isolateEnv(t)
	srv, dir := startCoordinator(t)
	var tc wire.TokenCreateResponse
	if err := json.Unmarshal([]byte(mustRun(t, "token", "create", "--data-dir", dir, "--json").stdout), &tc); err != nil {
		t.Fatal(err)
	}
	if tc.Coordinator != srv.URL() || tc.CAPin != srv.CAPin() {
		t.Errorf("token create: coordinator %s pin %s, server says %s %s", tc.Coordinator, tc.CAPin, srv.URL(), srv.CAPin())
	}
	state := filepath.Join(t.TempDir(), "state")
	o := mustRun(t, "enroll", "--coordinator", tc.Coordinator, "--token", tc.Token, "--ca-pin", tc.CAPin, "--name", "alpha", "--state-dir", state)
	if !strings.Contains(o.stdout, `node "alpha"`) {
		t.Errorf("enroll output:\n%s", o)
	}

	if o := run("nodes", "rename", "--data-dir", dir, "alpha", "Beta"); o.code == 0 || !strings.Contains(o.stderr, "upper-case") {
		t.Errorf("rename to an invalid name: %s", o)
	}
	o = mustRun(t, "nodes", "rename", "--data-dir", dir, "alpha", "beta")
	if !strings.Contains(o.stdout, "alpha renamed to beta") {
		t.Errorf("rename output:\n%s", o)
	}
	if o := run("nodes", "set-tags", "--data-dir", dir, "beta", "Cam"); o.code == 0 || !strings.Contains(o.stderr, "tag") {
		t.Errorf("set-tags with an invalid tag: %s", o)
	}
	if o := run("nodes", "set-tags", "--data-dir", dir, "nosuch", "cam"); o.code == 0 || !strings.Contains(o.stderr, `no active node named "nosuch"`) {
		t.Errorf("set-tags of an unknown node: %s", o)
	}
	if o := mustRun(t, "nodes", "set-tags", "--data-dir", dir, "beta", "cam", "lab"); !strings.Contains(o.stdout, "node beta tags: cam, lab") {
		t.Errorf("set-tags output:\n%s", o)
	}
	var listed []wire.Node
	if err := json.Unmarshal([]byte(mustRun(t, "nodes", "list", "--data-dir", dir, "--json").stdout), &listed); err != nil ||
		len(listed) != 1 || !slices.Equal(listed[0].Tags, []string{"cam", "lab"}) {
		t.Errorf("nodes list after set-tags: %+v, %v", listed, err)
	}
	if o := mustRun(t, "nodes", "set-tags", "--data-dir", dir, "beta"); !strings.Contains(o.stdout, "node beta has no tags now") {
		t.Errorf("set-tags with no tags:\n%s", o)
	}
	var nm wire.Netmap
	if err := json.Unmarshal([]byte(mustRun(t, "netmap", "--state-dir", state, "--json").stdout), &nm); err != nil {
		t.Fatal(err)
	}
	if nm.Self.Name != "beta" {
		t.Errorf("netmap self after rename = %q, want beta", nm.Self.Name)
	}

	if o := run("nodes", "revoke", "--data-dir", dir, "alpha"); o.code == 0 || !strings.Contains(o.stderr, `no active node named "alpha"`) {
		t.Errorf("revoking the old name: %s", o)
	}
	mustRun(t, "nodes", "revoke", "--data-dir", dir, "beta")
	if o := run("netmap", "--state-dir", state); o.code != ExitRevoked || !strings.Contains(o.stderr, "revoked") {
		t.Errorf("netmap after revoke: want exit %d, got %s", ExitRevoked, o)
	}
	o = mustRun(t, "nodes", "list", "--data-dir", dir)
	if strings.Contains(o.stdout, "beta") || !strings.Contains(o.stdout, "1 revoked node(s) not shown") {
		t.Errorf("nodes list hides revoked nodes by default:\n%s", o)
	}
	if o := mustRun(t, "nodes", "list", "--data-dir", dir, "--all"); !strings.Contains(o.stdout, "beta") || !strings.Contains(o.stdout, "revoked") {
		t.Errorf("nodes list --all shows revoked nodes:\n%s", o)
	}
}

func TestParseSize(t *testing.T) {
	for in, want := range map[string]int64{"64MiB": 64 << 20, "64M": 64 << 20, "1GiB": 1 << 30, "0": 0, "100000000": 100000000, " 48 mib ": 48 << 20, "1.5GiB": 3 << 29} {
		if got, err := parseSize(in); err != nil || got != want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "MiB", "-1MiB", "64XB", "1MiB", "abc"} {
		if got, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) = %d, want an error", in, got)
		}
	}
}

func TestVersionModules(t *testing.T) {
	o := mustRun(t, "version", "--modules")
	// (A test binary carries no module list; cmd/meshctl checks the real
	// binary's.)
	if !strings.Contains(o.stdout, "\ngo go1.") {
		t.Errorf("version --modules printed %q, want the Go version", o.stdout)
	}
}

func TestMemoryLimitFlagRefusesBadSizes(t *testing.T) {
	isolateEnv(t)
	d := meshtest.ShortTempDir(t)
	for _, args := range [][]string{
		{"server", "--data-dir", d, "--memory-limit", "lots"},
		{"server", "--data-dir", d, "--memory-limit", "1KiB"},
		{"up", "--state-dir", d, "--memory-limit", "-5MiB"},
	} {
		o := run(args...)
		if o.code != ExitUsage || !strings.Contains(o.stderr, "--memory-limit") {
			t.Errorf("meshctl %s: want exit %d naming --memory-limit, got %s", strings.Join(args, " "), ExitUsage, o)
		}
	}
	if _, err := os.Stat(filepath.Join(d, "meshctl.db")); err == nil {
		t.Error("the server created its database before refusing its flags")
	}
}
