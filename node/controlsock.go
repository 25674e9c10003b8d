package node

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/meshctl/meshctl/node/socks5"
	"github.com/meshctl/meshctl/wire"

	"github.com/meshctl/meshctl/internal/privsock"
)

// ControlSocket is the agent's local control socket in the state dir
// (0600): status, ping and dial for `meshctl status`, `ping` and `nc`.
const ControlSocket = "agent.sock"

// PingResult answers a ping through the agent.
type PingResult struct {
	Peer string        `json:"peer"`
	Addr string        `json:"addr"`
	RTT  time.Duration `json:"rtt_ns"`
	// Path is how the peer is reached ("direct" or "relay"), with why and
	// the endpoint in use (see PeerStatus).
	Path       string `json:"path"`
	PathReason string `json:"path_reason,omitempty"`
	Endpoint   string `json:"endpoint,omitempty"`
}

// listenPrivateUnix listens on a Unix socket at path that only its owner
// can connect to (see internal/privsock).
func listenPrivateUnix(path string) (net.Listener, error) { return privsock.Listen(path) }

func (a *Agent) startControl() error {
	path := filepath.Join(a.opts.StateDir, ControlSocket)
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	ln, err := listenPrivateUnix(path)
	if err != nil {
		return fmt.Errorf("control socket: %w", err)
	}
	a.ctlLn = ln
	mux := http.NewServeMux()
	mux.HandleFunc("GET /status", func(w http.ResponseWriter, r *http.Request) {
		st, err := a.Status()
		if err != nil {
			ctlError(w, http.StatusInternalServerError, err)
			return
		}
		writeCtlJSON(w, st)
	})
	mux.HandleFunc("POST /ping", func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), 5*time.Second)
		defer cancel()
		res, err := a.Ping(ctx, r.URL.Query().Get("peer"))
		if err != nil {
			ctlError(w, http.StatusBadGateway, err)
			return
		}
		writeCtlJSON(w, res)
	})
	mux.HandleFunc("POST /dial", a.handleDial)
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second, BaseContext: func(net.Listener) context.Context { return a.ctx }}
	a.goLoop(func() { srv.Serve(ln) })
	a.goLoop(func() {
		<-a.ctx.Done()
		srv.Close()
	})
	return nil
}

func writeCtlJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(v)
}

func ctlError(w http.ResponseWriter, status int, err error) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(wire.Error{Code: "error", Message: err.Error()})
}

// Resolve maps a peer name (or an overlay address) to an overlay address.
// Names are looked up in the current netmap; nothing else is resolved.
func (a *Agent) Resolve(host string) (netip.Addr, string, bool) {
	cur := a.applied.Load()
	if cur == nil {
		return netip.Addr{}, "", false
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		for _, p := range cur.peers {
			if p.IPv4 == ip || p.IPv6 == ip {
				return ip, p.Name, true
			}
		}
		return netip.Addr{}, "", false
	}
	if d := cur.nm.Domain; d != "" {
		host = trimSuffixFold(host, "."+d)
	}
	for _, p := range cur.peers {
		if p.Name == host {
			return p.IPv4, p.Name, true
		}
	}
	return netip.Addr{}, "", false
}

func trimSuffixFold(s, suffix string) string {
	if len(s) > len(suffix) && strings.EqualFold(s[len(s)-len(suffix):], suffix) {
		return s[:len(s)-len(suffix)]
	}
	return s
}

// peerKey finds a peer's WireGuard key by name.
func (a *Agent) peerKey(name string) ([32]byte, bool) {
	if cur := a.applied.Load(); cur != nil {
		for _, p := range cur.peers {
			if p.Name == name {
				return p.PublicKey, true
			}
		}
	}
	return [32]byte{}, false
}

// Ping sends an ICMP echo to a peer over the mesh.
func (a *Agent) Ping(ctx context.Context, peer string) (PingResult, error) {
	ip, name, ok := a.Resolve(peer)
	if !ok {
		return PingResult{}, fmt.Errorf("no peer %q in this node's netmap (see meshctl status)", peer)
	}
	src := a.v4
	if ip.Is6() {
		src = a.v6
	}
	rtt, err := a.plane.Ping(ctx, src, ip)
	if err != nil {
		return PingResult{}, fmt.Errorf("ping %s (%s): %w", name, ip, err)
	}
	res := PingResult{Peer: name, Addr: ip.String(), RTT: rtt}
	if k, ok := a.peerKey(name); ok {
		res.Path, res.PathReason, res.Endpoint = a.pathOf(k)
	}
	return res, nil
}

// Dial connects to host:port on the mesh, host being a peer name or
// overlay address. Only mesh peers are reachable.
func (a *Agent) Dial(ctx context.Context, host string, port uint16) (net.Conn, error) {
	ip, _, ok := a.Resolve(host)
	if !ok {
		return nil, fmt.Errorf("no peer %q in this node's netmap (see meshctl status)", host)
	}
	return a.plane.DialContext(ctx, "tcp", netip.AddrPortFrom(ip, port).String())
}

// handleDial upgrades the control connection to a raw byte stream to
// host:port on the mesh (for `meshctl nc`).
func (a *Agent) handleDial(w http.ResponseWriter, r *http.Request) {
	port, err := strconv.ParseUint(r.URL.Query().Get("port"), 10, 16)
	if err != nil || port == 0 {
		ctlError(w, http.StatusBadRequest, errors.New("port must be 1-65535"))
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 15*time.Second)
	up, err := a.Dial(ctx, r.URL.Query().Get("host"), uint16(port))
	cancel()
	if err != nil {
		ctlError(w, http.StatusBadGateway, err)
		return
	}
	defer up.Close()
	hj, ok := w.(http.Hijacker)
	if !ok {
		ctlError(w, http.StatusInternalServerError, errors.New("cannot hijack"))
		return
	}
	c, brw, err := hj.Hijack()
	if err != nil {
		return
	}
	defer c.Close()
	brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: meshctl-dial\r\nConnection: Upgrade\r\n\r\n")
	if err := brw.Flush(); err != nil {
		return
	}
	if n := brw.Reader.Buffered(); n > 0 {
		b, _ := brw.Reader.Peek(n)
		up.Write(b)
	}
	Splice(c, up)
}

func (a *Agent) startSOCKS5() error {
	ln, err := net.Listen("tcp", a.opts.SOCKS5)
	if err != nil {
		return fmt.Errorf("SOCKS5: %w", err)
	}
	if ap, err := netip.ParseAddrPort(ln.Addr().String()); err == nil && !ap.Addr().IsLoopback() {
		a.log.Warn("SOCKS5 listens beyond loopback: anyone who reaches it reaches the mesh as this node", "addr", ap)
	}
	a.socks = &socks5.Server{
		Dial: a.plane.DialContext,
		Resolve: func(name string) (netip.Addr, bool) {
			ip, _, ok := a.Resolve(name)
			return ip, ok
		},
		Logger: a.log,
	}
	a.goLoop(func() { a.socks.Serve(ln) })
	a.log.Info("SOCKS5 proxy into the mesh", "addr", ln.Addr().String())
	return nil
}

// CtlClient talks to a running agent's control socket.
type CtlClient struct {
	path string
	hc   *http.Client
}

// NewCtlClient returns a client for the agent of the state dir, with
// errors that say what to do when no agent runs or access is denied.
func NewCtlClient(stateDir string) (*CtlClient, error) {
	path := filepath.Join(stateDir, ControlSocket)
	if _, err := os.Stat(path); err != nil {
		if errors.Is(err, os.ErrPermission) {
			return nil, fmt.Errorf("cannot open %s: permission denied; run this as the agent's user or root (e.g. with sudo)", stateDir)
		}
		return nil, fmt.Errorf("no meshctl agent is running with state dir %s; start it with `meshctl up --state-dir %s`", stateDir, stateDir)
	}
	return &CtlClient{path: path, hc: &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		},
	}}}, nil
}

func (c *CtlClient) wrap(err error) error {
	switch {
	case errors.Is(err, syscall.EACCES):
		return fmt.Errorf("cannot use %s: permission denied; run this as the agent's user or root (e.g. with sudo)", c.path)
	case errors.Is(err, syscall.ECONNREFUSED):
		return fmt.Errorf("the agent behind %s is not running (connection refused); start it with `meshctl up`", c.path)
	}
	return err
}

// Status fetches the agent's status.
func (c *CtlClient) Status(ctx context.Context) (Status, error) {
	var st Status
	return st, c.wrap(wire.Call(ctx, c.hc, http.MethodGet, "http://agent/status", nil, nil, &st))
}

// Ping asks the agent to ping a peer.
func (c *CtlClient) Ping(ctx context.Context, peer string) (PingResult, error) {
	var res PingResult
	return res, c.wrap(wire.Call(ctx, c.hc, http.MethodPost, "http://agent/ping?peer="+url.QueryEscape(peer), nil, nil, &res))
}

// Dial asks the agent for a raw stream to host:port on the mesh.
func (c *CtlClient) Dial(ctx context.Context, host string, port uint16) (net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", c.path)
	if err != nil {
		return nil, c.wrap(err)
	}
	fmt.Fprintf(conn, "POST /dial?host=%s&port=%d HTTP/1.1\r\nHost: agent\r\nConnection: Upgrade\r\nUpgrade: meshctl-dial\r\nContent-Length: 0\r\n\r\n", url.QueryEscape(host), port)
	br := bufio.NewReader(conn)
	resp, err := http.ReadResponse(br, nil)
	if err != nil {
		conn.Close()
		return nil, err
	}
	if resp.StatusCode != http.StatusSwitchingProtocols {
		defer conn.Close()
		var e wire.Error
		body, _ := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
		if json.Unmarshal(body, &e) == nil && e.Message != "" {
			return nil, errors.New(e.Message)
		}
		return nil, fmt.Errorf("agent answered %s", resp.Status)
	}
	return &bufferedConn{Conn: conn, r: br}, nil
}

type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (b *bufferedConn) Read(p []byte) (int, error) { return b.r.Read(p) }

// CloseWrite passes a half-close through to the Unix connection.
func (b *bufferedConn) CloseWrite() error {
	if cw, ok := b.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
