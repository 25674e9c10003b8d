package coordinator_test

// Hostile clients of the coordinator API: raw TLS sockets (pinned, as a
// node connects) writing hand-made requests to the real server. Each case
// asserts the refusal and that nothing was half-written: no node row, and
// the single-use token in the body still enrolls afterwards.

import (
	"bufio"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator"
	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
)

// rawTLS opens a pinned TLS connection to c's API.
func rawTLS(t *testing.T, c *meshtest.Coordinator) net.Conn {
	t.Helper()
	u, err := url.Parse(c.URL())
	if err != nil {
		t.Fatal(err)
	}
	pin, _ := pki.ParsePin(c.CAPin())
	conn, err := tls.Dial("tcp", u.Host, pki.PinnedTLSConfig(pin))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	return conn
}

// rawEnroll writes head and body to a new connection and reads one
// response (status 0 if the server closed the connection instead).
func rawEnroll(t *testing.T, c *meshtest.Coordinator, head, body string) (int, string) {
	t.Helper()
	conn := rawTLS(t, c)
	defer conn.Close()
	if _, err := io.WriteString(conn, "POST "+wire.PathEnroll+" HTTP/1.1\r\nHost: coordinator\r\n"+head+"\r\n"+body); err != nil {
		return 0, err.Error()
	}
	res, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return 0, err.Error()
	}
	defer res.Body.Close()
	b, _ := io.ReadAll(res.Body)
	return res.StatusCode, string(b)
}

// wantNothingWritten checks there is no node and the token still works.
func wantNothingWritten(t *testing.T, c *meshtest.Coordinator, tok wire.TokenCreateResponse, name string) {
	t.Helper()
	if nodes := c.Nodes(t); len(nodes) != 0 {
		t.Fatalf("refused requests left nodes: %+v", nodes)
	}
	if code, e, _ := postJSON(t, c, enrollBody(t, tok.Token, name)); code != http.StatusOK {
		t.Fatalf("the token no longer enrolls after the refused requests: %d %s", code, e.Message)
	}
}

func goroutinesBack(t *testing.T, base, tolerance int, what string) {
	t.Helper()
	meshtest.WaitFor(t, 10*time.Second, func() bool { return runtime.NumGoroutine() <= base+tolerance },
		fmt.Sprintf("%s: goroutines back to %d+%d (now %d)", what, base, tolerance, runtime.NumGoroutine()))
}

// TestHostileEnrollBodies: oversized bodies 413, unknown fields 400, wrong
// content types 415, with a good single-use token inside every body.
func TestHostileEnrollBodies(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	tok := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 1})
	good, _ := json.Marshal(enrollBody(t, tok.Token, "pi1"))
	withField := func(field string) string { return strings.TrimSuffix(string(good), "}") + "," + field + "}" }
	huge := withField(`"pad":"` + strings.Repeat("a", 100<<10) + `"`)
	hugeName := strings.Replace(string(good), `"name":"pi1"`, `"name":"`+strings.Repeat("a", 100<<10)+`"`, 1)
	chunked := func(s string) string {
		var b strings.Builder
		for len(s) > 0 {
			n := min(len(s), 4096)
			fmt.Fprintf(&b, "%x\r\n%s\r\n", n, s[:n])
			s = s[n:]
		}
		return b.String() + "0\r\n\r\n"
	}
	const js = "Content-Type: application/json\r\n"
	base := runtime.NumGoroutine()
	cases := []struct {
		name, head, body string
		want             int
	}{
		{"oversized body", js + fmt.Sprintf("Content-Length: %d\r\n", len(hugeName)), hugeName, 413},
		{"oversized chunked body", js + "Transfer-Encoding: chunked\r\n", chunked(hugeName), 413},
		{"oversized declared length, short body", js + "Content-Length: 1073741824\r\n", hugeName, 413},
		{"oversized with unknown field", js + fmt.Sprintf("Content-Length: %d\r\n", len(huge)), huge, 413},
		{"unknown field", js + fmt.Sprintf("Content-Length: %d\r\n", len(withField(`"admin":true`))), withField(`"admin":true`), 400},
		{"unknown field, chunked", js + "Transfer-Encoding: chunked\r\n", chunked(withField(`"role_override":"proxy"`)), 400},
		{"two values", js + fmt.Sprintf("Content-Length: %d\r\n", 2*len(good)), string(good) + string(good), 400},
		{"trailing garbage", js + fmt.Sprintf("Content-Length: %d\r\n", len(good)+1), string(good) + "x", 400},
		{"not JSON", js + "Content-Length: 5\r\n", "token", 400},
		{"no Content-Type", fmt.Sprintf("Content-Length: %d\r\n", len(good)), string(good), 415},
		{"text/plain", "Content-Type: text/plain\r\n" + fmt.Sprintf("Content-Length: %d\r\n", len(good)), string(good), 415},
		{"form (cross-site post)", "Content-Type: application/x-www-form-urlencoded\r\n" + fmt.Sprintf("Content-Length: %d\r\n", len(good)), string(good), 415},
		{"multipart", "Content-Type: multipart/form-data; boundary=x\r\n" + fmt.Sprintf("Content-Length: %d\r\n", len(good)), string(good), 415},
		{"json lookalike", "Content-Type: application/jsonp\r\n" + fmt.Sprintf("Content-Length: %d\r\n", len(good)), string(good), 415},
		{"two Content-Types", js + "Content-Type: text/plain\r\n" + fmt.Sprintf("Content-Length: %d\r\n", len(good)), string(good), 415},
	}
	for _, tc := range cases {
		code, body := rawEnroll(t, c, tc.head, tc.body)
		var e wire.Error
		json.Unmarshal([]byte(body), &e)
		if code != tc.want || e.Message == "" {
			t.Errorf("%s: %d %q, want %d with a message", tc.name, code, body, tc.want)
			continue
		}
		t.Logf("%s: %d %s", tc.name, code, e.Message)
	}
	goroutinesBack(t, base, 5, "after the refused bodies")
	wantNothingWritten(t, c, tok, "pi1")
}

// TestHostileSlowBodies: a body dribbled slower than the read timeout, or
// stalled halfway, is cut off within the timeout; nothing is written and
// no goroutine is left.
func TestHostileSlowBodies(t *testing.T) {
	const timeout = time.Second
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) { o.ReadTimeout = timeout })
	tok := c.CreateToken(t, wire.TokenCreateRequest{MaxUses: 1})
	good, _ := json.Marshal(enrollBody(t, tok.Token, "pi1"))
	base := runtime.NumGoroutine()
	head := fmt.Sprintf("POST %s HTTP/1.1\r\nHost: coordinator\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n", wire.PathEnroll, len(good))

	for _, tc := range []struct {
		name  string
		write func(conn net.Conn) // bounded; returns when done or cut
	}{
		{"dribbled body", func(conn net.Conn) {
			io.WriteString(conn, head)
			tick := time.NewTicker(50 * time.Millisecond)
			defer tick.Stop()
			for i := range min(len(good)-1, 200) { // never the last byte within the test
				if _, err := conn.Write(good[i : i+1]); err != nil {
					return
				}
				<-tick.C
			}
		}},
		{"stalled body", func(conn net.Conn) {
			io.WriteString(conn, head+string(good[:len(good)/2]))
		}},
		{"dribbled headers", func(conn net.Conn) {
			tick := time.NewTicker(50 * time.Millisecond)
			defer tick.Stop()
			for i := range min(len(head), 200) {
				if _, err := io.WriteString(conn, head[i:i+1]); err != nil {
					return
				}
				<-tick.C
			}
		}},
	} {
		conn := rawTLS(t, c)
		start := time.Now()
		writer := make(chan struct{})
		go func() { defer close(writer); tc.write(conn) }()
		// Read until the server answers and closes, or just closes.
		var status string
		br := bufio.NewReader(conn)
		if res, err := http.ReadResponse(br, nil); err == nil {
			status = res.Status
			io.Copy(io.Discard, res.Body)
			res.Body.Close()
		}
		_, err := io.Copy(io.Discard, br)
		took := time.Since(start)
		if err != nil && !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("%s: %v after %v, want the connection closed by the server", tc.name, err, took)
		}
		if took < timeout-100*time.Millisecond || took > timeout+3*time.Second {
			t.Errorf("%s: cut after %v, want about %v", tc.name, took, timeout)
		}
		conn.Close()
		<-writer
		t.Logf("%s: cut after %v (response %q)", tc.name, took, status)
	}
	goroutinesBack(t, base, 5, "after the slow clients")
	wantNothingWritten(t, c, tok, "pi1")
}
