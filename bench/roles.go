//go:build linux

package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/proxy"
)

// The bench re-executes its own binary in helper roles, so that each
// party is a process of its own whose CPU time and memory /proc shows.
// The role is named by the environment variable roleEnv; a role prints
// one JSON line on stdout when it is ready, and runs until SIGTERM (or
// until its work is done, for the bulk client).
const roleEnv = "MESHCTL_BENCH_ROLE"

const (
	roleBackend  = "backend"  // HTTP bodies and the bulk byte source
	roleRevProxy = "revproxy" // the tuned httputil.ReverseProxy baseline
	roleBulk     = "bulk"     // the bulk TCP client
)

// The HTTP bodies the backend serves, and the chunk the source repeats.
const (
	path1K    = "/1k"
	path1M    = "/1m"
	chunkSize = 64 << 10
)

// pattern returns n bytes of the fixed pattern every body and the byte
// source are made of: byte i is i mod 251 (a prime, so that chunk
// boundaries show up as errors if data were lost or reordered).
func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i % 251)
	}
	return b
}

// sourceByte is the byte at offset off of a source stream: the source
// repeats one chunk of pattern(chunkSize).
func sourceByte(off int64) byte { return byte(off % chunkSize % 251) }

// runRole runs the role named in the environment; it returns the exit code.
func runRole(role string, args []string) int {
	var err error
	switch role {
	case roleBackend:
		err = backendRole()
	case roleRevProxy:
		err = revProxyRole(args)
	case roleBulk:
		err = bulkRole(args)
	default:
		err = fmt.Errorf("unknown %s %q", roleEnv, role)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "bench %s: %v\n", role, err)
		return 1
	}
	return 0
}

// backendReady is what the backend announces.
type backendReady struct {
	HTTP   string `json:"http"`   // 127.0.0.1:PORT serving path1K and path1M
	Source string `json:"source"` // 127.0.0.1:PORT: the bulk byte source
}

// backendRole serves the HTTP bodies (Go net/http, as a typical small web
// app) and the byte source, which writes the pattern to every connection
// until the connection ends.
func backendRole() error {
	hl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	sl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	bodies := map[string][]byte{path1K: pattern(1 << 10), path1M: pattern(1 << 20)}
	srv := &http.Server{
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			body, ok := bodies[r.URL.Path]
			if !ok {
				http.NotFound(w, r)
				return
			}
			w.Header().Set("Content-Type", "application/octet-stream")
			w.Header().Set("Content-Length", strconv.Itoa(len(body)))
			w.Write(body)
		}),
		ReadHeaderTimeout: 10 * time.Second,
	}
	go srv.Serve(hl)
	go func() {
		chunk := pattern(chunkSize)
		for {
			c, err := sl.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				for {
					if _, err := c.Write(chunk); err != nil {
						return
					}
				}
			}()
		}
	}()
	return announceAndWait(backendReady{HTTP: hl.Addr().String(), Source: sl.Addr().String()})
}

// revProxyRole is a reverse proxy tuned as a Go service would be: the
// stdlib ReverseProxy with Rewrite, and a Transport keeping up to 256 idle
// connections to the backend (the default keeps 2, which would make the
// baseline measure connection set-up instead of proxying).
func revProxyRole(args []string) error {
	fs := flag.NewFlagSet(roleRevProxy, flag.ContinueOnError)
	backend := fs.String("backend", "", "backend HOST:PORT")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *backend == "" {
		return errors.New("-backend is required")
	}
	target := &url.URL{Scheme: "http", Host: *backend}
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(target)
			pr.SetXForwarded()
		},
		Transport: &http.Transport{
			MaxIdleConns:        1024,
			MaxIdleConnsPerHost: 256,
			IdleConnTimeout:     90 * time.Second,
		},
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	go (&http.Server{Handler: rp, ReadHeaderTimeout: 10 * time.Second}).Serve(l)
	return announceAndWait(map[string]string{"http": l.Addr().String()})
}

// announceAndWait prints v as the ready line and waits for SIGTERM.
func announceAndWait(v any) error {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	if err := json.NewEncoder(os.Stdout).Encode(v); err != nil {
		return err
	}
	<-sig
	return nil
}

// bulkResult is the bulk client's report.
type bulkResult struct {
	Bytes   int64   `json:"bytes"`
	Seconds float64 `json:"seconds"`
	cpu     float64 // the client process's CPU seconds, from its rusage
}

// bulkRole opens -streams connections to -addr (through the SOCKS5 server
// -socks if set), reads from all of them for -duration and prints the
// bytes received in that time. With -check it instead reads 1 MiB from one
// connection, verifies the source's pattern and prints nothing.
func bulkRole(args []string) error {
	fs := flag.NewFlagSet(roleBulk, flag.ContinueOnError)
	addr := fs.String("addr", "", "the source, HOST:PORT")
	socks := fs.String("socks", "", "SOCKS5 server to reach -addr through")
	streams := fs.Int("streams", 1, "parallel connections")
	d := fs.Duration("duration", 10*time.Second, "how long to read")
	check := fs.Bool("check", false, "verify 1 MiB of the pattern and exit")
	if err := fs.Parse(args); err != nil {
		return err
	}
	dial := (&net.Dialer{Timeout: 10 * time.Second}).Dial
	if *socks != "" {
		s, err := proxy.SOCKS5("tcp", *socks, nil, &net.Dialer{Timeout: 10 * time.Second})
		if err != nil {
			return err
		}
		dial = s.Dial
	}
	if *check {
		return checkSource(dial, *addr)
	}
	conns := make([]net.Conn, *streams)
	for i := range conns {
		c, err := dial("tcp", *addr)
		if err != nil {
			return err
		}
		defer c.Close()
		conns[i] = c
	}
	start := time.Now()
	end := start.Add(*d)
	var (
		mu    sync.Mutex
		total int64
		wg    sync.WaitGroup
		errs  []error
	)
	for _, c := range conns {
		wg.Go(func() {
			c.SetReadDeadline(end)
			buf := make([]byte, 256<<10)
			var n int64
			var err error
			for {
				var k int
				k, err = c.Read(buf)
				n += int64(k)
				if err != nil {
					break
				}
			}
			mu.Lock()
			defer mu.Unlock()
			total += n
			if !errors.Is(err, os.ErrDeadlineExceeded) {
				errs = append(errs, err)
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("a stream ended early: %w", err)
	}
	return json.NewEncoder(os.Stdout).Encode(bulkResult{Bytes: total, Seconds: time.Since(start).Seconds()})
}

// checkSource reads 1 MiB from the source at addr and verifies every byte.
func checkSource(dial func(network, addr string) (net.Conn, error), addr string) error {
	c, err := dial("tcp", addr)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(15 * time.Second))
	buf := make([]byte, 1<<20)
	if _, err := io.ReadFull(c, buf); err != nil {
		return fmt.Errorf("read 1 MiB from %s: %w", addr, err)
	}
	for i, b := range buf {
		if b != sourceByte(int64(i)) {
			return fmt.Errorf("byte %d from %s is %d, want %d", i, addr, b, sourceByte(int64(i)))
		}
	}
	return nil
}
