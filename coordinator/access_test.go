package coordinator_test

import (
	"crypto/tls"
	"encoding/json"
	"errors"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator"
	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/node"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
)

// Paths of the access API (not yet in wire.go).

// addProxy enrolls a member with role proxy, as a proxy does, and returns
// its control client.
func addProxy(t *testing.T, c *meshtest.Coordinator, name string) *node.Client {
	t.Helper()
	tok := c.CreateToken(t, wire.TokenCreateRequest{Role: wire.RoleProxy})
	dir := filepath.Join(t.TempDir(), name)
	if _, _, err := node.Enroll(ctx(t), node.EnrollOptions{
		Coordinator: c.URL(), Token: tok.Token, CAPin: c.CAPin(), Name: name, StateDir: dir, Role: wire.RoleProxy,
	}); err != nil {
		t.Fatalf("enroll proxy: %v", err)
	}
	cl, err := node.NewClient(dir)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return cl
}

func createAccessKey(t *testing.T, c *meshtest.Coordinator, req wire.AccessKeyCreateRequest) wire.AccessKeyCreateResponse {
	t.Helper()
	var resp wire.AccessKeyCreateResponse
	if err := c.Admin(http.MethodPost, wire.PathAdminAccessKeys, req, &resp); err != nil {
		t.Fatalf("create access key %+v: %v", req, err)
	}
	return resp
}

func listAccessKeys(t *testing.T, c *meshtest.Coordinator) []wire.AccessKey {
	t.Helper()
	var l []wire.AccessKey
	if err := c.Admin(http.MethodGet, wire.PathAdminAccessKeys, nil, &l); err != nil {
		t.Fatalf("list access keys: %v", err)
	}
	return l
}

func revokeAccessKey(t *testing.T, c *meshtest.Coordinator, id string) {
	t.Helper()
	if err := c.Admin(http.MethodPost, wire.PathAdminAccessKeyRevoke, wire.IDRequest{ID: id}, nil); err != nil {
		t.Fatalf("revoke access key %s: %v", id, err)
	}
}

func auditActions(t *testing.T, c *meshtest.Coordinator) []wire.AuditEntry {
	t.Helper()
	var es []wire.AuditEntry
	if err := c.Admin(http.MethodGet, wire.PathAdminAudit+"?limit=0", nil, &es); err != nil {
		t.Fatal(err)
	}
	return es
}

func hasAudit(es []wire.AuditEntry, action, target, detail string) bool {
	for _, e := range es {
		if e.Action == action && e.Target == target && strings.Contains(e.Detail, detail) {
			return true
		}
	}
	return false
}

func TestAccessKeyCreateListRevoke(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	c.AddNode(t, "pi")
	now := c.Clock.Now()

	all := createAccessKey(t, c, wire.AccessKeyCreateRequest{})
	if !strings.HasPrefix(all.Key, "meshctl-access-"+all.ID+"-") || all.Node != "" || all.Service != "" {
		t.Errorf("create answer %+v", all)
	}
	if want := now.Add(coordinator.DefaultAccessKeyTTL); !all.Expires.Equal(want) {
		t.Errorf("default expiry %v, want %v (24h)", all.Expires, want)
	}
	scoped := createAccessKey(t, c, wire.AccessKeyCreateRequest{Node: "pi", Service: "web", TTL: wire.Duration(2 * time.Hour)})
	if scoped.Node != "pi" || scoped.Service != "web" || !scoped.Expires.Equal(now.Add(2*time.Hour)) {
		t.Errorf("scoped create answer %+v", scoped)
	}
	svcOnly := createAccessKey(t, c, wire.AccessKeyCreateRequest{Service: "grafana", TTL: wire.Duration(365 * 24 * time.Hour)})

	for _, bad := range []struct {
		req  wire.AccessKeyCreateRequest
		code string
		want string
	}{
		{wire.AccessKeyCreateRequest{Node: "nosuch"}, wire.CodeNotFound, `no active node "nosuch"`},
		{wire.AccessKeyCreateRequest{Node: "Pi"}, wire.CodeBadRequest, "upper-case"},
		{wire.AccessKeyCreateRequest{Service: "a b"}, wire.CodeBadRequest, "service name"},
		{wire.AccessKeyCreateRequest{TTL: wire.Duration(-time.Hour)}, wire.CodeBadRequest, "ttl"},
		{wire.AccessKeyCreateRequest{TTL: wire.Duration(366 * 24 * time.Hour)}, wire.CodeBadRequest, "365 days"},
	} {
		err := c.Admin(http.MethodPost, wire.PathAdminAccessKeys, bad.req, nil)
		var ae *wire.APIError
		if !errors.As(err, &ae) || ae.Code != bad.code || !strings.Contains(ae.Message, bad.want) {
			t.Errorf("create %+v: %v; want code %s and %q", bad.req, err, bad.code, bad.want)
		}
	}

	l := listAccessKeys(t, c)
	if len(l) != 3 || l[0].ID != all.ID || l[1].ID != scoped.ID || l[2].ID != svcOnly.ID {
		t.Fatalf("list = %+v, want the three keys in creation order", l)
	}
	if l[1].Node != "pi" || l[1].Service != "web" || l[1].Revoked || l[1].CreatedBy == "" || !l[1].Expires.Equal(scoped.Expires) {
		t.Errorf("listed scoped key %+v", l[1])
	}
	b, _ := json.Marshal(l)
	if strings.Contains(string(b), "meshctl-access-") {
		t.Errorf("the list shows secrets: %s", b)
	}

	revokeAccessKey(t, c, scoped.ID)
	revokeAccessKey(t, c, scoped.ID) // again: fine
	if l := listAccessKeys(t, c); !l[1].Revoked || l[0].Revoked || l[2].Revoked {
		t.Errorf("after revoke: %+v", l)
	}
	err := c.Admin(http.MethodPost, wire.PathAdminAccessKeyRevoke, wire.IDRequest{ID: "0123456789ab"}, nil)
	if !wire.IsCode(err, wire.CodeNotFound) || !strings.Contains(err.Error(), "meshctl access-key list") {
		t.Errorf("revoke of an unknown key: %v, want a 404 that points to the list", err)
	}

	es := auditActions(t, c)
	for _, want := range []struct{ action, target, detail string }{
		{"accesskey.create", all.ID, "node=* service=*"},
		{"accesskey.create", scoped.ID, "service=web"},
		{"accesskey.revoke", scoped.ID, ""},
	} {
		if !hasAudit(es, want.action, want.target, want.detail) {
			t.Errorf("no audit row %+v in %+v", want, es)
		}
	}
	n := 0
	for _, e := range es {
		if e.Action == "accesskey.revoke" {
			n++
		}
	}
	if n != 1 {
		t.Errorf("%d accesskey.revoke rows, want 1", n)
	}
}

// The access admin API is reachable with an admin key, like the rest.
func TestAccessAdminWithAdminKey(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	var k wire.AdminKeyCreateResponse
	if err := c.Admin(http.MethodPost, wire.PathAdminKeys, wire.AdminKeyCreateRequest{}, &k); err != nil {
		t.Fatal(err)
	}
	pin, _ := pki.ParsePin(c.CAPin())
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: pki.PinnedTLSConfig(pin)}}
	defer hc.CloseIdleConnections()
	auth := http.Header{"Authorization": {"Bearer " + k.Key}}
	var created wire.AccessKeyCreateResponse
	if err := wire.Call(ctx(t), hc, http.MethodPost, c.URL()+wire.PathAdminAccessKeys, auth, wire.AccessKeyCreateRequest{}, &created); err != nil {
		t.Fatalf("create with an admin key: %v", err)
	}
	var l []wire.AccessKey
	if err := wire.Call(ctx(t), hc, http.MethodGet, c.URL()+wire.PathAdminAccessKeys, auth, nil, &l); err != nil || len(l) != 1 || l[0].CreatedBy != "admin-key:"+k.ID {
		t.Fatalf("list with an admin key: %+v, %v", l, err)
	}
	if err := wire.Call(ctx(t), hc, http.MethodGet, c.URL()+wire.PathAdminAccessKeys, nil, nil, &l); !wire.IsCode(err, wire.CodeUnauthorized) {
		t.Fatalf("list without a key: %v, want 401", err)
	}
}

func TestAccessCheck(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	pi := c.AddNode(t, "pi")
	c.AddNode(t, "other")
	px := addProxy(t, c, "proxy")

	all := createAccessKey(t, c, wire.AccessKeyCreateRequest{})
	piWeb := createAccessKey(t, c, wire.AccessKeyCreateRequest{Node: "pi", Service: "web"})
	piAny := createAccessKey(t, c, wire.AccessKeyCreateRequest{Node: "pi"})
	webAny := createAccessKey(t, c, wire.AccessKeyCreateRequest{Service: "web"})
	short := createAccessKey(t, c, wire.AccessKeyCreateRequest{TTL: wire.Duration(time.Hour)})
	revoked := createAccessKey(t, c, wire.AccessKeyCreateRequest{})
	revokeAccessKey(t, c, revoked.ID)

	check := func(key, node, svc string) (wire.AccessCheckResponse, error) {
		return px.CheckAccessKey(ctx(t), wire.AccessCheckRequest{Key: key, Node: node, Service: svc})
	}
	for _, ok := range []struct {
		key       wire.AccessKeyCreateResponse
		node, svc string
	}{
		{all, "pi", "web"}, {all, "other", "db"},
		{piWeb, "pi", "web"},
		{piAny, "pi", "db"}, {piAny, pi.State.NodeID, "web"}, // by id too
		{webAny, "other", "web"},
		{short, "pi", "web"},
	} {
		got, err := check(ok.key.Key, ok.node, ok.svc)
		if err != nil || got.ID != ok.key.ID || !got.Expires.Equal(ok.key.Expires) {
			t.Errorf("check %s on %s/%s = %+v, %v; want id %s expires %v", ok.key.ID, ok.node, ok.svc, got, err, ok.key.ID, ok.key.Expires)
		}
	}
	// Surrounding white space (a pasted key) is fine.
	if _, err := check(" "+all.Key+"\n", "pi", "web"); err != nil {
		t.Errorf("pasted key with white space: %v", err)
	}

	// Every refusal looks the same.
	unknown, _, _, _ := pki.NewSecret(pki.KindAccess)
	other, _, _, _ := pki.NewSecret(pki.KindAccess)
	wrongSecret := "meshctl-access-" + all.ID + "-" + other[strings.LastIndex(other, "-")+1:]
	admin, _, _, _ := pki.NewSecret(pki.KindAdmin)
	refusals := []struct {
		what, key, node, svc string
	}{
		{"wrong secret", wrongSecret, "pi", "web"},
		{"unknown id", unknown, "pi", "web"},
		{"malformed", "hello", "pi", "web"},
		{"empty", "", "pi", "web"},
		{"another kind of secret", admin, "pi", "web"},
		{"revoked", revoked.Key, "pi", "web"},
		{"other node", piWeb.Key, "other", "web"},
		{"other service", piWeb.Key, "pi", "db"},
		{"node-scoped key, other node", piAny.Key, "other", "web"},
		{"node-scoped key, no node", piAny.Key, "", "web"},
		{"node-scoped key, unknown node", piAny.Key, "nosuch", "web"},
		{"service-scoped key, other service", webAny.Key, "pi", "ssh"},
	}
	c.Clock.Advance(2 * time.Hour)
	refusals = append(refusals, struct{ what, key, node, svc string }{"expired", short.Key, "pi", "web"})
	for _, r := range refusals {
		_, err := check(r.key, r.node, r.svc)
		var ae *wire.APIError
		if !errors.As(err, &ae) || ae.Status != http.StatusUnauthorized || ae.Code != wire.CodeUnauthorized || ae.Message != "access key refused" {
			t.Errorf("%s: %v; want the one 401 \"access key refused\"", r.what, err)
		}
	}
	// Many refusals in a row are not rate-limited (the proxy limits browsers).
	for range 20 {
		if _, err := check(unknown, "pi", "web"); !wire.IsCode(err, wire.CodeUnauthorized) {
			t.Fatalf("repeated refusal: %v, want 401 (not 429)", err)
		}
	}
	if _, err := check(all.Key, "pi", "web"); err != nil {
		t.Errorf("good key after many refusals: %v", err)
	}
}

func TestAccessCheckOnlyForProxies(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	a := c.AddNode(t, "a")
	k := createAccessKey(t, c, wire.AccessKeyCreateRequest{})
	_, err := a.Client.CheckAccessKey(ctx(t), wire.AccessCheckRequest{Key: k.Key, Node: "a", Service: "web"})
	var ae *wire.APIError
	if !errors.As(err, &ae) || ae.Status != http.StatusForbidden || ae.Message != "only proxies may check access keys" {
		t.Fatalf("node checking a key: %v, want 403", err)
	}
	// Without a client certificate at all.
	code, _, _ := post(t, c, wire.PathAccessCheck, "application/json", []byte(`{"key":"`+k.Key+`"}`))
	if code != http.StatusUnauthorized {
		t.Fatalf("check without a certificate: %d, want 401", code)
	}
}

// A key scoped to a node follows the node across a rename (it is bound to
// the node's id), and a new node that takes the old name does not inherit
// it.
func TestAccessKeyScopeFollowsRename(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	c.AddNode(t, "pi")
	px := addProxy(t, c, "proxy")
	k := createAccessKey(t, c, wire.AccessKeyCreateRequest{Node: "pi"})
	if err := c.Admin(http.MethodPost, wire.PathAdminNodeRename, wire.NameRequest{Name: "pi", NewName: "pi2"}, nil); err != nil {
		t.Fatal(err)
	}
	c.AddNode(t, "pi")
	if _, err := px.CheckAccessKey(ctx(t), wire.AccessCheckRequest{Key: k.Key, Node: "pi2", Service: "web"}); err != nil {
		t.Errorf("key on the renamed node: %v", err)
	}
	if _, err := px.CheckAccessKey(ctx(t), wire.AccessCheckRequest{Key: k.Key, Node: "pi", Service: "web"}); !wire.IsCode(err, wire.CodeUnauthorized) {
		t.Errorf("key on the new node with the old name: %v, want 401", err)
	}
	if l := listAccessKeys(t, c); len(l) != 1 || l[0].Node != "pi2" {
		t.Errorf("list shows %+v, want the node's current name pi2", l)
	}
}

func TestAccessRevokedInProxyNetmap(t *testing.T) {
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) { o.LongPoll = 30 * time.Second })
	a := c.AddNode(t, "a")
	px := addProxy(t, c, "proxy")
	k := createAccessKey(t, c, wire.AccessKeyCreateRequest{TTL: wire.Duration(3 * time.Hour)})
	long := createAccessKey(t, c, wire.AccessKeyCreateRequest{TTL: wire.Duration(48 * time.Hour)})

	nmP, err := px.Netmap(ctx(t), 0)
	if err != nil || nmP.AccessRevoked != nil {
		t.Fatalf("proxy netmap before any revocation: %+v, %v", nmP, err)
	}
	nmA, err := a.Client.Netmap(ctx(t), 0)
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		nm  *wire.Netmap
		err error
	}
	pollP, pollA := make(chan result, 1), make(chan result, 1)
	go func() { nm, err := px.Netmap(ctx(t), nmP.Version); pollP <- result{nm, err} }()
	go func() { nm, err := a.Client.Netmap(ctx(t), nmA.Version); pollA <- result{nm, err} }()
	time.Sleep(100 * time.Millisecond) // let both polls park

	revokeAccessKey(t, c, k.ID)
	select {
	case r := <-pollP:
		if r.err != nil || r.nm == nil || !slices.Equal(r.nm.AccessRevoked, []string{k.ID}) {
			t.Fatalf("proxy's woken netmap: %+v, %v; want AccessRevoked [%s]", r.nm, r.err, k.ID)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the proxy's long-poll did not wake on an access key revocation")
	}
	// Nothing the plain node sees changed: its long-poll does not wake
	// (its version stays valid), and its netmap has no AccessRevoked.
	select {
	case r := <-pollA:
		t.Fatalf("the node's long-poll woke on a change it cannot see: %+v, %v", r.nm, r.err)
	case <-time.After(300 * time.Millisecond):
	}
	if nm, err := a.Client.Netmap(ctx(t), 0); err != nil || nm.AccessRevoked != nil {
		t.Fatalf("node's netmap after the revocation: %+v, %v; want no AccessRevoked", nm, err)
	}
	// The plain node's netmap never carries the field, not even in JSON.
	raw := rawNetmap(t, c, a.State)
	if strings.Contains(raw, "access_revoked") {
		t.Errorf("a node's netmap has access_revoked: %s", raw)
	}
	if raw := rawNetmap(t, c, px.State()); !strings.Contains(raw, `"access_revoked":[`) || !strings.Contains(raw, k.ID) {
		t.Errorf("the proxy's raw netmap lacks access_revoked: %s", raw)
	}

	// A second revocation adds to the list; an already revoked one does not
	// change the netmap.
	revokeAccessKey(t, c, long.ID)
	nmP, _ = px.Netmap(ctx(t), 0)
	if want := sorted(k.ID, long.ID); !slices.Equal(nmP.AccessRevoked, want) {
		t.Errorf("AccessRevoked = %v, want %v", nmP.AccessRevoked, want)
	}
	v := nmP.Version
	revokeAccessKey(t, c, long.ID)
	if nmP, _ = px.Netmap(ctx(t), 0); nmP.Version != v {
		t.Errorf("revoking a revoked key changed the netmap version %d -> %d", v, nmP.Version)
	}

	// Expired keys drop out (they are refused anyway).
	c.Clock.Advance(4 * time.Hour)
	if nmP, _ = px.Netmap(ctx(t), 0); !slices.Equal(nmP.AccessRevoked, []string{long.ID}) {
		t.Errorf("after k expired: AccessRevoked = %v, want [%s]", nmP.AccessRevoked, long.ID)
	}
	// Revoking an expired key publishes nothing new.
	expired := createAccessKey(t, c, wire.AccessKeyCreateRequest{TTL: wire.Duration(time.Hour)})
	c.Clock.Advance(2 * time.Hour)
	revokeAccessKey(t, c, expired.ID)
	if nmP, _ = px.Netmap(ctx(t), 0); !slices.Equal(nmP.AccessRevoked, []string{long.ID}) {
		t.Errorf("after revoking an expired key: AccessRevoked = %v, want [%s]", nmP.AccessRevoked, long.ID)
	}
}

// After a restart the coordinator loads the revoked keys from the store.
func TestAccessRevokedSurvivesRestart(t *testing.T) {
	c := meshtest.NewCoordinator(t)
	px := addProxy(t, c, "proxy")
	k := createAccessKey(t, c, wire.AccessKeyCreateRequest{})
	revokeAccessKey(t, c, k.ID)
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	srv, err := coordinator.New(coordinator.Options{
		DataDir: c.Dir, Listen: "127.0.0.1:0", PublicHost: "127.0.0.1", Now: c.Clock.Now, LongPoll: 2 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Close() })
	if err := px.SetCoordinator(srv.URL()); err != nil {
		t.Fatal(err)
	}
	nm, err := px.Netmap(ctx(t), 0)
	if err != nil || !slices.Equal(nm.AccessRevoked, []string{k.ID}) {
		t.Fatalf("proxy netmap after a restart: %+v, %v; want AccessRevoked [%s]", nm, err, k.ID)
	}
	if _, err := px.CheckAccessKey(ctx(t), wire.AccessCheckRequest{Key: k.Key, Node: "x", Service: "y"}); !wire.IsCode(err, wire.CodeUnauthorized) {
		t.Errorf("revoked key after a restart: %v, want 401", err)
	}
}

func TestServiceVisibilityOverride(t *testing.T) {
	c := meshtest.NewCoordinator(t, func(o *coordinator.Options) { o.LongPoll = 30 * time.Second })
	a, b := c.AddNode(t, "a"), c.AddNode(t, "b")
	px := addProxy(t, c, "proxy")
	svcs := []wire.Service{{Name: "web", Port: 80}, {Name: "ssh", Port: 22, Public: true}}
	if err := a.Client.Update(ctx(t), wire.UpdateRequest{Services: &svcs}); err != nil {
		t.Fatal(err)
	}
	nmB, err := b.Client.Netmap(ctx(t), 0)
	if err != nil {
		t.Fatal(err)
	}
	nmP, err := px.Netmap(ctx(t), 0)
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		nm  *wire.Netmap
		err error
	}
	pollB, pollP := make(chan result, 1), make(chan result, 1)
	go func() { nm, err := b.Client.Netmap(ctx(t), nmB.Version); pollB <- result{nm, err} }()
	go func() { nm, err := px.Netmap(ctx(t), nmP.Version); pollP <- result{nm, err} }()
	time.Sleep(100 * time.Millisecond)

	var n wire.Node
	if err := c.Admin(http.MethodPost, wire.PathAdminVisibility, wire.VisibilityRequest{Node: "a", Service: "web", Public: true}, &n); err != nil {
		t.Fatal(err)
	}
	if n.Name != "a" || publicOf(n.Services)["web"] != true {
		t.Errorf("visibility answer %+v, want a with web public", n)
	}
	for _, poll := range []chan result{pollB, pollP} {
		select {
		case r := <-poll:
			if r.err != nil || r.nm == nil {
				t.Fatalf("woken netmap: %v", r.err)
			}
			if got := peerPublic(r.nm, "a"); !got["web"] || !got["ssh"] {
				t.Errorf("woken netmap: a's services public = %v, want web and ssh", got)
			}
		case <-time.After(5 * time.Second):
			t.Fatal("long-poll did not wake on a visibility change")
		}
	}
	// The node's own netmap shows the override too.
	if nm, _ := a.Client.Netmap(ctx(t), 0); !publicOf(nm.Self.Services)["web"] {
		t.Errorf("a's own netmap: %+v", nm.Self.Services)
	}

	// The override wins over what the node reports later.
	svcs[0].Public = false
	if err := a.Client.Update(ctx(t), wire.UpdateRequest{Services: &svcs}); err != nil {
		t.Fatal(err)
	}
	if nm, _ := b.Client.Netmap(ctx(t), 0); !peerPublic(nm, "a")["web"] {
		t.Error("the node's report undid the admin's override")
	}
	// Private wins over a node that says public.
	if err := c.Admin(http.MethodPost, wire.PathAdminVisibility, wire.VisibilityRequest{Node: "a", Service: "ssh", Public: false}, nil); err != nil {
		t.Fatal(err)
	}
	nm, _ := px.Netmap(ctx(t), 0)
	if got := peerPublic(nm, "a"); !got["web"] || got["ssh"] {
		t.Errorf("after set-private ssh: %v, want web public, ssh private", got)
	}
	for _, nd := range c.Nodes(t) {
		if nd.Name == "a" {
			if got := publicOf(nd.Services); !got["web"] || got["ssh"] {
				t.Errorf("admin node list: %v", got)
			}
		}
	}
	// An override for a service the node does not publish is kept and
	// applies once it does.
	if err := c.Admin(http.MethodPost, wire.PathAdminVisibility, wire.VisibilityRequest{Node: "a", Service: "grafana", Public: true}, nil); err != nil {
		t.Fatalf("override for an unpublished service: %v", err)
	}
	if nm, _ := b.Client.Netmap(ctx(t), 0); len(peerPublic(nm, "a")) != 2 {
		t.Errorf("an override added a service: %v", peerPublic(nm, "a"))
	}
	svcs = append(svcs, wire.Service{Name: "grafana", Port: 3000})
	if err := a.Client.Update(ctx(t), wire.UpdateRequest{Services: &svcs}); err != nil {
		t.Fatal(err)
	}
	if nm, _ := b.Client.Netmap(ctx(t), 0); !peerPublic(nm, "a")["grafana"] {
		t.Errorf("the stored override did not apply to the new service: %v", peerPublic(nm, "a"))
	}

	for _, bad := range []struct {
		req  wire.VisibilityRequest
		code string
	}{
		{wire.VisibilityRequest{Node: "nosuch", Service: "web"}, wire.CodeNotFound},
		{wire.VisibilityRequest{Node: "a", Service: "Web"}, wire.CodeBadRequest},
		{wire.VisibilityRequest{Node: "", Service: "web"}, wire.CodeBadRequest},
	} {
		if err := c.Admin(http.MethodPost, wire.PathAdminVisibility, bad.req, nil); !wire.IsCode(err, bad.code) {
			t.Errorf("visibility %+v: %v, want %s", bad.req, err, bad.code)
		}
	}
	es := auditActions(t, c)
	if !hasAudit(es, "service.visibility", "a", "service=web public=true") || !hasAudit(es, "service.visibility", "a", "service=ssh public=false") {
		t.Errorf("visibility audit rows missing: %+v", es)
	}
}

// rawNetmap fetches st's netmap as the raw JSON the coordinator sends.
func rawNetmap(t *testing.T, c *meshtest.Coordinator, st *node.State) string {
	t.Helper()
	conf := pki.CATLSConfig(st.CACert())
	conf.Certificates = []tls.Certificate{st.ClientCert()}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: conf}}
	defer hc.CloseIdleConnections()
	var raw json.RawMessage
	if err := wire.Call(ctx(t), hc, http.MethodGet, c.URL()+wire.PathNetmap, nil, nil, &raw); err != nil {
		t.Fatal(err)
	}
	return string(raw)
}

func sorted(s ...string) []string {
	slices.Sort(s)
	return s
}

func publicOf(svcs []wire.Service) map[string]bool {
	m := map[string]bool{}
	for _, s := range svcs {
		m[s.Name] = s.Public
	}
	return m
}

func peerPublic(nm *wire.Netmap, name string) map[string]bool {
	for _, p := range nm.Peers {
		if p.Name == name {
			return publicOf(p.Services)
		}
	}
	return nil
}
