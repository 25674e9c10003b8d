package sshtunnel

import (
	"crypto/ed25519"
	"crypto/rand"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"golang.org/x/crypto/ssh"

	"github.com/meshctl/meshctl/wire"
)

// fuzzServer is a Server with a session for node "pi1" (no connection:
// forwards are recorded, never bound) and node "pi2" known but offline.
func fuzzServer(tb testing.TB) (*Server, *session) {
	tb.Helper()
	_, hostKey, _ := ed25519.GenerateKey(rand.Reader)
	host, _ := ssh.NewSignerFromKey(hostKey)
	caPub, _, _ := ed25519.GenerateKey(rand.Reader)
	ca, _ := ssh.NewPublicKey(caPub)
	nodes := map[string][]wire.Service{
		"pi1": {{Name: "ssh", Port: 22}, {Name: "web", Port: 80}, {Name: "Bad", Port: 1}, {Name: "a--b", Port: 2}, {Name: "web", Port: 81}},
		"pi2": {{Name: "api", Port: 8080}},
	}
	s, err := New(Options{HostSigner: host, UserCA: ca, Logger: slog.New(slog.DiscardHandler),
		Lookup: func(node string) (NodeInfo, bool) {
			svcs, ok := nodes[node]
			return NodeInfo{Services: svcs}, ok
		}})
	if err != nil {
		tb.Fatal(err)
	}
	sess := &session{node: "pi1", done: make(chan struct{})}
	s.sessions["pi1"] = sess
	return s, sess
}

// FuzzForwardRequest sends tcpip-forward and cancel-tcpip-forward payloads
// (a fuzzed bind address and port, and raw bytes) on pi1's session.
// Invariants:
//   - a forward is accepted only when the payload is exactly one
//     well-formed message (it re-marshals to the same bytes), the port is
//     1-65535, and the bind address is "pi1" or "<service>--pi1" (any
//     case) for one of pi1's own valid services; it then publishes that
//     service, for pi1 only;
//   - another node's names, IP literals, "", "localhost" and "*" are
//     refused, and a refused request changes no forward;
//   - the same forward twice is refused the second time; cancelling it
//     succeeds once and restores the forwards as they were.
//
// Seeds: f.Add below and testdata/fuzz/FuzzForwardRequest.
func FuzzForwardRequest(f *testing.F) {
	for _, a := range []string{"pi1", "PI1", "web--pi1", "Ssh--Pi1", "api--pi2", "pi2", "bad--pi1", "a--b--pi1",
		"127.0.0.1", "::1", "[::1]", "", "localhost", "*", "web--pi1.example.com", "pi1:80", "fe80::1%eth0"} {
		f.Add(a, uint32(80), []byte(nil))
	}
	f.Add("pi1", uint32(0), []byte(nil))
	f.Add("pi1", uint32(65536), []byte(nil))
	f.Add("web--pi1", uint32(443), ssh.Marshal(forwardMsg{Addr: "web--pi1", Port: 443}))
	f.Add("", uint32(0), append(ssh.Marshal(forwardMsg{Addr: "web--pi1", Port: 443}), 0))
	f.Add("", uint32(0), []byte{0, 0, 0, 3, 'p', 'i', '1'})

	log := slog.New(slog.DiscardHandler)
	f.Fuzz(func(t *testing.T, addr string, port uint32, raw []byte) {
		s, sess := fuzzServer(t)
		for _, payload := range [][]byte{ssh.Marshal(forwardMsg{Addr: addr, Port: port}), raw} {
			before := s.Forwards()
			ok := s.addForward(sess, payload, log)
			after := s.Forwards()
			if !ok {
				if !slices.Equal(before, after) {
					t.Fatalf("refused forward %q changed the forwards: %v -> %v", payload, before, after)
				}
				continue
			}
			var m forwardMsg
			if err := ssh.Unmarshal(payload, &m); err != nil || string(ssh.Marshal(m)) != string(payload) {
				t.Fatalf("payload %q accepted; it is not one forward message (%v)", payload, err)
			}
			if m.Port == 0 || m.Port > 65535 {
				t.Fatalf("forward on port %d accepted", m.Port)
			}
			a := strings.ToLower(m.Addr)
			svc := "web" // pi1's default service
			if a != "pi1" {
				var rest string
				var found bool
				svc, rest, found = strings.Cut(a, "--")
				if !found || rest != "pi1" || (svc != "ssh" && svc != "web") {
					t.Fatalf("bind address %q accepted for pi1", m.Addr)
				}
			}
			want := slices.Clone(before)
			if !slices.Contains(want, Forward{Node: "pi1", Service: svc}) {
				want = append(want, Forward{Node: "pi1", Service: svc})
				slices.SortFunc(want, func(x, y Forward) int { return strings.Compare(x.Service, y.Service) })
			}
			if !slices.Equal(after, want) {
				t.Fatalf("forward %q: forwards %v, want %v", m.Addr, after, want)
			}
			if s.addForward(sess, payload, log) {
				t.Fatalf("forward %q accepted twice", m.Addr)
			}
			if !s.cancelForward(sess, payload, log) || !slices.Equal(s.Forwards(), before) {
				t.Fatalf("cancelling %q: forwards %v, want %v", m.Addr, s.Forwards(), before)
			}
			if s.cancelForward(sess, payload, log) {
				t.Fatalf("forward %q cancelled twice", m.Addr)
			}
		}
	})
}

// FuzzResolveBind checks the bind-address rule on its own for arbitrary
// node names and services: an accepted address, lower-cased, is the node's
// name (leading to its default service, or its first valid one) or
// "<service>--<node>" for one of its valid services; IP literals never
// resolve.
func FuzzResolveBind(f *testing.F) {
	f.Add("pi1", "web--pi1", "web", "ssh")
	f.Add("pi1", "PI1", "ssh", "web")
	f.Add("pi1", "pi1", "Bad", "x--y")
	f.Add("1.2.3.4", "1.2.3.4", "web", "")
	f.Add("a--b", "c--a--b", "c", "")
	f.Add("pi1", "api--pi2", "api", "")
	f.Fuzz(func(t *testing.T, node, addr, s1, s2 string) {
		svcs := []wire.Service{{Name: s1, Port: 1}, {Name: s2, Port: 2}}
		svc, ok := resolveBind(node, addr, svcs)
		if !ok {
			return
		}
		if !validName(svc) || !hasService(svcs, svc) {
			t.Fatalf("resolveBind(%q, %q) = %q, not one of the node's valid services %v", node, addr, svc, svcs)
		}
		a := strings.ToLower(addr)
		if a != node && a != svc+"--"+node {
			t.Fatalf("resolveBind(%q, %q) = %q", node, addr, svc)
		}
		if a == node {
			names := serviceNames(svcs)
			if want := names[0]; svc != want && svc != defaultService {
				t.Fatalf("resolveBind(%q, %q) = %q, want the default or first service %q", node, addr, svc, want)
			}
		}
		if _, err := netip.ParseAddr(a); err == nil || strings.ContainsAny(a, "[]:%") || a == "localhost" || a == "*" {
			t.Fatalf("bind address %q resolved", addr)
		}
	})
}
