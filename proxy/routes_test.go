package proxy

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/meshctl/meshctl/wire"
)

func peer(name, ipv4 string, svcs ...wire.Service) wire.Peer {
	return wire.Peer{ID: "id-" + name, Name: name, Role: wire.RoleNode, IPv4: ipv4, Services: svcs}
}

func svc(name string, port uint16) wire.Service { return wire.Service{Name: name, Port: port} }

func TestBuildTableScheme(t *testing.T) {
	px := peer("edge", "100.64.0.1", svc("web", 80))
	px.Role = wire.RoleProxy
	nm := &wire.Netmap{Peers: []wire.Peer{
		peer("pi1", "100.64.0.2", svc("api", 8080), svc("web", 80), wire.Service{Name: "grafana", Port: 3000, Public: true}),
		peer("nas", "100.64.0.3", svc("files", 8000), svc("media", 8096)),
		peer("idle", "100.64.0.4"), // no services: no routes
		px,                         // proxies are never routed to
	}}
	tb := BuildTable(nm, "Example.COM.")

	want := map[string]struct {
		node, svc string
		addr      string
		public    bool
	}{
		"pi1.example.com":          {"pi1", "web", "100.64.0.2:80", false}, // "web" wins over the first service
		"web--pi1.example.com":     {"pi1", "web", "100.64.0.2:80", false},
		"api--pi1.example.com":     {"pi1", "api", "100.64.0.2:8080", false},
		"grafana--pi1.example.com": {"pi1", "grafana", "100.64.0.2:3000", true},
		"nas.example.com":          {"nas", "files", "100.64.0.3:8000", false}, // no "web": the first service
		"files--nas.example.com":   {"nas", "files", "100.64.0.3:8000", false},
		"media--nas.example.com":   {"nas", "media", "100.64.0.3:8096", false},
	}
	if tb.Len() != len(want) {
		t.Errorf("Len = %d, want %d: %v", tb.Len(), len(want), tb.Routes())
	}
	for host, w := range want {
		rt, ok := tb.Lookup(host)
		if !ok {
			t.Errorf("Lookup(%q): no route", host)
			continue
		}
		if rt.Host != host || rt.Node != w.node || rt.Service != w.svc || rt.Addr.String() != w.addr || rt.Public != w.public || rt.NodeID != "id-"+w.node {
			t.Errorf("Lookup(%q) = %+v, want %+v", host, rt, w)
		}
	}
	routes := tb.Routes()
	if !slices.IsSortedFunc(routes, func(a, b Route) int { return strings.Compare(a.Host, b.Host) }) || len(routes) != len(want) {
		t.Errorf("Routes not sorted or incomplete: %v", routes)
	}
	for _, h := range []string{"edge.example.com", "web--edge.example.com", "idle.example.com", "a.pi1.example.com",
		"pi1.example.com.evil.test", "pi1", "example.com", "web-pi1.example.com", "pi1--web.example.com"} {
		if rt, ok := tb.Lookup(h); ok {
			t.Errorf("Lookup(%q) = %+v, want no route", h, rt)
		}
	}
}

func TestBuildTableSkipsInvalid(t *testing.T) {
	nm := &wire.Netmap{Peers: []wire.Peer{
		peer("noip", "", svc("web", 80)),
		peer("v6", "fd00::1", svc("web", 80)),
		peer("mapped", "::ffff:100.64.0.9", svc("web", 80)),
		peer("Upper", "100.64.0.5", svc("web", 80)),
		peer("a--b", "100.64.0.6", svc("web", 80)),
		peer("-x", "100.64.0.7", svc("web", 80)),
		peer("ok", "100.64.0.8", svc("Bad", 1), svc("x--y", 2), svc("zero", 0), svc("dup", 3), svc("dup", 4), svc("ok", 5)),
		peer("ok", "100.64.0.10", svc("web", 80)), // duplicate name: the first wins
	}}
	tb := BuildTable(nm, "example.com")
	var hosts []string
	for _, rt := range tb.Routes() {
		hosts = append(hosts, rt.Host+"="+rt.Addr.String())
	}
	want := []string{"dup--ok.example.com=100.64.0.8:3", "ok--ok.example.com=100.64.0.8:5", "ok.example.com=100.64.0.8:3"}
	if !slices.Equal(hosts, want) {
		t.Errorf("routes = %v, want %v", hosts, want)
	}
	if n := BuildTable(nil, "example.com").Len(); n != 0 {
		t.Errorf("nil netmap: %d routes", n)
	}
	for _, d := range []string{"", "10.0.0.1", "bad_domain", "-x.com"} {
		if n := BuildTable(nm, d).Len(); n != 0 {
			t.Errorf("domain %q: %d routes, want 0", d, n)
		}
	}
}

func TestBuildTableLocalhost(t *testing.T) {
	tb := BuildTable(&wire.Netmap{Peers: []wire.Peer{peer("pi1", "100.64.0.2", svc("web", 80))}}, "localhost")
	for _, h := range []string{"pi1.localhost", "pi1.localhost:8080", "web--pi1.localhost", "PI1.LOCALHOST."} {
		if _, ok := tb.Lookup(h); !ok {
			t.Errorf("Lookup(%q): no route", h)
		}
	}
	if got := ServiceHost("web", "pi1", "localhost"); got != "web--pi1.localhost" {
		t.Errorf("ServiceHost = %q", got)
	}
}

func TestCanonicalHost(t *testing.T) {
	for in, want := range map[string]string{
		"pi1.example.com":       "pi1.example.com",
		"PI1.Example.COM":       "pi1.example.com",
		"pi1.example.com.":      "pi1.example.com",
		"pi1.example.com:8443":  "pi1.example.com",
		"Pi1.Example.com.:443":  "pi1.example.com",
		"web--pi1.example.com":  "web--pi1.example.com",
		"localhost":             "localhost",
		"pi1.example.com..":     "",
		"":                      "",
		":80":                   "",
		"127.0.0.1":             "",
		"127.0.0.1:80":          "",
		"127.1":                 "", // browsers read it as 127.0.0.1
		"0x7f.1":                "",
		"[::1]":                 "",
		"[::1]:80":              "",
		"::1":                   "",
		"fd00::1":               "",
		"pi1.example.com:http":  "",
		"pi1.example.com:80:80": "",
		"pi1 .example.com":      "",
		"pi1_x.example.com":     "",
		"-pi1.example.com":      "",
		"pi1-.example.com":      "",
		".example.com":          "",
		"a..example.com":        "",
		"pi1.example.com/x":     "",
		"pi1.exämple.com":       "",
	} {
		if got := CanonicalHost(in); got != want {
			t.Errorf("CanonicalHost(%q) = %q, want %q", in, got, want)
		}
	}
	long := strings.Repeat("a", 64)
	if got := CanonicalHost(long + ".com"); got != "" {
		t.Errorf("64-character label accepted: %q", got)
	}
}

func TestServiceHostTooLongSkipped(t *testing.T) {
	name := "n123456789012345678901234567890123456789" // 40 characters
	tb := BuildTable(&wire.Netmap{Peers: []wire.Peer{peer(name, "100.64.0.2", svc(name, 80))}}, "example.com")
	if _, ok := tb.Lookup(name + ".example.com"); !ok {
		t.Error("node host missing")
	}
	if _, ok := tb.Lookup(ServiceHost(name, name, "example.com")); ok || tb.Len() != 1 {
		t.Errorf("a %d-character label was routed", 2*len(name)+2)
	}
}

func TestTableAddrs(t *testing.T) {
	a := BuildTable(&wire.Netmap{Peers: []wire.Peer{peer("pi1", "100.64.0.2", svc("web", 80))}}, "example.com")
	b := BuildTable(&wire.Netmap{Peers: []wire.Peer{peer("pi1", "100.64.0.2", svc("web", 80))}}, "example.com")
	moved := BuildTable(&wire.Netmap{Peers: []wire.Peer{peer("pi2", "100.64.0.2", svc("web", 80))}}, "example.com")
	if !a.hasAddr(netip.MustParseAddrPort("100.64.0.2:80")) || a.hasAddr(netip.MustParseAddrPort("100.64.0.2:81")) {
		t.Error("hasAddr wrong")
	}
	if !a.sameAddrs(b) || a.sameAddrs(moved) || a.sameAddrs(nil) || !(*Table)(nil).sameAddrs(BuildTable(nil, "x.com")) {
		t.Error("sameAddrs wrong")
	}
	var nilTable *Table
	if _, ok := nilTable.Lookup("pi1.example.com"); ok || nilTable.Len() != 0 || nilTable.Routes() != nil {
		t.Error("nil table not empty")
	}
}

func TestSSHOnlyRoutes(t *testing.T) {
	cam := wire.Peer{ID: "c1", Name: "cam1", Role: wire.RoleSSH, Services: []wire.Service{{Name: "web", Port: 80}, {Name: "rtsp", Port: 80}}}
	t1 := BuildTable(&wire.Netmap{SSHOnly: []wire.Peer{cam}}, "example.com")
	web, ok1 := t1.Lookup("cam1.example.com")
	rtsp, ok2 := t1.Lookup("rtsp--cam1.example.com")
	if !ok1 || !ok2 || !web.SSHOnly || web.Service != "web" || rtsp.Service != "rtsp" {
		t.Fatalf("routes: %+v %+v", web, rtsp)
	}
	if !netip.MustParsePrefix("240.0.0.0/4").Contains(web.Addr.Addr()) || web.Addr == rtsp.Addr {
		t.Fatalf("placeholder addresses %v %v: want distinct, in 240.0.0.0/4", web.Addr, rtsp.Addr)
	}
	if rt, ok := t1.RouteFor(rtsp.Addr); !ok || rt.Service != "rtsp" {
		t.Fatalf("RouteFor(%v) = %+v", rtsp.Addr, rt)
	}
	// Other nodes coming and going do not move an SSH-only node's addresses.
	other := wire.Peer{ID: "c2", Name: "cam2", Role: wire.RoleSSH, Services: []wire.Service{{Name: "web", Port: 80}}}
	t2 := BuildTable(&wire.Netmap{SSHOnly: []wire.Peer{other, cam}}, "example.com")
	if again, _ := t2.Lookup("cam1.example.com"); again.Addr != web.Addr {
		t.Fatalf("address moved from %v to %v", web.Addr, again.Addr)
	}
	// A peer with role ssh in the WireGuard peer list is not routed.
	if BuildTable(&wire.Netmap{Peers: []wire.Peer{cam}}, "example.com").Len() != 0 {
		t.Fatal("an ssh peer among WireGuard peers was routed")
	}
}
