package proxy

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/wire"
)

// scrape fetches h over HTTP and parses the text exposition format.
func scrapeMetrics(t *testing.T, h http.Handler) map[string]*dto.MetricFamily {
	t.Helper()
	srv := httptest.NewServer(h)
	defer srv.Close()
	res, err := srv.Client().Get(srv.URL + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	if res.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(res.Body)
		t.Fatalf("scrape: %s: %s", res.Status, b)
	}
	if ct := res.Header.Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
		t.Fatalf("scrape Content-Type %q", ct)
	}
	p := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := p.TextToMetricFamilies(res.Body)
	if err != nil {
		t.Fatalf("parse scrape: %v", err)
	}
	return mfs
}

type metricLabels map[string]string

func (l metricLabels) String() string {
	var parts []string
	for k, v := range l {
		parts = append(parts, fmt.Sprintf("%s=%q", k, v))
	}
	sort.Strings(parts)
	return "{" + strings.Join(parts, ",") + "}"
}

// series returns the metric of family name whose metricLabels are exactly want.
func metricSeries(t *testing.T, mfs map[string]*dto.MetricFamily, name string, want metricLabels) (*dto.Metric, bool) {
	t.Helper()
	mf := mfs[name]
	if mf == nil {
		return nil, false
	}
	var found *dto.Metric
	for _, m := range mf.GetMetric() {
		if len(m.GetLabel()) != len(want) {
			continue
		}
		match := true
		for _, lp := range m.GetLabel() {
			if v, ok := want[lp.GetName()]; !ok || v != lp.GetValue() {
				match = false
			}
		}
		if match {
			if found != nil {
				t.Fatalf("%s%v appears twice", name, want)
			}
			found = m
		}
	}
	return found, found != nil
}

// value is the value of a counter, gauge or untyped series; it fails the
// test when the series is missing.
func metricValue(t *testing.T, mfs map[string]*dto.MetricFamily, name string, l metricLabels) float64 {
	t.Helper()
	m, ok := metricSeries(t, mfs, name, l)
	if !ok {
		t.Fatalf("no series %s%v", name, l)
	}
	switch mfs[name].GetType() {
	case dto.MetricType_COUNTER:
		return m.GetCounter().GetValue()
	case dto.MetricType_GAUGE:
		return m.GetGauge().GetValue()
	default:
		return m.GetUntyped().GetValue()
	}
}

func metricHistogram(t *testing.T, mfs map[string]*dto.MetricFamily, name string, l metricLabels) *dto.Histogram {
	t.Helper()
	if mfs[name].GetType() != dto.MetricType_HISTOGRAM {
		t.Fatalf("%s is %v, not a histogram", name, mfs[name].GetType())
	}
	m, ok := metricSeries(t, mfs, name, l)
	if !ok {
		t.Fatalf("no histogram %s%v", name, l)
	}
	return m.GetHistogram()
}

func metricBucket(t *testing.T, h *dto.Histogram, le float64) uint64 {
	t.Helper()
	for _, b := range h.GetBucket() {
		if b.GetUpperBound() == le {
			return b.GetCumulativeCount()
		}
	}
	t.Fatalf("no bucket le=%v", le)
	return 0
}

// labelValues lists the values label takes in family name.
func metricLabelValues(mfs map[string]*dto.MetricFamily, name, label string) map[string]bool {
	out := map[string]bool{}
	for _, m := range mfs[name].GetMetric() {
		for _, lp := range m.GetLabel() {
			if lp.GetName() == label {
				out[lp.GetValue()] = true
			}
		}
	}
	return out
}

func wantMetric(t *testing.T, mfs map[string]*dto.MetricFamily, name string, l metricLabels, want float64) {
	t.Helper()
	if got := metricValue(t, mfs, name, l); got != want {
		t.Errorf("%s%v = %v, want %v", name, l, got, want)
	}
}

func TestMetricsObserve(t *testing.T) {
	m := NewMetrics(nil)
	const a, b = "pi1.example.com", "web.nas.example.com"
	m.Observe(a, 200, 100, 250*time.Millisecond)
	m.Observe(a, 200, 20, 500*time.Millisecond)
	m.Observe(a, 502, 7, 2*time.Millisecond)
	m.Observe(b, 504, 3, 60*time.Second)
	m.Observe(b, 499, 0, time.Second)
	m.Observe("", 404, 11, time.Millisecond)
	m.Observe("", 404, 11, time.Millisecond)
	m.Observe(a, 101, 0, 90*time.Second) // a WebSocket session ended

	mfs := scrapeMetrics(t, m.Handler())
	const req = "meshctl_proxy_requests_total"
	if got := mfs[req].GetType(); got != dto.MetricType_COUNTER {
		t.Errorf("%s is %v", req, got)
	}
	wantMetric(t, mfs, req, metricLabels{"route": a, "code": "200"}, 2)
	wantMetric(t, mfs, req, metricLabels{"route": a, "code": "502"}, 1)
	wantMetric(t, mfs, req, metricLabels{"route": a, "code": "101"}, 1)
	wantMetric(t, mfs, req, metricLabels{"route": b, "code": "504"}, 1)
	wantMetric(t, mfs, req, metricLabels{"route": b, "code": "499"}, 1)
	wantMetric(t, mfs, req, metricLabels{"route": "unknown", "code": "404"}, 2)
	if n := len(mfs[req].GetMetric()); n != 6 {
		t.Errorf("%s has %d series, want 6", req, n)
	}
	if routes := metricLabelValues(mfs, req, "route"); len(routes) != 3 || routes[""] {
		t.Errorf("route metricLabels %v", routes)
	}

	const bytes = "meshctl_proxy_response_bytes_total"
	wantMetric(t, mfs, bytes, metricLabels{"route": a}, 127)
	wantMetric(t, mfs, bytes, metricLabels{"route": b}, 3)
	wantMetric(t, mfs, bytes, metricLabels{"route": "unknown"}, 22)

	const up = "meshctl_proxy_upstream_errors_total"
	wantMetric(t, mfs, up, metricLabels{"kind": "dial"}, 1)
	wantMetric(t, mfs, up, metricLabels{"kind": "timeout"}, 1)
	if n := len(mfs[up].GetMetric()); n != 2 {
		t.Errorf("%s has %d series, want 2", up, n)
	}

	// The WebSocket session is not a request duration.
	h := metricHistogram(t, mfs, "meshctl_proxy_request_duration_seconds", metricLabels{"route": a})
	if h.GetSampleCount() != 3 || math.Abs(h.GetSampleSum()-0.752) > 1e-9 {
		t.Errorf("duration{%s}: count %d sum %v, want 3 and 0.752", a, h.GetSampleCount(), h.GetSampleSum())
	}
	if got := metricBucket(t, h, 0.005); got != 1 {
		t.Errorf("duration{%s} le=0.005: %d, want 1", a, got)
	}
	if got := metricBucket(t, h, 0.25); got != 2 {
		t.Errorf("duration{%s} le=0.25: %d, want 2", a, got)
	}
	if got := metricBucket(t, h, 0.5); got != 3 {
		t.Errorf("duration{%s} le=0.5: %d, want 3", a, got)
	}
	hb := metricHistogram(t, mfs, "meshctl_proxy_request_duration_seconds", metricLabels{"route": b})
	if hb.GetSampleCount() != 2 || hb.GetSampleSum() != 61 || metricBucket(t, hb, 30) != 1 || metricBucket(t, hb, 60) != 2 {
		t.Errorf("duration{%s}: count %d sum %v", b, hb.GetSampleCount(), hb.GetSampleSum())
	}

	ws := metricHistogram(t, mfs, "meshctl_proxy_websocket_duration_seconds", metricLabels{"route": a})
	if ws.GetSampleCount() != 1 || ws.GetSampleSum() != 90 || metricBucket(t, ws, 60) != 0 || metricBucket(t, ws, 300) != 1 {
		t.Errorf("websocket duration: count %d sum %v", ws.GetSampleCount(), ws.GetSampleSum())
	}
	if _, ok := metricSeries(t, mfs, "meshctl_proxy_websocket_duration_seconds", metricLabels{"route": b}); ok {
		t.Errorf("websocket duration series for %s, which had no WebSocket", b)
	}
	// A 101 without a tracked hijack does not take the gauge below 0.
	wantMetric(t, mfs, "meshctl_proxy_websockets_open", metricLabels{}, 0)

	// The registry is the Metrics' own: the Go and process collectors are
	// there, nothing went to the global default registry.
	if mfs["go_goroutines"] == nil {
		t.Error("go_goroutines missing")
	}
	def, err := prometheus.DefaultGatherer.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range def {
		if strings.HasPrefix(mf.GetName(), "meshctl_") {
			t.Errorf("%s registered in the default registry", mf.GetName())
		}
	}
	NewMetrics(func() (node.Status, error) { return node.Status{}, nil }) // a second one must not clash
}

func TestMetricsRouteCardinalityCap(t *testing.T) {
	m := NewMetrics(nil)
	host := func(i int) string { return fmt.Sprintf("n%d.example.com", i) }
	for i := range maxMetricRoutes + 50 {
		m.Observe(host(i), 200, 1, time.Millisecond)
	}
	m.Observe(host(0), 200, 1, time.Millisecond)                  // admitted: keeps its label
	m.Observe(host(maxMetricRoutes+60), 503, 1, time.Millisecond) // new: "other"
	m.Observe("", 404, 1, time.Millisecond)                       // unknown does not count toward the cap
	m.Observe("\xff.example.com", 404, 1, time.Millisecond)       // not a label value: unknown

	mfs := scrapeMetrics(t, m.Handler())
	const req = "meshctl_proxy_requests_total"
	routes := metricLabelValues(mfs, req, "route")
	if len(routes) != maxMetricRoutes+2 {
		t.Errorf("%d distinct routes, want %d (+ other, unknown)", len(routes), maxMetricRoutes)
	}
	if !routes[host(maxMetricRoutes-1)] || routes[host(maxMetricRoutes)] {
		t.Errorf("the cap admitted the wrong routes")
	}
	wantMetric(t, mfs, req, metricLabels{"route": host(0), "code": "200"}, 2)
	wantMetric(t, mfs, req, metricLabels{"route": "other", "code": "200"}, 50)
	wantMetric(t, mfs, req, metricLabels{"route": "other", "code": "503"}, 1)
	wantMetric(t, mfs, req, metricLabels{"route": "unknown", "code": "404"}, 2)
	wantMetric(t, mfs, "meshctl_proxy_response_bytes_total", metricLabels{"route": "other"}, 51)
	if n := len(metricLabelValues(mfs, "meshctl_proxy_request_duration_seconds", "route")); n != maxMetricRoutes+2 {
		t.Errorf("duration histogram has %d routes", n)
	}
}

func TestMetricsConnState(t *testing.T) {
	m := NewMetrics(nil)
	open := func() (float64, float64) {
		mfs := scrapeMetrics(t, m.Handler())
		return metricValue(t, mfs, "meshctl_proxy_open_connections", metricLabels{}), metricValue(t, mfs, "meshctl_proxy_websockets_open", metricLabels{})
	}
	want := func(conns, ws float64) {
		t.Helper()
		if c, w := open(); c != conns || w != ws {
			t.Errorf("open_connections %v websockets_open %v, want %v %v", c, w, conns, ws)
		}
	}
	c1, c2, c3 := &net.TCPConn{}, &net.TCPConn{}, &net.TCPConn{}
	want(0, 0)
	m.TrackConn(c1, http.StateNew)
	m.TrackConn(c2, http.StateNew)
	m.TrackConn(c3, http.StateNew)
	want(3, 0)
	m.TrackConn(c1, http.StateActive)
	m.TrackConn(c1, http.StateIdle)
	m.TrackConn(c2, http.StateActive)
	want(3, 0)
	m.TrackConn(c1, http.StateClosed)
	want(2, 0)
	m.TrackConn(c2, http.StateHijacked) // a WebSocket begins
	want(1, 1)
	m.Observe("pi1.example.com", 200, 0, time.Millisecond) // not a WebSocket end
	want(1, 1)
	m.Observe("pi1.example.com", 101, 0, time.Second) // ...this is
	want(1, 0)
	m.Observe("pi1.example.com", 101, 0, time.Second) // unmatched: stays at 0
	want(1, 0)
	m.TrackConn(c3, http.StateClosed)
	want(0, 0)
}

// TestMetricsConnStateServer tracks a real server's connections.
func TestMetricsConnStateServer(t *testing.T) {
	m := NewMetrics(nil)
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "hi") }))
	srv.Config.ConnState = m.TrackConn
	srv.Start()
	defer srv.Close()

	conns := func() float64 {
		return metricValue(t, scrapeMetrics(t, m.Handler()), "meshctl_proxy_open_connections", metricLabels{})
	}
	c, err := net.Dial("tcp", srv.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.SetDeadline(time.Now().Add(20 * time.Second))
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	res, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	io.ReadAll(res.Body)
	res.Body.Close()
	if got := conns(); got != 1 {
		t.Errorf("open_connections with a keep-alive connection = %v, want 1", got)
	}
	c.Close()
	waitForMetric(t, "open_connections 0 after close", func() bool { return conns() == 0 })
}

func waitForMetric(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestMetricsWebSocketThroughHandler wires the metrics as the lead does
// (Observe and ConnState) and checks a proxied WebSocket session moves
// websockets_open up while it lasts and down when it ends.
func TestMetricsWebSocketThroughHandler(t *testing.T) {
	back := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "websocket" {
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
	defer back.Close()
	ap, err := netip.ParseAddrPort(back.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	table := BuildTable(&wire.Netmap{Peers: []wire.Peer{{
		ID: "id-ws1", Name: "ws1", Role: wire.RoleNode, IPv4: "127.0.0.1",
		Services: []wire.Service{{Name: "web", Port: ap.Port()}},
	}}}, "example.com")
	m := NewMetrics(nil)
	var d net.Dialer
	h, err := NewHandler(HandlerOptions{Table: func() *Table { return table }, Dial: d.DialContext, Observe: m.Observe})
	if err != nil {
		t.Fatal(err)
	}
	front := httptest.NewUnstartedServer(h)
	front.Config.ConnState = m.TrackConn
	front.Start()
	defer front.Close()

	gauges := func() (float64, float64) {
		mfs := scrapeMetrics(t, m.Handler())
		return metricValue(t, mfs, "meshctl_proxy_open_connections", metricLabels{}), metricValue(t, mfs, "meshctl_proxy_websockets_open", metricLabels{})
	}
	conn, err := net.Dial("tcp", front.Listener.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(20 * time.Second))
	io.WriteString(conn, "GET /ws HTTP/1.1\r\nHost: ws1.example.com\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n")
	br := bufio.NewReader(conn)
	res, err := http.ReadResponse(br, nil)
	if err != nil {
		t.Fatal(err)
	}
	if res.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("handshake: %s", res.Status)
	}
	io.WriteString(conn, "ping")
	got := make([]byte, 4)
	if _, err := io.ReadFull(br, got); err != nil || string(got) != "ping" {
		t.Fatalf("echo: %q, %v", got, err)
	}
	if c, w := gauges(); c != 0 || w != 1 {
		t.Errorf("during the session: open_connections %v websockets_open %v, want 0 1", c, w)
	}
	conn.Close()
	waitForMetric(t, "websockets_open 0 after the session", func() bool { _, w := gauges(); return w == 0 })
	mfs := scrapeMetrics(t, m.Handler())
	wantMetric(t, mfs, "meshctl_proxy_requests_total", metricLabels{"route": "ws1.example.com", "code": "101"}, 1)
	if ws := metricHistogram(t, mfs, "meshctl_proxy_websocket_duration_seconds", metricLabels{"route": "ws1.example.com"}); ws.GetSampleCount() != 1 {
		t.Errorf("websocket sessions %d, want 1", ws.GetSampleCount())
	}
	wantMetric(t, mfs, "meshctl_proxy_open_connections", metricLabels{}, 0)
}

type fakeAgentStatus struct {
	mu    sync.Mutex
	st    node.Status
	err   error
	calls int
}

func (f *fakeAgentStatus) status() (node.Status, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	return f.st, f.err
}

func (f *fakeAgentStatus) set(st node.Status, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.st, f.err = st, err
}

func TestMetricsPeerCollector(t *testing.T) {
	hs := time.Date(2026, 3, 4, 5, 6, 7, 0, time.UTC)
	f := &fakeAgentStatus{}
	f.set(node.Status{Peers: []node.PeerStatus{
		{Name: "pi1", PublicKey: "K1=", LastHandshake: hs.Format(time.RFC3339), RxBytes: 1234, TxBytes: 5678},
		{Name: "nas", PublicKey: "K2=", RxBytes: 0, TxBytes: 148}, // never handshaked
		{Name: "(unknown)", PublicKey: "K3=", LastHandshake: "yesterday", RxBytes: 5, TxBytes: 6},
		{Name: "(unknown)", PublicKey: "K4=", RxBytes: 7, TxBytes: 8},
		{Name: "pi1", PublicKey: "K5=", RxBytes: 9, TxBytes: 10}, // a duplicate name
	}}, nil)
	m := NewMetrics(f.status)
	if f.calls != 0 {
		t.Errorf("status read %d times before any scrape", f.calls)
	}
	mfs := scrapeMetrics(t, m.Handler())
	if f.calls != 1 {
		t.Errorf("status read %d times for one scrape", f.calls)
	}
	const (
		hsName = "meshctl_proxy_peer_last_handshake_seconds"
		rx     = "meshctl_proxy_peer_rx_bytes_total"
		tx     = "meshctl_proxy_peer_tx_bytes_total"
		up     = "meshctl_proxy_peer_status_up"
	)
	for name, typ := range map[string]dto.MetricType{hsName: dto.MetricType_GAUGE, rx: dto.MetricType_COUNTER, tx: dto.MetricType_COUNTER, up: dto.MetricType_GAUGE} {
		if got := mfs[name].GetType(); got != typ {
			t.Errorf("%s is %v, want %v", name, got, typ)
		}
	}
	wantMetric(t, mfs, up, metricLabels{}, 1)
	wantMetric(t, mfs, hsName, metricLabels{"peer": "pi1"}, float64(hs.Unix()))
	wantMetric(t, mfs, hsName, metricLabels{"peer": "nas"}, 0)
	wantMetric(t, mfs, hsName, metricLabels{"peer": "K4="}, 0)
	wantMetric(t, mfs, hsName, metricLabels{"peer": "K5="}, 0)
	if _, ok := metricSeries(t, mfs, hsName, metricLabels{"peer": "K3="}); ok {
		t.Error("a handshake time that does not parse was exported")
	}
	wantMetric(t, mfs, rx, metricLabels{"peer": "pi1"}, 1234)
	wantMetric(t, mfs, tx, metricLabels{"peer": "pi1"}, 5678)
	wantMetric(t, mfs, rx, metricLabels{"peer": "nas"}, 0)
	wantMetric(t, mfs, tx, metricLabels{"peer": "nas"}, 148)
	wantMetric(t, mfs, rx, metricLabels{"peer": "K3="}, 5)
	wantMetric(t, mfs, tx, metricLabels{"peer": "K4="}, 8)
	wantMetric(t, mfs, rx, metricLabels{"peer": "K5="}, 9)
	for _, name := range []string{rx, tx} {
		if got := metricLabelValues(mfs, name, "peer"); len(got) != 5 || got["(unknown)"] {
			t.Errorf("%s peers %v", name, got)
		}
	}

	// Computed at scrape time: the next scrape sees the new status.
	f.set(node.Status{Peers: []node.PeerStatus{{Name: "pi1", PublicKey: "K1=", LastHandshake: hs.Add(time.Minute).Format(time.RFC3339), RxBytes: 2000, TxBytes: 6000}}}, nil)
	mfs = scrapeMetrics(t, m.Handler())
	wantMetric(t, mfs, hsName, metricLabels{"peer": "pi1"}, float64(hs.Unix()+60))
	wantMetric(t, mfs, rx, metricLabels{"peer": "pi1"}, 2000)
	if got := metricLabelValues(mfs, rx, "peer"); len(got) != 1 {
		t.Errorf("gone peers still exported: %v", got)
	}

	// A failed read: up 0, no peers, and the rest of the scrape still served.
	f.set(node.Status{}, errors.New("device gone"))
	m.Observe("pi1.example.com", 200, 1, time.Millisecond)
	mfs = scrapeMetrics(t, m.Handler())
	wantMetric(t, mfs, up, metricLabels{}, 0)
	if mfs[rx] != nil || mfs[hsName] != nil {
		t.Error("peer series exported after a failed status read")
	}
	wantMetric(t, mfs, "meshctl_proxy_requests_total", metricLabels{"route": "pi1.example.com", "code": "200"}, 1)
	if f.calls != 3 {
		t.Errorf("status read %d times for three scrapes", f.calls)
	}
}

func TestMetricsPeerStatusPanics(t *testing.T) {
	// node.Agent.Status panics before the agent has started.
	m := NewMetrics(func() (node.Status, error) { panic("agent not started") })
	m.Observe("pi1.example.com", 200, 1, time.Millisecond)
	mfs := scrapeMetrics(t, m.Handler())
	wantMetric(t, mfs, "meshctl_proxy_peer_status_up", metricLabels{}, 0)
	wantMetric(t, mfs, "meshctl_proxy_requests_total", metricLabels{"route": "pi1.example.com", "code": "200"}, 1)
}

func TestMetricsWithoutStatus(t *testing.T) {
	mfs := scrapeMetrics(t, NewMetrics(nil).Handler())
	for name := range mfs {
		if strings.HasPrefix(name, "meshctl_proxy_peer_") {
			t.Errorf("%s exported without a status func", name)
		}
	}
	wantMetric(t, mfs, "meshctl_proxy_upstream_errors_total", metricLabels{"kind": "dial"}, 0)
	wantMetric(t, mfs, "meshctl_proxy_open_connections", metricLabels{}, 0)
}

// TestMetricsConcurrent runs Observe, TrackConn and scrapes in parallel
// for the race detector, then checks nothing was lost.
func TestMetricsConcurrent(t *testing.T) {
	m := NewMetrics(func() (node.Status, error) { return node.Status{}, nil })
	const workers, each = 8, 200
	var wg sync.WaitGroup
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := &net.TCPConn{}
			for i := range each {
				m.TrackConn(c, http.StateNew)
				m.Observe(fmt.Sprintf("w%d-%d.example.com", w, i%3), 200, 2, time.Millisecond)
				m.TrackConn(c, http.StateClosed)
			}
		}()
	}
	for range 3 {
		scrapeMetrics(t, m.Handler())
	}
	wg.Wait()
	mfs := scrapeMetrics(t, m.Handler())
	var total float64
	for _, s := range mfs["meshctl_proxy_requests_total"].GetMetric() {
		total += s.GetCounter().GetValue()
	}
	if total != workers*each {
		t.Errorf("requests_total sums to %v, want %d", total, workers*each)
	}
	wantMetric(t, mfs, "meshctl_proxy_open_connections", metricLabels{}, 0)
}
