package proxy

// Hostile clients: raw sockets writing hand-made bytes to the proxy's real
// HTTP server configuration (newHTTPServer) in front of the real Handler,
// with real loopback backends. Each case asserts the safe outcome.

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
	"golang.org/x/net/websocket"
)

// hostileFront serves h with the proxy's listener configuration and the
// given timeouts on a loopback port, optionally with TLS.
func hostileFront(t *testing.T, h http.Handler, tlsConf *tls.Config, readHeader, idle time.Duration) string {
	t.Helper()
	srv := newHTTPServer(h, tlsConf, Options{ReadHeaderTimeout: readHeader, IdleTimeout: idle}, slog.New(slog.DiscardHandler))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if tlsConf != nil {
			srv.ServeTLS(ln, "", "")
		} else {
			srv.Serve(ln)
		}
	}()
	t.Cleanup(func() { srv.Close(); <-done })
	return ln.Addr().String()
}

// hostileEnv is the proxy Handler (env, from handler_test.go, without
// Observe so that floods do not overflow it) routing pi1's "web" service to
// a recording backend, behind the real server configuration.
func hostileEnv(t *testing.T, readHeader, idle time.Duration) (*env, *recordingBackend, string) {
	t.Helper()
	b, p := newRecordingBackend(t)
	e := newEnv(t, func(o *HandlerOptions) { o.Observe = nil }, nodePeer("pi1", svc("web", p)))
	return e, b, hostileFront(t, e.h, nil, readHeader, idle)
}

// rawRequest is one request as a backend received it, byte for byte.
type rawRequest struct {
	line     string   // request line
	header   []string // header lines as received
	body     string
	complete bool     // the whole body arrived
	flaws    []string // framing a lenient backend could read differently
}

// recordingBackend is a loopback HTTP/1.1 server that parses what arrives
// itself and records every request, flagging ambiguous framing: both
// Content-Length and Transfer-Encoding, repeated framing headers, folded
// lines, bare LF line ends. It answers 200 with the request target as
// body and X-Backend: saw.
type recordingBackend struct {
	mu   sync.Mutex
	reqs []rawRequest
	open atomic.Int32
}

func newRecordingBackend(t *testing.T) (*recordingBackend, uint16) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &recordingBackend{}
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = true
			mu.Unlock()
			b.open.Add(1)
			wg.Go(func() {
				defer func() {
					c.Close()
					b.open.Add(-1)
					mu.Lock()
					delete(conns, c)
					mu.Unlock()
				}()
				b.serve(c)
			})
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	return b, port(t, ln.Addr())
}

func (b *recordingBackend) record(r rawRequest) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.reqs = append(b.reqs, r)
}

func (b *recordingBackend) requests() []rawRequest {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]rawRequest(nil), b.reqs...)
}

func (b *recordingBackend) reset() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.reqs = nil
}

func (b *recordingBackend) serve(c net.Conn) {
	br := bufio.NewReader(c)
	for range 10000 {
		var rr rawRequest
		var raw strings.Builder
		for n := 0; ; n++ {
			line, err := br.ReadString('\n')
			if err != nil || n > 1000 {
				if rr.line != "" {
					b.record(rr)
				}
				return
			}
			raw.WriteString(line)
			if !strings.HasSuffix(line, "\r\n") {
				rr.flaws = append(rr.flaws, "bare LF")
			}
			line = strings.TrimRight(line, "\r\n")
			if rr.line == "" {
				rr.line = line
				continue
			}
			if line == "" {
				break
			}
			if line[0] == ' ' || line[0] == '\t' {
				rr.flaws = append(rr.flaws, "folded line "+line)
			}
			rr.header = append(rr.header, line)
		}
		var cl, te int
		for _, h := range rr.header {
			name, _, _ := strings.Cut(h, ":")
			if name != strings.TrimSpace(name) {
				rr.flaws = append(rr.flaws, "space around header name "+h)
			}
			switch strings.ToLower(strings.TrimSpace(name)) {
			case "content-length":
				cl++
			case "transfer-encoding":
				te++
			}
		}
		if cl > 1 || te > 1 || (cl > 0 && te > 0) {
			rr.flaws = append(rr.flaws, fmt.Sprintf("%d Content-Length and %d Transfer-Encoding headers", cl, te))
		}
		req, err := http.ReadRequest(bufio.NewReader(strings.NewReader(raw.String())))
		if err != nil {
			rr.flaws = append(rr.flaws, "unparsable: "+err.Error())
			b.record(rr)
			return
		}
		var body []byte
		switch {
		case len(req.TransferEncoding) > 0:
			body, err = io.ReadAll(httputil.NewChunkedReader(br))
			if err == nil {
				var end string
				end, err = br.ReadString('\n')
				if err == nil && end != "\r\n" {
					err = fmt.Errorf("trailer %q", end)
				}
			}
		case req.ContentLength > 0:
			body = make([]byte, req.ContentLength)
			_, err = io.ReadFull(br, body)
		}
		rr.body = string(body)
		rr.complete = err == nil
		b.record(rr)
		if err != nil {
			return
		}
		if _, err := fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nX-Backend: saw\r\nContent-Length: %d\r\n\r\n%s", len(req.RequestURI), req.RequestURI); err != nil {
			return
		}
	}
}

// sentResponse is one response the client read.
type sentResponse struct {
	status  int
	body    string
	backend bool // answered by the backend (X-Backend)
}

// exchange writes payload on a new connection to addr and reads responses
// until the server closes the connection or the deadline passes.
func exchange(t *testing.T, addr, payload string) []sentResponse {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, payload); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	var out []sentResponse
	for range 100 {
		res, err := http.ReadResponse(br, nil)
		if err != nil {
			break
		}
		body, _ := io.ReadAll(res.Body)
		res.Body.Close()
		out = append(out, sentResponse{res.StatusCode, string(body), res.Header.Get("X-Backend") == "saw"})
	}
	return out
}

// waitGoroutines polls until at most base+tolerance goroutines are left.
func waitGoroutines(t *testing.T, base, tolerance int, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		n := runtime.NumGoroutine()
		if n <= base+tolerance {
			t.Logf("%s: %d goroutines (baseline %d)", what, n, base)
			return
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("%s: %d goroutines, baseline %d (+%d allowed):\n%s", what, n, base, tolerance, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// goodRequest checks that the front still serves a normal request.
func goodRequest(t *testing.T, addr, what string) {
	t.Helper()
	rs := exchange(t, addr, "GET /good HTTP/1.1\r\nHost: pi1.example.com\r\nConnection: close\r\n\r\n")
	if len(rs) != 1 || rs[0].status != 200 || rs[0].body != "/good" {
		t.Fatalf("%s: a good request got %+v", what, rs)
	}
}

const smuggled = "GET /smuggled HTTP/1.1\r\nHost: pi1.example.com\r\n\r\n"

// TestHostileSmuggling sends request-smuggling shapes. Each is either
// refused (4xx/501 and nothing reaches the backend) or normalised: the
// backend receives only unambiguous requests, exactly the ones whose
// responses the client got, in order, so no request hides inside another.
func TestHostileSmuggling(t *testing.T) {
	e, b, addr := hostileEnv(t, 5*time.Second, 5*time.Second)
	const host = "Host: pi1.example.com\r\n"
	const end = "GET /end HTTP/1.1\r\n" + host + "Connection: close\r\n\r\n"
	cases := []struct {
		name, payload string
		refused       int // status of the refusal; 0: must be normalised
	}{
		{"CL.TE", "POST /a HTTP/1.1\r\n" + host + "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + smuggled + end, 0},
		{"TE.CL", "POST /a HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n" +
			fmt.Sprintf("%x\r\n%s\r\n0\r\n\r\n", len(smuggled), smuggled) + end, 0},
		{"conflicting Content-Length", "POST /a HTTP/1.1\r\n" + host + "Content-Length: 0\r\nContent-Length: 49\r\n\r\n" + smuggled + end, 400},
		{"Content-Length list", "POST /a HTTP/1.1\r\n" + host + "Content-Length: 0, 49\r\n\r\n" + smuggled + end, 400},
		{"signed Content-Length", "POST /a HTTP/1.1\r\n" + host + "Content-Length: +0\r\n\r\n" + smuggled + end, 400},
		{"equal duplicate Content-Length", "POST /a HTTP/1.1\r\n" + host + "Content-Length: 2\r\nContent-Length: 2\r\n\r\nhi" + end, 0},
		{"Transfer-Encoding not chunked", "POST /a HTTP/1.1\r\n" + host + "Transfer-Encoding: xchunked\r\nContent-Length: 0\r\n\r\n" + smuggled + end, 501},
		{"Transfer-Encoding chunked, identity", "POST /a HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n" + smuggled + end, 501},
		{"two Transfer-Encoding headers", "POST /a HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n" + smuggled + end, 501},
		{"space before colon", "POST /a HTTP/1.1\r\n" + host + "Transfer-Encoding : chunked\r\nContent-Length: 0\r\n\r\n0\r\n\r\n" + smuggled + end, 400},
		{"obs-fold Transfer-Encoding", "POST /a HTTP/1.1\r\n" + host + "X-A: b\r\n Transfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n0\r\n\r\n" + smuggled + end, 0},
		{"obs-fold first header", "POST /a HTTP/1.1\r\n Transfer-Encoding: chunked\r\n" + host + "\r\n0\r\n\r\n" + smuggled + end, 400},
		{"bare LF in headers", "POST /a HTTP/1.1\n" + host + "Transfer-Encoding: chunked\nContent-Length: 0\n\n0\r\n\r\n" + smuggled + end, 0},
		{"bare LF after chunk size", "POST /a HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n" + smuggled + end, 400},
		{"bare LF after chunk data", "POST /a HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\n0\r\n\r\n" + smuggled + end, 400},
		{"chunk size overflow", "POST /a HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nx\r\n0\r\n\r\n" + smuggled + end, 400},
		{"negative chunk size", "POST /a HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\n\r\n-1\r\nx\r\n0\r\n\r\n" + smuggled + end, 400},
		{"0x chunk size", "POST /a HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n" + smuggled + end, 400},
		{"chunk size with space", "POST /a HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\n\r\n5 5\r\nhello\r\n0\r\n\r\n" + smuggled + end, 400},
		{"HTTP/1.0 with chunked", "POST /a HTTP/1.0\r\n" + host + "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n" + smuggled + end, 0},
	}
	for _, tc := range cases {
		// Let the previous case's backend connections end, so that a late
		// record of an aborted request lands in its own case.
		e.h.transport.CloseIdleConnections()
		deadline := time.Now().Add(5 * time.Second)
		for b.open.Load() != 0 && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		b.reset()
		got := exchange(t, addr, tc.payload)
		reqs := b.requests()
		var fromBackend []string
		for _, r := range got {
			if r.backend {
				fromBackend = append(fromBackend, r.body)
			}
		}
		var complete []string
		for _, r := range reqs {
			if len(r.flaws) > 0 {
				t.Errorf("%s: the backend received ambiguous framing %q in %q %q", tc.name, r.flaws, r.line, r.header)
			}
			if r.complete {
				target := strings.Fields(r.line)
				if len(target) > 1 {
					complete = append(complete, target[1])
				}
			}
		}
		// The core property: the backend answered exactly what the client
		// was answered; a smuggled request would be one more.
		if strings.Join(complete, " ") != strings.Join(fromBackend, " ") {
			t.Errorf("%s: the backend completed %q but the client got backend answers for %q", tc.name, complete, fromBackend)
		}
		var statuses []int
		for _, r := range got {
			statuses = append(statuses, r.status)
		}
		switch {
		case len(got) == 0:
			t.Errorf("%s: no response", tc.name)
		case tc.refused != 0 && (got[0].status != tc.refused || len(complete) != 0):
			t.Errorf("%s: statuses %v, backend completed %q; want %d and nothing forwarded", tc.name, statuses, complete, tc.refused)
		case tc.refused == 0 && got[0].status != 200:
			t.Errorf("%s: statuses %v, want the request served normalised", tc.name, statuses)
		}
		t.Logf("%s: statuses %v, backend completed %q (%d received)", tc.name, statuses, complete, len(reqs))
		if strings.HasPrefix(tc.name, "obs-fold") && len(reqs) > 0 {
			t.Logf("%s: the backend received the headers %q", tc.name, reqs[0].header)
		}
	}
	goodRequest(t, addr, "after the smuggling attempts")
}

// TestHostileH2C: an HTTP/2 cleartext upgrade or preface never reaches a
// backend as one; the backend is a real h2c server that would upgrade.
func TestHostileH2C(t *testing.T) {
	var mu sync.Mutex
	var seen []http.Header
	h2srv := httptest.NewServer(h2c.NewHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Clone())
		mu.Unlock()
		fmt.Fprintf(w, "%s %s", r.Proto, r.URL.Path)
	}), &http2.Server{}))
	t.Cleanup(h2srv.Close)
	e := newEnv(t, func(o *HandlerOptions) { o.Observe = nil }, nodePeer("pi1", svc("web", port(t, h2srv.Listener.Addr()))))
	addr := hostileFront(t, e.h, nil, 5*time.Second, 5*time.Second)
	const settings = "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
	const host = "Host: pi1.example.com\r\n"
	cases := []struct {
		name, payload string
		want          int
	}{
		{"Upgrade h2c", "GET /u HTTP/1.1\r\n" + host + "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n" + settings + "\r\n", 200},
		{"Upgrade h2c, settings not in Connection", "GET /u HTTP/1.1\r\n" + host + "Connection: Upgrade\r\nUpgrade: h2c\r\n" + settings + "\r\n", 200},
		{"Upgrade H2C, websocket", "GET /u HTTP/1.1\r\n" + host + "Connection: upgrade, http2-settings\r\nUpgrade: H2C, websocket\r\n" + settings + "\r\n", 200},
		{"preface", "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 404},
		{"preface with Host", "PRI * HTTP/2.0\r\n" + host + "\r\nSM\r\n\r\n", 405},
		{"preface as HTTP/1.1", "PRI * HTTP/1.1\r\n" + host + "\r\n", 405},
	}
	for _, tc := range cases {
		mu.Lock()
		seen = nil
		mu.Unlock()
		got := exchange(t, addr, tc.payload+"GET /end HTTP/1.1\r\n"+host+"Connection: close\r\n\r\n")
		var statuses []int
		for _, r := range got {
			statuses = append(statuses, r.status)
			if r.status == http.StatusSwitchingProtocols || strings.HasPrefix(r.body, "HTTP/2") {
				t.Errorf("%s: switched to HTTP/2: %+v", tc.name, r)
			}
		}
		if len(got) == 0 || got[0].status != tc.want {
			t.Errorf("%s: statuses %v, want %d first", tc.name, statuses, tc.want)
		}
		mu.Lock()
		for _, h := range seen {
			if h.Get("Upgrade") != "" || h.Get("HTTP2-Settings") != "" {
				t.Errorf("%s: the backend received Upgrade %q, HTTP2-Settings %q", tc.name, h.Get("Upgrade"), h.Get("HTTP2-Settings"))
			}
		}
		if tc.want != 200 && len(seen) > 1 {
			t.Errorf("%s: the backend received %d requests, want only /end", tc.name, len(seen))
		}
		mu.Unlock()
		t.Logf("%s: statuses %v", tc.name, statuses)
	}
}

// TestHostileHugeHeaders: a header block over the limit gets 431 and
// reaches no backend.
func TestHostileHugeHeaders(t *testing.T) {
	_, b, addr := hostileEnv(t, 5*time.Second, 5*time.Second)
	var many strings.Builder
	for i := range 12000 {
		fmt.Fprintf(&many, "X-%d: v\r\n", i)
	}
	for name, hdr := range map[string]string{
		"one huge header":   "X-Big: " + strings.Repeat("a", 2*maxHeaderBytes) + "\r\n",
		"many headers":      many.String(),
		"huge request line": "",
	} {
		target := "/"
		if hdr == "" {
			target = "/" + strings.Repeat("a", 2*maxHeaderBytes)
		}
		got := exchange(t, addr, "GET "+target+" HTTP/1.1\r\nHost: pi1.example.com\r\n"+hdr+"\r\n")
		if len(got) != 1 || got[0].status != http.StatusRequestHeaderFieldsTooLarge {
			t.Errorf("%s: got %+v, want one 431", name, got)
		}
	}
	if reqs := b.requests(); len(reqs) != 0 {
		t.Errorf("huge headers reached the backend: %d requests", len(reqs))
	}
	goodRequest(t, addr, "after huge headers")
}

// TestHostileSlowloris: headers dribbled one byte at a time, and a TLS
// handshake never started, are cut by the read-header timeout; nothing
// reaches the backend and no goroutine is left.
func TestHostileSlowloris(t *testing.T) {
	const timeout = 300 * time.Millisecond
	e, b, addr := hostileEnv(t, timeout, 5*time.Second)
	ts := httptest.NewUnstartedServer(nil)
	ts.StartTLS()
	tlsConf := &tls.Config{Certificates: ts.TLS.Certificates}
	ts.Close()
	tlsAddr := hostileFront(t, e.h, tlsConf, timeout, 5*time.Second)
	goodRequest(t, addr, "before")
	e.h.transport.CloseIdleConnections()
	base := runtime.NumGoroutine()

	const conns = 20
	var wg sync.WaitGroup
	closedAfter := make(chan time.Duration, 2*conns)
	for i := range 2 * conns {
		c, err := net.Dial("tcp", map[bool]string{true: addr, false: tlsAddr}[i < conns])
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		start := time.Now()
		c.SetDeadline(start.Add(10 * time.Second))
		stop := make(chan struct{})
		wg.Go(func() { // the attacker: a byte every 20 ms, bounded
			if i >= conns {
				return // TLS: sends nothing at all
			}
			tick := time.NewTicker(20 * time.Millisecond)
			defer tick.Stop()
			msg := "GET / HTTP/1.1\r\nHost: pi1.example.com\r\nX-Slow: " + strings.Repeat("a", 500)
			for j := range len(msg) {
				select {
				case <-stop:
					return
				case <-tick.C:
				}
				if _, err := c.Write([]byte{msg[j]}); err != nil {
					return
				}
			}
		})
		wg.Go(func() {
			defer close(stop)
			n, err := io.Copy(io.Discard, c)
			if err != nil && !errors.Is(err, syscall.ECONNRESET) { // reset: closed with our bytes unread
				t.Errorf("slow connection %d: %v after %d bytes, want closed by the server", i, err, n)
			}
			closedAfter <- time.Since(start)
		})
	}
	wg.Wait()
	close(closedAfter)
	var longest time.Duration
	for d := range closedAfter {
		if d < timeout-50*time.Millisecond {
			t.Errorf("closed after %v, before the timeout", d)
		}
		longest = max(longest, d)
	}
	t.Logf("%d slow connections closed; the last after %v (timeout %v)", 2*conns, longest, timeout)
	if reqs := b.requests(); len(reqs) != 1 { // "/good"
		t.Errorf("slow requests reached the backend: %d requests", len(reqs))
	}
	waitGoroutines(t, base, 5, "after slowloris")
	goodRequest(t, addr, "after slowloris")
}

// TestHostileIdleConnections: thousands of idle connections, half after
// a served request and half silent, do not stop a normal request; the idle
// and read-header timeouts close them all and their goroutines end.
func TestHostileIdleConnections(t *testing.T) {
	const n = 2000
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err != nil || lim.Cur < 2*n+512 {
		t.Skipf("open-file limit %d is below the %d this test needs (%v)", lim.Cur, 2*n+512, err)
	}
	const idle, readHeader = time.Second, 1500 * time.Millisecond
	e, _, addr := hostileEnv(t, readHeader, idle)
	goodRequest(t, addr, "before")
	e.h.transport.CloseIdleConnections()
	base := runtime.NumGoroutine()

	conns := make([]net.Conn, n)
	brs := make([]*bufio.Reader, n)
	defer func() {
		for _, c := range conns {
			if c != nil {
				c.Close()
			}
		}
	}()
	start := time.Now()
	var wg sync.WaitGroup
	var failed atomic.Int32
	for w := range 8 {
		wg.Go(func() {
			for i := w; i < n; i += 8 {
				c, err := net.Dial("tcp", addr)
				if err != nil {
					failed.Add(1)
					continue
				}
				conns[i] = c
				c.SetDeadline(time.Now().Add(20 * time.Second))
				if i%2 == 1 {
					continue // silent
				}
				brs[i] = bufio.NewReader(c)
				io.WriteString(c, "GET /idle HTTP/1.1\r\nHost: pi1.example.com\r\n\r\n")
				res, err := http.ReadResponse(brs[i], nil)
				if err != nil || res.StatusCode != 200 {
					failed.Add(1)
					continue
				}
				io.Copy(io.Discard, res.Body)
				res.Body.Close()
			}
		})
	}
	wg.Wait()
	if failed.Load() != 0 {
		t.Fatalf("%d of %d connections failed", failed.Load(), n)
	}
	t.Logf("%d connections open after %v (%d goroutines)", n, time.Since(start), runtime.NumGoroutine())
	goodRequest(t, addr, "with the idle connections open")
	for i, c := range conns {
		var err error
		if brs[i] != nil {
			_, err = brs[i].ReadByte()
		} else {
			_, err = c.Read(make([]byte, 1))
		}
		if err != io.EOF {
			t.Fatalf("idle connection %d: %v, want closed by the server", i, err)
		}
	}
	t.Logf("all %d closed %v after the start (idle timeout %v, read-header timeout %v)", n, time.Since(start), idle, readHeader)
	e.h.transport.CloseIdleConnections()
	waitGoroutines(t, base, 5, "after the idle connections")
}

// TestHostileWebSocketFlood: many WebSocket sessions with many messages to
// a real WebSocket echo backend; each session is one backend connection,
// and everything ends when the clients go.
func TestHostileWebSocketFlood(t *testing.T) {
	var open, peak atomic.Int32
	ws := httptest.NewServer(websocket.Handler(func(c *websocket.Conn) {
		n := open.Add(1)
		defer open.Add(-1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		io.Copy(c, c)
	}))
	t.Cleanup(ws.Close)
	e := newEnv(t, func(o *HandlerOptions) { o.Observe = nil }, nodePeer("pi1", svc("web", port(t, ws.Listener.Addr()))))
	addr := hostileFront(t, e.h, nil, 5*time.Second, 5*time.Second)
	base := runtime.NumGoroutine()

	const sessions, messages = 200, 50
	clients := make([]*websocket.Conn, 0, sessions)
	defer func() {
		for _, c := range clients {
			c.Close()
		}
	}()
	for i := range sessions {
		raw, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		raw.SetDeadline(time.Now().Add(20 * time.Second))
		cfg, err := websocket.NewConfig("ws://pi1.example.com/ws", "http://pi1.example.com")
		if err != nil {
			t.Fatal(err)
		}
		c, err := websocket.NewClient(cfg, raw)
		if err != nil {
			raw.Close()
			t.Fatalf("session %d: %v", i, err)
		}
		clients = append(clients, c)
	}
	grown := runtime.NumGoroutine() - base
	var wg sync.WaitGroup
	for i, c := range clients {
		wg.Go(func() {
			for j := range messages {
				msg := fmt.Sprintf("session %d message %d %s", i, j, strings.Repeat("x", j*20))
				if err := websocket.Message.Send(c, msg); err != nil {
					t.Errorf("session %d send: %v", i, err)
					return
				}
				var got string
				if err := websocket.Message.Receive(c, &got); err != nil || got != msg {
					t.Errorf("session %d echo: %q, %v", i, got, err)
					return
				}
			}
		})
	}
	wg.Wait()
	if p := peak.Load(); p != sessions {
		t.Errorf("backend saw %d concurrent sessions, want exactly %d (one per client)", p, sessions)
	}
	t.Logf("%d sessions × %d messages echoed; %d goroutines per session while open", sessions, messages, grown/sessions)
	if grown > 12*sessions {
		t.Errorf("%d goroutines for %d sessions", grown, sessions)
	}
	for _, c := range clients {
		c.Close()
	}
	clients = nil
	deadline := time.Now().Add(10 * time.Second)
	for open.Load() != 0 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := open.Load(); n != 0 {
		t.Fatalf("%d backend sessions still open after the clients closed", n)
	}
	e.h.transport.CloseIdleConnections()
	waitGoroutines(t, base, 5, "after the WebSocket flood")
}

// TestHostileSlowBody: a request body that stalls is cut after the body
// read timeout with 408 and the backend's request ends; a slow but steady
// upload and a long response after an upload are not cut.
func TestHostileSlowBody(t *testing.T) {
	const timeout = 300 * time.Millisecond
	var inflight, cut atomic.Int32
	_, p := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		inflight.Add(1)
		defer inflight.Add(-1)
		n, err := io.Copy(io.Discard, r.Body)
		if err != nil {
			cut.Add(1)
			return
		}
		if r.URL.Path == "/stream" { // a slow response, longer than the timeout
			for i := range 8 {
				fmt.Fprintf(w, "%d\n", i)
				http.NewResponseController(w).Flush()
				time.Sleep(timeout / 2)
			}
			return
		}
		fmt.Fprintf(w, "%d", n)
	}))
	e := newEnv(t, func(o *HandlerOptions) { o.Observe = nil; o.BodyReadTimeout = timeout }, nodePeer("pi1", svc("web", p)))
	addr := hostileFront(t, e.h, nil, 5*time.Second, 5*time.Second)
	const host = "Host: pi1.example.com\r\n"
	base := runtime.NumGoroutine()

	dial := func() (net.Conn, *bufio.Reader) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		return c, bufio.NewReader(c)
	}
	read := func(br *bufio.Reader) (int, string, error) {
		res, err := http.ReadResponse(br, nil)
		if err != nil {
			return 0, "", err
		}
		defer res.Body.Close()
		b, err := io.ReadAll(res.Body)
		return res.StatusCode, string(b), err
	}

	for name, payload := range map[string]string{
		"stalled body":         "POST /up HTTP/1.1\r\n" + host + "Content-Length: 100\r\n\r\n0123456789",
		"stalled chunked body": "POST /up HTTP/1.1\r\n" + host + "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
	} {
		c, br := dial()
		start := time.Now()
		io.WriteString(c, payload)
		code, body, err := read(br)
		took := time.Since(start)
		if err != nil || code != http.StatusRequestTimeout {
			t.Errorf("%s: %d %q %v, want 408", name, code, body, err)
		}
		if took < timeout-50*time.Millisecond || took > timeout+3*time.Second {
			t.Errorf("%s: answered after %v, want about %v", name, took, timeout)
		}
		t.Logf("%s: %d after %v", name, code, took)
		c.Close()
	}
	deadline := time.Now().Add(10 * time.Second)
	for inflight.Load() != 0 && time.Now().Before(deadline) {
		time.Sleep(5 * time.Millisecond)
	}
	if n := inflight.Load(); n != 0 || cut.Load() != 2 {
		t.Fatalf("backend: %d requests still in flight, %d cut; want 0 and 2", n, cut.Load())
	}

	// Steady: a byte every timeout/4, four times the timeout in all.
	c, br := dial()
	io.WriteString(c, "POST /up HTTP/1.1\r\n"+host+"Content-Length: 16\r\n\r\n")
	tick := time.NewTicker(timeout / 4)
	for range 16 {
		<-tick.C
		c.Write([]byte{'x'})
	}
	tick.Stop()
	if code, body, err := read(br); code != 200 || body != "16" || err != nil {
		t.Fatalf("steady slow upload: %d %q %v, want 200 \"16\"", code, body, err)
	}
	// A response that streams for longer than the timeout after an upload,
	// then another request on the same connection.
	io.WriteString(c, "POST /stream HTTP/1.1\r\n"+host+"Content-Length: 2\r\n\r\nhi")
	if code, body, err := read(br); code != 200 || strings.Count(body, "\n") != 8 || err != nil {
		t.Fatalf("long response after an upload: %d %q %v", code, body, err)
	}
	io.WriteString(c, "POST /up HTTP/1.1\r\n"+host+"Content-Length: 2\r\n\r\nhi")
	if code, body, err := read(br); code != 200 || body != "2" || err != nil {
		t.Fatalf("next request on the connection: %d %q %v", code, body, err)
	}
	c.Close()
	e.h.transport.CloseIdleConnections()
	waitGoroutines(t, base, 5, "after the slow bodies")
}
