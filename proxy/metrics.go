package proxy

import (
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unicode/utf8"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/proxy/relay"
)

const (
	metricsNamespace = "meshctl"
	metricsSubsystem = "proxy"

	// maxMetricRoutes caps the distinct route label values: routes beyond
	// it are counted as routeOther. Each route costs about 20 series (its
	// status codes and histogram buckets).
	maxMetricRoutes = 1000
	// routeUnknown labels requests that matched no route (any Host the
	// client made up); routeOther those past maxMetricRoutes. Neither can
	// be a route's host: those are always <name>.<domain>.
	routeUnknown = "unknown"
	routeOther   = "other"
)

// Metrics collects the proxy's metrics in its own registry (never the
// global default one) and serves them with Handler.
//
// Wiring: Observe as HandlerOptions.Observe, TrackConn as the
// http.Server.ConnState of every listener serving the Handler, and Handler
// on an address of the operator's choosing.
//
// Exposed, besides the Go runtime and process collectors:
//
//	meshctl_proxy_requests_total{route,code}              counter
//	meshctl_proxy_request_duration_seconds{route}         histogram (WebSockets excluded)
//	meshctl_proxy_response_bytes_total{route}             counter (body bytes; not those after a protocol switch)
//	meshctl_proxy_upstream_errors_total{kind}             counter: kind "dial" (502) or "timeout" (504)
//	meshctl_proxy_open_connections                        gauge: client connections the HTTP servers manage
//	meshctl_proxy_websockets_open                         gauge: hijacked connections whose session has not ended
//	meshctl_proxy_websocket_duration_seconds{route}       histogram of ended WebSocket sessions
//	meshctl_proxy_peer_last_handshake_seconds{peer}       gauge: unix time, 0 if never
//	meshctl_proxy_peer_rx_bytes_total{peer}               counter
//	meshctl_proxy_peer_tx_bytes_total{peer}               counter
//	meshctl_proxy_peer_status_up                          gauge: 1 if the last status read succeeded
//
// With the relay (SSH fallback on), also:
//
//	meshctl_proxy_relay_forwarded_packets_total           counter
//	meshctl_proxy_relay_forwarded_bytes_total             counter (payload bytes)
//	meshctl_proxy_relay_dropped_packets_total{reason}     counter: not_wireguard, no_destination, rate_limited, queue_full
//	meshctl_proxy_relay_bad_frames_total                  counter: protocol violations (each closed its stream)
//	meshctl_proxy_relay_refused_total                     counter: streams of unknown or revoked nodes
//	meshctl_proxy_relay_nodes                             gauge: nodes attached now
//
// route is the route's canonical host, "unknown" for requests that matched
// no route and "other" once maxMetricRoutes distinct routes have been seen
// (a route keeps its own label once admitted, for the process's life).
type Metrics struct {
	reg     *prometheus.Registry
	handler http.Handler

	requests   *prometheus.CounterVec
	duration   *prometheus.HistogramVec
	respBytes  *prometheus.CounterVec
	upstream   *prometheus.CounterVec
	openConns  prometheus.Gauge
	wsDuration *prometheus.HistogramVec
	wsOpen     atomic.Int64

	mu     sync.Mutex
	routes map[string]struct{} // admitted route labels, at most maxMetricRoutes
}

// NewMetrics returns the proxy's metrics. status, if not nil, is read at
// every scrape for the per-peer WireGuard series (the proxy passes its
// agent's Status).
func NewMetrics(status func() (node.Status, error)) *Metrics {
	m := &Metrics{
		reg:    prometheus.NewRegistry(),
		routes: make(map[string]struct{}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem,
			Name: "requests_total",
			Help: "Requests handled, by route (canonical host, \"unknown\" or \"other\") and status code (499: the client went away; 101: a WebSocket session, counted when it ends).",
		}, []string{"route", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem,
			Name:    "request_duration_seconds",
			Help:    "Time from receiving a request to the end of its response, by route. WebSocket sessions are in meshctl_proxy_websocket_duration_seconds instead.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120},
		}, []string{"route"}),
		respBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem,
			Name: "response_bytes_total",
			Help: "Response body bytes written to clients, by route (bytes exchanged after a protocol switch are not counted).",
		}, []string{"route"}),
		upstream: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem,
			Name: "upstream_errors_total",
			Help: "Requests answered 502 (kind=\"dial\": the device or service was not reachable) or 504 (kind=\"timeout\": no response headers in time). Derived from the status, so a backend's own 502/504 counts too.",
		}, []string{"kind"}),
		openConns: prometheus.NewGauge(prometheus.GaugeOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem,
			Name: "open_connections",
			Help: "Client connections open on the proxy's HTTP(S) listeners (hijacked ones move to meshctl_proxy_websockets_open).",
		}),
		wsDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem,
			Name:    "websocket_duration_seconds",
			Help:    "Duration of ended WebSocket (protocol switch) sessions, by route.",
			Buckets: []float64{1, 10, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 24 * 3600},
		}, []string{"route"}),
	}
	wsOpen := prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: metricsNamespace, Subsystem: metricsSubsystem,
		Name: "websockets_open",
		Help: "WebSocket sessions in progress: client connections handed over for a protocol switch whose session has not ended yet.",
	}, func() float64 { return float64(m.wsOpen.Load()) })
	// Both kinds exist from the start, so that rate() sees the first error.
	m.upstream.WithLabelValues("dial")
	m.upstream.WithLabelValues("timeout")

	m.reg.MustRegister(
		m.requests, m.duration, m.respBytes, m.upstream, m.openConns, wsOpen, m.wsDuration,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	if status != nil {
		m.reg.MustRegister(newPeerCollector(status))
	}
	m.handler = promhttp.HandlerFor(m.reg, promhttp.HandlerOpts{
		Registry:      m.reg, // counts its own errors in promhttp_metric_handler_errors_total
		ErrorHandling: promhttp.ContinueOnError,
	})
	return m
}

// Handler serves the metrics in the Prometheus exposition formats.
func (m *Metrics) Handler() http.Handler { return m.handler }

// Observe records one completed request; it has HandlerOptions.Observe's
// signature. host is the route's canonical host, "" if none matched.
//
// Status 101 marks the end of a WebSocket session: it is counted in
// requests_total, its duration goes to websocket_duration_seconds and it
// ends one of the sessions websockets_open counts. 502 and 504 count as
// upstream errors.
func (m *Metrics) Observe(host string, status int, bytes int64, d time.Duration) {
	route := m.route(host)
	m.requests.WithLabelValues(route, strconv.Itoa(status)).Inc()
	m.respBytes.WithLabelValues(route).Add(float64(max(bytes, 0)))
	if status == http.StatusSwitchingProtocols {
		m.wsDuration.WithLabelValues(route).Observe(d.Seconds())
		m.websocketEnded()
	} else {
		m.duration.WithLabelValues(route).Observe(d.Seconds())
	}
	switch status {
	case http.StatusBadGateway:
		m.upstream.WithLabelValues("dial").Inc()
	case http.StatusGatewayTimeout:
		m.upstream.WithLabelValues("timeout").Inc()
	}
}

// route returns the label value for host, admitting new hosts until
// maxMetricRoutes.
func (m *Metrics) route(host string) string {
	if host == "" || !utf8.ValidString(host) {
		return routeUnknown
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if _, ok := m.routes[host]; ok {
		return host
	}
	if len(m.routes) >= maxMetricRoutes {
		return routeOther
	}
	m.routes[host] = struct{}{}
	return host
}

// TrackConn follows client connections; it has http.Server.ConnState's
// signature. A connection counts in open_connections from StateNew until
// StateClosed, or until StateHijacked: net/http reports nothing more of a
// hijacked connection, and the proxy only hijacks for protocol switches
// (WebSocket), so from then on it counts in websockets_open until Observe
// reports the session's end with status 101.
func (m *Metrics) TrackConn(_ net.Conn, state http.ConnState) {
	switch state {
	case http.StateNew:
		m.openConns.Inc()
	case http.StateHijacked:
		m.openConns.Dec()
		m.wsOpen.Add(1)
	case http.StateClosed:
		m.openConns.Dec()
	}
}

// websocketEnded decrements websockets_open, never below 0 (should a 101
// be observed on a server whose ConnState is not tracked).
func (m *Metrics) websocketEnded() {
	for {
		n := m.wsOpen.Load()
		if n <= 0 || m.wsOpen.CompareAndSwap(n, n-1) {
			return
		}
	}
}

// peerCollector reports the WireGuard peers from the agent's status, read
// at scrape time.
type peerCollector struct {
	status                  func() (node.Status, error)
	up, handshake, rxb, txb *prometheus.Desc
}

func newPeerCollector(status func() (node.Status, error)) *peerCollector {
	name := func(n string) string { return prometheus.BuildFQName(metricsNamespace, metricsSubsystem, n) }
	peer := []string{"peer"}
	return &peerCollector{
		status:    status,
		up:        prometheus.NewDesc(name("peer_status_up"), "1 if the proxy's WireGuard status could be read at this scrape, else 0.", nil, nil),
		handshake: prometheus.NewDesc(name("peer_last_handshake_seconds"), "Unix time of the last WireGuard handshake with the peer; 0 if never.", peer, nil),
		rxb:       prometheus.NewDesc(name("peer_rx_bytes_total"), "Bytes received from the peer over WireGuard.", peer, nil),
		txb:       prometheus.NewDesc(name("peer_tx_bytes_total"), "Bytes sent to the peer over WireGuard.", peer, nil),
	}
}

func (c *peerCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.up
	ch <- c.handshake
	ch <- c.rxb
	ch <- c.txb
}

func (c *peerCollector) Collect(ch chan<- prometheus.Metric) {
	st, err := c.read()
	up := 1.0
	if err != nil {
		up = 0
	}
	ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, up)
	seen := make(map[string]bool, len(st.Peers))
	for _, p := range st.Peers {
		label := peerLabel(p, seen)
		if label == "" {
			continue
		}
		ch <- prometheus.MustNewConstMetric(c.rxb, prometheus.CounterValue, float64(p.RxBytes), label)
		ch <- prometheus.MustNewConstMetric(c.txb, prometheus.CounterValue, float64(p.TxBytes), label)
		hs := 0.0
		if p.LastHandshake != "" {
			t, err := time.Parse(time.RFC3339, p.LastHandshake)
			if err != nil {
				continue // no series rather than a wrong one
			}
			hs = float64(t.Unix())
		}
		ch <- prometheus.MustNewConstMetric(c.handshake, prometheus.GaugeValue, hs, label)
	}
}

// read calls status, turning a panic into an error: node.Agent.Status
// panics before the agent has started, and a scrape may come first.
func (c *peerCollector) read() (st node.Status, err error) {
	defer func() {
		if r := recover(); r != nil {
			st, err = node.Status{}, fmt.Errorf("proxy metrics: status: panic: %v", r)
		}
	}()
	return c.status()
}

// peerLabel names p by its node name, or by its public key when the name
// is missing ("(unknown)": not in the netmap) or already taken, so that no
// two series collide. It returns "" for a peer it cannot tell apart.
func peerLabel(p node.PeerStatus, seen map[string]bool) string {
	label := strings.ToValidUTF8(p.Name, "\uFFFD")
	if label == "" || label == "(unknown)" || seen[label] {
		label = strings.ToValidUTF8(p.PublicKey, "\uFFFD")
	}
	if label == "" || seen[label] {
		return ""
	}
	seen[label] = true
	return label
}

// addRelay registers the relay's counters, read from stats at scrape time.
func (m *Metrics) addRelay(stats func() relay.Stats) {
	m.reg.MustRegister(newRelayCollector(stats))
}

type relayCollector struct {
	stats                                        func() relay.Stats
	packets, bytes, dropped, bad, refused, nodes *prometheus.Desc
}

func newRelayCollector(stats func() relay.Stats) *relayCollector {
	name := func(n string) string { return prometheus.BuildFQName(metricsNamespace, metricsSubsystem, n) }
	return &relayCollector{
		stats:   stats,
		packets: prometheus.NewDesc(name("relay_forwarded_packets_total"), "WireGuard messages the relay queued to their destination.", nil, nil),
		bytes:   prometheus.NewDesc(name("relay_forwarded_bytes_total"), "Payload bytes of the WireGuard messages the relay queued to their destination.", nil, nil),
		dropped: prometheus.NewDesc(name("relay_dropped_packets_total"), "Messages the relay dropped, by reason: not_wireguard (no WireGuard message header), no_destination (no attached node holds the key), rate_limited (over the sender's rate), queue_full (the destination's queue was full).", []string{"reason"}, nil),
		bad:     prometheus.NewDesc(name("relay_bad_frames_total"), "Relay frames of the wrong type or length; each closed its stream.", nil, nil),
		refused: prometheus.NewDesc(name("relay_refused_total"), "Relay streams refused because the node was unknown or revoked.", nil, nil),
		nodes:   prometheus.NewDesc(name("relay_nodes"), "Nodes attached to the relay now.", nil, nil),
	}
}

func (c *relayCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.packets, c.bytes, c.dropped, c.bad, c.refused, c.nodes} {
		ch <- d
	}
}

func (c *relayCollector) Collect(ch chan<- prometheus.Metric) {
	st := c.stats()
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	counter(c.packets, st.Forwarded)
	counter(c.bytes, st.ForwardedBytes)
	counter(c.dropped, st.DropNotWG, "not_wireguard")
	counter(c.dropped, st.DropNoDst, "no_destination")
	counter(c.dropped, st.DropDenied, "not_allowed")
	counter(c.dropped, st.DropRate, "rate_limited")
	counter(c.dropped, st.DropQueue, "queue_full")
	counter(c.bad, st.BadFrames)
	counter(c.refused, st.Refused)
	ch <- prometheus.MustNewConstMetric(c.nodes, prometheus.GaugeValue, float64(st.Connected))
}
