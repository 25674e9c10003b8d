package cli

import (
	"fmt"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"time"
)

// pprofEnv names a loopback HOST:PORT on which any meshctl process serves
// Go's profiler (/debug/pprof/), for measuring the data plane and the
// coordinator under load: MESHCTL_PPROF=127.0.0.1:6060 meshctl up …
// It is a developer's tool, not a flag: profiles show memory contents'
// shapes and timings, so it refuses anything but a loopback address.
const pprofEnv = "MESHCTL_PPROF"

// startPprof serves the profiler if pprofEnv is set; a bad value is an
// error so that a typo does not silently profile nothing.
func startPprof() error {
	addr := os.Getenv(pprofEnv)
	if addr == "" {
		return nil
	}
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().IsLoopback() {
		return fmt.Errorf("%s=%q: want a loopback IP:PORT such as 127.0.0.1:6060", pprofEnv, addr)
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return fmt.Errorf("%s: %w", pprofEnv, err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	go (&http.Server{Handler: mux, ReadHeaderTimeout: 10 * time.Second}).Serve(ln)
	return nil
}
