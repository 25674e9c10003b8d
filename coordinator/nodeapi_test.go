package coordinator_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"math/big"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator"
	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
)

func ctx(t *testing.T) context.Context {
	c, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	t.Cleanup(cancel)
	return c
}

func peerNames(nm *wire.Netmap) map[string]bool {
	m := map[string]bool{}
	for _, p := range nm.Peers {
		m[p.Name] = true
	}
	return m
}

func TestNetmapListsPeersNotSelf(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	a, b := c.AddNode(t, "a"), c.AddNode(t, "b")
	nm, err := a.Client.Netmap(ctx(t), 0)
	if err != nil {
		t.Fatal(err)
	}
	if nm.Self.Name != "a" || len(nm.Peers) != 1 || nm.Peers[0].Name != "b" {
		t.Fatalf("netmap of a: self %s peers %+v", nm.Self.Name, nm.Peers)
	}
	p := nm.Peers[0]
	if p.WireGuardKey != b.State.WireGuardKey().PublicKey().String() || p.IPv4 != b.State.IPv4 || p.IPv6 != b.State.IPv6 {
		t.Fatalf("peer b in a's netmap %+v does not match b's identity", p)
	}
}

// A long-poll wakes promptly when another node changes something.
func TestLongPollWakesOnChange(t *testing.T) {
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) { o.LongPoll = 30 * time.Second })
	a, b := c.AddNode(t, "a"), c.AddNode(t, "b")
	nm, err := a.Client.Netmap(ctx(t), 0)
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		nm  *wire.Netmap
		err error
		at  time.Time
	}
	done := make(chan result, 1)
	go func() {
		n, err := a.Client.Netmap(ctx(t), nm.Version)
		done <- result{n, err, time.Now()}
	}()
	// Wait until a's poll is parked at the coordinator (a is online).
	meshtest.WaitFor(t, 5*time.Second, func() bool {
		for _, n := range c.Nodes(t) {
			if n.Name == "a" && n.Online {
				return true
			}
		}
		return false
	}, "a's long-poll to be open")
	select {
	case r := <-done:
		t.Fatalf("long-poll returned before any change: %+v %v", r.nm, r.err)
	default:
	}
	changed := time.Now()
	svcs := []wire.Service{{Name: "web", Port: 80, Public: true}}
	if err := b.Client.Update(ctx(t), wire.UpdateRequest{Services: &svcs}); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-done:
		if r.err != nil {
			t.Fatal(r.err)
		}
		if r.nm.Version == nm.Version || len(r.nm.Peers) != 1 || len(r.nm.Peers[0].Services) != 1 || r.nm.Peers[0].Services[0].Name != "web" {
			t.Fatalf("woken netmap does not carry b's service: %+v", r.nm)
		}
		t.Logf("long-poll woke %s after the change", r.at.Sub(changed))
	case <-time.After(5 * time.Second): // the property is < 1 s; the deadline is generous for -race on 2 cores
		t.Fatal("long-poll did not wake within 5 s of a change")
	}
}

func TestLongPollTimesOutNotModified(t *testing.T) {
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) { o.LongPoll = 200 * time.Millisecond })
	a := c.AddNode(t, "a")
	nm, err := a.Client.Netmap(ctx(t), 0)
	if err != nil {
		t.Fatal(err)
	}
	again, err := a.Client.Netmap(ctx(t), nm.Version)
	if err != nil || again != nil {
		t.Fatalf("unchanged netmap after the wait: want (nil, nil), got (%v, %v)", again, err)
	}
}

// Revocation: the node's certificate is refused and it leaves every other
// node's netmap, waking their long-polls.
func TestRevokedNodeRefusedAndRemoved(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	a, b, v := c.AddNode(t, "a"), c.AddNode(t, "b"), c.AddNode(t, "victim")
	nmA, _ := a.Client.Netmap(ctx(t), 0)
	woke := make(chan *wire.Netmap, 1)
	go func() {
		n, _ := a.Client.Netmap(ctx(t), nmA.Version)
		woke <- n
	}()
	var revoked wire.Node
	if err := c.Admin(http.MethodPost, wire.PathAdminNodeRevoke, wire.NameRequest{Name: "victim"}, &revoked); err != nil {
		t.Fatal(err)
	}
	if !revoked.Revoked || revoked.RevokedAt == nil {
		t.Fatalf("revoke answer %+v", revoked)
	}
	_, err := v.Client.Netmap(ctx(t), 0)
	if !errors.Is(err, node.ErrRevoked) {
		t.Fatalf("revoked node's netmap call: want ErrRevoked, got %v", err)
	}
	var ae *wire.APIError
	if !errors.As(err, &ae) || ae.Status != http.StatusForbidden {
		t.Fatalf("want 403, got %v", err)
	}
	svcs := []wire.Service{}
	if err := v.Client.Update(ctx(t), wire.UpdateRequest{Services: &svcs}); !errors.Is(err, node.ErrRevoked) {
		t.Fatalf("revoked node's update: %v", err)
	}
	select {
	case n := <-woke:
		if n == nil || peerNames(n)["victim"] || !peerNames(n)["b"] {
			t.Fatalf("a's netmap after revoke: %+v", n)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a's long-poll did not wake on revocation")
	}
	nmB, err := b.Client.Netmap(ctx(t), 0)
	if err != nil || peerNames(nmB)["victim"] {
		t.Fatalf("b still sees the revoked node: %v %+v", err, nmB)
	}
	// Revoking again is a clear 404; the name is free again.
	if err := c.Admin(http.MethodPost, wire.PathAdminNodeRevoke, wire.NameRequest{Name: "victim"}, nil); !wire.IsCode(err, wire.CodeNotFound) {
		t.Fatalf("second revoke: %v", err)
	}
	v2 := c.AddNode(t, "victim")
	if v2.State.IPv4 == v.State.IPv4 {
		t.Fatalf("revoked node's address %s reused inside the quarantine", v.State.IPv4)
	}
}

func TestCertificateExpiryAndRenewal(t *testing.T) {
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) { o.CertValidity = 3 * time.Hour })
	a := c.AddNode(t, "a")
	now := c.Clock.Now()
	if renewed, err := a.Client.RenewIfDue(ctx(t), now, false); err != nil || renewed {
		t.Fatalf("fresh certificate renewed: %v %v", renewed, err)
	}
	c.Clock.Advance(2*time.Hour + 10*time.Minute) // less than a third of the lifetime left
	if renewed, err := a.Client.RenewIfDue(ctx(t), c.Clock.Now(), false); err != nil || !renewed {
		t.Fatalf("due certificate not renewed: %v %v", renewed, err)
	}
	reloaded, err := node.LoadState(a.Dir)
	if err != nil {
		t.Fatal(err)
	}
	if !reloaded.ClientCert().Leaf.NotAfter.After(a.State.ClientCert().Leaf.NotAfter) {
		t.Fatal("renewed certificate not saved to the state dir")
	}
	c.Clock.Advance(2 * time.Hour) // past the old certificate's end, inside the new one's
	if _, err := a.Client.Netmap(ctx(t), 0); err != nil {
		t.Fatalf("renewed certificate refused: %v", err)
	}
	c.Clock.Advance(4 * time.Hour)
	_, err = a.Client.Netmap(ctx(t), 0)
	var ae *wire.APIError
	if !errors.As(err, &ae) || ae.Status != http.StatusForbidden || ae.Code != wire.CodeCertExpired || !strings.Contains(ae.Message, "expired") {
		t.Fatalf("expired certificate: want 403 cert_expired, got %v", err)
	}
	// Within the renewal grace, the expired certificate can still renew.
	if renewed, err := a.Client.RenewIfDue(ctx(t), c.Clock.Now(), false); err != nil || !renewed {
		t.Fatalf("renewal within the grace: %v %v", renewed, err)
	}
	if _, err := a.Client.Netmap(ctx(t), 0); err != nil {
		t.Fatalf("certificate renewed within the grace refused: %v", err)
	}
	// Beyond the grace, only a new enrollment helps.
	c.Clock.Advance(3*time.Hour + coordinator.DefaultRenewGrace + time.Hour)
	_, err = a.Client.RenewIfDue(ctx(t), c.Clock.Now(), false)
	if !wire.IsCode(err, wire.CodeCertExpired) || !strings.Contains(err.Error(), "re-enroll") {
		t.Fatalf("renewal beyond the grace: want cert_expired saying re-enroll, got %v", err)
	}
}

func TestRevokedNodeCannotRenew(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	a := c.AddNode(t, "a")
	if err := c.Admin(http.MethodPost, wire.PathAdminNodeRevoke, wire.NameRequest{Name: "a"}, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Client.RenewIfDue(ctx(t), c.Clock.Now(), true); !errors.Is(err, node.ErrRevoked) {
		t.Fatalf("revoked node renewing: %v", err)
	}
}

// Node endpoints need a certificate from this coordinator's CA.
func TestNodeAPINeedsOwnCertificate(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	other := meshtest.NewCoordinator(t)
	stranger := other.AddNode(t, "stranger")
	pin, _ := pki.ParsePin(c.CAPin())
	get := func(cert *tls.Certificate) int {
		conf := pki.PinnedTLSConfig(pin)
		if cert != nil {
			conf.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
		}
		hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: conf}}
		defer hc.CloseIdleConnections()
		resp, err := hc.Get(c.URL() + wire.PathNetmap)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	if code := get(nil); code != http.StatusUnauthorized {
		t.Errorf("no client certificate: %d, want 401", code)
	}
	sc := stranger.State.ClientCert()
	if code := get(&sc); code != http.StatusForbidden {
		t.Errorf("certificate from another coordinator: %d, want 403", code)
	}
}

func TestUpdateValidates(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	a := c.AddNode(t, "a")
	bad := [][]wire.Service{
		{{Name: "Web", Port: 80}},
		{{Name: "web", Port: 0}},
		{{Name: "web", Port: 80}, {Name: "web", Port: 81}},
		{{Name: "a--b", Port: 80}},
	}
	for _, svcs := range bad {
		if err := a.Client.Update(ctx(t), wire.UpdateRequest{Services: &svcs}); !wire.IsCode(err, wire.CodeBadRequest) {
			t.Errorf("services %+v: want 400, got %v", svcs, err)
		}
	}
	for _, eps := range [][]string{{"nonsense"}, {"0.0.0.0:51820"}, {"192.0.2.1:0"}} {
		if err := a.Client.Update(ctx(t), wire.UpdateRequest{Endpoints: &eps}); !wire.IsCode(err, wire.CodeBadRequest) {
			t.Errorf("endpoints %v: want 400, got %v", eps, err)
		}
	}
	eps := []string{"192.0.2.1:51820", "[2001:db8::1]:51820"}
	if err := a.Client.Update(ctx(t), wire.UpdateRequest{Endpoints: &eps}); err != nil {
		t.Fatal(err)
	}
	nodes := c.Nodes(t)
	if len(nodes) != 1 || len(nodes[0].Endpoints) != 2 || len(nodes[0].Services) != 0 {
		t.Fatalf("after updates: %+v", nodes)
	}
}

func TestAdminSocketIsPrivate(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	for path, want := range map[string]os.FileMode{c.Dir: 0o700, c.AdminSocket(): 0o600} {
		st, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != want {
			t.Errorf("%s mode %04o, want %04o", path, st.Mode().Perm(), want)
		}
	}
	for _, f := range []string{pki.CAKeyFile, pki.ServerKeyFile, pki.SSHCAKeyFile, "meshctl.db"} {
		st, err := os.Stat(filepath.Join(c.Dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if st.Mode().Perm() != 0o600 {
			t.Errorf("%s mode %04o, want 0600", f, st.Mode().Perm())
		}
	}
}

func TestRemoteAdminKey(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	var k wire.AdminKeyCreateResponse
	if err := c.Admin(http.MethodPost, wire.PathAdminKeys, wire.AdminKeyCreateRequest{TTL: wire.Duration(time.Hour)}, &k); err != nil {
		t.Fatal(err)
	}
	pin, _ := pki.ParsePin(c.CAPin())
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: pki.PinnedTLSConfig(pin)}}
	list := func(key string) error {
		var nodes []wire.Node
		return wire.Call(ctx(t), hc, http.MethodGet, c.URL()+wire.PathAdminNodes, http.Header{"Authorization": {"Bearer " + key}}, nil, &nodes)
	}
	if err := list(k.Key); err != nil {
		t.Fatalf("valid admin key refused: %v", err)
	}
	if err := list("meshctl-admin-" + k.ID + "-" + "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"); !wire.IsCode(err, wire.CodeUnauthorized) {
		t.Fatalf("wrong secret: %v", err)
	}
	c.Clock.Advance(2 * time.Hour)
	if err := list(k.Key); !wire.IsCode(err, wire.CodeUnauthorized) {
		t.Fatalf("expired admin key: %v", err)
	}
	var es []wire.AuditEntry
	if err := c.Admin(http.MethodGet, wire.PathAdminAudit+"?limit=0", nil, &es); err != nil {
		t.Fatal(err)
	}
	if len(es) == 0 || es[len(es)-1].Action != "adminkey.create" {
		t.Fatalf("audit log lacks the key creation: %+v", es)
	}
}

// Client certificates that are not a node's own are refused, and the
// certificate a node gets is client-auth only and lives at most 24 h.
func TestNodeAPIRefusesForeignCertificates(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	a := c.AddNode(t, "a")
	leaf := a.State.ClientCert().Leaf
	if leaf == nil {
		var err error
		if leaf, err = x509.ParseCertificate(a.State.ClientCert().Certificate[0]); err != nil {
			t.Fatal(err)
		}
	}
	// The default leaf: ≤ 24 h from issuance, client auth only.
	if life := leaf.NotAfter.Sub(c.Clock.Now()); life > 24*time.Hour {
		t.Errorf("default node certificate valid for %s more, want ≤ 24h", life)
	}
	if len(leaf.ExtKeyUsage) != 1 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageClientAuth || leaf.IsCA {
		t.Errorf("node certificate EKU %v IsCA %v, want client auth only", leaf.ExtKeyUsage, leaf.IsCA)
	}
	nodeID := leaf.Subject.CommonName
	if nodeID != a.Enroll.Node.ID {
		t.Fatalf("certificate CN %q, node id %q", nodeID, a.Enroll.Node.ID)
	}

	pin, _ := pki.ParsePin(c.CAPin())
	get := func(cert tls.Certificate) (int, wire.Error) {
		conf := pki.PinnedTLSConfig(pin)
		conf.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &cert, nil }
		hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: conf}}
		defer hc.CloseIdleConnections()
		resp, err := hc.Get(c.URL() + wire.PathNetmap)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var e wire.Error
		json.NewDecoder(resp.Body).Decode(&e)
		return resp.StatusCode, e
	}
	// The node's own certificate works: the refusals below are the certificates'.
	if code, e := get(a.State.ClientCert()); code != http.StatusOK {
		t.Fatalf("node's own certificate: %d %+v", code, e)
	}
	ca := c.CA()
	sign := func(cn string, eku x509.ExtKeyUsage, parent *x509.Certificate, parentKey crypto.Signer) tls.Certificate {
		key, err := pki.GenerateKey()
		if err != nil {
			t.Fatal(err)
		}
		now := c.Clock.Now()
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(now.UnixNano()),
			Subject:      pkix.Name{CommonName: cn},
			NotBefore:    now.Add(-time.Minute),
			NotAfter:     now.Add(time.Hour),
			KeyUsage:     x509.KeyUsageDigitalSignature,
			ExtKeyUsage:  []x509.ExtKeyUsage{eku},
		}
		if parent == nil { // self-signed
			parent, parentKey = tmpl, key
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
		if err != nil {
			t.Fatal(err)
		}
		return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	}
	csrKey, _ := pki.GenerateKey()
	csr, err := pki.NewCSR(csrKey, "ghost")
	if err != nil {
		t.Fatal(err)
	}
	ghost, err := ca.SignClientCSR(csr, "0123456789ab", c.Clock.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cases := []struct {
		what string
		cert tls.Certificate
	}{
		{"our CA, client auth, a CN that is no node", tls.Certificate{Certificate: [][]byte{ghost.Raw}, PrivateKey: csrKey}},
		{"our CA, server auth only, a real node's CN", sign(nodeID, x509.ExtKeyUsageServerAuth, ca.Cert, ca.Key)},
		{"self-signed, client auth, a real node's CN", sign(nodeID, x509.ExtKeyUsageClientAuth, nil, nil)},
	}
	for _, tc := range cases {
		if code, e := get(tc.cert); code != http.StatusForbidden || e.Code != wire.CodeForbidden {
			t.Errorf("%s: %d %+v, want 403 %s", tc.what, code, e, wire.CodeForbidden)
		}
	}
}
