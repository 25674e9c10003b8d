package main

// End-to-end tests of the proxy that `meshctl server` embeds: nodes publish
// services with `meshctl up --expose`, and clients reach them at
// http://<node>.localhost:PORT/ through the proxy. TestProxyEndToEnd drives
// it with a Go HTTP client and curl; TestBrowser with a real headless
// Chromium (chromedp), including the sign-in form of private services.

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/cookiejar"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/chromedp/chromedp"
	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/wire"
)

// proxyDeadline bounds every wait for the proxy to see a change (a node
// coming up, a revocation): generous for -race on two cores.
const proxyDeadline = 20 * time.Second

// chromiumPath is where Debian's chromium package (CI installs it) puts the
// browser.
const chromiumPath = "/usr/bin/chromium"

// inCI reports whether we run under CI (.ci/run exports CI=true), where
// missing tools and features fail instead of skipping.
func inCI() bool { return os.Getenv("CI") == "true" }

// skipOrFail skips the test outside CI and fails it under CI=true.
func skipOrFail(t *testing.T, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	if inCI() {
		t.Fatalf("%s (CI=true: this is a failure, not a skip)", msg)
	}
	t.Skip(msg + " (skipped outside CI; under CI=true this fails)")
}

// accessKeyCreated is `meshctl access-key create --json`.
type accessKeyCreated struct {
	Key     string `json:"key"`
	ID      string `json:"id"`
	Node    string `json:"node"`
	Service string `json:"service"`
	Expires string `json:"expires"`
}

// missingCommand reports whether r failed because the binary has no such
// (sub)command: urfave/cli answers "No help topic for 'X'".
func missingCommand(r result) bool {
	return r.code != 0 && strings.Contains(r.stderr, "No help topic for")
}

// createAccessKey runs `meshctl access-key create --data-dir D --node N
// --json`. The command is being built concurrently: while the binary lacks
// it, the calling (sub)test skips, except under CI=true.
func createAccessKey(t *testing.T, dataDir, node string) accessKeyCreated {
	t.Helper()
	r := meshctl(t, nil, "access-key", "create", "--data-dir", dataDir, "--node", node, "--json")
	if missingCommand(r) {
		skipOrFail(t, "this meshctl has no `access-key create` command yet:\n%s", r)
	}
	if r.code != 0 {
		t.Fatalf("want exit 0:\n%s", r)
	}
	var k accessKeyCreated
	decode(t, r, &k)
	if !strings.HasPrefix(k.Key, "meshctl-access-") || k.ID == "" {
		t.Fatalf("access-key create --json: key %q (want the meshctl-access- prefix), id %q (want one):\n%s", k.Key, k.ID, r)
	}
	return k
}

// revokeAccessKey runs `meshctl access-key revoke --data-dir D ID`.
func revokeAccessKey(t *testing.T, dataDir, id string) {
	t.Helper()
	r := meshctl(t, nil, "access-key", "revoke", "--data-dir", dataDir, id)
	if missingCommand(r) {
		skipOrFail(t, "this meshctl has no `access-key revoke` command yet:\n%s", r)
	}
	if r.code != 0 {
		t.Fatalf("want exit 0:\n%s", r)
	}
}

// echoed is what a backend's /echo answers: the request as it arrived.
type echoed struct {
	Host      string `json:"host"`
	XFF       string `json:"x_forwarded_for"`
	XFHost    string `json:"x_forwarded_host"`
	XFProto   string `json:"x_forwarded_proto"`
	Forwarded string `json:"forwarded"`
	Cookie    string `json:"cookie"`
	Path      string `json:"path"`
	// Other is every other X-Forwarded-* or X-Real-Ip header that arrived.
	Other []string `json:"other_forwarding_headers"`
}

// startBackend runs a local HTTP service that a node publishes. /echo
// answers the request's forwarding headers as JSON; every other path
// answers text: as a tiny HTML page to browsers (Accept: text/html), as
// plain text to everyone else, so that curl and Go see exactly text.
func startBackend(t *testing.T, text string) string {
	t.Helper()
	b := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/echo" {
			w.Header().Set("Content-Type", "application/json")
			json.NewEncoder(w).Encode(echoed{
				Host: r.Host, XFF: r.Header.Get("X-Forwarded-For"), XFHost: r.Header.Get("X-Forwarded-Host"),
				XFProto: r.Header.Get("X-Forwarded-Proto"), Forwarded: r.Header.Get("Forwarded"),
				Cookie: r.Header.Get("Cookie"), Path: r.URL.Path, Other: otherForwardingHeaders(r.Header),
			})
			return
		}
		if strings.Contains(r.Header.Get("Accept"), "text/html") {
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
			fmt.Fprintf(w, "<!doctype html><html><head><title>%s</title></head><body>%s</body></html>\n", text, text)
			return
		}
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		io.WriteString(w, text)
	}))
	t.Cleanup(b.Close)
	return b.Listener.Addr().String()
}

func otherForwardingHeaders(h http.Header) []string {
	var out []string
	for k, v := range h {
		switch n := strings.ToLower(k); {
		case n == "x-forwarded-for" || n == "x-forwarded-host" || n == "x-forwarded-proto":
		case n == "x-real-ip" || strings.HasPrefix(n, "x-forwarded-"):
			out = append(out, k+": "+strings.Join(v, ", "))
		}
	}
	return out
}

// proxyMesh is a `meshctl server` with two nodes up behind its proxy:
//
//	pi1: web (public, "hello from pi1"), api (public, "pi1 api"),
//	     admin (private, "pi1 admin")
//	pi2: web (private, "hello from pi2")
type proxyMesh struct {
	srv      *server
	dataDir  string
	port     string // the proxy's HTTP port
	up1, up2 *proc
}

// url is http://HOST.localhost:PORT/PATH on the proxy.
func (m *proxyMesh) url(host, path string) string {
	return "http://" + host + ".localhost:" + m.port + path
}

// logs is the processes' stderr, for failure messages.
func (m *proxyMesh) logs() string {
	return "server:\n" + m.srv.stderr.String() + "\npi1:\n" + m.up1.stderr.String() + "\npi2:\n" + m.up2.stderr.String()
}

// startProxyMesh starts the server and both nodes and waits until the
// proxy serves pi1 and knows pi2.
func startProxyMesh(t *testing.T) *proxyMesh {
	t.Helper()
	needBinary(t)
	// Backends first: their cleanup (Close) then runs after the agents'.
	web1 := startBackend(t, "hello from pi1")
	api1 := startBackend(t, "pi1 api")
	admin1 := startBackend(t, "pi1 admin")
	web2 := startBackend(t, "hello from pi2")

	base := meshtest.ShortTempDir(t)
	dataDir := filepath.Join(base, "d")
	srv := startServer(t, dataDir, freePort(t))
	stopGracefully(t, srv.proc)
	_, port, err := net.SplitHostPort(srv.http)
	if err != nil {
		t.Fatal(err)
	}
	s1, s2 := filepath.Join(base, "pi1"), filepath.Join(base, "pi2")
	enrollNode(t, dataDir, "pi1", s1)
	enrollNode(t, dataDir, "pi2", s2)
	m := &proxyMesh{srv: srv, dataDir: dataDir, port: port}
	m.up1 = start(t, nil, "up", "--state-dir", s1, "--listen-port", "0",
		"--expose", "web="+web1+",public", "--expose", "api="+api1+",public", "--expose", "admin="+admin1)
	stopGracefully(t, m.up1)
	m.up2 = start(t, nil, "up", "--state-dir", s2, "--listen-port", "0", "--expose", "web="+web2)
	stopGracefully(t, m.up2)
	waitAgentUp(t, m.up1, s1)
	waitAgentUp(t, m.up2, s2)

	c := newProxyClient(t, nil)
	waitFor(t, proxyDeadline, "the proxy to serve pi1 and know pi2", func() (bool, string) {
		s1, b1, err1 := get(c, m.url("pi1", "/"), nil)
		s2, _, err2 := get(c, m.url("pi2", "/"), nil)
		return s1 == 200 && b1 == "hello from pi1" && s2 == 401,
			fmt.Sprintf("pi1: %d %q %v\npi2: %d %v\n%s", s1, b1, err1, s2, err2, m.logs())
	})
	return m
}

// newProxyClient is an HTTP client that dials *.localhost at 127.0.0.1
// (Go's resolver need not know the name), never uses a proxy from the
// environment and never follows redirects (the tests check them).
func newProxyClient(t *testing.T, jar http.CookieJar) *http.Client {
	t.Helper()
	d := &net.Dialer{Timeout: 5 * time.Second}
	tr := &http.Transport{
		Proxy: nil,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			host, port, err := net.SplitHostPort(addr)
			if err != nil {
				return nil, err
			}
			if host == "localhost" || strings.HasSuffix(host, ".localhost") {
				addr = net.JoinHostPort("127.0.0.1", port)
			}
			return d.DialContext(ctx, "tcp4", addr)
		},
	}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{
		Transport:     tr,
		Jar:           jar,
		Timeout:       15 * time.Second,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
}

// do sends a request and reads the whole answer; status is 0 on error.
func do(c *http.Client, method, u string, body io.Reader, hdr http.Header) (*http.Response, string, error) {
	req, err := http.NewRequest(method, u, body)
	if err != nil {
		return nil, "", err
	}
	for k, vs := range hdr {
		req.Header[k] = vs
	}
	resp, err := c.Do(req)
	if err != nil {
		return nil, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp, string(b), err
}

// get is a GET that reports status 0 on a transport error.
func get(c *http.Client, u string, hdr http.Header) (int, string, error) {
	resp, body, err := do(c, http.MethodGet, u, nil, hdr)
	if err != nil {
		return 0, body, err
	}
	return resp.StatusCode, body, nil
}

// mustGet is get that fails the test on a transport error.
func mustGet(t *testing.T, c *http.Client, u string, hdr http.Header) (int, string) {
	t.Helper()
	st, body, err := get(c, u, hdr)
	if err != nil {
		t.Fatalf("GET %s: %v", u, err)
	}
	return st, body
}

// signIn posts the sign-in form (key, next) to host's /.meshctl/signin.
func (m *proxyMesh) signIn(t *testing.T, c *http.Client, host, key, next string, hdr http.Header) (*http.Response, string) {
	t.Helper()
	form := url.Values{"key": {key}, "next": {next}}
	h := http.Header{"Content-Type": {"application/x-www-form-urlencoded"}}
	for k, vs := range hdr {
		h[k] = vs
	}
	resp, body, err := do(c, http.MethodPost, m.url(host, "/.meshctl/signin"), strings.NewReader(form.Encode()), h)
	if err != nil {
		t.Fatalf("POST the sign-in form on %s: %v", host, err)
	}
	return resp, body
}

// checkSignInPage checks that body is the sign-in page: a form that posts
// to /.meshctl/signin on the same host, with an input named key.
func checkSignInPage(t *testing.T, body string) {
	t.Helper()
	for _, want := range []string{"Sign in", "<form", `method="post"`, `action="/.meshctl/signin"`, `name="key"`, `name="next"`} {
		if !strings.Contains(body, want) {
			t.Errorf("the sign-in page lacks %q:\n%s", want, body)
		}
	}
}

func decodeEcho(t *testing.T, body string) echoed {
	t.Helper()
	var e echoed
	if err := json.Unmarshal([]byte(body), &e); err != nil {
		t.Fatalf("backend /echo answered %q: %v", body, err)
	}
	return e
}

func TestProxyEndToEnd(t *testing.T) {
	m := startProxyMesh(t)
	c := newProxyClient(t, nil)
	hostPort := func(h string) string { return h + ".localhost:" + m.port }

	step(t, "PublicDefaultService", func(t *testing.T) {
		st, body := mustGet(t, c, m.url("pi1", "/"), nil)
		if st != 200 || body != "hello from pi1" {
			t.Errorf("pi1.localhost: %d %q, want 200 \"hello from pi1\"", st, body)
		}
	})

	t.Run("PublicNamedService", func(t *testing.T) {
		st, body := mustGet(t, c, m.url("api--pi1", "/"), nil)
		if st != 200 || body != "pi1 api" {
			t.Errorf("api--pi1.localhost: %d %q, want 200 \"pi1 api\"", st, body)
		}
	})

	t.Run("PrivateShowsSignIn", func(t *testing.T) {
		for _, host := range []string{"pi2", "web--pi2", "admin--pi1"} {
			st, body := mustGet(t, c, m.url(host, "/some/page?x=1"), nil)
			if st != http.StatusUnauthorized {
				t.Errorf("%s.localhost: status %d, want 401", host, st)
			}
			checkSignInPage(t, body)
			if strings.Contains(body, "hello from") || strings.Contains(body, "pi1 admin") {
				t.Errorf("%s.localhost: the 401 page leaks the backend's content:\n%s", host, body)
			}
			if !strings.Contains(body, `value="/some/page?x=1"`) {
				t.Errorf("%s.localhost: the sign-in form's next is not the requested /some/page?x=1:\n%s", host, body)
			}
		}
	})

	t.Run("UnknownHost", func(t *testing.T) {
		for _, host := range []string{"unknown", "web--unknown", "nosuch--pi1"} {
			if st, body := mustGet(t, c, m.url(host, "/"), nil); st != http.StatusNotFound {
				t.Errorf("%s.localhost: %d, want 404:\n%s", host, st, body)
			}
		}
		// An IP literal is no host name to route.
		if st, body := mustGet(t, c, "http://"+m.srv.http+"/", nil); st != http.StatusNotFound {
			t.Errorf("http://%s/: %d, want 404:\n%s", m.srv.http, st, body)
		}
	})

	t.Run("ReservedPathNeverForwarded", func(t *testing.T) {
		st, body := mustGet(t, c, m.url("pi1", "/.meshctl/nothing"), nil)
		if st != http.StatusNotFound || strings.Contains(body, "hello from pi1") {
			t.Errorf("pi1.localhost/.meshctl/nothing: %d, want a 404 of the proxy's own:\n%s", st, body)
		}
	})

	t.Run("ForwardingHeaders", func(t *testing.T) {
		spoof := http.Header{
			"X-Forwarded-For":   {"203.0.113.7"},
			"X-Forwarded-Host":  {"evil.example"},
			"X-Forwarded-Proto": {"https"},
			"Forwarded":         {"for=203.0.113.7;proto=https"},
			"X-Forwarded-Port":  {"443"},
			"X-Forwarded-Ssl":   {"on"},
			"X-Real-Ip":         {"203.0.113.7"},
		}
		for _, host := range []string{"pi1", "api--pi1"} {
			st, body := mustGet(t, c, m.url(host, "/echo"), spoof)
			if st != 200 {
				t.Fatalf("%s.localhost/echo: %d\n%s", host, st, body)
			}
			e := decodeEcho(t, body)
			if e.XFF != "127.0.0.1" {
				t.Errorf("%s: backend got X-Forwarded-For %q, want the client's address 127.0.0.1 (the spoofed value replaced)", host, e.XFF)
			}
			if e.Host != hostPort(host) || e.XFHost != hostPort(host) {
				t.Errorf("%s: backend got Host %q, X-Forwarded-Host %q; want both %q", host, e.Host, e.XFHost, hostPort(host))
			}
			if e.XFProto != "http" || e.Forwarded != "" {
				t.Errorf("%s: backend got X-Forwarded-Proto %q, Forwarded %q; want http and none", host, e.XFProto, e.Forwarded)
			}
			if len(e.Other) != 0 {
				t.Errorf("%s: the client's forwarding headers reached the backend: %q", host, e.Other)
			}
		}
	})

	// On a node's host name, /metrics and the coordinator's API paths are
	// the node's own: the backend answers, never the coordinator or metrics.
	t.Run("ControlPathsReachTheNode", func(t *testing.T) {
		paths := []string{"/metrics", wire.PathAdminNodes, wire.PathAdminInfo, wire.PathAdminTokens, wire.PathNetmap, wire.PathHealthz}
		for _, p := range paths {
			if st, body := mustGet(t, c, m.url("pi1", p), nil); st != 200 || body != "hello from pi1" {
				t.Errorf("pi1.localhost%s: %d %.300q, want pi1's backend: 200 \"hello from pi1\"", p, st, body)
			}
			st, body := mustGet(t, c, m.url("pi2", p), nil) // private: the sign-in page
			if st != http.StatusUnauthorized {
				t.Errorf("pi2.localhost%s: %d, want 401:\n%.300s", p, st, body)
			}
			checkSignInPage(t, body)
			if st, body := mustGet(t, c, "http://localhost:"+m.port+p, nil); st != http.StatusNotFound || strings.Contains(body, "meshctl_") || strings.Contains(body, `"nodes"`) {
				t.Errorf("localhost%s: %d, want the proxy's 404:\n%.300s", p, st, body)
			}
		}
	})

	t.Run("Curl", func(t *testing.T) {
		curl, err := exec.LookPath("curl")
		if err != nil {
			skipOrFail(t, "curl is not installed")
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		// curl resolves *.localhost to loopback itself (no /etc/hosts entry).
		cmd := exec.CommandContext(ctx, curl, "-s", "--noproxy", "*", "--max-time", "15", m.url("pi1", "/"))
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil || string(out) != "hello from pi1" {
			t.Errorf("curl -s %s: %v, printed %q (want \"hello from pi1\")\nstderr: %s", m.url("pi1", "/"), err, out, stderr.String())
		}
	})

	// The session of the access key; later steps use it when we have one.
	jar, err := cookiejar.New(nil)
	if err != nil {
		t.Fatal(err)
	}
	signedIn := newProxyClient(t, jar)
	var haveSession bool
	var key accessKeyCreated
	failures := 0 // failed sign-ins so far, which the rate limit counts

	step(t, "SignIn", func(t *testing.T) {
		key = createAccessKey(t, m.dataDir, "pi2")

		// A cross-site post is refused before the key is looked at.
		resp, body := m.signIn(t, signedIn, "pi2", key.Key, "/", http.Header{"Origin": {"http://evil.localhost:" + m.port}})
		if resp.StatusCode != http.StatusForbidden || len(jar.Cookies(mustURL(t, m.url("pi2", "/")))) != 0 {
			t.Errorf("sign-in with a foreign Origin: %d, cookies %v; want 403 and no session\n%s", resp.StatusCode, jar.Cookies(mustURL(t, m.url("pi2", "/"))), body)
		}

		resp, body = m.signIn(t, signedIn, "pi2", key.Key, "/deep/page?x=1", http.Header{"Origin": {"http://pi2.localhost:" + m.port}})
		if resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/deep/page?x=1" {
			t.Fatalf("sign-in with the access key: %d, Location %q; want 303 to /deep/page?x=1\n%s\n%s", resp.StatusCode, resp.Header.Get("Location"), body, m.logs())
		}
		var session *http.Cookie
		for _, ck := range resp.Cookies() {
			if ck.Name == "meshctl_session" {
				session = ck
			}
		}
		switch {
		case session == nil:
			t.Fatalf("sign-in set no meshctl_session cookie: %v", resp.Header["Set-Cookie"])
		case !session.HttpOnly || session.SameSite != http.SameSiteLaxMode || session.Path != "/" || session.Domain != "":
			t.Errorf("session cookie %q: want HttpOnly, SameSite=Lax, Path=/ and host-only", resp.Header.Get("Set-Cookie"))
		case session.Secure:
			t.Errorf("session cookie %q is Secure on plain HTTP: the browser would never send it back", resp.Header.Get("Set-Cookie"))
		}

		// The first request after sign-in may wait for the tunnel to pi2.
		waitFor(t, proxyDeadline, "pi2's page with the session", func() (bool, string) {
			st, body, err := get(signedIn, m.url("pi2", "/"), nil)
			return st == 200 && body == "hello from pi2", fmt.Sprintf("%d %q %v\n%s", st, body, err, m.logs())
		})
		haveSession = true
		if st, body := mustGet(t, signedIn, m.url("pi2", "/deep/page?x=1"), nil); st != 200 || body != "hello from pi2" {
			t.Errorf("pi2.localhost/deep/page?x=1 signed in: %d %q", st, body)
		}
	})

	t.Run("SessionCookieNotForwarded", func(t *testing.T) {
		if !haveSession {
			t.Skip("no session (see SignIn)")
		}
		st, body := mustGet(t, signedIn, m.url("pi2", "/echo"), http.Header{"Cookie": {"theme=dark"}})
		if st != 200 {
			t.Fatalf("pi2.localhost/echo: %d %s", st, body)
		}
		if e := decodeEcho(t, body); e.Cookie != "theme=dark" {
			t.Errorf("backend got Cookie %q, want only the site's own theme=dark (never meshctl_session)", e.Cookie)
		}
	})

	t.Run("SessionBoundToHostAndKeyToNode", func(t *testing.T) {
		if !haveSession {
			t.Skip("no session (see SignIn)")
		}
		var session string
		for _, ck := range jar.Cookies(mustURL(t, m.url("pi2", "/"))) {
			if ck.Name == "meshctl_session" {
				session = ck.Value
			}
		}
		// pi2's cookie, replayed on another private host, opens nothing.
		hdr := http.Header{"Cookie": {"meshctl_session=" + session}}
		if st, body := mustGet(t, c, m.url("admin--pi1", "/"), hdr); st != http.StatusUnauthorized {
			t.Errorf("pi2's session cookie on admin--pi1.localhost: %d, want 401\n%s", st, body)
		}
		// A key for pi2 does not open pi1's private service.
		resp, body := m.signIn(t, c, "admin--pi1", key.Key, "/", nil)
		failures++
		if resp.StatusCode != http.StatusUnauthorized || len(resp.Cookies()) != 0 {
			t.Errorf("signing in to admin--pi1 with pi2's key: %d, cookies %v; want 401 and none\n%s", resp.StatusCode, resp.Cookies(), body)
		}
	})

	t.Run("WrongKeyThenRateLimited", func(t *testing.T) {
		resp, body := m.signIn(t, c, "pi2", "meshctl-access-nosuch-0123456789abcdef", "/", nil)
		failures++
		if resp.StatusCode != http.StatusUnauthorized || len(resp.Cookies()) != 0 {
			t.Errorf("wrong key: %d, cookies %v; want 401 and none", resp.StatusCode, resp.Cookies())
		}
		checkSignInPage(t, body)
		if !strings.Contains(body, "not accepted") {
			t.Errorf("the page after a wrong key does not say it was not accepted:\n%s", body)
		}
		// Ten failures from one address (the burst), then 429.
		limited := false
		for i := 0; i < 20 && !limited; i++ {
			resp, body := m.signIn(t, c, "pi2", "wrong-"+strconv.Itoa(i), "/", nil)
			switch resp.StatusCode {
			case http.StatusUnauthorized:
				failures++
			case http.StatusTooManyRequests:
				limited = true
				if failures < 10 {
					t.Errorf("429 after only %d failed sign-ins, want at least 10", failures)
				}
				if s, err := strconv.Atoi(resp.Header.Get("Retry-After")); err != nil || s < 1 {
					t.Errorf("429 with Retry-After %q, want a positive number of seconds", resp.Header.Get("Retry-After"))
				}
				checkSignInPage(t, body)
			default:
				t.Fatalf("wrong key #%d: status %d, want 401 or 429\n%s", i, resp.StatusCode, body)
			}
		}
		if !limited {
			t.Fatalf("still no 429 after %d failed sign-ins", failures)
		}
		// While limited, even the right key is refused: no oracle.
		if key.Key != "" {
			resp, _ := m.signIn(t, c, "pi2", key.Key, "/", nil)
			if resp.StatusCode != http.StatusTooManyRequests || len(resp.Cookies()) != 0 {
				t.Errorf("the right key while rate limited: %d, cookies %v; want 429 and none", resp.StatusCode, resp.Cookies())
			}
		}
		// A session is not a sign-in: it keeps working.
		if haveSession {
			if st, body := mustGet(t, signedIn, m.url("pi2", "/"), nil); st != 200 || body != "hello from pi2" {
				t.Errorf("pi2 with the session while sign-in is rate limited: %d %q", st, body)
			}
		}
	})

	step(t, "RevokeNode", func(t *testing.T) {
		mustOK(t, nil, "nodes", "revoke", "--data-dir", m.dataDir, "pi1")
		waitFor(t, proxyDeadline, "pi1.localhost and api--pi1.localhost to answer 404", func() (bool, string) {
			s1, b1, err1 := get(c, m.url("pi1", "/"), nil)
			s2, b2, err2 := get(c, m.url("api--pi1", "/"), nil)
			return s1 == 404 && s2 == 404, fmt.Sprintf("pi1: %d %q %v\napi--pi1: %d %q %v", s1, b1, err1, s2, b2, err2)
		})
		if code := m.up1.wait(t, proxyDeadline); code == 0 {
			t.Errorf("pi1's agent exited 0 after its revocation, want an error exit")
		}
		if !haveSession {
			return
		}
		if st, body := mustGet(t, signedIn, m.url("pi2", "/"), nil); st != 200 || body != "hello from pi2" {
			t.Errorf("pi2 with the session after pi1's revocation: %d %q, want 200 \"hello from pi2\"", st, body)
		}
	})
}

func mustURL(t *testing.T, s string) *url.URL {
	t.Helper()
	u, err := url.Parse(s)
	if err != nil {
		t.Fatal(err)
	}
	return u
}

// TestBrowser drives a real headless Chromium through the proxy: a public
// page, the sign-in form of a private one, the session across reloads, and
// the end of the session when its access key is revoked.
func TestBrowser(t *testing.T) {
	if _, err := os.Stat(chromiumPath); err != nil {
		skipOrFail(t, "no Chromium at %s (apt-get install chromium): %v", chromiumPath, err)
	}
	m := startProxyMesh(t)

	// Everything in the browser is bounded by one budget; cancelling it
	// (also in Cleanup) kills Chromium.
	userDataDir := t.TempDir()
	total, cancelTotal := context.WithTimeout(context.Background(), 60*time.Second)
	allocCtx, cancelAlloc := chromedp.NewExecAllocator(total,
		chromedp.ExecPath(chromiumPath),
		chromedp.Headless,
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.Flag("disable-quic", true),
		chromedp.NoFirstRun,
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.UserDataDir(userDataDir),
	)
	ctx, cancelBrowser := chromedp.NewContext(allocCtx)
	t.Cleanup(func() {
		cancelBrowser()
		cancelAlloc()
		cancelTotal()
		// Chromium's helpers can outlive its main process; they must not
		// write into userDataDir while t.TempDir removes it.
		killChromiumUsing(userDataDir)
	})
	if err := chromedp.Do(ctx); err != nil { // starts Chromium and its tab
		t.Fatalf("start Chromium: %v", err)
	}

	// open navigates and returns the HTTP status and the rendered text.
	open := func(t *testing.T, what string, steps ...chromedp.Action[chromedp.Void]) (int64, string) {
		t.Helper()
		c, cancel := context.WithTimeout(ctx, 15*time.Second)
		defer cancel()
		resp, err := chromedp.RunResponse(c, steps...)
		if err != nil {
			t.Fatalf("%s: %v\n%s", what, err, m.logs())
		}
		text, err := chromedp.Run(c, chromedp.Text(chromedp.CSS("body")))
		if err != nil {
			t.Fatalf("%s: read the page's text: %v", what, err)
		}
		if resp == nil {
			t.Fatalf("%s: no response", what)
		}
		return resp.Status, strings.TrimSpace(text)
	}
	location := func(t *testing.T) string {
		t.Helper()
		c, cancel := context.WithTimeout(ctx, 5*time.Second)
		defer cancel()
		loc, err := chromedp.Run(c, chromedp.Location())
		if err != nil {
			t.Fatalf("location: %v", err)
		}
		return loc
	}

	step(t, "PublicPage", func(t *testing.T) {
		st, text := open(t, "open pi1", chromedp.Navigate(m.url("pi1", "/")))
		if st != 200 || text != "hello from pi1" {
			t.Errorf("pi1.localhost in Chromium: %d, text %q; want 200 \"hello from pi1\"", st, text)
		}
		if title, err := chromedp.Run(ctx, chromedp.Title()); err != nil || title != "hello from pi1" {
			t.Errorf("title %q (%v): the backend's HTML page was not rendered", title, err)
		}
	})

	var key accessKeyCreated
	var signedIn bool
	private := m.url("pi2", "/deep/page?x=1")

	step(t, "SignIn", func(t *testing.T) {
		key = createAccessKey(t, m.dataDir, "pi2")
		st, text := open(t, "open pi2", chromedp.Navigate(private))
		if st != http.StatusUnauthorized || !strings.Contains(text, "Sign in") {
			t.Fatalf("pi2.localhost in Chromium: %d, text %q; want 401 and the sign-in page", st, text)
		}
		if strings.Contains(text, "hello from pi2") {
			t.Fatalf("the sign-in page shows the private page's content: %q", text)
		}
		st, text = open(t, "submit the sign-in form",
			chromedp.SendKeys(chromedp.ID("key"), key.Key),
			chromedp.Submit(chromedp.ID("key")))
		if st != 200 || text != "hello from pi2" {
			// The first request may wait for the tunnel to pi2: reload.
			deadline := time.Now().Add(proxyDeadline)
			for (st != 200 || text != "hello from pi2") && time.Now().Before(deadline) {
				time.Sleep(200 * time.Millisecond)
				st, text = open(t, "reload pi2", chromedp.Reload())
			}
			if st != 200 || text != "hello from pi2" {
				t.Fatalf("after signing in: %d, text %q; want 200 \"hello from pi2\"\n%s", st, text, m.logs())
			}
		}
		if loc := location(t); loc != private {
			t.Errorf("after signing in the browser is at %s, want back at %s", loc, private)
		}
		signedIn = true
		// The session cookie is HttpOnly: page scripts never see it.
		cookies, err := chromedp.Run(ctx, chromedp.Evaluate[string](`document.cookie`))
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(cookies, "meshctl_session") {
			t.Errorf("document.cookie shows the session cookie: %q", cookies)
		}
	})

	t.Run("ReloadKeepsSession", func(t *testing.T) {
		if !signedIn {
			t.Skip("not signed in (see SignIn)")
		}
		st, text := open(t, "reload pi2", chromedp.Reload())
		if st != 200 || text != "hello from pi2" {
			t.Errorf("reload after sign-in: %d, text %q; want 200 \"hello from pi2\"", st, text)
		}
		st, text = open(t, "open pi2 again", chromedp.Navigate(m.url("pi2", "/")))
		if st != 200 || text != "hello from pi2" {
			t.Errorf("pi2.localhost/ after sign-in: %d, text %q; want 200 \"hello from pi2\"", st, text)
		}
	})

	t.Run("RevokedKeyEndsSession", func(t *testing.T) {
		if !signedIn {
			t.Skip("not signed in (see SignIn)")
		}
		revokeAccessKey(t, m.dataDir, key.ID)
		deadline := time.Now().Add(proxyDeadline)
		for {
			st, text := open(t, "reload pi2", chromedp.Reload())
			if st == http.StatusUnauthorized && strings.Contains(text, "Sign in") && !strings.Contains(text, "hello from pi2") {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%v after revoking the access key, reload still shows %d %q; want the sign-in page\n%s", proxyDeadline, st, text, m.logs())
			}
			time.Sleep(100 * time.Millisecond) // poll interval
		}
		// The public page is unaffected.
		if st, text := open(t, "open pi1", chromedp.Navigate(m.url("pi1", "/"))); st != 200 || text != "hello from pi1" {
			t.Errorf("pi1.localhost after the revocation: %d, text %q", st, text)
		}
	})
}

// killChromiumUsing kills the processes this test's Chromium left behind:
// those with --user-data-dir=dir (unique to this test) on their command
// line, looking again until none shows up for a few passes (5s at most).
func killChromiumUsing(dir string) {
	want := []byte("--user-data-dir=" + dir)
	deadline := time.Now().Add(5 * time.Second)
	for quiet := 0; quiet < 3 && time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		entries, _ := os.ReadDir("/proc")
		found := 0
		for _, e := range entries {
			pid, err := strconv.Atoi(e.Name())
			if err != nil || pid == os.Getpid() {
				continue
			}
			cmdline, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
			if err != nil {
				continue
			}
			for _, arg := range bytes.Split(cmdline, []byte{0}) {
				if bytes.Equal(arg, want) {
					syscall.Kill(pid, syscall.SIGKILL)
					found++
					break
				}
			}
		}
		if found == 0 {
			quiet++
		} else {
			quiet = 0
		}
	}
}
