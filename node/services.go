package node

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/meshctl/meshctl/wire"
)

// Service is a local service published on the mesh: the agent listens on
// the node's overlay addresses at Port and splices each connection to
// Target on the device. Only Name and Port are published; Target never
// leaves the node.
type Service struct {
	Name   string
	Target string // host:port on the device
	Port   uint16 // overlay port: the target's port
	Public bool   // reachable through the proxy without sign-in
}

// ParseExpose parses an --expose value: NAME=HOST:PORT[,public].
func ParseExpose(s string) (Service, error) {
	name, rest, ok := strings.Cut(s, "=")
	if !ok {
		return Service{}, fmt.Errorf("--expose %q: want NAME=HOST:PORT[,public], e.g. web=127.0.0.1:3000", s)
	}
	target, opts, _ := strings.Cut(rest, ",")
	var svc Service
	svc.Name, svc.Target = name, target
	for _, o := range strings.Split(opts, ",") {
		switch o {
		case "":
		case "public":
			svc.Public = true
		default:
			return Service{}, fmt.Errorf("--expose %q: unknown option %q (known: public)", s, o)
		}
	}
	if err := validLabel(name); err != nil {
		return Service{}, fmt.Errorf("--expose %q: service %w", s, err)
	}
	host, port, err := net.SplitHostPort(target)
	if err != nil || host == "" {
		return Service{}, fmt.Errorf("--expose %q: target must be HOST:PORT on this device, e.g. 127.0.0.1:3000", s)
	}
	p, err := strconv.ParseUint(port, 10, 16)
	if err != nil || p == 0 {
		return Service{}, fmt.Errorf("--expose %q: port %q is not 1-65535", s, port)
	}
	svc.Port = uint16(p)
	return svc, nil
}

// validLabel mirrors the coordinator's name rules (which remain the
// authority) so that mistakes show up before anything starts.
func validLabel(name string) error {
	switch {
	case name == "" || len(name) > 63:
		return fmt.Errorf("name %q must be 1-63 characters", name)
	case strings.Contains(name, "--") || name[0] == '-' || name[len(name)-1] == '-':
		return fmt.Errorf("name %q must not start or end with '-' or contain \"--\"", name)
	}
	for _, c := range name {
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
			return fmt.Errorf("name %q may contain only a-z, 0-9 and '-'", name)
		}
	}
	return nil
}

// checkServices refuses duplicate names and overlay ports.
func checkServices(svcs []Service) error {
	names, ports := map[string]bool{}, map[uint16]string{}
	for _, s := range svcs {
		if names[s.Name] {
			return fmt.Errorf("service %q is exposed twice", s.Name)
		}
		names[s.Name] = true
		if other, ok := ports[s.Port]; ok {
			return fmt.Errorf("services %q and %q both use overlay port %d (a service is published on its target's port)", other, s.Name, s.Port)
		}
		ports[s.Port] = s.Name
	}
	return nil
}

func wireServices(svcs []Service) []wire.Service {
	out := make([]wire.Service, 0, len(svcs))
	for _, s := range svcs {
		out = append(out, wire.Service{Name: s.Name, Port: s.Port, Public: s.Public})
	}
	return out
}

// forwarder serves one listener: every accepted overlay connection is
// spliced to the service's target on the device.
type forwarder struct {
	svc Service
	ln  net.Listener
	log *slog.Logger

	mu    sync.Mutex
	conns map[net.Conn]struct{}
	wg    sync.WaitGroup
}

const (
	maxConnsPerService = 1024
	targetDialTimeout  = 10 * time.Second
)

func serveForwarder(ctx context.Context, svc Service, ln net.Listener, log *slog.Logger) *forwarder {
	f := &forwarder{svc: svc, ln: ln, log: log, conns: map[net.Conn]struct{}{}}
	f.wg.Add(1)
	go f.acceptLoop(ctx)
	return f
}

func (f *forwarder) acceptLoop(ctx context.Context) {
	defer f.wg.Done()
	for {
		c, err := f.ln.Accept()
		if err != nil {
			return // listener closed
		}
		f.mu.Lock()
		if len(f.conns) >= maxConnsPerService {
			f.mu.Unlock()
			f.log.Warn("service connection limit reached; refusing", "service", f.svc.Name, "limit", maxConnsPerService)
			c.Close()
			continue
		}
		f.conns[c] = struct{}{}
		f.mu.Unlock()
		f.wg.Add(1)
		go func() {
			defer f.wg.Done()
			defer f.forget(c)
			f.splice(ctx, c)
		}()
	}
}

func (f *forwarder) forget(c net.Conn) {
	f.mu.Lock()
	delete(f.conns, c)
	f.mu.Unlock()
	c.Close()
}

func (f *forwarder) splice(ctx context.Context, c net.Conn) {
	d := net.Dialer{Timeout: targetDialTimeout}
	up, err := d.DialContext(ctx, "tcp", f.svc.Target)
	if err != nil {
		f.log.Warn("service target unreachable", "service", f.svc.Name, "target", f.svc.Target, "from", c.RemoteAddr().String(), "err", err)
		return
	}
	f.mu.Lock()
	f.conns[up] = struct{}{}
	f.mu.Unlock()
	defer f.forget(up)
	Splice(c, up)
}

// close stops accepting, closes every open connection and waits.
func (f *forwarder) close() {
	f.ln.Close()
	f.mu.Lock()
	for c := range f.conns {
		c.Close()
	}
	f.mu.Unlock()
	f.wg.Wait()
}

// Splice copies both ways between a and b until both directions end,
// passing half-closes on (so request/response protocols that close their
// write side still get their answer).
func Splice(a, b net.Conn) {
	done := make(chan struct{}, 2)
	cp := func(dst, src net.Conn) {
		io.Copy(dst, src)
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			cw.CloseWrite()
		} else {
			dst.Close()
		}
		done <- struct{}{}
	}
	go cp(a, b)
	go cp(b, a)
	<-done
	<-done
}

// overlayListenAddrs are the addresses a service listens on.
func overlayListenAddrs(v4, v6 netip.Addr, port uint16) []netip.AddrPort {
	return []netip.AddrPort{netip.AddrPortFrom(v4, port), netip.AddrPortFrom(v6, port)}
}
