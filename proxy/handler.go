package proxy

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"net/url"
	"path"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// ReservedPrefix is the path prefix the proxy keeps for itself on every
// host (sign-in lives there); requests under it never reach a backend.
const ReservedPrefix = "/.meshctl/"

// statusClientGone is recorded (never sent) when the client went away
// before a response could be written, as nginx does.
const statusClientGone = 499

// HandlerOptions configures NewHandler.
type HandlerOptions struct {
	// Table returns the current route table; the caller swaps it atomically
	// on netmap changes. Required.
	Table func() *Table
	// Dial dials the overlay (netstack). It is only ever asked for an
	// address that a route in the current table leads to. Required.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Authorize decides whether r may reach rt. It returns true to proceed;
	// when it returns false it has written the response itself (a sign-in
	// page, a redirect). It sees requests under ReservedPrefix first, so
	// sign-in can live there. It may remove the proxy's own credentials
	// from r.Header before the request is forwarded. The server always sets
	// it; nil allows every request (for tests).
	Authorize func(w http.ResponseWriter, r *http.Request, rt Route) bool
	// Logger receives the access log; nil discards it.
	Logger *slog.Logger
	// DialTimeout bounds one overlay dial; 0 means 10s.
	DialTimeout time.Duration
	// ResponseHeaderTimeout bounds the wait for a backend's response
	// headers once the request is sent; 0 means 60s.
	ResponseHeaderTimeout time.Duration
	// BodyReadTimeout cuts a request whose body stalls, sending no byte
	// for this long (else a client could hold a backend connection open at
	// no cost); the client gets 408. 0 means 60s.
	BodyReadTimeout time.Duration
	// Observe, if set, is called once per request after it completes (for
	// metrics): the route's host ("" when unknown), the status, the bytes
	// of response body written and the duration.
	Observe func(host string, status int, bytes int64, d time.Duration)
}

type Handler struct {
	o         HandlerOptions
	active    connSet // backend connections, by address, for TableChanged
	log       *slog.Logger
	proxy     *httputil.ReverseProxy
	transport *http.Transport
	seen      atomic.Pointer[Table] // the table the pooled connections belong to
}

type routeKey struct{}

// NewHandler returns the Handler that routes requests by host name to
// nodes' services.
//
// Host header policy: the backend receives the route's canonical public
// host (lower-case, no trailing dot) as Host, with the client's port if it
// sent one, so that virtual hosts and absolute URLs a backend builds match
// what the browser uses. X-Forwarded-Host carries the client's Host as sent,
// X-Forwarded-For the client's address and X-Forwarded-Proto its scheme;
// client-supplied Forwarded, X-Forwarded-* and X-Real-Ip headers are
// dropped.
func NewHandler(o HandlerOptions) (*Handler, error) {
	if o.Table == nil || o.Dial == nil {
		return nil, errors.New("proxy: HandlerOptions needs Table and Dial")
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = 10 * time.Second
	}
	if o.ResponseHeaderTimeout <= 0 {
		o.ResponseHeaderTimeout = 60 * time.Second
	}
	if o.BodyReadTimeout <= 0 {
		o.BodyReadTimeout = 60 * time.Second
	}
	h := &Handler{o: o, log: o.Logger, active: connSet{m: map[netip.AddrPort]map[*trackedConn]struct{}{}}}
	if h.log == nil {
		h.log = slog.New(slog.DiscardHandler)
	}
	h.transport = &http.Transport{
		Proxy:                 nil, // never from the environment
		DialContext:           h.dial,
		ForceAttemptHTTP2:     false, // backends speak plain HTTP/1.1
		MaxIdleConns:          1024,
		MaxIdleConnsPerHost:   64,
		IdleConnTimeout:       90 * time.Second,
		ResponseHeaderTimeout: o.ResponseHeaderTimeout,
		ExpectContinueTimeout: time.Second,
	}
	h.proxy = &httputil.ReverseProxy{
		Rewrite:       h.rewrite,
		Transport:     h.transport,
		FlushInterval: 100 * time.Millisecond, // event streams flush at once anyway
		ErrorHandler:  h.proxyError,
		ErrorLog:      slog.NewLogLogger(h.log.Handler(), slog.LevelDebug),
		BufferPool:    copyBuffers,
	}
	return h, nil
}

// copyBuffers lends ReverseProxy its body-copy buffers; without a pool it
// allocates 32 KiB per response (measured: 1.9 GB of garbage in 5 s of
// 1 KiB requests, a collector busy enough to cost throughput).
var copyBuffers = &bufferPool{p: sync.Pool{New: func() any { return new([32 << 10]byte) }}}

type bufferPool struct{ p sync.Pool }

func (b *bufferPool) Get() []byte { return b.p.Get().(*[32 << 10]byte)[:] }
func (b *bufferPool) Put(x []byte) {
	if cap(x) == 32<<10 {
		b.p.Put((*[32 << 10]byte)(x[:32<<10]))
	}
}

func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	rec := &recorder{ResponseWriter: w}
	var rt Route
	defer func() {
		p := recover()
		if p != nil && rec.reason == "" {
			rec.reason = "response aborted"
		}
		h.finish(rec, r, rt, start)
		if p != nil {
			panic(p)
		}
	}()

	t := h.o.Table()
	h.retire(t)
	rt, ok := t.Lookup(r.Host)
	switch {
	case !ok:
		rec.reason = "no route"
		if CanonicalHost(r.Host) == "" {
			rec.reason = "not a host name"
		}
		writePage(rec, http.StatusNotFound, "No device at this address",
			"Nothing is published at this address. Check the name and try again.")
		return
	case r.Method == http.MethodConnect || r.Method == "PRI":
		// PRI is the HTTP/2 preface: never forwarded as a request.
		rec.reason = r.Method
		writePage(rec, http.StatusMethodNotAllowed, "Not allowed", "This request method is not supported.")
		return
	case h.o.Authorize != nil && !h.o.Authorize(rec, r, rt):
		if rec.reason == "" {
			rec.reason = "not authorized"
		}
		return
	case reserved(r.URL.Path):
		rec.reason = "reserved path"
		writePage(rec, http.StatusNotFound, "Not found", "There is nothing here.")
		return
	}
	dropH2CUpgrade(r.Header)
	if r.Body != nil && r.Body != http.NoBody {
		rec.body = &bodyReader{ReadCloser: r.Body, rc: http.NewResponseController(w), timeout: h.o.BodyReadTimeout}
		r.Body = rec.body
	}
	h.proxy.ServeHTTP(rec, r.WithContext(context.WithValue(r.Context(), routeKey{}, rt)))
}

// dropH2CUpgrade removes an HTTP/2 cleartext upgrade offer: a backend that
// accepted it would carry further requests in a tunnel the proxy does not
// look into. The request goes on as plain HTTP/1.1, as to a server that
// does not speak h2c.
func dropH2CUpgrade(h http.Header) {
	for _, v := range h.Values("Upgrade") {
		for tok := range strings.SplitSeq(v, ",") {
			if strings.EqualFold(strings.TrimSpace(tok), "h2c") {
				h.Del("Upgrade")
				h.Del("HTTP2-Settings")
				return
			}
		}
	}
}

// bodyReader cuts a request body that stalls for longer than timeout, and
// notes one that failed to read (stalled, or malformed chunked encoding),
// so that the client gets 408 or 400 rather than a 502 that blames the
// device.
type bodyReader struct {
	io.ReadCloser
	rc      *http.ResponseController
	timeout time.Duration
	failed  atomic.Bool
	timeOut atomic.Bool
}

func (b *bodyReader) Read(p []byte) (int, error) {
	b.rc.SetReadDeadline(time.Now().Add(b.timeout))
	n, err := b.ReadCloser.Read(p)
	switch {
	case err == io.EOF:
		// What the connection reads next is not this body.
		b.rc.SetReadDeadline(time.Time{})
	case err != nil && !errors.Is(err, http.ErrBodyReadAfterClose):
		b.timeOut.Store(isTimeout(err))
		b.failed.Store(true)
	}
	return n, err
}

// reserved reports whether p is, or resolves to, a path under
// ReservedPrefix.
func reserved(p string) bool {
	return strings.HasPrefix(p+"/", ReservedPrefix) || strings.HasPrefix(path.Clean("/"+p)+"/", ReservedPrefix)
}

func (h *Handler) rewrite(pr *httputil.ProxyRequest) {
	rt := pr.In.Context().Value(routeKey{}).(Route)
	pr.SetURL(&url.URL{Scheme: "http", Host: rt.Addr.String()})
	// Rewrite has removed Forwarded and X-Forwarded-For/-Host/-Proto; a
	// client's X-Forwarded-Port, -Prefix, -Ssl, X-Real-Ip and the like would
	// otherwise reach the backend as if the proxy had said so.
	for k := range pr.Out.Header {
		if forwardingHeader(k) {
			delete(pr.Out.Header, k)
		}
	}
	pr.SetXForwarded()
	pr.Out.Host = rt.Host
	if _, port, err := net.SplitHostPort(pr.In.Host); err == nil && port != "" {
		pr.Out.Host = net.JoinHostPort(rt.Host, port)
	}
}

// forwardingHeader reports whether k is X-Real-Ip or X-Forwarded-*, also
// spelt with underscores (CGI and WSGI servers read X_Real_Ip as X-Real-Ip).
func forwardingHeader(k string) bool {
	k = strings.ReplaceAll(strings.ToLower(k), "_", "-")
	return k == "x-real-ip" || strings.HasPrefix(k, "x-forwarded-")
}

// retire drops pooled connections when the table's addresses changed: an
// idle connection might otherwise lead to a device that no longer owns the
// address it was dialed to.
func (h *Handler) retire(t *Table) {
	old := h.seen.Load()
	if old == t || !h.seen.CompareAndSwap(old, t) {
		return
	}
	if !t.sameAddrs(old) {
		h.transport.CloseIdleConnections()
	}
}

var errNoRoute = errors.New("address is not in the route table")

// dialError marks a failure to reach the backend (as opposed to a backend
// that was reached and then failed).
type dialError struct{ err error }

func (e *dialError) Error() string { return "dial: " + e.err.Error() }
func (e *dialError) Unwrap() error { return e.err }

// dial is the Transport's only way out: it dials addresses that a route in
// the current table leads to, checked before and again after dialing (the
// table may change while the dial is in flight).
func (h *Handler) dial(ctx context.Context, network, addr string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !h.o.Table().hasAddr(ap) {
		return nil, &dialError{fmt.Errorf("%s: %w", addr, errNoRoute)}
	}
	ctx, cancel := context.WithTimeout(ctx, h.o.DialTimeout)
	defer cancel()
	c, err := h.o.Dial(ctx, network, addr)
	if err != nil {
		return nil, &dialError{err}
	}
	tc := h.active.add(ap, c)
	if !h.o.Table().hasAddr(ap) {
		tc.Close()
		return nil, &dialError{fmt.Errorf("%s: %w (removed while dialing)", addr, errNoRoute)}
	}
	return tc, nil
}

// TableChanged must be called after the table changes: it drops pooled
// connections and closes in-flight ones to addresses no longer in the
// table, so a revoked node's requests end at once instead of hanging on a
// peer that WireGuard no longer reaches.
func (h *Handler) TableChanged() {
	t := h.o.Table()
	h.retire(t)
	h.active.closeUnless(t.hasAddr)
}

// connSet tracks open backend connections by address.
type connSet struct {
	mu sync.Mutex
	m  map[netip.AddrPort]map[*trackedConn]struct{}
}

type trackedConn struct {
	net.Conn
	set  *connSet
	addr netip.AddrPort
	once sync.Once
}

func (s *connSet) add(addr netip.AddrPort, c net.Conn) *trackedConn {
	tc := &trackedConn{Conn: c, set: s, addr: addr}
	s.mu.Lock()
	if s.m[addr] == nil {
		s.m[addr] = map[*trackedConn]struct{}{}
	}
	s.m[addr][tc] = struct{}{}
	s.mu.Unlock()
	return tc
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.set.mu.Lock()
		delete(c.set.m[c.addr], c)
		if len(c.set.m[c.addr]) == 0 {
			delete(c.set.m, c.addr)
		}
		c.set.mu.Unlock()
	})
	return c.Conn.Close()
}

// closeUnless closes every connection whose address fails keep.
func (s *connSet) closeUnless(keep func(netip.AddrPort) bool) {
	var doomed []*trackedConn
	s.mu.Lock()
	for addr, conns := range s.m {
		if keep(addr) {
			continue
		}
		for c := range conns {
			doomed = append(doomed, c)
		}
	}
	s.mu.Unlock()
	for _, c := range doomed {
		c.Close()
	}
}

// proxyError answers for a request the backend did not answer. The page
// names no internals; the access log records the reason.
func (h *Handler) proxyError(w http.ResponseWriter, r *http.Request, err error) {
	rec := w.(*recorder)
	rec.reason = err.Error()
	var de *dialError
	fresh := rec.status == 0 && !rec.hijacked
	switch {
	case fresh && rec.body != nil && rec.body.timeOut.Load():
		// Before "client gone": the cut cancels the request's context.
		rec.reason = "request body stalled: " + err.Error()
		writePage(rec, http.StatusRequestTimeout, "Request timeout", "The request body did not arrive in time.")
	case fresh && rec.body != nil && rec.body.failed.Load() && r.Context().Err() == nil:
		rec.reason = "bad request body: " + err.Error()
		writePage(rec, http.StatusBadRequest, "Bad request", "The request body could not be read.")
	case errors.Is(r.Context().Err(), context.Canceled):
		rec.reason = "client gone: " + err.Error()
		if rec.status == 0 {
			rec.status = statusClientGone
		}
	case rec.hijacked || rec.status != 0:
		// Too late for an error page.
	case errors.As(err, &de):
		writePage(rec, http.StatusBadGateway, "Device not reachable", "This device is not reachable right now. Try again later.")
	case errors.Is(err, context.DeadlineExceeded) || isTimeout(err):
		writePage(rec, http.StatusGatewayTimeout, "No answer", "The device did not answer in time. Try again later.")
	default:
		writePage(rec, http.StatusBadGateway, "Device not reachable", "This device is not reachable right now. Try again later.")
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

func (h *Handler) finish(rec *recorder, r *http.Request, rt Route, start time.Time) {
	d := time.Since(start)
	status := rec.status
	if status == 0 {
		status = http.StatusOK // what net/http sends for a Handler that wrote nothing
		if r.Context().Err() != nil {
			status = statusClientGone
		}
	}
	level := slog.LevelInfo
	if status >= 500 {
		level = slog.LevelWarn
	}
	host := CanonicalHost(r.Host)
	if host == "" {
		host = clip(r.Host)
	}
	// Never the query string (sign-in codes), cookies or Authorization.
	h.log.LogAttrs(r.Context(), level, "http request",
		slog.String("method", r.Method),
		slog.String("host", host),
		slog.String("path", clip(r.URL.Path)),
		slog.Int("status", status),
		slog.String("node", rt.Node),
		slog.String("service", rt.Service),
		slog.Duration("duration", d),
		slog.Int64("bytes", rec.bytes),
		slog.String("reason", rec.reason),
		slog.String("client", r.RemoteAddr),
	)
	if h.o.Observe != nil {
		h.o.Observe(rt.Host, status, rec.bytes, d)
	}
}

func clip(s string) string {
	if len(s) > 256 {
		return s[:256] + "…"
	}
	return s
}

// recorder notes the status and body bytes of a response. It passes
// flushing and hijacking through to the server's ResponseWriter.
type recorder struct {
	http.ResponseWriter
	status   int
	bytes    int64
	reason   string
	hijacked bool
	body     *bodyReader // the request body, when there is one
}

func (r *recorder) WriteHeader(code int) {
	if r.status == 0 && (code >= 200 || code == http.StatusSwitchingProtocols) {
		r.status = code // 1xx informational responses are not final
	}
	r.ResponseWriter.WriteHeader(code)
}

func (r *recorder) Write(b []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	n, err := r.ResponseWriter.Write(b)
	r.bytes += int64(n)
	return n, err
}

func (r *recorder) Unwrap() http.ResponseWriter { return r.ResponseWriter }

func (r *recorder) FlushError() error { return http.NewResponseController(r.ResponseWriter).Flush() }

func (r *recorder) Flush() { _ = r.FlushError() }

// Hijack hands over the connection for a protocol switch (WebSocket); the
// bytes exchanged afterwards are not counted.
func (r *recorder) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	c, brw, err := http.NewResponseController(r.ResponseWriter).Hijack()
	if err == nil {
		r.hijacked = true
		if r.status == 0 {
			r.status = http.StatusSwitchingProtocols
		}
	}
	return c, brw, err
}

// setReason records why a request was answered the way it was, for the
// access log (hooks such as Authorize call it on the writer they got).
func setReason(w http.ResponseWriter, reason string) {
	if rec, ok := w.(*recorder); ok {
		rec.reason = reason
	}
}
