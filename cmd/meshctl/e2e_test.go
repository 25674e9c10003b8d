package main

// End-to-end tests: build the real binary and drive it as a user would, with
// a `meshctl server` subprocess on loopback and nodes enrolled into temp
// state dirs.

import (
	"bytes"
	"encoding/json"
	"github.com/meshctl/meshctl/internal/meshtest"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// tokenCreated is `meshctl token create --json`.
type tokenCreated struct {
	Token         string   `json:"token"`
	ID            string   `json:"id"`
	Coordinator   string   `json:"coordinator"`
	CAPin         string   `json:"ca_pin"`
	Expires       string   `json:"expires"`
	MaxUses       int      `json:"max_uses"`
	Tags          []string `json:"tags"`
	Role          string   `json:"role"`
	EnrollCommand string   `json:"enroll_command"`
}

// listedNode is one element of `meshctl nodes list --json`.
type listedNode struct {
	ID        string   `json:"id"`
	Name      string   `json:"name"`
	IPv4      string   `json:"ipv4"`
	IPv6      string   `json:"ipv6"`
	Tags      []string `json:"tags"`
	Created   string   `json:"created"`
	LastSeen  *string  `json:"last_seen"` // null: never seen
	Online    bool     `json:"online"`
	Revoked   bool     `json:"revoked"`
	RevokedAt *string  `json:"revoked_at"` // null: not revoked
}

type listedToken struct {
	ID      string `json:"id"`
	Uses    int    `json:"uses"`
	MaxUses int    `json:"max_uses"`
}

type netmapJSON struct {
	Version uint64 `json:"version"`
	Self    struct {
		Name string `json:"name"`
		IPv4 string `json:"ipv4"`
	} `json:"self"`
	Peers []struct {
		Name string `json:"name"`
		ID   string `json:"id"`
		Role string `json:"role"`
	} `json:"peers"`
}

type auditJSON struct {
	Actor  string `json:"actor"`
	Action string `json:"action"`
	Target string `json:"target"`
}

var pinRE = regexp.MustCompile(`^sha256:[0-9a-f]{64}$`)

// step runs a subtest and stops the whole test if it failed, since later
// steps build on its state.
func step(t *testing.T, name string, f func(t *testing.T)) {
	t.Helper()
	if !t.Run(name, f) {
		t.FailNow()
	}
}

func createToken(t *testing.T, dataDir string, extra ...string) tokenCreated {
	t.Helper()
	r := mustOK(t, nil, append([]string{"token", "create", "--data-dir", dataDir, "--json"}, extra...)...)
	var tc tokenCreated
	decode(t, r, &tc)
	return tc
}

// listNodes returns the nodes by name, checking the JSON's field set.
func listNodes(t *testing.T, dataDir string) map[string]listedNode {
	t.Helper()
	r := mustOK(t, nil, "nodes", "list", "--data-dir", dataDir, "--json")
	return parseNodes(t, r)
}

func parseNodes(t *testing.T, r result) map[string]listedNode {
	t.Helper()
	var raw []map[string]json.RawMessage
	decode(t, r, &raw)
	var nodes []listedNode
	decode(t, r, &nodes)
	out := map[string]listedNode{}
	for i, n := range nodes {
		for _, f := range []string{"id", "name", "ipv4", "ipv6", "tags", "created", "last_seen", "online", "revoked", "revoked_at"} {
			if _, ok := raw[i][f]; !ok {
				t.Errorf("node %q lacks field %q in nodes list --json: %s", n.Name, f, r.stdout)
			}
		}
		if string(raw[i]["tags"]) == "null" {
			t.Errorf("node %q: tags is null, want an array", n.Name)
		}
		if string(raw[i]["role"]) == `"proxy"` {
			continue // the server's embedded proxy is a mesh member too; the tests count nodes
		}
		if _, dup := out[n.Name]; dup && !n.Revoked {
			t.Errorf("two nodes named %q", n.Name)
		}
		out[n.Name] = n
	}
	return out
}

func listTokens(t *testing.T, dataDir string) map[string]listedToken {
	t.Helper()
	r := mustOK(t, nil, "token", "list", "--data-dir", dataDir, "--json")
	var ts []listedToken
	decode(t, r, &ts)
	out := map[string]listedToken{}
	for _, tk := range ts {
		out[tk.ID] = tk
	}
	return out
}

func netmap(t *testing.T, stateDir string) netmapJSON {
	t.Helper()
	r := mustOK(t, nil, "netmap", "--state-dir", stateDir, "--json")
	var nm netmapJSON
	decode(t, r, &nm)
	return nm
}

// peerNames lists a netmap's node peers (the server's embedded proxy
// aside).
func peerNames(nm netmapJSON) []string {
	var names []string
	for _, p := range nm.Peers {
		if p.Role != "proxy" {
			names = append(names, p.Name)
		}
	}
	slices.Sort(names)
	return names
}

func checkMode(t *testing.T, path string, want fs.FileMode) {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := st.Mode().Perm(); got != want {
		t.Errorf("%s has mode %04o, want %04o", path, got, want)
	}
}

func readFile(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustNotExist(t *testing.T, path string) {
	t.Helper()
	if _, err := os.Lstat(path); err == nil {
		t.Errorf("%s exists, want it not created", path)
	} else if !os.IsNotExist(err) {
		t.Fatal(err)
	}
}

// stringsIn collects every string value in a decoded JSON document.
func stringsIn(v any) []string {
	switch v := v.(type) {
	case string:
		return []string{v}
	case map[string]any:
		var out []string
		for _, e := range v {
			out = append(out, stringsIn(e)...)
		}
		return out
	case []any:
		var out []string
		for _, e := range v {
			out = append(out, stringsIn(e)...)
		}
		return out
	}
	return nil
}

// otherPin returns a well-formed pin that differs from pin.
func otherPin(pin string) string {
	last := pin[len(pin)-1]
	repl := byte('0')
	if last == '0' {
		repl = '1'
	}
	return pin[:len(pin)-1] + string(repl)
}

func TestEndToEnd(t *testing.T) {
	needBinary(t)
	dataDir := filepath.Join(meshtest.ShortTempDir(t), "d")
	port := freePort(t)
	srv := startServer(t, dataDir, port)
	url := "https://127.0.0.1:" + port
	states := t.TempDir()
	s1, s2 := filepath.Join(states, "s1"), filepath.Join(states, "s2")

	var tok1, tok2 tokenCreated
	var pin string
	step(t, "TokenCreateJSON", func(t *testing.T) {
		before := time.Now()
		r := mustOK(t, nil, "token", "create", "--data-dir", dataDir, "--json")
		var raw map[string]any
		decode(t, r, &raw)
		for _, f := range []string{"token", "coordinator", "ca_pin", "expires", "enroll_command"} {
			if s, ok := raw[f].(string); !ok || s == "" {
				t.Errorf("token create --json: field %q = %#v, want a non-empty string", f, raw[f])
			}
		}
		decode(t, r, &tok1)
		if !strings.HasPrefix(tok1.Token, "meshctl-enroll-") {
			t.Errorf("token = %q, want the meshctl-enroll- prefix", tok1.Token)
		}
		if tok1.Coordinator != url {
			t.Errorf("coordinator = %q, want %q", tok1.Coordinator, url)
		}
		if !pinRE.MatchString(tok1.CAPin) {
			t.Errorf("ca_pin = %q, want sha256:<64 hex>", tok1.CAPin)
		}
		exp, err := time.Parse(time.RFC3339, tok1.Expires)
		if err != nil {
			t.Errorf("expires %q is not RFC 3339: %v", tok1.Expires, err)
		} else if lo, hi := before.Add(time.Hour-time.Minute), time.Now().Add(time.Hour+time.Minute); exp.Before(lo) || exp.After(hi) {
			t.Errorf("expires = %v, want about 1h from now (%v…%v)", exp, lo, hi)
		}
		if tok1.MaxUses != 1 || tok1.Role != "node" {
			t.Errorf("max_uses = %d, role = %q; want a single-use node token", tok1.MaxUses, tok1.Role)
		}
		for _, w := range []string{"--coordinator " + url, "--token " + tok1.Token, "--ca-pin " + tok1.CAPin} {
			if !strings.Contains(tok1.EnrollCommand, w) {
				t.Errorf("enroll_command %q lacks %q", tok1.EnrollCommand, w)
			}
		}
		if f := strings.Fields(tok1.EnrollCommand); len(f) < 2 || f[0] != "meshctl" || f[1] != "enroll" {
			t.Errorf("enroll_command %q does not start with `meshctl enroll`", tok1.EnrollCommand)
		}
		pin = tok1.CAPin
		if !strings.Contains(srv.stdout.String(), pin) {
			t.Errorf("server banner does not show the CA pin %s:\n%s", pin, srv.stdout)
		}
	})

	step(t, "EnrollWithPrintedLine", func(t *testing.T) {
		// Paste the printed line, as the docs say, adding name and state dir.
		args := append(strings.Fields(tok1.EnrollCommand)[1:], "--name", "pi1", "--state-dir", s1)
		r := mustOK(t, nil, args...)
		if !strings.Contains(r.stdout, `"pi1"`) {
			t.Errorf("enroll output does not name the node:\n%s", r)
		}
		checkMode(t, s1, 0o700)
		checkMode(t, filepath.Join(s1, "node.json"), 0o600)
		checkMode(t, filepath.Join(s1, "netmap.json"), 0o600)
		b := readFile(t, filepath.Join(s1, "node.json"))
		var st map[string]any
		if err := json.Unmarshal(b, &st); err != nil {
			t.Fatalf("node.json: %v", err)
		}
		for _, s := range stringsIn(st) {
			if s == tok1.Token {
				t.Errorf("node.json stores the enrollment token")
			}
		}
		secret := tok1.Token[strings.LastIndex(tok1.Token, "-")+1:]
		if bytes.Contains(b, []byte(secret)) {
			t.Errorf("node.json contains the token's secret part")
		}
		if st["name"] != "pi1" || st["coordinator"] != url || st["ca_pin"] != pin {
			t.Errorf("node.json name/coordinator/ca_pin = %v/%v/%v, want pi1/%s/%s", st["name"], st["coordinator"], st["ca_pin"], url, pin)
		}
	})

	step(t, "EnrollSecondNode", func(t *testing.T) {
		tok2 = createToken(t, dataDir, "--tag", "lab")
		if tok2.Token == tok1.Token || tok2.ID == tok1.ID {
			t.Fatal("second token equals the first")
		}
		mustOK(t, nil, "enroll", "--coordinator", tok2.Coordinator, "--token", tok2.Token, "--ca-pin", tok2.CAPin,
			"--name", "pi2", "--state-dir", s2)
	})

	step(t, "NodesListJSON", func(t *testing.T) {
		before := time.Now()
		nodes := listNodes(t, dataDir)
		if len(nodes) != 2 {
			t.Fatalf("nodes list has %d nodes, want pi1 and pi2: %v", len(nodes), nodes)
		}
		pool := netip.MustParsePrefix("100.64.0.0/16")
		v4s, v6s, ids := map[string]bool{}, map[string]bool{}, map[string]bool{}
		for _, name := range []string{"pi1", "pi2"} {
			n, ok := nodes[name]
			if !ok {
				t.Fatalf("node %s not listed: %v", name, nodes)
			}
			v4, err := netip.ParseAddr(n.IPv4)
			if err != nil || !v4.Is4() || !pool.Contains(v4) {
				t.Errorf("%s: ipv4 %q is not inside %v", name, n.IPv4, pool)
			}
			v6, err := netip.ParseAddr(n.IPv6)
			if err != nil || !v6.Is6() || v6.Is4In6() || !netip.MustParsePrefix("fd00::/8").Contains(v6) {
				t.Errorf("%s: ipv6 %q is not a ULA address", name, n.IPv6)
			} else if b4, b6 := v4.As4(), v6.As16(); !bytes.Equal(b4[:], b6[12:]) {
				t.Errorf("%s: ipv6 %v does not carry ipv4 %v in its low 32 bits", name, v6, v4)
			}
			v4s[n.IPv4], v6s[n.IPv6], ids[n.ID] = true, true, true
			created, err := time.Parse(time.RFC3339, n.Created)
			if err != nil || created.After(before) || before.Sub(created) > time.Minute {
				t.Errorf("%s: created = %q, want a recent RFC 3339 time", name, n.Created)
			}
			// Enrollment does not count as being seen: the node has not
			// talked to the coordinator with its certificate yet.
			if n.LastSeen != nil {
				t.Errorf("%s: last_seen = %q before the node ever used the API, want null", name, *n.LastSeen)
			}
			if n.RevokedAt != nil {
				t.Errorf("%s: revoked_at = %q, want null", name, *n.RevokedAt)
			}
			if n.Online || n.Revoked {
				t.Errorf("%s: online=%v revoked=%v, want both false", name, n.Online, n.Revoked)
			}
		}
		if len(v4s) != 2 || len(v6s) != 2 || len(ids) != 2 {
			t.Errorf("nodes share an id or address: %+v", nodes)
		}
		if got := nodes["pi2"].Tags; !slices.Equal(got, []string{"lab"}) {
			t.Errorf("pi2 tags = %q, want the token's [lab]", got)
		}
		if got := nodes["pi1"].Tags; len(got) != 0 {
			t.Errorf("pi1 tags = %q, want none", got)
		}
		var st map[string]any
		json.Unmarshal(readFile(t, filepath.Join(s1, "node.json")), &st)
		if st["node_id"] != nodes["pi1"].ID || st["ipv4"] != nodes["pi1"].IPv4 {
			t.Errorf("node.json id/ipv4 = %v/%v, server says %s/%s", st["node_id"], st["ipv4"], nodes["pi1"].ID, nodes["pi1"].IPv4)
		}
	})

	t.Run("SingleUseTokenRefusedTwice", func(t *testing.T) {
		mustFail(t, nil, []string{"token refused"}, "enroll", "--coordinator", url, "--token", tok1.Token, "--ca-pin", pin,
			"--name", "pi9", "--state-dir", filepath.Join(states, "reuse"))
		if n := len(listNodes(t, dataDir)); n != 2 {
			t.Errorf("after a refused enrollment nodes list has %d nodes, want 2", n)
		}
		if tk := listTokens(t, dataDir)[tok1.ID]; tk.Uses != 1 || tk.MaxUses != 1 {
			t.Errorf("token %s uses/max = %d/%d, want 1/1", tok1.ID, tk.Uses, tk.MaxUses)
		}
	})

	step(t, "NetmapMarksNodeSeen", func(t *testing.T) {
		nm := netmap(t, s2)
		if nm.Self.Name != "pi2" || !slices.Equal(peerNames(nm), []string{"pi1"}) {
			t.Errorf("pi2's netmap: self %q, peers %q; want pi2 seeing pi1", nm.Self.Name, peerNames(nm))
		}
		before := time.Now()
		nodes := listNodes(t, dataDir)
		n := nodes["pi2"]
		if n.LastSeen == nil || !n.Online {
			t.Fatalf("after a netmap request pi2 has last_seen=%v online=%v, want a time and true", n.LastSeen, n.Online)
		}
		if seen, err := time.Parse(time.RFC3339, *n.LastSeen); err != nil || before.Sub(seen) > time.Minute || seen.After(time.Now()) {
			t.Errorf("pi2 last_seen = %q, want a recent RFC 3339 time", *n.LastSeen)
		}
		if p := nodes["pi1"]; p.LastSeen != nil || p.Online {
			t.Errorf("pi1 never asked for a netmap but has last_seen=%v online=%v", p.LastSeen, p.Online)
		}
	})

	step(t, "RevokeNode", func(t *testing.T) {
		r := mustOK(t, nil, "nodes", "revoke", "--data-dir", dataDir, "pi1")
		if !strings.Contains(r.stdout, "pi1") || !strings.Contains(r.stdout, "revoked") {
			t.Errorf("revoke output:\n%s", r)
		}
		r = meshctl(t, nil, "netmap", "--state-dir", s1)
		if r.code != 3 || !strings.Contains(r.stderr, "revoked") {
			t.Errorf("netmap of a revoked node: want exit 3 and \"revoked\" on stderr:\n%s", r)
		}
		if nm := netmap(t, s2); len(peerNames(nm)) != 0 {
			t.Errorf("pi2 still sees %q after pi1 was revoked", peerNames(nm))
		}
		nodes := listNodes(t, dataDir)
		if n := nodes["pi1"]; !n.Revoked || n.Online || n.RevokedAt == nil {
			t.Errorf("pi1 after revoke: revoked=%v online=%v revoked_at=%v", n.Revoked, n.Online, n.RevokedAt)
		} else if at, err := time.Parse(time.RFC3339, *n.RevokedAt); err != nil || time.Since(at) > time.Minute {
			t.Errorf("pi1 revoked_at = %q, want a recent RFC 3339 time", *n.RevokedAt)
		}
		if nodes["pi2"].Revoked || nodes["pi2"].RevokedAt != nil {
			t.Error("pi2 revoked too")
		}
		mustFail(t, nil, []string{`no active node named "pi1"`}, "nodes", "revoke", "--data-dir", dataDir, "pi1")
	})

	var tok3 tokenCreated
	t.Run("EnrollRefusals", func(t *testing.T) {
		tok3 = createToken(t, dataDir)
		base := []string{"enroll", "--coordinator", url, "--token", tok3.Token}
		s2State := readFile(t, filepath.Join(s2, "node.json"))

		// An enrolled state dir is not replaced without --force.
		mustFail(t, nil, []string{"already enrolled", "--force"}, append(base, "--ca-pin", pin, "--name", "pi5", "--state-dir", s2)...)
		if !bytes.Equal(readFile(t, filepath.Join(s2, "node.json")), s2State) {
			t.Error("refused enrollment changed the existing node.json")
		}

		// A wrong pin is caught before the token is sent, into a new dir…
		wrong := otherPin(pin)
		fresh := filepath.Join(states, "wrongpin")
		mustFail(t, nil, []string{"pin mismatch"}, append(base, "--ca-pin", wrong, "--name", "pi5", "--state-dir", fresh)...)
		mustNotExist(t, filepath.Join(fresh, "node.json"))
		t.Run("WrongPinCreatesNoStateDir", func(t *testing.T) {
			// A refused enrollment must leave no trace; node.Enroll creates
			// the state dir before it has talked to the coordinator.
			mustNotExist(t, fresh)
		})
		// …and with --force over an existing identity, which stays as it was.
		mustFail(t, nil, []string{"pin mismatch"}, append(base, "--ca-pin", wrong, "--name", "pi5", "--state-dir", s2, "--force")...)
		if !bytes.Equal(readFile(t, filepath.Join(s2, "node.json")), s2State) {
			t.Error("enrollment refused for a pin mismatch changed node.json")
		}

		// A state dir that is a file is refused before the token is spent.
		file := filepath.Join(states, "file")
		if err := os.WriteFile(file, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		mustFail(t, nil, []string{"not a directory"}, append(base, "--ca-pin", pin, "--name", "pi5", "--state-dir", file)...)

		// Plain http is refused before anything happens.
		plain := filepath.Join(states, "plain")
		mustFail(t, nil, []string{"plain http"}, "enroll", "--coordinator", "http://127.0.0.1:"+port, "--token", tok3.Token,
			"--ca-pin", pin, "--name", "pi5", "--state-dir", plain)
		mustNotExist(t, plain)

		// None of these consumed the token.
		if tk := listTokens(t, dataDir)[tok3.ID]; tk.Uses != 0 {
			t.Errorf("refused enrollments consumed token %s: uses = %d", tok3.ID, tk.Uses)
		}
		if n := len(listNodes(t, dataDir)); n != 2 {
			t.Errorf("nodes list has %d nodes after refused enrollments, want 2", n)
		}
	})

	t.Run("DamagedStateFile", func(t *testing.T) {
		good := readFile(t, filepath.Join(s2, "node.json"))

		corrupt := filepath.Join(states, "corrupt")
		if err := os.Mkdir(corrupt, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(corrupt, "node.json"), good[:len(good)/2], 0o600); err != nil {
			t.Fatal(err)
		}
		r := mustFail(t, nil, []string{"corrupt"}, "netmap", "--state-dir", corrupt)
		if r.code == 3 {
			t.Errorf("a corrupt state file exits 3 (revoked):\n%s", r)
		}
		if b := readFile(t, filepath.Join(corrupt, "node.json")); !bytes.Equal(b, good[:len(good)/2]) {
			t.Error("netmap rewrote a corrupt node.json")
		}

		open := filepath.Join(states, "open")
		if err := os.Mkdir(open, 0o700); err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(open, "node.json")
		if err := os.WriteFile(p, good, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, 0o644); err != nil {
			t.Fatal(err)
		}
		mustFail(t, nil, []string{"chmod 600"}, "netmap", "--state-dir", open)
		checkMode(t, p, 0o644) // reported, not silently "fixed"
	})

	t.Run("TokenFromEnvAndFile", func(t *testing.T) {
		if tok3.Token == "" {
			t.Skip("no token from EnrollRefusals")
		}
		s3, s4 := filepath.Join(states, "s3"), filepath.Join(states, "s4")
		mustOK(t, []string{"MESHCTL_TOKEN=" + tok3.Token}, "enroll", "--coordinator", url, "--ca-pin", pin, "--name", "pi3", "--state-dir", s3)

		tok4 := createToken(t, dataDir)
		f := filepath.Join(t.TempDir(), "token")
		if err := os.WriteFile(f, []byte(tok4.Token+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		r := meshctl(t, nil, "enroll", "--coordinator", url, "--ca-pin", pin, "--token", tok4.Token, "--token-file", f,
			"--name", "pi4", "--state-dir", s4)
		if r.code != 2 || !strings.Contains(r.stderr, "exclude each other") {
			t.Errorf("--token with --token-file: want exit 2, \"exclude each other\":\n%s", r)
		}
		mustOK(t, nil, "enroll", "--coordinator", url, "--ca-pin", pin, "--token-file", f, "--name", "pi4", "--state-dir", s4)

		toks := listTokens(t, dataDir)
		if toks[tok3.ID].Uses != 1 || toks[tok4.ID].Uses != 1 {
			t.Errorf("token uses = %d and %d, want 1 each", toks[tok3.ID].Uses, toks[tok4.ID].Uses)
		}
		nodes := listNodes(t, dataDir)
		v4s := map[string]string{}
		for _, name := range []string{"pi1", "pi2", "pi3", "pi4"} {
			n, ok := nodes[name]
			if !ok {
				t.Fatalf("%s not listed: %v", name, nodes)
			}
			if other, dup := v4s[n.IPv4]; dup {
				// pi1's address is quarantined after revocation.
				t.Errorf("%s got %s, already held by %s", name, n.IPv4, other)
			}
			v4s[n.IPv4] = name
		}
		if nm := netmap(t, s3); !slices.Equal(peerNames(nm), []string{"pi2", "pi4"}) {
			t.Errorf("pi3 sees %q, want pi2 and pi4", peerNames(nm))
		}
	})

	t.Run("Audit", func(t *testing.T) {
		r := mustOK(t, nil, "audit", "--data-dir", dataDir, "--json", "--limit", "0")
		var es []auditJSON
		decode(t, r, &es)
		count := map[string]int{}
		targets := map[string][]string{}
		for _, e := range es {
			count[e.Action]++
			targets[e.Action] = append(targets[e.Action], e.Target)
			if e.Action == "token.create" && !strings.HasPrefix(e.Actor, "local:uid=") && e.Actor != "server:embedded-proxy" {
				t.Errorf("token.create actor = %q, want local:uid=…", e.Actor)
			}
		}
		if count["token.create"] < 3 {
			t.Errorf("audit has %d token.create entries, want ≥ 3:\n%s", count["token.create"], r.stdout)
		}
		for _, n := range []string{"pi1", "pi2"} {
			if !slices.Contains(targets["node.enroll"], n) {
				t.Errorf("audit has no node.enroll for %s: %q", n, targets["node.enroll"])
			}
		}
		if !slices.Equal(targets["node.revoke"], []string{"pi1"}) {
			t.Errorf("node.revoke targets = %q, want [pi1]", targets["node.revoke"])
		}
		r = mustOK(t, nil, "audit", "--data-dir", dataDir, "--json", "--limit", "1")
		var one []auditJSON
		decode(t, r, &one)
		if len(one) != 1 || len(es) == 0 || one[0] != es[len(es)-1] {
			t.Errorf("audit --limit 1 = %+v, want just the newest of %+v", one, es)
		}
	})

	t.Run("RemoteAdminKey", func(t *testing.T) {
		r := mustOK(t, nil, "admin-key", "create", "--data-dir", dataDir, "--json")
		var k struct {
			Key, ID, Coordinator string
			CAPin                string `json:"ca_pin"`
		}
		decode(t, r, &k)
		if !strings.HasPrefix(k.Key, "meshctl-admin-") || k.Coordinator != url || k.CAPin != pin {
			t.Fatalf("admin-key create --json = %+v, want a meshctl-admin- key for %s with pin %s", k, url, pin)
		}
		remote := []string{"nodes", "list", "--coordinator", url, "--ca-pin", pin, "--json"}
		r = mustOK(t, []string{"MESHCTL_ADMIN_KEY=" + k.Key}, remote...)
		got, want := parseNodes(t, r), listNodes(t, dataDir)
		if len(got) != len(want) {
			t.Errorf("remote nodes list has %d nodes, local %d", len(got), len(want))
		}
		for name, n := range want {
			if got[name].ID != n.ID || got[name].Revoked != n.Revoked {
				t.Errorf("remote sees %s as %+v, local as %+v", name, got[name], n)
			}
		}

		f := filepath.Join(t.TempDir(), "admin-key")
		if err := os.WriteFile(f, []byte(k.Key+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		mustOK(t, nil, append(remote, "--admin-key-file", f)...)

		wrongKey := k.Key[:len(k.Key)-1] + "a"
		if wrongKey == k.Key {
			wrongKey = k.Key[:len(k.Key)-1] + "b"
		}
		mustFail(t, []string{"MESHCTL_ADMIN_KEY=" + wrongKey}, []string{"admin key refused"}, remote...)
		mustFail(t, nil, []string{"needs an admin key"}, remote...)
		mustFail(t, []string{"MESHCTL_ADMIN_KEY=" + k.Key}, []string{"pin mismatch"},
			"nodes", "list", "--coordinator", url, "--ca-pin", otherPin(pin), "--json")

		// A revoked key stops working.
		mustOK(t, nil, "admin-key", "revoke", "--data-dir", dataDir, k.ID)
		mustFail(t, []string{"MESHCTL_ADMIN_KEY=" + k.Key}, []string{"admin key refused"}, remote...)
	})

	t.Run("SecondServerRefused", func(t *testing.T) {
		mustFail(t, nil, []string{"already running"},
			"server", "--data-dir", dataDir, "--listen", "127.0.0.1:"+freePort(t), "--public-host", "127.0.0.1")
		// The first server is unaffected (its socket was not replaced).
		mustOK(t, nil, "nodes", "list", "--data-dir", dataDir, "--json")
	})

	step(t, "SIGTERM", func(t *testing.T) {
		if err := srv.cmd.Process.Signal(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if code := srv.wait(t, 15*time.Second); code != 0 {
			t.Errorf("server exited %d on SIGTERM, want 0\nstderr:\n%s", code, srv.stderr)
		}
		mustNotExist(t, filepath.Join(dataDir, "admin.sock"))
		mustFail(t, nil, []string{"no meshctl server is running"}, "nodes", "list", "--data-dir", dataDir)
	})

	t.Run("RestartKeepsState", func(t *testing.T) {
		srv2 := startServer(t, dataDir, port)
		nodes := listNodes(t, dataDir)
		if len(nodes) != 4 || !nodes["pi1"].Revoked || nodes["pi2"].Revoked {
			t.Errorf("after a restart: %+v, want pi1 (revoked) to pi4", nodes)
		}
		if tc := createToken(t, dataDir); tc.CAPin != pin {
			t.Errorf("CA pin changed across a restart: %s → %s", pin, tc.CAPin)
		}
		if nm := netmap(t, s2); !slices.Equal(peerNames(nm), []string{"pi3", "pi4"}) {
			t.Errorf("pi2 after restart sees %q, want pi3 and pi4", peerNames(nm))
		}
		if r := meshctl(t, nil, "netmap", "--state-dir", s1); r.code != 3 {
			t.Errorf("revoked pi1 after a restart: want exit 3:\n%s", r)
		}
		if err := srv2.cmd.Process.Signal(syscall.SIGINT); err != nil {
			t.Fatal(err)
		}
		if code := srv2.wait(t, 15*time.Second); code != 0 {
			t.Errorf("server exited %d on SIGINT, want 0\nstderr:\n%s", code, srv2.stderr)
		}
	})
}

// The real binary lists the modules it was built from (for vulnerability
// checks against its exact dependencies).
func TestVersionListsModules(t *testing.T) {
	needBinary(t)
	r := mustOK(t, nil, "version", "--modules")
	for _, want := range []string{"\ngo go1.", "\ngolang.zx2c4.com/wireguard v", "\ngolang.org/x/crypto v", "\nmodernc.org/sqlite v"} {
		if !strings.Contains(r.stdout, want) {
			t.Errorf("version --modules lacks %q:\n%s", strings.TrimSpace(want), r.stdout)
		}
	}
}
