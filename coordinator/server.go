// Package coordinator is meshctl's control plane: token-verified
// enrollment, overlay address allocation, node certificates, live netmaps,
// revocation and the admin API with its audit log.
//
// Lifecycle: New(opts) loads or creates the PKI in the data dir, then
// Start() listens on the API address and the admin Unix socket, and
// Close() stops both and waits for every goroutine it started.
package coordinator

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/meshctl/meshctl/coordinator/ipam"
	"github.com/meshctl/meshctl/coordinator/store"
	"github.com/meshctl/meshctl/coordinator/store/sqlite"
	"github.com/meshctl/meshctl/internal/ratelimit"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
	"golang.org/x/crypto/ssh"
)

// Defaults for Options fields left zero.
const (
	DefaultListen       = ":7443"
	DefaultQuarantine   = 7 * 24 * time.Hour
	DefaultCertValidity = 24 * time.Hour
	DefaultLongPoll     = 50 * time.Second
	DefaultRenewGrace   = 30 * 24 * time.Hour
	AdminSocketName     = "admin.sock"
	DBFile              = "meshctl.db"
)

// Topologies: who sees whom in netmaps.
const (
	TopologyMesh = wire.TopologyMesh
	TopologyHub  = wire.TopologyHub
	TopologyTags = wire.TopologyTags
)

// DefaultIPv4Pool is where overlay IPv4 addresses come from by default: a
// /16 inside the shared address space 100.64.0.0/10 (RFC 6598).
var DefaultIPv4Pool = netip.MustParsePrefix("100.64.0.0/16")

// Options configures a coordinator. Zero values mean the documented default.
type Options struct {
	// DataDir holds the PKI and the admin socket. Required; created 0700.
	DataDir string
	// Store is the node registry. Nil opens the embedded SQLite store
	// DataDir/meshctl.db, which Close closes; a Store passed in is the
	// caller's to close.
	Store store.Store
	// Listen is the API's TCP address. Default ":7443".
	Listen string
	// PublicHost is the host name or address (optionally host:port) nodes
	// use to reach the API; it goes into enrollment lines and the server
	// certificate. Default: the machine's first non-loopback IPv4 address,
	// else "localhost".
	PublicHost string
	// IPv4Pool is the prefix overlay IPv4 addresses are allocated from.
	// Default DefaultIPv4Pool.
	IPv4Pool netip.Prefix
	// Quarantine is how long a revoked node's addresses are held back.
	// Default 7 days.
	Quarantine time.Duration
	// CertValidity is the lifetime of node client certificates. Default 24h.
	CertValidity time.Duration
	// RenewGrace is how long after its expiry a node certificate can still
	// renew itself (proving possession of its key). Default 30 days.
	RenewGrace time.Duration
	// LongPoll is how long a netmap request waits for a change before it
	// answers 304. Up to 10% jitter is added. Default 50s.
	LongPoll time.Duration
	// WGEndpoint is the proxy's public WireGuard endpoint, and Domain its
	// domain, both sent in netmaps. Empty when no proxy runs.
	WGEndpoint string
	Domain     string
	// EmbeddedProxy is the name of the proxy WGEndpoint belongs to (the
	// all-in-one server's own); netmaps name its key beside the endpoint
	// (wire.Netmap.ProxyEndpointKey), so that standalone proxies do not
	// get it too.
	EmbeddedProxy string
	// Topology is TopologyMesh (default: every member sees every other),
	// TopologyHub (nodes see only proxies and cannot reach each other) or
	// TopologyTags (nodes see the proxies and the nodes that share a tag
	// with them, wire.SharesTag; untagged nodes see only the proxies).
	Topology string
	// SSHEndpoint is the proxy's SSH fallback endpoint (host:port) sent in
	// netmaps; empty when none runs.
	SSHEndpoint string
	// SSHPort, when SSHEndpoint is empty, makes it PublicHost:SSHPort.
	SSHPort int
	// WGPort, when WGEndpoint is empty, makes the endpoint PublicHost:WGPort
	// (the all-in-one server's proxy).
	WGPort int
	// FailureBurst is how many failed token or admin-key attempts a source
	// address may make before it gets 429; one more is allowed every 6 s.
	// Default 10.
	FailureBurst int
	// ReadTimeout bounds reading one API request, headers and body; a
	// client that sends slower is cut off. Default 30s. Headers (and the
	// TLS handshake) must arrive within 10s or ReadTimeout if shorter.
	ReadTimeout time.Duration
	// Version is reported by the admin info endpoint.
	Version string
	// Logger receives the coordinator's logs. Nil discards them.
	Logger *slog.Logger
	// Now is the clock. Nil means time.Now. Tests inject one to check expiry.
	Now func() time.Time
}

// Server is a running coordinator.
type Server struct {
	opts    Options
	log     *slog.Logger
	ca      *pki.CA
	sshCA   ssh.Signer
	tlsCert tls.Certificate
	ipv6    netip.Prefix
	state   *netmapState
	limiter *ratelimit.FailLimiter
	seen    *seenTracker
	// verified caches node certificates already verified (nodeAuth).
	verified certCache

	lock      *os.File // flock on the data dir
	ownsStore bool
	apiLn     net.Listener
	adminLn   net.Listener
	apiSrv    *http.Server
	adminSrv  *http.Server
	ctx       context.Context
	cancel    context.CancelFunc
	wg        sync.WaitGroup

	closeOnce sync.Once
	closeErr  error
}

// New validates opts, locks the data dir, loads or creates the CA, SSH CA
// and API certificate, and loads the node registry. It does not listen.
func New(opts Options) (s *Server, err error) {
	if opts.DataDir == "" {
		return nil, errors.New("coordinator: DataDir is required")
	}
	if opts.Listen == "" {
		opts.Listen = DefaultListen
	}
	if !opts.IPv4Pool.IsValid() {
		opts.IPv4Pool = DefaultIPv4Pool
	}
	if opts.Quarantine == 0 {
		opts.Quarantine = DefaultQuarantine
	}
	if opts.CertValidity == 0 {
		opts.CertValidity = DefaultCertValidity
	}
	if opts.RenewGrace == 0 {
		opts.RenewGrace = DefaultRenewGrace
	}
	if opts.LongPoll == 0 {
		opts.LongPoll = DefaultLongPoll
	}
	switch opts.Topology {
	case "":
		opts.Topology = TopologyMesh
	case TopologyMesh, TopologyHub, TopologyTags:
	default:
		return nil, fmt.Errorf("coordinator: topology %q: use mesh, hub or tags", opts.Topology)
	}
	if opts.FailureBurst == 0 {
		opts.FailureBurst = 10
	}
	if opts.ReadTimeout <= 0 {
		opts.ReadTimeout = 30 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if opts.PublicHost == "" {
		opts.PublicHost = defaultPublicHost()
	}
	if opts.WGEndpoint == "" && opts.WGPort != 0 {
		opts.WGEndpoint = net.JoinHostPort(hostOnly(opts.PublicHost), strconv.Itoa(opts.WGPort))
	}
	if opts.SSHEndpoint == "" && opts.SSHPort != 0 {
		opts.SSHEndpoint = net.JoinHostPort(hostOnly(opts.PublicHost), strconv.Itoa(opts.SSHPort))
	}
	if opts.WGEndpoint != "" {
		ep, err := resolveEndpoint(opts.WGEndpoint)
		if err != nil {
			return nil, err
		}
		opts.WGEndpoint = ep
	}
	if opts.Quarantine < 0 || opts.CertValidity < time.Minute || opts.LongPoll < 0 {
		return nil, errors.New("coordinator: Quarantine, CertValidity (≥1m) and LongPoll must not be negative")
	}
	s = &Server{opts: opts, log: opts.Logger}
	if err := pki.EnsurePrivateDir(opts.DataDir); err != nil {
		return nil, err
	}
	if s.lock, err = lockDir(opts.DataDir); err != nil {
		return nil, err
	}
	srv := s // s is nil once New returns an error
	defer func() {
		if err != nil {
			if srv.ownsStore {
				srv.opts.Store.Close()
			}
			srv.lock.Close()
		}
	}()
	if s.opts.Store == nil {
		st, err := sqlite.Open(filepath.Join(opts.DataDir, DBFile), sqlite.Options{Logger: s.log})
		if err != nil {
			return nil, err
		}
		s.opts.Store, s.ownsStore = st, true
		opts.Store = st
	}
	now := opts.Now()
	ca, created, err := pki.LoadOrCreateCA(opts.DataDir, now)
	if err != nil {
		return nil, fmt.Errorf("coordinator CA: %w", err)
	}
	if created {
		s.log.Info("created a new CA", "dir", opts.DataDir, "ca_pin", ca.Pin())
	}
	s.ca = ca
	if s.sshCA, err = pki.LoadOrCreateSSHCA(opts.DataDir); err != nil {
		return nil, fmt.Errorf("coordinator SSH CA: %w", err)
	}
	if s.tlsCert, err = pki.LoadOrCreateServerCert(opts.DataDir, ca, s.certHosts(), now); err != nil {
		return nil, fmt.Errorf("coordinator TLS certificate: %w", err)
	}
	ctx := context.Background()
	ula, err := opts.Store.SetMetaIfAbsent(ctx, "ipv6_pool", ipam.NewULA48(rand.Reader).String())
	if err != nil {
		return nil, fmt.Errorf("coordinator: read IPv6 pool: %w", err)
	}
	if s.ipv6, err = netip.ParsePrefix(ula); err != nil {
		return nil, fmt.Errorf("coordinator: stored IPv6 pool %q: %w", ula, err)
	}
	if err := ipam.ValidatePools(opts.IPv4Pool, s.ipv6); err != nil {
		return nil, err
	}
	nodes, err := opts.Store.ListNodes(ctx)
	if err != nil {
		return nil, fmt.Errorf("coordinator: load nodes: %w", err)
	}
	keys, err := opts.Store.ListAccessKeys(ctx)
	if err != nil {
		return nil, fmt.Errorf("coordinator: load access keys: %w", err)
	}
	s.state = newNetmapState(nodes, revokedAccessOf(keys, now), now)
	s.limiter = ratelimit.New(opts.FailureBurst, 6*time.Second, opts.Now)
	s.seen = newSeenTracker(opts.Store, opts.Now, s.log)
	return s, nil
}

// certHosts lists the names the API certificate covers.
func (s *Server) certHosts() []string {
	hosts := []string{"localhost", "127.0.0.1", "::1"}
	if h := hostOnly(s.opts.PublicHost); h != "" && h != "localhost" && h != "127.0.0.1" && h != "::1" {
		hosts = append(hosts, h)
	}
	return hosts
}

// Start listens on the API address and the admin socket and serves both.
func (s *Server) Start() (err error) {
	s.ctx, s.cancel = context.WithCancel(context.Background())
	s.apiLn, err = net.Listen("tcp", s.opts.Listen)
	if err != nil {
		return fmt.Errorf("coordinator API: %w", err)
	}
	sock := filepath.Join(s.opts.DataDir, AdminSocketName)
	s.adminLn, err = listenUnixPrivate(sock)
	if err != nil {
		s.apiLn.Close()
		return fmt.Errorf("coordinator admin socket: %w", err)
	}
	s.apiSrv = &http.Server{
		Handler: s.apiHandler(),
		TLSConfig: &tls.Config{
			MinVersion:   tls.VersionTLS12,
			Certificates: []tls.Certificate{s.tlsCert},
			// Node certificates are verified per request (nodeAuth), so that
			// an expired or unknown certificate gets a clear 403 rather than
			// a TLS alert, and so the injected clock applies.
			ClientAuth: tls.RequestClientCert,
		},
		ReadHeaderTimeout: min(10*time.Second, s.opts.ReadTimeout),
		ReadTimeout:       s.opts.ReadTimeout,
		IdleTimeout:       120 * time.Second,
		MaxHeaderBytes:    32 << 10,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelDebug),
		BaseContext:       func(net.Listener) context.Context { return s.ctx },
	}
	s.adminSrv = &http.Server{
		Handler:           s.adminSocketHandler(),
		ReadHeaderTimeout: 10 * time.Second,
		ConnContext:       withPeerCred,
		BaseContext:       func(net.Listener) context.Context { return s.ctx },
	}
	s.wg.Add(3)
	go func() {
		defer s.wg.Done()
		if err := s.apiSrv.ServeTLS(s.apiLn, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("API server stopped", "err", err)
		}
	}()
	go func() {
		defer s.wg.Done()
		if err := s.adminSrv.Serve(s.adminLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			s.log.Error("admin server stopped", "err", err)
		}
	}()
	go func() {
		defer s.wg.Done()
		s.seen.run(s.ctx)
	}()
	s.log.Info("coordinator listening", "api", s.URL(), "admin_socket", sock, "ca_pin", s.ca.Pin())
	return nil
}

// Addr is the API's listening address (after Start).
func (s *Server) Addr() net.Addr { return s.apiLn.Addr() }

// URL is the API's public URL, as nodes should use it.
func (s *Server) URL() string {
	if _, _, err := net.SplitHostPort(s.opts.PublicHost); err == nil {
		return "https://" + s.opts.PublicHost
	}
	port := ""
	if s.apiLn != nil {
		port = strconv.Itoa(s.apiLn.Addr().(*net.TCPAddr).Port)
	} else if _, p, err := net.SplitHostPort(s.opts.Listen); err == nil {
		port = p
	}
	return "https://" + net.JoinHostPort(s.opts.PublicHost, port)
}

// LocalURL is the API's URL from this host: the listen address, with
// loopback in place of an unspecified address.
func (s *Server) LocalURL() string {
	ap := s.apiLn.Addr().(*net.TCPAddr)
	host := "127.0.0.1"
	if !ap.IP.IsUnspecified() {
		host = ap.IP.String()
	}
	return "https://" + net.JoinHostPort(host, strconv.Itoa(ap.Port))
}

// CAPin is the pin nodes verify the coordinator by.
func (s *Server) CAPin() string { return s.ca.Pin() }

// SSHCA returns the coordinator's SSH CA (the all-in-one server certifies
// its proxy's SSH host key with it).
func (s *Server) SSHCA() ssh.Signer { return s.sshCA }

// CA returns the coordinator's CA (the proxy uses it to issue local TLS
// certificates in all-in-one mode).
func (s *Server) CA() *pki.CA { return s.ca }

// AdminSocket is the path of the admin Unix socket.
func (s *Server) AdminSocket() string { return filepath.Join(s.opts.DataDir, AdminSocketName) }

// Close stops serving, ends long-polls, flushes last-seen times and
// releases the data dir. It is idempotent and waits for every goroutine
// Start began.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		if s.cancel != nil {
			s.cancel()
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			s.closeErr = errors.Join(s.apiSrv.Shutdown(ctx), s.adminSrv.Shutdown(ctx))
			s.wg.Wait()
		}
		s.seen.flush(context.Background())
		if s.ownsStore {
			s.closeErr = errors.Join(s.closeErr, s.opts.Store.Close())
		}
		s.lock.Close()
	})
	return s.closeErr
}

func (s *Server) apiHandler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET "+wire.PathHealthz, func(w http.ResponseWriter, r *http.Request) { w.Write([]byte("ok\n")) })
	mux.Handle("POST "+wire.PathEnroll, s.handle(s.handleEnroll))
	mux.Handle("GET "+wire.PathNetmap, s.nodeAuth(s.handleNetmap))
	mux.Handle("POST "+wire.PathUpdate, s.nodeAuth(s.handleUpdate))
	mux.Handle("POST "+wire.PathRenew, s.nodeAuthGrace(s.handleRenew, true))
	mux.Handle("POST "+wire.PathAccessCheck, s.nodeAuth(s.handleAccessCheck))
	mux.Handle("POST "+wire.PathSSHHostCert, s.nodeAuth(s.handleSSHHostCert))
	s.adminRoutes(mux, s.adminKeyAuth)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusNotFound, wire.Error{Code: wire.CodeNotFound, Message: "no such API endpoint: " + r.Method + " " + r.URL.Path})
	})
	return mux
}

// handle adapts a handler that returns an error into an http.Handler,
// mapping the error once, at the edge, to a status and client message.
func (s *Server) handle(h func(w http.ResponseWriter, r *http.Request) error) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := h(w, r); err != nil {
			s.writeError(w, r, err)
		}
	})
}

func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	ae := toAPIError(err)
	level := slog.LevelInfo
	if ae.status >= 500 {
		level = slog.LevelError
	}
	s.log.Log(r.Context(), level, "request refused", "method", r.Method, "path", r.URL.Path,
		"remote", r.RemoteAddr, "status", ae.status, "err", err)
	if ae.status == http.StatusTooManyRequests {
		if ra := w.Header().Get("Retry-After"); ra == "" {
			w.Header().Set("Retry-After", "1")
		}
	}
	writeJSON(w, ae.status, wire.Error{Code: ae.code, Message: ae.msg})
}

func hostOnly(hostport string) string {
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		return h
	}
	return hostport
}

// defaultPublicHost picks the first non-loopback, global-unicast IPv4
// address of an up interface: what devices on the same network can reach.
func defaultPublicHost() string {
	ifs, err := net.Interfaces()
	if err != nil {
		return "localhost"
	}
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagUp == 0 || ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, _ := ifc.Addrs()
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok {
				if ip, ok := netip.AddrFromSlice(ipn.IP); ok && ip.Unmap().Is4() && ip.IsGlobalUnicast() {
					return ip.Unmap().String()
				}
			}
		}
	}
	return "localhost"
}

// resolveEndpoint turns HOST:PORT into IP:PORT (nodes configure WireGuard
// with addresses, not names), preferring IPv4.
func resolveEndpoint(hostport string) (string, error) {
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		return "", fmt.Errorf("WireGuard endpoint %q must be HOST:PORT: %w", hostport, err)
	}
	if _, err := netip.ParseAddr(host); err == nil {
		return hostport, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ips, err := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	if err != nil || len(ips) == 0 {
		return "", fmt.Errorf("WireGuard endpoint %q: cannot resolve %s (%v); pass --wg-endpoint IP:PORT", hostport, host, err)
	}
	best := ips[0]
	for _, ip := range ips {
		if ip.Unmap().Is4() {
			best = ip
			break
		}
	}
	return net.JoinHostPort(best.Unmap().String(), port), nil
}
