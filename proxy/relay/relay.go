// Package relay forwards WireGuard packets between mesh nodes that cannot
// reach each other directly (both behind NAT), in the manner of Tailscale's
// DERP. The relay only ever sees opaque, still-encrypted WireGuard messages
// addressed by the destination node's WireGuard public key; it never
// decrypts them and never routes anything into its own WireGuard device.
//
// # Identity
//
// The relay does not authenticate anyone itself. It serves byte streams
// that its caller has already authenticated: [Server.ServeConn] takes the
// node's name together with the stream. In meshctl the caller is the
// proxy's SSH server (package proxy/sshtunnel): a node opens an SSH channel
// of type wire.SSHRelayChannel on the connection it authenticated with the
// user certificate from the coordinator's SSH CA (principal = node name),
// and that name is what ServeConn gets. The proxy's own agent is attached
// in-process, over a net.Pipe, under the proxy's own name.
//
// Options.Lookup maps the name to the node's WireGuard public key. A node
// therefore cannot claim another key: it can only receive packets
// addressed to its own key, and every packet it sends is delivered with
// its own key as the source. An unknown or revoked name (Lookup returns
// false) is refused by closing the stream at once.
//
// # Protocol
//
// Both directions of a stream carry frames:
//
//	1 byte   type
//	32 bytes WireGuard public key
//	2 bytes  payload length, big-endian
//	n bytes  payload
//
// Client→server frames have type 1, "send to key" (the key is the
// destination). Server→client frames have type 2, "from key" (the key is the
// authenticated source). A client frame with another type, a zero length or
// a length above Options.MaxPacket makes the relay close that stream.
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
// A second stream of the same node (or holding the same key) replaces the
// first, which is closed. Lookup is re-checked for the source node when it
// sends and at least one second (by Options.Now) has passed since the last
// check; if the node is gone or its key changed, the stream is closed.
// Server.Drop closes a node's stream immediately (revocation, rekey).
//
// # Streams
//
// A stream is any io.ReadWriteCloser whose Close may be called while a Read
// or Write is blocked and makes them return (net.Conn, net.Pipe and
// x/crypto/ssh channels qualify; an SSH channel's blocked Write returns
// once the peer answers the channel close, or when the connection ends). A
// write that does not complete within WriteTimeout closes the stream: via
// SetWriteDeadline when the stream has it, else by a watchdog that calls
// Close.
package relay

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"
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
	// WriteTimeout bounds one write to a stream, on both the server and
	// the client side; a stream whose write takes longer is closed.
	WriteTimeout = 10 * time.Second

	recheckInterval = time.Second
	sendQueueLen    = 256
)

// writeTimeout is WriteTimeout; tests shorten it.
var writeTimeout atomic.Int64

func init() { writeTimeout.Store(int64(WriteTimeout)) }

// Reasons ServeConn returns.
var (
	// ErrServerClosed: the server was closed (before or while serving).
	ErrServerClosed = errors.New("relay: server closed")
	// ErrRefused: Lookup does not know the node (unknown or revoked).
	ErrRefused = errors.New("relay: node unknown or revoked")
	// ErrReplaced: a newer stream of the same node or key took over.
	ErrReplaced = errors.New("relay: replaced by a newer stream of the node")
	// ErrDropped: Server.Drop cut the node.
	ErrDropped = errors.New("relay: node dropped")
	// ErrRevoked: the periodic Lookup re-check found the node gone or
	// holding another key.
	ErrRevoked = errors.New("relay: node no longer authorized")
	// ErrBadFrame: the client sent a frame of the wrong type or length.
	ErrBadFrame = errors.New("relay: bad frame")
	// ErrWriteTimeout: a write to the stream took longer than WriteTimeout.
	ErrWriteTimeout = errors.New("relay: write timed out")
)

// ErrClientClosed is returned by Client.Send after Close, or after an
// earlier write error closed the client.
var ErrClientClosed = errors.New("relay: client closed")

// Options configure a Server.
type Options struct {
	// Lookup maps an authenticated node name to its WireGuard public key;
	// false = unknown or revoked → refused. It is called when a stream
	// starts and about once a second per sending node, so it should be
	// cheap (in memory). Required.
	Lookup func(node string) (key [32]byte, ok bool)
	// Allow, if set, says whether src may send to dst (node names); a
	// packet between members that may not see each other (the hub
	// topology) is dropped. Called per packet: keep it cheap.
	Allow     func(src, dst string) bool
	Now       func() time.Time // default time.Now
	Logger    *slog.Logger     // nil = discard; packet contents are never logged
	RateBytes int              // per-node sustained bytes/s forwarded (default 8 MiB/s), burst 2x
	MaxPacket int              // largest payload, default and maximum 65535
}

// Stats are the server's counters since New.
type Stats struct {
	Forwarded      uint64 // packets queued to their destination
	ForwardedBytes uint64 // payload bytes of those packets
	DropNotWG      uint64 // payloads without a WireGuard message header
	DropNoDst      uint64 // no connected node holds the key, or it is the sender's own
	DropDenied     uint64 // Options.Allow refused the pair (hub topology)
	DropRate       uint64 // over the sender's rate limit
	DropQueue      uint64 // the destination's send queue was full
	BadFrames      uint64 // frames that closed their stream
	Refused        uint64 // streams refused (unknown or revoked node)
	Connected      int    // nodes connected now
}

// Server relays WireGuard messages between nodes over streams its caller
// authenticated. It is safe for concurrent use.
type Server struct {
	o   Options
	log *slog.Logger

	mu     sync.Mutex
	closed bool
	byID   map[string]*conn
	byKey  map[[32]byte]*conn
	wg     sync.WaitGroup // running ServeConn calls

	forwarded      atomic.Uint64
	forwardedBytes atomic.Uint64
	dropNotWG      atomic.Uint64
	dropNoDst      atomic.Uint64
	dropDenied     atomic.Uint64
	dropRate       atomic.Uint64
	dropQueue      atomic.Uint64
	badFrames      atomic.Uint64
	refusedConn    atomic.Uint64
}

type conn struct {
	id    string
	key   [32]byte
	rw    io.ReadWriteCloser
	sendq chan []byte
	done  chan struct{}
	once  sync.Once
	// reason is why the stream was closed; written once before done is
	// closed, read only after.
	reason error

	// touched only by the stream's read loop
	tokens    float64
	last      time.Time
	lastCheck time.Time
}

// close records reason (the first one wins) and closes the stream.
func (c *conn) close(reason error) {
	c.once.Do(func() {
		c.reason = reason
		close(c.done)
		c.rw.Close()
	})
}

// New validates o and returns a Server.
func New(o Options) (*Server, error) {
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
	return &Server{
		o:     o,
		log:   log,
		byID:  map[string]*conn{},
		byKey: map[[32]byte]*conn{},
	}, nil
}

// ServeConn serves one stream of node, whom the caller has authenticated,
// until the stream ends or is cut, and closes rw before it returns. A node
// Lookup does not know is refused at once (ErrRefused). The result is nil
// when the client ended the stream (EOF), else why it ended: ErrRefused,
// ErrServerClosed, ErrReplaced, ErrDropped, ErrRevoked, ErrBadFrame,
// ErrWriteTimeout or an I/O error.
func (s *Server) ServeConn(node string, rw io.ReadWriteCloser) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		rw.Close()
		return ErrServerClosed
	}
	s.wg.Add(1)
	s.mu.Unlock()
	defer s.wg.Done()

	key, ok := [32]byte{}, false
	if node != "" {
		key, ok = s.o.Lookup(node)
	}
	if !ok {
		s.refusedConn.Add(1)
		s.log.Warn("relay: unknown or revoked node refused", "node", node)
		rw.Close()
		return ErrRefused
	}
	now := s.o.Now()
	c := &conn{
		id: node, key: key, rw: rw,
		sendq:  make(chan []byte, sendQueueLen),
		done:   make(chan struct{}),
		tokens: float64(2 * s.o.RateBytes),
		last:   now, lastCheck: now,
	}
	if !s.register(c) {
		rw.Close()
		return ErrServerClosed
	}
	s.log.Info("relay: node connected", "node", node)
	wdone := make(chan struct{})
	go func() {
		defer close(wdone)
		s.writeLoop(c)
	}()
	err := s.readLoop(c)
	if errors.Is(err, io.EOF) {
		err = nil
	}
	c.close(err)
	s.mu.Lock()
	s.removeLocked(c)
	s.mu.Unlock()
	<-wdone // bounded: the stream is closed, which ends a blocked write
	s.log.Info("relay: node disconnected", "node", node, "reason", c.reason)
	return c.reason
}

// Close closes every stream, makes later ServeConn calls return
// ErrServerClosed, and waits for the running ones to return. It is
// idempotent and returns nil.
func (s *Server) Close() error {
	var conns []*conn
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		for _, c := range s.byID {
			conns = append(conns, c)
		}
		clear(s.byID)
		clear(s.byKey)
	}
	s.mu.Unlock()
	for _, c := range conns { // not under mu: closing a stream may block briefly
		c.close(ErrServerClosed)
	}
	s.wg.Wait()
	return nil
}

// Drop closes node's stream now (revocation or rekey). The node can
// reconnect only if Lookup accepts it again.
func (s *Server) Drop(node string) {
	s.mu.Lock()
	c := s.byID[node]
	if c != nil {
		s.removeLocked(c)
	}
	s.mu.Unlock()
	if c != nil {
		s.log.Info("relay: node dropped", "node", node)
		c.close(ErrDropped)
	}
}

// Connected returns the names of the connected nodes, sorted.
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

// Stats returns the server's counters.
func (s *Server) Stats() Stats {
	s.mu.Lock()
	n := len(s.byID)
	s.mu.Unlock()
	return Stats{
		Forwarded:      s.forwarded.Load(),
		ForwardedBytes: s.forwardedBytes.Load(),
		DropNotWG:      s.dropNotWG.Load(),
		DropNoDst:      s.dropNoDst.Load(),
		DropDenied:     s.dropDenied.Load(),
		DropRate:       s.dropRate.Load(),
		DropQueue:      s.dropQueue.Load(),
		BadFrames:      s.badFrames.Load(),
		Refused:        s.refusedConn.Load(),
		Connected:      n,
	}
}

func (s *Server) removeLocked(c *conn) {
	if s.byID[c.id] == c {
		delete(s.byID, c.id)
	}
	if s.byKey[c.key] == c {
		delete(s.byKey, c.key)
	}
}

// register installs c, closing any stream it replaces. It fails once the
// server is closed.
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
		s.log.Info("relay: stream replaced", "node", o.id, "by", c.id)
		o.close(ErrReplaced)
	}
	return true
}

func (s *Server) writeLoop(c *conn) {
	tw := newTimedWriter(c.rw, func() { c.close(ErrWriteTimeout) })
	defer tw.stop()
	bw := bufio.NewWriterSize(tw, 32<<10)
	for {
		select {
		case <-c.done:
			return
		case f := <-c.sendq:
			_, err := bw.Write(f)
			if err == nil && len(c.sendq) == 0 {
				err = bw.Flush()
			}
			if err != nil {
				if errors.Is(err, os.ErrDeadlineExceeded) {
					err = ErrWriteTimeout
				} else {
					err = fmt.Errorf("relay: write: %w", err)
				}
				c.close(err)
				return
			}
		}
	}
}

// readLoop reads c's frames until an error or a protocol violation.
func (s *Server) readLoop(c *conn) error {
	br := bufio.NewReaderSize(c.rw, 32<<10)
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
			return ErrBadFrame
		}
		var dst [32]byte
		copy(dst[:], hdr[1:33])
		frame := make([]byte, headerLen+n)
		if _, err := io.ReadFull(br, frame[headerLen:]); err != nil {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return err
		}
		payload := frame[headerLen:]

		now := s.o.Now()
		if now.Sub(c.lastCheck) >= recheckInterval || now.Before(c.lastCheck) {
			c.lastCheck = now
			if key, ok := s.o.Lookup(c.id); !ok || key != c.key {
				s.log.Warn("relay: node revoked or rekeyed, closing", "node", c.id)
				return ErrRevoked
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
		if s.o.Allow != nil && !s.o.Allow(c.id, d.id) {
			s.dropDenied.Add(1)
			continue
		}
		// The source is always the sender's authenticated key.
		frame[0] = frameFrom
		copy(frame[1:33], c.key[:])
		binary.BigEndian.PutUint16(frame[33:35], uint16(n))
		select {
		case d.sendq <- frame:
			s.forwarded.Add(1)
			s.forwardedBytes.Add(uint64(n))
		default:
			s.dropQueue.Add(1)
		}
	}
}

// timedWriter bounds each Write by WriteTimeout: with the stream's
// SetWriteDeadline when it has one, else with a watchdog timer that calls
// onStall (which closes the stream) if a Write is still running when it
// fires. It is used by one goroutine at a time.
type timedWriter struct {
	w       io.Writer
	dl      interface{ SetWriteDeadline(time.Time) error }
	onStall func()
	timer   *time.Timer
}

func newTimedWriter(w io.Writer, onStall func()) *timedWriter {
	tw := &timedWriter{w: w, onStall: onStall}
	tw.dl, _ = w.(interface{ SetWriteDeadline(time.Time) error })
	return tw
}

func (t *timedWriter) Write(p []byte) (int, error) {
	if t.dl != nil {
		if err := t.dl.SetWriteDeadline(time.Now().Add(time.Duration(writeTimeout.Load()))); err == nil {
			return t.w.Write(p)
		}
		// A stream that cannot set deadlines after all (e.g. a wrapper
		// around a conn without them): fall back to the watchdog.
		t.dl = nil
	}
	d := time.Duration(writeTimeout.Load())
	if t.timer == nil {
		t.timer = time.AfterFunc(d, t.onStall)
	} else {
		t.timer.Reset(d)
	}
	n, err := t.w.Write(p)
	t.timer.Stop()
	return n, err
}

func (t *timedWriter) stop() {
	if t.timer != nil {
		t.timer.Stop()
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

// Client is a node's end of a relay stream.
//
// Send may be called from any number of goroutines; Recv from one at a
// time (typically one receive loop). Neither blocks forever on a stuck
// stream: a write that takes longer than WriteTimeout closes the stream
// (SetWriteDeadline if the stream has it, else a watchdog calling Close;
// see the package doc for what the stream's Close must do), and Recv
// returns an error once the stream is closed.
type Client struct {
	rw io.ReadWriteCloser

	wmu    sync.Mutex
	tw     *timedWriter
	wbuf   []byte
	closed atomic.Bool

	rmu  sync.Mutex
	br   *bufio.Reader
	rbuf []byte

	closeOnce sync.Once
	closeErr  error
}

// NewClient returns a relay client speaking over rw, a stream to the relay:
// typically an SSH channel of type wire.SSHRelayChannel on the node's
// connection to the proxy's SSH server (the relay knows the node by that
// connection's certificate), or one end of a net.Pipe for an in-process
// relay. The Client owns rw: Close closes it.
func NewClient(rw io.ReadWriteCloser) *Client {
	c := &Client{rw: rw, br: bufio.NewReaderSize(rw, 32<<10)}
	c.tw = newTimedWriter(rw, func() { c.Close() })
	return c
}

// Send asks the relay to deliver pkt (a WireGuard message, 1..65535 bytes)
// to the node holding dst. It returns once the frame is written to the
// stream; delivery is best effort (the relay drops silently). pkt is not
// retained. A write error (including a write stuck for WriteTimeout)
// closes the client, since the stream may hold half a frame; later Sends
// return ErrClientClosed.
func (c *Client) Send(dst [32]byte, pkt []byte) error {
	if len(pkt) == 0 || len(pkt) > DefaultMaxPacket {
		return fmt.Errorf("relay: packet length %d not in 1..%d", len(pkt), DefaultMaxPacket)
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.closed.Load() {
		return ErrClientClosed
	}
	n := headerLen + len(pkt)
	if cap(c.wbuf) < n {
		c.wbuf = make([]byte, n, max(n, 2048))
	}
	f := c.wbuf[:n]
	f[0] = frameSend
	copy(f[1:33], dst[:])
	binary.BigEndian.PutUint16(f[33:35], uint16(len(pkt)))
	copy(f[headerLen:], pkt)
	if _, err := c.tw.Write(f); err != nil {
		c.Close()
		return fmt.Errorf("relay: send: %w", err)
	}
	return nil
}

// Recv blocks until the relay delivers a packet and returns it with its
// source: the WireGuard key of the node that sent it, as the relay
// authenticated it. pkt aliases the client's receive buffer: it is valid
// only until the next Recv call, so copy it to keep it. Recv must not be
// called concurrently with itself. Any error is final (the stream ended,
// or the relay broke the protocol, which closes the client): open a new
// stream and a new Client to reconnect.
func (c *Client) Recv() (src [32]byte, pkt []byte, err error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	var hdr [headerLen]byte
	if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
		return src, nil, err
	}
	n := int(binary.BigEndian.Uint16(hdr[33:]))
	if hdr[0] != frameFrom || n == 0 {
		c.Close()
		return src, nil, fmt.Errorf("relay: unexpected frame (type %d, length %d)", hdr[0], n)
	}
	copy(src[:], hdr[1:33])
	if c.rbuf == nil {
		c.rbuf = make([]byte, DefaultMaxPacket)
	}
	pkt = c.rbuf[:n]
	if _, err := io.ReadFull(c.br, pkt); err != nil {
		if err == io.EOF {
			err = io.ErrUnexpectedEOF
		}
		return src, nil, err
	}
	return src, pkt, nil
}

// Close closes the stream; a blocked Recv or Send returns. It is
// idempotent and returns the stream's Close error of the first call.
func (c *Client) Close() error {
	c.closeOnce.Do(func() {
		c.closed.Store(true)
		c.closeErr = c.rw.Close()
	})
	return c.closeErr
}
