package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/wire"
)

// Options configures a Proxy. Zero values mean the documented default.
type Options struct {
	// Domain is the proxy's domain: <node>.<Domain> reaches a node's
	// default service. Required; "localhost" works for local use.
	Domain string
	// HTTP is the plain-HTTP listen address; empty disables it. With TLS
	// on, it only redirects to HTTPS.
	HTTP string
	// HTTPS is the HTTPS listen address, used when TLS is set.
	HTTPS string
	// TLS is the HTTPS server configuration (certificates); nil means no
	// HTTPS.
	TLS *tls.Config
	// SSH, if set, runs the SSH reverse-tunnel fallback for nodes whose UDP
	// is blocked.
	SSH *SSHOptions
	// ACME, if set, gets certificates from an ACME CA (Let's Encrypt by
	// default) for the hosts of routed nodes only; it excludes TLS.
	ACME *ACME
	// Agent configures the proxy's own mesh membership (its state dir, its
	// WireGuard port). Its OnNetmap is set by New.
	Agent node.AgentOptions
	// Metrics is the listen address of Prometheus metrics (/metrics);
	// empty disables them. Keep it off the public network.
	Metrics string
	// DialTimeout bounds connecting to a node's service; a node that does
	// not answer in time gets 502. Default 10s.
	DialTimeout time.Duration
	// ReadHeaderTimeout closes a connection whose request headers (or TLS
	// handshake) do not arrive in time (slowloris). Default 10s.
	ReadHeaderTimeout time.Duration
	// IdleTimeout closes a keep-alive connection that sends no new request
	// in time. Default 120s.
	IdleTimeout time.Duration
	// Logger receives the proxy's logs (nil discards).
	Logger *slog.Logger
}

// Proxy is a mesh member with role proxy: a node agent on netstack (the
// public WireGuard endpoint that nodes behind NAT keep alive to) plus the
// HTTP(S) front that routes <name>.<domain> to nodes' services through it.
type Proxy struct {
	opts    Options
	log     *slog.Logger
	agent   *node.Agent
	table   atomic.Pointer[Table]
	access  *access
	metrics *Metrics
	ssh     *sshFallback // nil without SSH fallback
	relay   *meshRelay   // nil without SSH fallback (the relay's only way in)

	handler *Handler
	servers []*http.Server
	lns     []net.Listener
	wg      sync.WaitGroup
	once    sync.Once
}

// New validates opts and loads the proxy's identity (it must have been
// enrolled with a proxy token).
func New(opts Options) (*Proxy, error) {
	opts.Domain = strings.TrimSuffix(strings.ToLower(opts.Domain), ".")
	if opts.Domain == "" || CanonicalHost("x."+opts.Domain) == "" {
		return nil, fmt.Errorf("proxy: --domain %q is not a DNS name (e.g. mesh.example.com, or localhost for local use)", opts.Domain)
	}
	if opts.ACME != nil {
		if opts.TLS != nil {
			return nil, errors.New("proxy: ACME and a TLS certificate exclude each other")
		}
		if opts.HTTP == "" {
			return nil, errors.New("proxy: ACME needs --http (port 80, reachable from the internet) for its http-01 challenges")
		}
	}
	if opts.HTTP == "" && opts.TLS == nil && opts.ACME == nil {
		return nil, errors.New("proxy: nothing to serve: give --http, or --https with a certificate")
	}
	if (opts.TLS != nil || opts.ACME != nil) && opts.HTTPS == "" {
		return nil, errors.New("proxy: a TLS certificate needs an --https address")
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.ReadHeaderTimeout <= 0 {
		opts.ReadHeaderTimeout = 10 * time.Second
	}
	if opts.IdleTimeout <= 0 {
		opts.IdleTimeout = 120 * time.Second
	}
	p := &Proxy{opts: opts, log: opts.Logger}
	p.table.Store(BuildTable(&wire.Netmap{}, opts.Domain))
	agentOpts := opts.Agent
	agentOpts.Logger = opts.Logger
	agentOpts.OnNetmap = p.setNetmap
	st, err := node.LoadState(agentOpts.StateDir)
	if err != nil {
		return nil, err
	}
	if st.Role != wire.RoleProxy {
		return nil, fmt.Errorf("%s holds the identity of node %q, not of a proxy: give the proxy its own --state-dir", agentOpts.StateDir, st.Name)
	}
	if opts.SSH != nil {
		// The relay is reached through the SSH server only; the proxy's own
		// agent attaches to it in-process.
		if p.relay, err = newMeshRelay(st.Name, st.WireGuardKey().PublicKey(), opts.Logger.With("component", "relay")); err != nil {
			return nil, err
		}
		if agentOpts.RelayDial == nil {
			agentOpts.RelayDial = p.relay.dial
		}
	}
	if p.agent, err = node.NewAgent(agentOpts); err != nil {
		return nil, err
	}
	if p.access, err = newAccess(agentOpts.StateDir, p.agent.Client()); err != nil {
		return nil, err
	}
	p.metrics = NewMetrics(p.agent.Status)
	if p.relay != nil {
		p.metrics.addRelay(p.relay.srv.Stats)
	}
	p.handler, err = NewHandler(HandlerOptions{
		Observe:     p.metrics.Observe,
		Table:       p.table.Load,
		Dial:        p.dial,
		Authorize:   p.access.authorize,
		Logger:      opts.Logger,
		DialTimeout: opts.DialTimeout,
	})
	if err != nil {
		return nil, err
	}
	return p, nil
}

// setNetmap swaps in the route table of a new netmap (the agent calls it
// after every applied netmap).
func (p *Proxy) setNetmap(nm *wire.Netmap) {
	if p.access != nil {
		p.access.setRevoked(nm.AccessRevoked)
	}
	var keys map[string][32]byte
	if p.relay != nil {
		keys = relayKeys(nm)
		p.relay.setTopology(nm)
		p.relay.setKeys(keys)
	}
	if p.ssh != nil {
		p.ssh.setNetmap(nm, keys)
	}
	t := BuildTable(nm, p.opts.Domain)
	p.table.Store(t)
	if p.handler != nil {
		p.handler.TableChanged()
	}
	p.log.Debug("routes updated", "routes", t.Len(), "netmap_version", nm.Version)
}

// Table returns the current route table.
func (p *Proxy) Table() *Table { return p.table.Load() }

// Agent returns the proxy's mesh agent.
func (p *Proxy) Agent() *node.Agent { return p.agent }

// Start joins the mesh and opens the listeners.
func (p *Proxy) Start() (err error) {
	defer func() {
		if err != nil {
			p.Close()
		}
	}()
	if p.opts.SSH != nil { // before the agent, whose first netmap it wants
		if err := p.startSSH(p.opts.SSH); err != nil {
			return err
		}
	}
	if err := p.agent.Start(); err != nil {
		return err
	}
	tlsConf := p.opts.TLS
	var acmeHTTP func(http.Handler) http.Handler
	if p.opts.ACME != nil {
		m := p.opts.ACME.manager(p.hostPolicy)
		tlsConf, acmeHTTP = m.TLSConfig(), m.HTTPHandler
	}
	if tlsConf != nil {
		if err := p.listen(p.opts.HTTPS, p.handler, tlsConf, true); err != nil {
			return err
		}
	}
	if p.opts.HTTP != "" {
		var h http.Handler = p.handler
		if tlsConf != nil {
			h = http.HandlerFunc(redirectToHTTPS(p.lns[0].Addr().String()))
		}
		if acmeHTTP != nil {
			h = acmeHTTP(h) // answers http-01 challenges, redirects the rest
		}
		if err := p.listen(p.opts.HTTP, h, nil, true); err != nil {
			return err
		}
	}
	if p.opts.Metrics != "" {
		mux := http.NewServeMux()
		mux.Handle("GET /metrics", p.metrics.Handler())
		if err := p.listen(p.opts.Metrics, mux, nil, false); err != nil {
			return err
		}
	}
	return nil
}

// listen serves h on addr; public listeners count their connections in
// the metrics.
func (p *Proxy) listen(addr string, h http.Handler, tlsConf *tls.Config, public bool) error {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		if errors.Is(err, syscall.EACCES) {
			return fmt.Errorf("proxy: listening on %s needs root or CAP_NET_BIND_SERVICE (ports below 1024); pick another port, e.g. --http :8080: %w", addr, err)
		}
		return fmt.Errorf("proxy: listen on %s: %w", addr, err)
	}
	srv := newHTTPServer(h, tlsConf, p.opts, p.log)
	if public {
		srv.ConnState = p.metrics.TrackConn
	}
	p.servers = append(p.servers, srv)
	p.lns = append(p.lns, ln)
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		serve := func() error { return srv.Serve(ln) }
		if tlsConf != nil {
			serve = func() error { return srv.ServeTLS(ln, "", "") } // negotiates HTTP/2
		}
		if err := serve(); err != nil && !errors.Is(err, http.ErrServerClosed) {
			p.log.Error("proxy listener stopped", "addr", addr, "err", err)
		}
	}()
	scheme := "http"
	if tlsConf != nil {
		scheme = "https"
	}
	p.log.Info("proxy listening", "addr", ln.Addr().String(), "scheme", scheme, "domain", p.opts.Domain)
	return nil
}

// maxHeaderBytes bounds a request's header block; larger ones get 431.
const maxHeaderBytes = 64 << 10

// newHTTPServer is the configuration of every listener: the timeouts of
// opts (defaults applied by New) and the header limit.
func newHTTPServer(h http.Handler, tlsConf *tls.Config, opts Options, log *slog.Logger) *http.Server {
	return &http.Server{
		Handler:           h,
		ReadHeaderTimeout: opts.ReadHeaderTimeout, // slowloris; bounds the TLS handshake too
		IdleTimeout:       opts.IdleTimeout,
		MaxHeaderBytes:    maxHeaderBytes,
		ErrorLog:          slog.NewLogLogger(log.Handler(), slog.LevelDebug),
		TLSConfig:         tlsConf,
	}
}

// Addrs returns the listeners' addresses: HTTPS first when on, then
// HTTP, then metrics.
func (p *Proxy) Addrs() []net.Addr {
	out := make([]net.Addr, 0, len(p.lns))
	for _, ln := range p.lns {
		out = append(out, ln.Addr())
	}
	return out
}

// Close stops the listeners and leaves the mesh. Idempotent.
func (p *Proxy) Close() error {
	p.once.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		for _, s := range p.servers {
			if err := s.Shutdown(ctx); err != nil {
				s.Close()
			}
		}
		if p.ssh != nil {
			p.ssh.srv.Close() // ends the relay channels too
		}
		if p.relay != nil {
			p.relay.close()
		}
		p.wg.Wait()
		p.agent.Close()
	})
	return nil
}

func redirectToHTTPS(httpsAddr string) func(http.ResponseWriter, *http.Request) {
	_, port, _ := net.SplitHostPort(httpsAddr)
	return func(w http.ResponseWriter, r *http.Request) {
		host := CanonicalHost(r.Host)
		if host == "" {
			http.NotFound(w, r)
			return
		}
		if port != "" && port != "443" {
			host = net.JoinHostPort(host, port)
		}
		http.Redirect(w, r, "https://"+host+r.URL.RequestURI(), http.StatusPermanentRedirect)
	}
}
