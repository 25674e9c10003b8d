package sshtunnel

import (
	"bufio"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
)

func TestNewRejectsMissingFields(t *testing.T) {
	signer, _ := newSigner(t)
	ok := Options{HostSigner: signer, UserCA: signer.PublicKey(), Lookup: func(string) (NodeInfo, bool) { return NodeInfo{}, false }}
	if _, err := New(ok); err != nil {
		t.Fatalf("New(complete options) = %v", err)
	}
	for name, mod := range map[string]func(*Options){
		"no HostSigner":  func(o *Options) { o.HostSigner = nil },
		"no UserCA":      func(o *Options) { o.UserCA = nil },
		"no Lookup":      func(o *Options) { o.Lookup = nil },
		"negative limit": func(o *Options) { o.MaxForwards = -1 },
	} {
		o := ok
		mod(&o)
		if _, err := New(o); err == nil {
			t.Errorf("%s: New succeeded", name)
		}
	}
	s, _ := New(ok)
	if s.o.PreAuthTimeout != 10*time.Second || s.o.MaxAuthTries != 3 || s.o.MaxConnsPerIP != 8 ||
		s.o.MaxForwards != 16 || s.o.MaxChannels != 256 || s.o.Now == nil || s.keepaliveInterval != 30*time.Second {
		t.Errorf("defaults not applied: %+v", s.o)
	}
}

func TestResolveBind(t *testing.T) {
	svcs := services("api", "web", "admin").Services
	for addr, want := range map[string]string{
		"pi1": "web", "PI1": "web", "api--pi1": "api", "Admin--Pi1": "admin", "web--pi1": "web",
		"pi2": "", "web--pi2": "", "nope--pi1": "", "--pi1": "", "api--": "", "api-pi1": "",
		"api--pi1--x": "", "pi1.example.com": "", "127.0.0.1": "", "::1": "", "[::1]": "",
		"": "", "localhost": "", "*": "", "0.0.0.0": "", "pi1 ": "", "api--pi1:80": "",
	} {
		got, ok := resolveBind("pi1", addr, svcs)
		if got != want || ok != (want != "") {
			t.Errorf("resolveBind(pi1, %q) = %q, %v; want %q", addr, got, ok, want)
		}
	}
	// Without "web" the default is the first valid service.
	if got, _ := resolveBind("pi3", "pi3", services("Bad", "api", "metrics").Services); got != "api" {
		t.Errorf("default of pi3 = %q, want api", got)
	}
	if _, ok := resolveBind("pi4", "pi4", nil); ok {
		t.Error("a node without services got a default forward")
	}
}

// TestStrictKEX checks the Terrapin countermeasure: the server's first
// KEXINIT advertises OpenSSH's strict key exchange.
func TestStrictKEX(t *testing.T) {
	e := newEnv(t, nil, nil)
	c, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "SSH-2.0-probe\r\n"); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(c)
	line, err := r.ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "SSH-2.0-") {
		t.Fatalf("banner %q, %v", line, err)
	}
	var hdr [5]byte
	if _, err := io.ReadFull(r, hdr[:]); err != nil {
		t.Fatal(err)
	}
	pkt := make([]byte, binary.BigEndian.Uint32(hdr[:4])-1)
	if _, err := io.ReadFull(r, pkt); err != nil {
		t.Fatal(err)
	}
	// payload: byte 20 (KEXINIT), 16-byte cookie, name-list kex_algorithms
	if pkt[0] != 20 || len(pkt) < 21 {
		t.Fatalf("first packet is not KEXINIT: type %d", pkt[0])
	}
	n := binary.BigEndian.Uint32(pkt[17:21])
	kex := strings.Split(string(pkt[21:21+n]), ",")
	if !slices.Contains(kex, "kex-strict-s-v00@openssh.com") {
		t.Fatalf("server KEXINIT kex algorithms %v lack kex-strict-s-v00@openssh.com", kex)
	}
}

// swappedSigner presents one key (a certificate of key A) but signs with
// another (key B).
type swappedSigner struct {
	pub    ssh.PublicKey
	signer ssh.Signer
}

func (s swappedSigner) PublicKey() ssh.PublicKey { return s.pub }
func (s swappedSigner) Sign(r io.Reader, data []byte) (*ssh.Signature, error) {
	return s.signer.Sign(r, data)
}

func TestAuthRefused(t *testing.T) {
	e := newEnv(t, nil, nil)
	now := time.Now()
	valid := func(ca ssh.Signer, principals ...string) ssh.Signer {
		s, _, _ := userCert(t, ca, now.Add(-time.Hour), now.Add(time.Hour), principals...)
		return s
	}
	_, certA, _ := userCert(t, e.userCA, now.Add(-time.Hour), now.Add(time.Hour), "pi1")
	keyB, _ := newSigner(t)
	otherCA, _ := newSigner(t)
	plain, _ := newSigner(t)
	expired, _, _ := userCert(t, e.userCA, now.Add(-time.Hour), now.Add(time.Minute), "pi1")
	noForwarding, _, _ := userCertExt(t, e.userCA, map[string]string{"permit-pty": ""}, now.Add(-time.Hour), now.Add(time.Hour), "pi1")
	e.setNode("gone", services("web"), false)

	// The control: a valid certificate authenticates.
	if _, err := e.dial("pi1", ssh.PublicKeys(valid(e.userCA, "pi1"))); err != nil {
		t.Fatalf("valid certificate refused: %v", err)
	}
	cases := []struct {
		name string
		user string
		auth ssh.AuthMethod
		skew time.Duration
	}{
		{"cert of key A signed with key B", "pi1", ssh.PublicKeys(swappedSigner{certA, keyB}), 0},
		{"expired certificate", "pi1", ssh.PublicKeys(expired), 2 * time.Minute},
		{"certificate from another CA", "pi1", ssh.PublicKeys(valid(otherCA, "pi1")), 0},
		{"plain key", "pi1", ssh.PublicKeys(plain), 0},
		{"certificate without port forwarding", "pi1", ssh.PublicKeys(noForwarding), 0},
		{"CA key itself", "pi1", ssh.PublicKeys(e.userCA), 0},
		{"principal mismatch", "pi1", ssh.PublicKeys(valid(e.userCA, "pi2")), 0},
		{"revoked node", "gone", ssh.PublicKeys(valid(e.userCA, "gone")), 0},
		{"unknown node", "ghost", ssh.PublicKeys(valid(e.userCA, "ghost")), 0},
		{"user name not a node name", "PI1", ssh.PublicKeys(valid(e.userCA, "PI1")), 0},
		{"password", "pi1", ssh.Password("secret"), 0},
		{"keyboard-interactive", "pi1", ssh.KeyboardInteractive(func(string, string, []string, []bool) ([]string, error) {
			return []string{"secret"}, nil
		}), 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			e.skew.Store(int64(tc.skew))
			defer e.skew.Store(0)
			// x/crypto answers a bad signature by closing the connection,
			// the other cases with "unable to authenticate".
			if _, err := e.dial(tc.user, tc.auth); err == nil {
				t.Fatal("authenticated")
			} else if !strings.Contains(err.Error(), "handshake failed") {
				t.Fatalf("err = %v, want a handshake failure", err)
			}
			e.wantForwards()
		})
	}
	// The expired certificate works while Now is inside its validity.
	if _, err := e.dial("pi1", ssh.PublicKeys(expired)); err != nil {
		t.Fatalf("certificate refused inside its validity: %v", err)
	}
}

func TestForwardRefused(t *testing.T) {
	e := newEnv(t, nil, nil)
	c := e.connect("pi1")
	for _, tc := range []struct {
		addr string
		port uint32
	}{
		{"pi2", 80}, {"web--pi2", 80}, {"127.0.0.1", 80}, {"::1", 80}, {"[::1]", 80},
		{"0.0.0.0", 80}, {"", 80}, {"localhost", 80}, {"*", 80}, {"nope--pi1", 80},
		{"pi1", 0}, {"api--pi1", 0}, {"pi1", 65536},
	} {
		if forwardReq(t, c, tc.addr, tc.port) {
			t.Errorf("tcpip-forward %q:%d accepted", tc.addr, tc.port)
		}
	}
	e.wantForwards()
	if e.changes.Load() != 0 {
		t.Errorf("OnChange called %d times", e.changes.Load())
	}
	// x/crypto's Listen gets the same answer.
	if _, err := c.Listen("tcp", "pi2:80"); err == nil {
		t.Error("Listen(pi2:80) succeeded")
	}
	// The control: the node's own name is accepted, and only once.
	if !forwardReq(t, c, "pi1", 80) {
		t.Fatal("tcpip-forward pi1:80 refused")
	}
	if forwardReq(t, c, "PI1", 80) {
		t.Error("duplicate forward accepted")
	}
	e.wantForwards(Forward{"pi1", "web"})
}

func TestMaxForwards(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.MaxForwards = 2 }, nil)
	c := e.connect("pi1")
	if !forwardReq(t, c, "pi1", 80) || !forwardReq(t, c, "api--pi1", 80) {
		t.Fatal("forward refused below the limit")
	}
	if forwardReq(t, c, "admin--pi1", 80) {
		t.Error("third forward accepted with MaxForwards 2")
	}
	e.wantForwards(Forward{"pi1", "api"}, Forward{"pi1", "web"})
}

func TestClientChannelsRefused(t *testing.T) {
	e := newEnv(t, nil, nil)
	c := e.connect("pi1")
	for _, typ := range []string{"session", "direct-tcpip", "x11", "auth-agent@openssh.com", "tun@openssh.com", "direct-streamlocal@openssh.com", "anything"} {
		ch, _, err := c.OpenChannel(typ, nil)
		var oe *ssh.OpenChannelError
		if !errors.As(err, &oe) || oe.Reason != ssh.Prohibited {
			t.Errorf("open %q: channel %v, err %v; want Prohibited", typ, ch, err)
		}
	}
	if conn, err := c.Dial("tcp", "127.0.0.1:22"); err == nil {
		conn.Close()
		t.Error("direct-tcpip to 127.0.0.1:22 opened")
	} else if oe := (*ssh.OpenChannelError)(nil); !errors.As(err, &oe) || oe.Reason != ssh.Prohibited {
		t.Errorf("direct-tcpip: %v, want Prohibited", err)
	}
	// No session, so neither exec nor a pty can ever be requested.
	if sess, err := c.NewSession(); err == nil {
		if err := sess.RequestPty("xterm", 24, 80, nil); err == nil {
			t.Error("pty granted")
		}
		if err := sess.Run("id"); err == nil {
			t.Error("exec succeeded")
		}
		t.Fatal("session channel opened")
	}
	e.wantForwards()
	if !isOpen(c) {
		t.Error("connection closed by refused channels")
	}
}

func TestGlobalRequests(t *testing.T) {
	e := newEnv(t, nil, nil)
	c := e.connect("pi1")
	if ok, _, err := c.SendRequest("keepalive@openssh.com", true, nil); err != nil || !ok {
		t.Errorf("keepalive@openssh.com = %v, %v; want true", ok, err)
	}
	for _, typ := range []string{"streamlocal-forward@openssh.com", "no-more-sessions@openssh.com", "hostkeys-prove-00@openssh.com", "x"} {
		if ok, _, err := c.SendRequest(typ, true, ssh.Marshal(forwardMsg{"pi1", 80})); err != nil || ok {
			t.Errorf("%s = %v, %v; want false", typ, ok, err)
		}
	}
	if ok, _, _ := c.SendRequest("cancel-tcpip-forward", true, ssh.Marshal(forwardMsg{"pi1", 80})); ok {
		t.Error("cancel of a forward that does not exist succeeded")
	}
	e.wantForwards()
}

func TestMaxConnsPerIP(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.MaxConnsPerIP = 2 }, nil)
	banner := func() (net.Conn, error) {
		c, err := net.Dial("tcp", e.addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(10 * time.Second))
		line, err := bufio.NewReader(c).ReadString('\n')
		if err == nil && !strings.HasPrefix(line, "SSH-2.0-") {
			t.Fatalf("banner %q", line)
		}
		return c, err
	}
	first, err := banner()
	if err != nil {
		t.Fatalf("first connection: %v", err)
	}
	if _, err := banner(); err != nil {
		t.Fatalf("second connection: %v", err)
	}
	if _, err := banner(); !errors.Is(err, io.EOF) {
		t.Fatalf("third connection: %v, want it closed (EOF)", err)
	}
	if _, err := e.dial("pi1", ssh.PublicKeys(e.nodeSigner("pi1"))); err == nil {
		t.Fatal("authenticated over the limit")
	}
	e.wantForwards()
	// A slot frees up when a connection ends.
	first.Close()
	waitAccepted(t, "no slot after a connection closed", func() (*ssh.Client, error) {
		return e.dial("pi1", ssh.PublicKeys(e.nodeSigner("pi1")))
	})
}

func TestPreAuthTimeout(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.PreAuthTimeout = 200 * time.Millisecond }, nil)
	c, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	start := time.Now()
	c.SetDeadline(start.Add(10 * time.Second))
	_, err = io.Copy(io.Discard, c) // banner, KEXINIT, then EOF when closed
	if err != nil {
		t.Fatalf("idle connection not closed by the server: %v", err)
	}
	if d := time.Since(start); d < 150*time.Millisecond {
		t.Fatalf("closed after %v, before the timeout", d)
	}
	// An authenticated connection outlives the timeout: its handshake
	// stopped the timer, and the session answers after it would have fired.
	cl := e.connect("pi1")
	timer := time.NewTimer(300 * time.Millisecond)
	<-timer.C
	if !isOpen(cl) {
		t.Fatal("authenticated connection closed by the pre-auth timeout")
	}
}

func TestMaxAuthTries(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.MaxAuthTries = 2 }, nil)
	// x/crypto lets the first MaxAuthTries refused key offers go free;
	// every further refusal counts.
	var keys []ssh.Signer
	for range 4 {
		k, _ := newSigner(t)
		keys = append(keys, k)
	}
	cb := ssh.PublicKeysCallback(func() ([]ssh.Signer, error) { return append(keys, e.nodeSigner("pi1")), nil })
	if _, err := e.dial("pi1", cb); err == nil {
		t.Fatal("authenticated after more failed tries than MaxAuthTries")
	}
	// With fewer bad keys first the valid certificate gets through.
	cb = ssh.PublicKeysCallback(func() ([]ssh.Signer, error) { return []ssh.Signer{keys[0], e.nodeSigner("pi1")}, nil })
	if _, err := e.dial("pi1", cb); err != nil {
		t.Fatalf("valid certificate after one bad key: %v", err)
	}
}

func TestKeepaliveClosesSilentPeer(t *testing.T) {
	e := newEnv(t, nil, func(s *Server) { s.keepaliveInterval = 20 * time.Millisecond })
	alive := e.connect("pi1") // ssh.Client answers keepalives
	raw, err := net.Dial("tcp", e.addr)
	if err != nil {
		t.Fatal(err)
	}
	conn, _, _, err := ssh.NewClientConn(raw, e.addr, e.clientConfig("pi2", ssh.PublicKeys(e.nodeSigner("pi2"))))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// Nobody reads conn's global requests, so keepalives go unanswered.
	waitClosed(t, conn, "silent peer")
	if !isOpen(alive) {
		t.Fatal("answering peer was closed")
	}
}
