// Package relay forwards WireGuard packets between mesh nodes that cannot
// reach each other directly (both behind NAT), in the manner of Tailscale's
// DERP. The relay only ever sees opaque, still-encrypted WireGuard messages
// addressed by the destination node's WireGuard public key; it never
// decrypts them and never routes anything into its own WireGuard device.
//
// # Protocol
//
// A node opens a TLS connection (TLS 1.2 or later) to the relay and presents
// the mTLS client certificate the coordinator's CA issued it. The relay
// verifies that certificate itself: it must chain to Options.ClientCA, carry
// the ClientAuth extended key usage and be valid at Options.Now. The node is
// identified ONLY by that verified certificate: its CommonName is the node
// id, and Options.Lookup maps the id to the node's WireGuard public key. A
// node therefore cannot claim another key, so it can only receive packets
// addressed to its own key. An unknown or revoked id (Lookup returns false)
// is refused by closing the connection right after the handshake. The
// client verifies the relay's certificate against the mesh CA (ServerAuth,
// no host name check, like pki.CATLSConfig).
//
// After the handshake both directions carry frames:
//
//	1 byte   type
//	32 bytes WireGuard public key
//	2 bytes  payload length, big-endian
//	n bytes  payload
//
// Client→server frames have type 1, "send to key" (the key is the
// destination). Server→client frames have type 2, "from key" (the key is the
// authenticated source). A client frame with another type, a zero length or
// a length above Options.MaxPacket makes the relay close that connection.
//
// The relay forwards a payload only if its header is that of a WireGuard
// message: the first byte is 1 (handshake initiation, exactly 148 bytes),
// 2 (handshake response, 92 bytes), 3 (cookie reply, 64 bytes) or 4
// (transport data, at least 32 bytes), followed by three zero bytes.
// Anything else is dropped (counted, logged at debug level without its
// contents). A packet for a key no connected node holds, or for the sender's
// own key, is dropped silently. Each source node has a token bucket of
// Options.RateBytes bytes per second with a burst of twice that; packets
// exceeding it are dropped. A destination whose send queue is full drops the
// packet too (WireGuard retransmits). Drops are never reported to the sender.
//
// A second connection from the same node (or holding the same key) replaces
// the first, which is closed. Lookup is re-checked for the source node when
// it sends and at least one second (by Options.Now) has passed since the
// last check; if the node is gone or its key changed, the connection is
// closed. Server.Drop closes a node's connection immediately (revocation).
package relay

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshctl/meshctl/pki"
)

// Frame types.
const (
	frameSend byte = 1 // client→server: send payload to key
	frameFrom byte = 2 // server→client: payload from key
)

const (
	headerLen = 1 + 32 + 2

	// DefaultRateBytes is the default per-node forwarding rate in bytes/s.
	DefaultRateBytes = 8 << 20
	// DefaultMaxPacket is the default and largest payload size.
	DefaultMaxPacket = 65535

	handshakeTimeout = 10 * time.Second
	writeTimeout     = 10 * time.Second
	recheckInterval  = time.Second
	sendQueueLen     = 256
)

// ErrServerClosed is returned by Serve after Close.
var ErrServerClosed = errors.New("relay: server closed")

// Options configure a Server.
type Options struct {
	TLSCert  tls.Certificate   // the relay's server certificate (required)
	ClientCA *x509.Certificate // nodes' certificates must chain to it (required)
	// Lookup maps an authenticated node id (certificate CommonName) to its
	// WireGuard public key; false = unknown or revoked → refused. It is
	// called at connect and about once a second per sending node, so it
	// should be cheap (in memory).
	Lookup    func(nodeID string) (key [32]byte, ok bool)
	Now       func() time.Time // default time.Now
	Logger    *slog.Logger     // nil = discard; packet contents are never logged
	RateBytes int              // per-node sustained bytes/s forwarded (default 8 MiB/s), burst 2x
	MaxPacket int              // largest payload, default and maximum 65535
}

// Server relays WireGuard messages between authenticated nodes over TLS
// streams.
type Server struct {
	o      Options
	log    *slog.Logger
	tlsCfg *tls.Config

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	raw       map[net.Conn]struct{}
	byID      map[string]*conn
	byKey     map[[32]byte]*conn
	wg        sync.WaitGroup
	closeOnce sync.Once

	// counters (for tests and status)
	forwarded   atomic.Uint64
	dropNotWG   atomic.Uint64
	dropNoDst   atomic.Uint64
	dropRate    atomic.Uint64
	dropQueue   atomic.Uint64
	badFrames   atomic.Uint64
	refusedConn atomic.Uint64
}

type conn struct {
	id    string
	key   [32]byte
	raw   net.Conn
	tc    *tls.Conn
	sendq chan []byte
	done  chan struct{}
	once  sync.Once

	// touched only by the connection's read loop
	tokens    float64
	last      time.Time
	lastCheck time.Time
}

func (c *conn) close() {
	c.once.Do(func() {
		close(c.done)
		c.raw.Close()
	})
}

// New validates o and returns a Server.
func New(o Options) (*Server, error) {
	if len(o.TLSCert.Certificate) == 0 || o.TLSCert.PrivateKey == nil {
		return nil, errors.New("relay: TLSCert is required")
	}
	if o.ClientCA == nil {
		return nil, errors.New("relay: ClientCA is required")
	}
	if o.Lookup == nil {
		return nil, errors.New("relay: Lookup is required")
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.RateBytes < 0 || o.MaxPacket < 0 || o.MaxPacket > DefaultMaxPacket {
		return nil, fmt.Errorf("relay: RateBytes must be ≥ 0 and MaxPacket within 0..%d", DefaultMaxPacket)
	}
	if o.RateBytes == 0 {
		o.RateBytes = DefaultRateBytes
	}
	if o.MaxPacket == 0 {
		o.MaxPacket = DefaultMaxPacket
	}
	log := o.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{
		o:         o,
		log:       log,
		listeners: map[net.Listener]struct{}{},
		raw:       map[net.Conn]struct{}{},
		byID:      map[string]*conn{},
		byKey:     map[[32]byte]*conn{},
	}
	roots := x509.NewCertPool()
	roots.AddCert(o.ClientCA)
	s.tlsCfg = &tls.Config{
		MinVersion:   tls.VersionTLS12,
		Certificates: []tls.Certificate{o.TLSCert},
		ClientAuth:   tls.RequireAnyClientCert,
		VerifyPeerCertificate: func(rawCerts [][]byte, _ [][]*x509.Certificate) error {
			if len(rawCerts) == 0 {
				return errors.New("no client certificate")
			}
			certs := make([]*x509.Certificate, len(rawCerts))
			for i, r := range rawCerts {
				c, err := x509.ParseCertificate(r)
				if err != nil {
					return fmt.Errorf("client certificate: %w", err)
				}
				certs[i] = c
			}
			inter := x509.NewCertPool()
			for _, c := range certs[1:] {
				inter.AddCert(c)
			}
			_, err := certs[0].Verify(x509.VerifyOptions{
				Roots:         roots,
				Intermediates: inter,
				CurrentTime:   s.o.Now(),
				KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
			})
			if err != nil {
				return fmt.Errorf("client certificate: %w", err)
			}
			if certs[0].Subject.CommonName == "" {
				return errors.New("client certificate has no CommonName")
			}
			return nil
		},
	}
	return s, nil
}

// Serve accepts connections on ln until Close (then it returns
// ErrServerClosed) or until Accept fails. TLS is done by the server; ln
// must be a plain listener.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return ErrServerClosed
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
	}()
	for {
		raw, err := ln.Accept()
		if err != nil {
			s.mu.Lock()
			closed := s.closed
			s.mu.Unlock()
			if closed {
				return ErrServerClosed
			}
			return err
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			raw.Close()
			return ErrServerClosed
		}
		s.raw[raw] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go s.handle(raw)
	}
}

// Close stops all listeners and connections and waits for the server's
// goroutines. It is idempotent.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		for ln := range s.listeners {
			ln.Close()
		}
		for r := range s.raw {
			r.Close()
		}
		for _, c := range s.byID {
			c.close()
		}
		s.mu.Unlock()
	})
	s.wg.Wait()
	return nil
}

// Drop closes nodeID's connection now (revocation). The node can reconnect
// only if Lookup accepts it again.
func (s *Server) Drop(nodeID string) {
	s.mu.Lock()
	c := s.byID[nodeID]
	if c != nil {
		s.removeLocked(c)
	}
	s.mu.Unlock()
	if c != nil {
		s.log.Info("relay: node dropped", "node", nodeID)
		c.close()
	}
}

// Connected returns the ids of the connected nodes, sorted.
func (s *Server) Connected() []string {
	s.mu.Lock()
	ids := make([]string, 0, len(s.byID))
	for id := range s.byID {
		ids = append(ids, id)
	}
	s.mu.Unlock()
	sort.Strings(ids)
	return ids
}

func (s *Server) removeLocked(c *conn) {
	if s.byID[c.id] == c {
		delete(s.byID, c.id)
	}
	if s.byKey[c.key] == c {
		delete(s.byKey, c.key)
	}
}

// register installs c, closing any connection it replaces. It fails once
// the server is closed.
func (s *Server) register(c *conn) bool {
	var old []*conn
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return false
	}
	if o := s.byID[c.id]; o != nil {
		s.removeLocked(o)
		old = append(old, o)
	}
	if o := s.byKey[c.key]; o != nil {
		s.removeLocked(o)
		old = append(old, o)
	}
	s.byID[c.id] = c
	s.byKey[c.key] = c
	s.mu.Unlock()
	for _, o := range old {
		s.log.Info("relay: connection replaced", "node", o.id)
		o.close()
	}
	return true
}

func (s *Server) handle(raw net.Conn) {
	defer s.wg.Done()
	defer func() {
		raw.Close()
		s.mu.Lock()
		delete(s.raw, raw)
		s.mu.Unlock()
	}()
	tc := tls.Server(raw, s.tlsCfg)
	ctx, cancel := context.WithTimeout(context.Background(), handshakeTimeout)
	err := tc.HandshakeContext(ctx)
	cancel()
	if err != nil {
		s.refusedConn.Add(1)
		s.log.Debug("relay: handshake failed", "remote", raw.RemoteAddr().String(), "err", err)
		return
	}
	id := tc.ConnectionState().PeerCertificates[0].Subject.CommonName
	key, ok := s.o.Lookup(id)
	if !ok {
		s.refusedConn.Add(1)
		s.log.Warn("relay: unknown or revoked node refused", "node", id, "remote", raw.RemoteAddr().String())
		return
	}
	now := s.o.Now()
	c := &conn{
		id: id, key: key, raw: raw, tc: tc,
		sendq:  make(chan []byte, sendQueueLen),
		done:   make(chan struct{}),
		tokens: float64(2 * s.o.RateBytes),
		last:   now, lastCheck: now,
	}
	if !s.register(c) {
		return
	}
	s.log.Info("relay: node connected", "node", id, "remote", raw.RemoteAddr().String())
	s.wg.Add(1) // safe: this goroutine's count keeps Wait from returning
	go s.writeLoop(c)
	err = s.readLoop(c)
	s.mu.Lock()
	s.removeLocked(c)
	s.mu.Unlock()
	c.close()
	s.log.Info("relay: node disconnected", "node", id, "err", err)
}

func (s *Server) writeLoop(c *conn) {
	defer s.wg.Done()
	bw := bufio.NewWriterSize(c.tc, 32<<10)
	for {
		select {
		case <-c.done:
			return
		case f := <-c.sendq:
			c.raw.SetWriteDeadline(time.Now().Add(writeTimeout))
			if _, err := bw.Write(f); err != nil {
				c.close()
				return
			}
			if len(c.sendq) == 0 {
				if err := bw.Flush(); err != nil {
					c.close()
					return
				}
			}
		}
	}
}

// readLoop reads c's frames until an error or a protocol violation.
func (s *Server) readLoop(c *conn) error {
	br := bufio.NewReaderSize(c.tc, 32<<10)
	var hdr [headerLen]byte
	rate, burst := float64(s.o.RateBytes), float64(2*s.o.RateBytes)
	for {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			return err
		}
		n := int(binary.BigEndian.Uint16(hdr[33:]))
		if hdr[0] != frameSend || n == 0 || n > s.o.MaxPacket {
			s.badFrames.Add(1)
			s.log.Warn("relay: bad frame, closing", "node", c.id, "type", hdr[0], "len", n)
			return errors.New("bad frame")
		}
		var dst [32]byte
		copy(dst[:], hdr[1:33])
		frame := make([]byte, headerLen+n)
		if _, err := io.ReadFull(br, frame[headerLen:]); err != nil {
			return err
		}
		payload := frame[headerLen:]

		now := s.o.Now()
		if now.Sub(c.lastCheck) >= recheckInterval || now.Before(c.lastCheck) {
			c.lastCheck = now
			if key, ok := s.o.Lookup(c.id); !ok || key != c.key {
				s.log.Warn("relay: node revoked or rekeyed, closing", "node", c.id)
				return errors.New("node no longer authorized")
			}
		}
		if !IsWireGuard(payload) {
			s.dropNotWG.Add(1)
			s.log.Debug("relay: dropped non-WireGuard payload", "node", c.id, "len", n)
			continue
		}
		if el := now.Sub(c.last); el > 0 {
			c.tokens += el.Seconds() * rate
			if c.tokens > burst {
				c.tokens = burst
			}
		}
		c.last = now
		if c.tokens < float64(n) {
			s.dropRate.Add(1)
			continue
		}
		c.tokens -= float64(n)

		s.mu.Lock()
		d := s.byKey[dst]
		s.mu.Unlock()
		if d == nil || d == c {
			s.dropNoDst.Add(1)
			continue
		}
		frame[0] = frameFrom
		copy(frame[1:33], c.key[:])
		binary.BigEndian.PutUint16(frame[33:35], uint16(n))
		select {
		case d.sendq <- frame:
			s.forwarded.Add(1)
		default:
			s.dropQueue.Add(1)
		}
	}
}

// IsWireGuard reports whether p has the header of a WireGuard message:
// type 1 (148 bytes), 2 (92 bytes), 3 (64 bytes) or 4 (≥ 32 bytes),
// followed by three zero bytes.
func IsWireGuard(p []byte) bool {
	if len(p) < 4 || p[1]|p[2]|p[3] != 0 {
		return false
	}
	switch p[0] {
	case 1:
		return len(p) == 148
	case 2:
		return len(p) == 92
	case 3:
		return len(p) == 64
	case 4:
		return len(p) >= 32
	}
	return false
}

// Client is a node's connection to the relay. Send and Recv may be called
// from different goroutines.
type Client struct {
	tc  *tls.Conn
	wmu sync.Mutex
	rmu sync.Mutex
	br  *bufio.Reader
}

// Dial connects to the relay at addr with the node's mTLS certificate,
// verifying the relay's certificate against ca (ServerAuth, no host name
// check). With TLS 1.3 a refused certificate may only show as an error from
// the first Recv.
func Dial(ctx context.Context, addr string, cert tls.Certificate, ca *x509.Certificate) (*Client, error) {
	cfg := pki.CATLSConfig(ca)
	cfg.Certificates = []tls.Certificate{cert}
	d := &tls.Dialer{Config: cfg}
	nc, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("relay: dial %s: %w", addr, err)
	}
	tc := nc.(*tls.Conn)
	return &Client{tc: tc, br: bufio.NewReaderSize(tc, 32<<10)}, nil
}

// Send asks the relay to deliver pkt (a WireGuard message) to the node
// holding dst. Delivery is best effort: the relay drops silently.
func (c *Client) Send(dst [32]byte, pkt []byte) error {
	if len(pkt) == 0 || len(pkt) > DefaultMaxPacket {
		return fmt.Errorf("relay: packet length %d not in 1..%d", len(pkt), DefaultMaxPacket)
	}
	f := make([]byte, headerLen+len(pkt))
	f[0] = frameSend
	copy(f[1:33], dst[:])
	binary.BigEndian.PutUint16(f[33:35], uint16(len(pkt)))
	copy(f[headerLen:], pkt)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	_, err := c.tc.Write(f)
	return err
}

// Recv blocks until the relay delivers a packet and returns its source key.
func (c *Client) Recv() (src [32]byte, pkt []byte, err error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	var hdr [headerLen]byte
	if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
		return src, nil, err
	}
	if hdr[0] != frameFrom {
		c.tc.Close()
		return src, nil, fmt.Errorf("relay: unexpected frame type %d", hdr[0])
	}
	copy(src[:], hdr[1:33])
	pkt = make([]byte, binary.BigEndian.Uint16(hdr[33:]))
	if _, err := io.ReadFull(c.br, pkt); err != nil {
		return src, nil, err
	}
	return src, pkt, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.tc.Close() }
