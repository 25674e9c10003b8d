package proxy

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshctl/meshctl/internal/syncbuf"
	"github.com/meshctl/meshctl/wire"
)

const testDomain = "example.com"

type observation struct {
	host   string
	status int
	bytes  int64
}

// env is a proxy handler behind a real loopback server, routing to real
// loopback backends through a counting dialer.
type env struct {
	table  atomic.Pointer[Table]
	dials  atomic.Int32
	dial   func(ctx context.Context, network, addr string) (net.Conn, error) // set before requests
	h      *Handler
	front  *httptest.Server
	client *http.Client
	obs    chan observation
	log    *syncBuffer
}

func newEnv(t *testing.T, configure func(*HandlerOptions), peers ...wire.Peer) *env {
	t.Helper()
	e := &env{obs: make(chan observation, 256), log: &syncBuffer{}}
	e.setPeers(peers...)
	var d net.Dialer
	e.dial = d.DialContext
	o := HandlerOptions{
		Table: e.table.Load,
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			e.dials.Add(1)
			return e.dial(ctx, network, addr)
		},
		Logger: slog.New(slog.NewJSONHandler(e.log, nil)),
		Observe: func(host string, status int, bytes int64, _ time.Duration) {
			select {
			case e.obs <- observation{host, status, bytes}:
			default:
				t.Error("observations overflow")
			}
		},
	}
	if configure != nil {
		configure(&o)
	}
	h, err := NewHandler(o)
	if err != nil {
		t.Fatal(err)
	}
	e.h = h
	e.front = httptest.NewServer(h)
	t.Cleanup(e.front.Close)
	e.client = e.front.Client()
	e.client.Timeout = 30 * time.Second
	e.client.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return e
}

func (e *env) setPeers(peers ...wire.Peer) {
	e.table.Store(BuildTable(&wire.Netmap{Peers: peers}, testDomain))
}

// do sends a request for host through the proxy and returns the response
// with its body read.
func (e *env) do(t *testing.T, method, host, path string, hdr http.Header) (*http.Response, string) {
	t.Helper()
	req, err := http.NewRequest(method, e.front.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = host
	for k, v := range hdr {
		req.Header[k] = v
	}
	res, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	body, err := io.ReadAll(res.Body)
	if err != nil {
		t.Fatal(err)
	}
	return res, string(body)
}

func (e *env) nextObs(t *testing.T) observation {
	t.Helper()
	select {
	case o := <-e.obs:
		return o
	case <-time.After(10 * time.Second):
		t.Fatal("Observe not called")
	}
	return observation{}
}

// backend starts a loopback HTTP server and returns the node peer that
// publishes it as service name.
func backend(t *testing.T, h http.Handler) (*httptest.Server, uint16) {
	t.Helper()
	srv := httptest.NewServer(h)
	t.Cleanup(srv.Close)
	return srv, port(t, srv.Listener.Addr())
}

func port(t *testing.T, a net.Addr) uint16 {
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		t.Fatal(err)
	}
	return ap.Port()
}

func nodePeer(name string, svcs ...wire.Service) wire.Peer { return peer(name, "127.0.0.1", svcs...) }

// echo answers with its name and the request's Host and headers as JSON.
func echo(name string, hits *atomic.Int32) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if hits != nil {
			hits.Add(1)
		}
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"name": name, "host": r.Host, "path": r.URL.RequestURI(), "header": r.Header})
	})
}

type echoed struct {
	Name   string      `json:"name"`
	Host   string      `json:"host"`
	Path   string      `json:"path"`
	Header http.Header `json:"header"`
}

func decode(t *testing.T, body string) echoed {
	t.Helper()
	var got echoed
	if err := json.Unmarshal([]byte(body), &got); err != nil {
		t.Fatalf("backend body %q: %v", body, err)
	}
	return got
}

// syncBuffer is a log capture safe to read while it is written.
type syncBuffer = syncbuf.Buffer

func TestNewHandlerRequiresTableAndDial(t *testing.T) {
	if _, err := NewHandler(HandlerOptions{Table: func() *Table { return nil }}); err == nil {
		t.Error("no error without Dial")
	}
	if _, err := NewHandler(HandlerOptions{Dial: (&net.Dialer{}).DialContext}); err == nil {
		t.Error("no error without Table")
	}
}

func TestRoutesByHost(t *testing.T) {
	var webHits, apiHits atomic.Int32
	_, webPort := backend(t, echo("web", &webHits))
	_, apiPort := backend(t, echo("api", &apiHits))
	e := newEnv(t, nil, nodePeer("pi1", svc("api", apiPort), svc("web", webPort)))

	for _, tc := range []struct{ host, name, backendHost string }{
		{"pi1.example.com", "web", "pi1.example.com"},
		{"PI1.Example.COM", "web", "pi1.example.com"},
		{"pi1.example.com.", "web", "pi1.example.com"},
		{"pi1.example.com:8080", "web", "pi1.example.com:8080"},
		{"web--pi1.example.com", "web", "web--pi1.example.com"},
		{"API--PI1.example.com", "api", "api--pi1.example.com"},
	} {
		res, body := e.do(t, "GET", tc.host, "/a/b?x=1", nil)
		if res.StatusCode != 200 {
			t.Errorf("%s: status %d: %s", tc.host, res.StatusCode, body)
			continue
		}
		got := decode(t, body)
		if got.Name != tc.name || got.Host != tc.backendHost || got.Path != "/a/b?x=1" {
			t.Errorf("%s: backend saw %+v, want %s with Host %s", tc.host, got, tc.name, tc.backendHost)
		}
		if o := e.nextObs(t); o.host != strings.TrimSuffix(strings.ToLower(strings.Split(tc.host, ":")[0]), ".") || o.status != 200 || o.bytes != int64(len(body)) {
			t.Errorf("%s: observed %+v, body %d bytes", tc.host, o, len(body))
		}
	}
	if webHits.Load() != 5 || apiHits.Load() != 1 {
		t.Errorf("hits web=%d api=%d", webHits.Load(), apiHits.Load())
	}
}

func TestUnknownHostNotDialed(t *testing.T) {
	var hits atomic.Int32
	_, p := backend(t, echo("web", &hits))
	e := newEnv(t, nil, nodePeer("pi1", svc("web", p)))
	for _, host := range []string{"nope.example.com", "a.pi1.example.com", "pi1.example.org", "127.0.0.1", "127.0.0.1:" + strconv.Itoa(int(p)), "[::1]:80", "pi1_x.example.com"} {
		res, body := e.do(t, "GET", host, "/", nil)
		if res.StatusCode != 404 || !strings.Contains(body, "No device at this address") {
			t.Errorf("%s: status %d body %q", host, res.StatusCode, body)
		}
		if strings.Contains(body, "127.0.0.1") || strings.Contains(body, "pi1") {
			t.Errorf("%s: 404 page names internals: %s", host, body)
		}
		if o := e.nextObs(t); o.host != "" || o.status != 404 {
			t.Errorf("%s: observed %+v", host, o)
		}
	}
	// An empty Host (HTTP/1.0) cannot be sent by the client; ask the handler directly.
	req := httptest.NewRequest("GET", "/", nil)
	req.Host = ""
	rec := httptest.NewRecorder()
	e.h.ServeHTTP(rec, req)
	if rec.Code != 404 {
		t.Errorf("empty host: status %d", rec.Code)
	}
	if n := e.dials.Load(); n != 0 || hits.Load() != 0 {
		t.Errorf("unknown hosts dialed %d times, backend hit %d times", n, hits.Load())
	}
	if log := e.log.String(); !strings.Contains(log, `"reason":"no route"`) || !strings.Contains(log, `"reason":"not a host name"`) {
		t.Errorf("access log lacks reasons:\n%s", log)
	}
}

func TestForwardingHeadersReplaced(t *testing.T) {
	_, p := backend(t, echo("web", nil))
	e := newEnv(t, nil, nodePeer("pi1", svc("web", p)))
	// Headers a backend might take as the proxy's word about the client:
	// none may arrive but X-Forwarded-For/-Host/-Proto, as the proxy set them.
	spoofed := []string{
		"X-Forwarded-Port", "X-Forwarded-Prefix", "X-Forwarded-Server",
		"X-Forwarded-Ssl", "X-Forwarded-Scheme", "X-Forwarded-Uri",
		"X-Forwarded-User", "X-Forwarded-Client-Cert", "X-Real-Ip",
		"X_forwarded_for", "X-Forwarded_port", "X_real_ip", // CGI reads _ as -
	}
	hdr := http.Header{
		"X-Forwarded-For":   {"6.6.6.6"},
		"X-Forwarded-Host":  {"evil.example"},
		"X-Forwarded-Proto": {"https"},
		"Forwarded":         {"for=6.6.6.6;host=evil.example;proto=https"},
		"Connection":        {"X-Forwarded-For"}, // hop-by-hop trick: must not delete ours
	}
	for _, k := range spoofed {
		hdr[k] = []string{"evil"}
	}
	res, body := e.do(t, "GET", "pi1.example.com", "/", hdr)
	if res.StatusCode != 200 {
		t.Fatalf("status %d", res.StatusCode)
	}
	h := decode(t, body).Header
	for k, v := range h {
		switch n := strings.ReplaceAll(strings.ToLower(k), "_", "-"); {
		case k == "X-Forwarded-For" || k == "X-Forwarded-Host" || k == "X-Forwarded-Proto":
		case n == "x-real-ip" || strings.HasPrefix(n, "x-forwarded-"):
			t.Errorf("client's %s reached the backend: %q", k, v)
		}
	}
	if got := h.Values("X-Forwarded-For"); len(got) != 1 || got[0] != "127.0.0.1" {
		t.Errorf("X-Forwarded-For = %q", got)
	}
	if got := h.Values("X-Forwarded-Host"); len(got) != 1 || got[0] != "pi1.example.com" {
		t.Errorf("X-Forwarded-Host = %q", got)
	}
	if got := h.Values("X-Forwarded-Proto"); len(got) != 1 || got[0] != "http" {
		t.Errorf("X-Forwarded-Proto = %q", got)
	}
	if got := h.Values("Forwarded"); len(got) != 0 {
		t.Errorf("Forwarded reached the backend: %q", got)
	}
}

func TestKeepAliveReuse(t *testing.T) {
	var conns atomic.Int32
	srv := httptest.NewUnstartedServer(echo("web", nil))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	e := newEnv(t, nil, nodePeer("pi1", svc("web", port(t, srv.Listener.Addr()))))
	for i := range 20 {
		if res, _ := e.do(t, "GET", "pi1.example.com", "/", nil); res.StatusCode != 200 {
			t.Fatalf("request %d: status %d", i, res.StatusCode)
		}
	}
	if n, d := conns.Load(), e.dials.Load(); n != 1 || d != 1 {
		t.Errorf("20 requests took %d backend connections and %d dials, want 1", n, d)
	}
}

func TestServerSentEventsStream(t *testing.T) {
	release := make(chan struct{})
	_, p := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		io.WriteString(w, "data: one\n\n")
		w.(http.Flusher).Flush()
		select {
		case <-release: // the client has read "one"
		case <-r.Context().Done():
			return
		}
		io.WriteString(w, "data: two\n\n")
	}))
	e := newEnv(t, nil, nodePeer("pi1", svc("web", p)))
	req, _ := http.NewRequest("GET", e.front.URL+"/events", nil)
	req.Host = "pi1.example.com"
	res, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	br := bufio.NewReader(res.Body)
	readEvent := func() string {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		br.ReadString('\n') // the blank line
		return line
	}
	if got := readEvent(); got != "data: one\n" {
		t.Fatalf("first event %q", got)
	}
	close(release) // only now may the backend write the second event
	if got := readEvent(); got != "data: two\n" {
		t.Fatalf("second event %q", got)
	}
}

func TestWebSocketUpgrade(t *testing.T) {
	_, p := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "websocket" || !strings.EqualFold(r.Header.Get("Connection"), "Upgrade") {
			http.Error(w, "upgrade expected", 400)
			return
		}
		conn, brw, err := http.NewResponseController(w).Hijack()
		if err != nil {
			return
		}
		defer conn.Close()
		brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
		brw.Flush()
		io.Copy(conn, brw.Reader) // echo
	}))
	e := newEnv(t, nil, nodePeer("pi1", svc("web", p)))

	conn, err := net.Dial("tcp", e.front.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(20 * time.Second)) // a hang fails instead of blocking
	io.WriteString(conn, "GET /ws HTTP/1.1\r\nHost: pi1.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n")
	br := bufio.NewReader(conn)
	res, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.StatusCode != http.StatusSwitchingProtocols || res.Header.Get("Upgrade") != "websocket" {
		t.Fatalf("handshake: %s %v", res.Status, res.Header)
	}
	for _, msg := range []string{"hello", "world, again"} {
		io.WriteString(conn, msg)
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(br, got); err != nil || string(got) != msg {
			t.Fatalf("echo %q: got %q, %v", msg, got, err)
		}
	}
	conn.Close()
	if o := e.nextObs(t); o.status != http.StatusSwitchingProtocols || o.host != "pi1.example.com" {
		t.Errorf("observed %+v", o)
	}
}

// pattern is an endless deterministic byte stream.
type pattern struct{ n byte }

func (p *pattern) Read(b []byte) (int, error) {
	for i := range b {
		b[i] = p.n
		p.n = p.n*31 + 7
	}
	return len(b), nil
}

// heapWatch samples HeapInuse; peak is the most it grew over the baseline.
type heapWatch struct {
	mu         sync.Mutex
	base, peak uint64
	samples    int
}

func newHeapWatch() *heapWatch {
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return &heapWatch{base: ms.HeapInuse}
}

func (h *heapWatch) sample() {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	h.mu.Lock()
	defer h.mu.Unlock()
	h.samples++
	if ms.HeapInuse > h.base && ms.HeapInuse-h.base > h.peak {
		h.peak = ms.HeapInuse - h.base
	}
}

func (h *heapWatch) check(t *testing.T, what string) {
	t.Helper()
	h.mu.Lock()
	defer h.mu.Unlock()
	const limit = 16 << 20
	if h.samples < 8 {
		t.Errorf("%s: only %d heap samples", what, h.samples)
	}
	if h.peak > limit {
		t.Errorf("%s: heap grew by %d MiB during the transfer (limit %d MiB)", what, h.peak>>20, limit>>20)
	}
	t.Logf("%s: heap grew by at most %.1f MiB over %d samples", what, float64(h.peak)/(1<<20), h.samples)
}

// sampledCopy copies src to dst, sampling the heap every 4 MiB.
func sampledCopy(dst io.Writer, src io.Reader, hw *heapWatch) (int64, error) {
	var total int64
	for {
		n, err := io.CopyN(dst, src, 4<<20)
		total += n
		hw.sample()
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

func TestLargeBodiesStream(t *testing.T) {
	const size = 64 << 20
	want := sha256.New()
	io.CopyN(want, &pattern{}, size)
	wantSum := want.Sum(nil)

	var hw *heapWatch
	_, p := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == "POST" { // upload: hash while sampling the heap
			sum := sha256.New()
			n, err := sampledCopy(sum, r.Body, hw)
			if err != nil || n != size || !bytes.Equal(sum.Sum(nil), wantSum) {
				http.Error(w, "upload corrupted", 500)
				return
			}
			io.WriteString(w, "ok")
			return
		}
		w.Header().Set("Content-Length", strconv.Itoa(size))
		io.CopyN(w, &pattern{}, size)
	}))
	e := newEnv(t, nil, nodePeer("pi1", svc("web", p)))

	hw = newHeapWatch()
	req, _ := http.NewRequest("POST", e.front.URL+"/up", io.LimitReader(&pattern{}, size))
	req.Host = "pi1.example.com"
	req.ContentLength = size
	res, err := e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if res.StatusCode != 200 || string(body) != "ok" {
		t.Fatalf("upload: %d %q", res.StatusCode, body)
	}
	hw.check(t, "upload")

	hw = newHeapWatch()
	req, _ = http.NewRequest("GET", e.front.URL+"/down", nil)
	req.Host = "pi1.example.com"
	res, err = e.client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	sum := sha256.New()
	n, err := sampledCopy(sum, res.Body, hw)
	if err != nil || n != size || !bytes.Equal(sum.Sum(nil), wantSum) {
		t.Fatalf("download: %d bytes, err %v, checksum ok %v", n, err, bytes.Equal(sum.Sum(nil), wantSum))
	}
	hw.check(t, "download")
}

func TestNodeDown(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := port(t, ln.Addr())
	ln.Close()
	e := newEnv(t, nil, nodePeer("pi1", svc("web", closed)))
	start := time.Now()
	res, body := e.do(t, "GET", "pi1.example.com", "/", nil)
	if res.StatusCode != http.StatusBadGateway || !strings.Contains(body, "not reachable right now") {
		t.Errorf("status %d body %q", res.StatusCode, body)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("took %v; a refused connection should fail at once", d)
	}
	if strings.Contains(body, "127.0.0.1") || strings.Contains(body, strconv.Itoa(int(closed))) || strings.Contains(body, "id-pi1") {
		t.Errorf("error page names internals: %s", body)
	}
	if log := e.log.String(); !strings.Contains(log, "refused") || !strings.Contains(log, `"status":502`) {
		t.Errorf("access log lacks the reason:\n%s", log)
	}
}

func TestDialTimeout(t *testing.T) {
	e := newEnv(t, func(o *HandlerOptions) { o.DialTimeout = 200 * time.Millisecond }, nodePeer("pi1", svc("web", 9)))
	deadlines := make(chan time.Duration, 1)
	e.dial = func(ctx context.Context, _, _ string) (net.Conn, error) {
		dl, _ := ctx.Deadline()
		select {
		case deadlines <- time.Until(dl):
		default:
		}
		<-ctx.Done() // an unreachable node: the dial hangs until it times out
		return nil, ctx.Err()
	}
	res, body := e.do(t, "GET", "pi1.example.com", "/", nil)
	if res.StatusCode != http.StatusBadGateway || !strings.Contains(body, "not reachable") {
		t.Errorf("status %d body %q", res.StatusCode, body)
	}
	if d := <-deadlines; d <= 0 || d > 200*time.Millisecond {
		t.Errorf("dial deadline %v away, want within DialTimeout", d)
	}
}

func TestBackendTimeout(t *testing.T) {
	_, p := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		<-r.Context().Done() // never answers; the proxy hangs up
	}))
	e := newEnv(t, func(o *HandlerOptions) { o.ResponseHeaderTimeout = 300 * time.Millisecond }, nodePeer("pi1", svc("web", p)))
	res, body := e.do(t, "GET", "pi1.example.com", "/", nil)
	if res.StatusCode != http.StatusGatewayTimeout || !strings.Contains(body, "did not answer in time") {
		t.Errorf("status %d body %q", res.StatusCode, body)
	}
	if o := e.nextObs(t); o.status != http.StatusGatewayTimeout || o.host != "pi1.example.com" {
		t.Errorf("observed %+v", o)
	}
}

func TestReservedPathNotForwarded(t *testing.T) {
	var hits atomic.Int32
	_, p := backend(t, echo("web", &hits))
	for _, authorize := range []func(http.ResponseWriter, *http.Request, Route) bool{
		nil,
		func(http.ResponseWriter, *http.Request, Route) bool { return true },
	} {
		e := newEnv(t, func(o *HandlerOptions) { o.Authorize = authorize }, nodePeer("pi1", svc("web", p)))
		for _, path := range []string{"/.meshctl/signin?code=x", "/.meshctl", "/a/../.meshctl/x", "//.meshctl/x", "/%2emeshctl/x"} {
			if res, _ := e.do(t, "GET", "pi1.example.com", path, nil); res.StatusCode != 404 {
				t.Errorf("%s (authorize set: %v): status %d", path, authorize != nil, res.StatusCode)
			}
		}
		if res, _ := e.do(t, "GET", "pi1.example.com", "/.meshctlx/", nil); res.StatusCode != 200 {
			t.Errorf("/.meshctlx/: status %d", res.StatusCode)
		}
	}
	if n := hits.Load(); n != 2 {
		t.Errorf("backend hit %d times, want 2 (only /.meshctlx/)", n)
	}
}

// TestControlPathsGoToTheNode: on a node's host name, the coordinator's
// API paths and /metrics are the node's own paths. The proxy serves
// neither (metrics have their own listener, see TestMetricsNotOnNodeHosts),
// so each request must reach the node's backend, as sent.
func TestControlPathsGoToTheNode(t *testing.T) {
	var hits atomic.Int32
	_, p := backend(t, echo("web", &hits))
	e := newEnv(t, nil, nodePeer("pi1", svc("web", p)))
	paths := []string{
		"/metrics", "/metrics?name[]=x",
		wire.PathAdminInfo, wire.PathAdminNodes, wire.PathAdminTokens, wire.PathAdminAudit, wire.PathAdminKeys,
		wire.PathAdminNodeRevoke, wire.PathEnroll, wire.PathNetmap, wire.PathRenew, wire.PathAccessCheck, wire.PathHealthz,
	}
	for _, method := range []string{"GET", "POST"} {
		for _, path := range paths {
			for _, host := range []string{"pi1.example.com", "web--pi1.example.com"} {
				res, body := e.do(t, method, host, path, nil)
				if res.StatusCode != 200 {
					t.Errorf("%s %s%s: status %d, want the backend's 200:\n%s", method, host, path, res.StatusCode, body)
					continue
				}
				if got := decode(t, body); got.Name != "web" || got.Path != path {
					t.Errorf("%s %s%s: answered by %q for path %q, want the backend for %q", method, host, path, got.Name, got.Path, path)
				}
			}
		}
	}
	if n, want := hits.Load(), int32(2*2*len(paths)); n != want {
		t.Errorf("backend hit %d times, want %d", n, want)
	}
}

func TestAuthorizeShortCircuits(t *testing.T) {
	var hits atomic.Int32
	_, p := backend(t, echo("web", &hits))
	var mu sync.Mutex
	var seen []Route
	e := newEnv(t, func(o *HandlerOptions) {
		o.Authorize = func(w http.ResponseWriter, r *http.Request, rt Route) bool {
			mu.Lock()
			seen = append(seen, rt)
			mu.Unlock()
			if r.URL.Path == "/open" {
				r.Header.Del("Cookie") // the proxy's own credentials stay here
				return true
			}
			http.Redirect(w, r, ReservedPrefix+"signin", http.StatusSeeOther)
			return false
		}
	}, nodePeer("pi1", svc("web", p)))
	res, _ := e.do(t, "GET", "pi1.example.com", "/private", nil)
	if res.StatusCode != http.StatusSeeOther || res.Header.Get("Location") != "/.meshctl/signin" {
		t.Errorf("status %d location %q", res.StatusCode, res.Header.Get("Location"))
	}
	if hits.Load() != 0 || e.dials.Load() != 0 {
		t.Errorf("denied request reached the backend (hits %d, dials %d)", hits.Load(), e.dials.Load())
	}
	if o := e.nextObs(t); o.status != http.StatusSeeOther {
		t.Errorf("observed %+v", o)
	}
	res, body := e.do(t, "GET", "pi1.example.com", "/open", http.Header{"Cookie": {"meshctl=secret"}})
	if res.StatusCode != 200 || decode(t, body).Header.Get("Cookie") != "" {
		t.Errorf("allowed request: %d, backend saw %q", res.StatusCode, body)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(seen) != 2 || seen[0].Node != "pi1" || seen[0].Service != "web" {
		t.Errorf("Authorize saw %+v", seen)
	}
	if log := e.log.String(); !strings.Contains(log, `"reason":"not authorized"`) {
		t.Errorf("access log lacks the reason:\n%s", log)
	}
}

func TestAccessLogOmitsSecrets(t *testing.T) {
	_, p := backend(t, echo("web", nil))
	e := newEnv(t, nil, nodePeer("pi1", svc("web", p)))
	e.do(t, "GET", "pi1.example.com", "/cb?code=s3cret-code", http.Header{
		"Cookie":        {"session=c00kie-value"},
		"Authorization": {"Bearer t0ken-value"},
	})
	e.nextObs(t)
	log := e.log.String()
	for _, want := range []string{`"method":"GET"`, `"host":"pi1.example.com"`, `"path":"/cb"`, `"status":200`, `"node":"pi1"`, `"service":"web"`, `"bytes":`, `"duration":`} {
		if !strings.Contains(log, want) {
			t.Errorf("access log lacks %s:\n%s", want, log)
		}
	}
	for _, secret := range []string{"s3cret", "c00kie", "t0ken"} {
		if strings.Contains(log, secret) {
			t.Errorf("access log contains %q:\n%s", secret, log)
		}
	}
}

func TestTableChange(t *testing.T) {
	var hits atomic.Int32
	_, p := backend(t, echo("web", &hits))
	pi1 := nodePeer("pi1", svc("web", p))
	other := nodePeer("pi2", svc("web", p+1)) // a different address
	e := newEnv(t, nil, pi1, other)
	if res, _ := e.do(t, "GET", "pi1.example.com", "/", nil); res.StatusCode != 200 {
		t.Fatalf("status %d", res.StatusCode)
	}

	// The route goes away: the next request is a 404 and dials nothing.
	e.setPeers(other)
	dials := e.dials.Load()
	if res, _ := e.do(t, "GET", "pi1.example.com", "/", nil); res.StatusCode != 404 {
		t.Errorf("removed route: status %d", res.StatusCode)
	}
	if e.dials.Load() != dials {
		t.Error("removed route was dialed")
	}

	// The route goes away while a dial to it is in flight: refused.
	e.setPeers(pi1, other)
	dialing, proceed := make(chan struct{}), make(chan struct{})
	var d net.Dialer
	e.dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		close(dialing)
		<-proceed
		return d.DialContext(ctx, network, addr)
	}
	hitsBefore := hits.Load()
	type result struct {
		status int
		body   string
	}
	done := make(chan result, 1)
	go func() {
		req, _ := http.NewRequest("GET", e.front.URL+"/", nil)
		req.Host = "pi1.example.com"
		res, err := e.client.Do(req)
		if err != nil {
			done <- result{0, err.Error()}
			return
		}
		b, _ := io.ReadAll(res.Body)
		res.Body.Close()
		done <- result{res.StatusCode, string(b)}
	}()
	select {
	case <-dialing:
	case <-time.After(10 * time.Second):
		t.Fatal("the request did not dial (an idle connection to the old address was reused?)")
	}
	e.setPeers(other)
	close(proceed)
	r := <-done
	if r.status != http.StatusBadGateway {
		t.Errorf("in-flight dial to a removed address: status %d %q", r.status, r.body)
	}
	if hits.Load() != hitsBefore {
		t.Error("a request reached an address no longer in the table")
	}
	if log := e.log.String(); !strings.Contains(log, "removed while dialing") {
		t.Errorf("access log lacks the reason:\n%s", log)
	}
}

func TestDialGuard(t *testing.T) {
	e := newEnv(t, nil, nodePeer("pi1", svc("web", 8080)))
	dial := e.h.transport.DialContext
	for _, addr := range []string{"127.0.0.1:8081", "127.0.0.2:8080", "localhost:8080", "garbage"} {
		if c, err := dial(context.Background(), "tcp", addr); !errors.Is(err, errNoRoute) {
			if c != nil {
				c.Close()
			}
			t.Errorf("dial %s: err %v, want refusal", addr, err)
		}
	}
	if n := e.dials.Load(); n != 0 {
		t.Errorf("Dial called %d times for addresses not in the table", n)
	}
}

func TestIdleConnectionsRetiredOnAddressChange(t *testing.T) {
	var conns atomic.Int32
	srv := httptest.NewUnstartedServer(echo("web", nil))
	srv.Config.ConnState = func(_ net.Conn, s http.ConnState) {
		if s == http.StateNew {
			conns.Add(1)
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	p := port(t, srv.Listener.Addr())
	e := newEnv(t, nil, nodePeer("pi1", svc("web", p)))
	get := func() {
		t.Helper()
		if res, _ := e.do(t, "GET", "pi1.example.com", "/", nil); res.StatusCode != 200 {
			t.Fatalf("status %d", res.StatusCode)
		}
	}
	get()
	e.setPeers(nodePeer("pi1", svc("web", p))) // a new table, same addresses: keep the pool
	get()
	if n := conns.Load(); n != 1 {
		t.Errorf("same addresses: %d connections, want 1", n)
	}
	moved := nodePeer("pi1", svc("web", p))
	moved.ID = "id-new-device" // the address now belongs to another device
	e.setPeers(moved)
	get()
	if n := conns.Load(); n != 2 {
		t.Errorf("address moved to another node: %d connections, want 2", n)
	}
}

// A request in flight to a node whose route disappears (revocation) ends
// at once when the table changes, instead of waiting for a peer that
// WireGuard no longer reaches.
func TestTableChangeCutsInFlightRequests(t *testing.T) {
	entered := make(chan struct{})
	release := make(chan struct{})
	defer close(release)
	_, port := backend(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		close(entered)
		<-release // never answers while the test runs
	}))
	e := newEnv(t, nil, nodePeer("pi1", svc("web", port)))
	done := make(chan int, 1)
	go func() {
		res, _ := e.do(t, http.MethodGet, "pi1."+testDomain, "/", nil)
		done <- res.StatusCode
	}()
	<-entered
	e.setPeers() // pi1 revoked
	e.h.TableChanged()
	select {
	case code := <-done:
		if code != http.StatusBadGateway {
			t.Fatalf("in-flight request after its route went away: %d, want 502", code)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("in-flight request still hanging after TableChanged")
	}
}
