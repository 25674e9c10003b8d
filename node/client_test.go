package node

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/meshctl/meshctl/wire"
)

func peer(id, name string) wire.Peer {
	return wire.Peer{ID: id, Name: name, Role: wire.RoleNode, WireGuardKey: "k" + id, IPv4: "100.64.0." + id[1:]}
}

func baseNetmap() *wire.Netmap {
	return &wire.Netmap{Version: 10, Self: peer("s1", "self"), Topology: "mesh", IPv4Pool: "100.64.0.0/16",
		Peers: []wire.Peer{peer("a1", "alpha"), peer("b2", "bravo"), peer("c3", "charlie")}}
}

func delta(base, version uint64, removed []string, peers ...wire.Peer) *wire.Netmap {
	return &wire.Netmap{Version: version, Delta: true, Base: base, Removed: removed, Self: peer("s1", "self"),
		Topology: "mesh", IPv4Pool: "100.64.0.0/16", Peers: peers}
}

func names(nm *wire.Netmap) string {
	var l []string
	for _, p := range nm.Peers {
		l = append(l, p.ID+":"+p.Name)
	}
	return strings.Join(l, " ")
}

func TestApplyDelta(t *testing.T) {
	bravo2 := peer("b2", "bravo")
	bravo2.Endpoints = []string{"192.0.2.1:51820"}
	tests := []struct {
		name    string
		d       *wire.Netmap
		want    string // peers of the result, "" for an error
		wantErr string
	}{
		{"added, updated and removed", delta(10, 11, []string{"c3"}, peer("d4", "delta"), bravo2),
			"a1:alpha b2:bravo d4:delta", ""},
		{"added sorts by name", delta(10, 11, nil, peer("z9", "aardvark")),
			"z9:aardvark a1:alpha b2:bravo c3:charlie", ""},
		{"removed only", delta(10, 12, []string{"a1", "b2"}), "c3:charlie", ""},
		{"renamed", delta(10, 11, nil, peer("a1", "zulu")), "b2:bravo c3:charlie a1:zulu", ""},
		{"removing an unknown id is harmless", delta(10, 11, []string{"x0"}), "a1:alpha b2:bravo c3:charlie", ""},
		{"nothing changed but the version", delta(10, 11, nil), "a1:alpha b2:bravo c3:charlie", ""},
		{"other base", delta(9, 11, nil, peer("d4", "delta")), "", "from version 9"},
		{"to itself", delta(10, 10, nil), "", "to itself"},
		{"lists the node itself", delta(10, 11, nil, peer("s1", "self")), "", "is itself"},
		{"peer without id", delta(10, 11, nil, wire.Peer{Name: "nobody"}), "", "no id"},
		{"removed and updated", delta(10, 11, []string{"b2"}, bravo2), "", "removed"},
		{"listed twice", delta(10, 11, nil, peer("d4", "delta"), peer("d4", "delta")), "", "twice"},
		{"name clash", delta(10, 11, nil, peer("d4", "alpha")), "", "twice"},
		{"another node's delta", func() *wire.Netmap { d := delta(10, 11, nil); d.Self.ID = "o5"; return d }(), "", "node"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			base := baseNetmap()
			before := names(base)
			got, err := applyDelta(base, tt.d)
			if names(base) != before {
				t.Errorf("base changed: %s, was %s", names(base), before)
			}
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("applyDelta = %s, %v; want an error with %q", names(got), err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("applyDelta: %v", err)
			}
			if names(got) != tt.want {
				t.Errorf("peers %s, want %s", names(got), tt.want)
			}
			if got.Delta || got.Base != 0 || got.Removed != nil || got.Version != tt.d.Version || !reflect.DeepEqual(got.Self, tt.d.Self) {
				t.Errorf("result is not a full netmap of version %d: %+v", tt.d.Version, got)
			}
			if tt.name == "added, updated and removed" && !reflect.DeepEqual(got.Peers[1], bravo2) {
				t.Errorf("updated peer %+v, want %+v", got.Peers[1], bravo2)
			}
		})
	}
	if _, err := applyDelta(nil, delta(10, 11, nil)); err == nil {
		t.Error("a delta with no netmap to apply it to was accepted")
	}
}

// fakeCoordinator answers netmap requests from a script and records their
// queries.
type fakeCoordinator struct {
	mu      sync.Mutex
	queries []string
	answers []fakeAnswer
}

type fakeAnswer struct {
	status int
	nm     *wire.Netmap
}

func (f *fakeCoordinator) RoundTrip(r *http.Request) (*http.Response, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.queries = append(f.queries, r.URL.RawQuery)
	a := fakeAnswer{status: http.StatusInternalServerError}
	if len(f.answers) > 0 {
		a, f.answers = f.answers[0], f.answers[1:]
	}
	var body []byte
	switch {
	case a.nm != nil:
		body, _ = json.Marshal(a.nm)
	case a.status >= 400:
		body, _ = json.Marshal(wire.Error{Code: wire.CodeInternal, Message: "scripted failure"})
	}
	if a.status == 0 {
		a.status = http.StatusOK
	}
	return &http.Response{StatusCode: a.status, Body: io.NopCloser(bytes.NewReader(body)), Header: http.Header{}, Request: r}, nil
}

// script queues answers and returns the queries made since the last call.
func (f *fakeCoordinator) script(answers ...fakeAnswer) []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	q := f.queries
	f.queries, f.answers = nil, answers
	return q
}

func newFakeClient() (*Client, *fakeCoordinator) {
	f := &fakeCoordinator{}
	return &Client{state: &State{Coordinator: "https://coordinator.test"}, hc: &http.Client{Transport: f}}, f
}

func full(nm *wire.Netmap) fakeAnswer { return fakeAnswer{nm: nm} }

func TestClientNetmapDeltas(t *testing.T) {
	ctx := context.Background()
	c, f := newFakeClient()
	get := func(since uint64) *wire.Netmap {
		t.Helper()
		nm, err := c.Netmap(ctx, since)
		if err != nil {
			t.Fatalf("Netmap(%d): %v", since, err)
		}
		return nm
	}
	wantQueries := func(want ...string) {
		t.Helper()
		if got := f.script(); !slicesEqual(got, want) {
			t.Errorf("queries %q, want %q", got, want)
		}
	}

	// No netmap yet: a full one, without asking for a delta.
	f.script(full(baseNetmap()))
	nm := get(0)
	wantQueries("since=0")
	if nm.Version != 10 || names(nm) != "a1:alpha b2:bravo c3:charlie" {
		t.Fatalf("first netmap %d %s", nm.Version, names(nm))
	}

	// Long-poll from the version it has: a delta, applied.
	f.script(fakeAnswer{nm: delta(10, 11, []string{"a1"}, peer("d4", "delta"))})
	nm = get(10)
	wantQueries("since=10&delta=1")
	if nm.Version != 11 || nm.Delta || names(nm) != "b2:bravo c3:charlie d4:delta" {
		t.Fatalf("after a delta: %d %s (delta %t)", nm.Version, names(nm), nm.Delta)
	}
	// What the caller does to the netmap it got does not reach the copy
	// the next delta applies to.
	nm.Peers[0].Name = "scribbled"

	// A gap: the delta is from another version. It is dropped and a full
	// netmap fetched.
	f.script(fakeAnswer{nm: delta(10, 12, nil, peer("e5", "echo"))}, full(&wire.Netmap{Version: 12, Self: peer("s1", "self"),
		Peers: []wire.Peer{peer("b2", "bravo"), peer("e5", "echo")}}))
	nm = get(11)
	wantQueries("since=11&delta=1", "since=0")
	if nm.Version != 12 || names(nm) != "b2:bravo e5:echo" {
		t.Fatalf("after a delta with a gap: %d %s", nm.Version, names(nm))
	}

	// A caller asking from a version the client does not hold gets no
	// delta (it could not be applied to what the caller has).
	f.script(full(&wire.Netmap{Version: 13, Self: peer("s1", "self"), Peers: []wire.Peer{peer("b2", "bravo")}}))
	nm = get(7)
	wantQueries("since=7")
	if nm.Version != 13 {
		t.Fatalf("from an unknown version: %d", nm.Version)
	}

	// A long-poll that runs out changes nothing.
	f.script(fakeAnswer{status: http.StatusNotModified})
	if nm, err := c.Netmap(ctx, 13); nm != nil || err != nil {
		t.Fatalf("304: %+v, %v", nm, err)
	}
	wantQueries("since=13&delta=1")

	// A rejected delta, and the full fetch after it fails: an error, and
	// the client keeps version 13 to apply the next delta to.
	f.script(fakeAnswer{nm: delta(13, 14, nil, peer("s1", "self"))}, fakeAnswer{status: http.StatusServiceUnavailable})
	if nm, err := c.Netmap(ctx, 13); err == nil {
		t.Fatalf("rejected delta and failed full fetch: %+v, want an error", nm)
	}
	wantQueries("since=13&delta=1", "since=0")
	f.script(fakeAnswer{nm: delta(13, 15, nil, peer("f6", "foxtrot"))})
	nm = get(13)
	wantQueries("since=13&delta=1")
	if nm.Version != 15 || names(nm) != "b2:bravo f6:foxtrot" {
		t.Fatalf("delta after a rejected one: %d %s", nm.Version, names(nm))
	}

	// A coordinator that answers the full fetch with a delta is refused.
	f.script(fakeAnswer{nm: delta(3, 16, nil)}, fakeAnswer{nm: delta(15, 16, nil)})
	if nm, err := c.Netmap(ctx, 15); err == nil {
		t.Fatalf("delta for a full request: %+v, want an error", nm)
	}
	// ... and the client still holds version 15.
	f.script(fakeAnswer{nm: delta(15, 17, []string{"b2"})})
	if nm = get(15); nm.Version != 17 || names(nm) != "f6:foxtrot" {
		t.Fatalf("after a refused answer: %d %s", nm.Version, names(nm))
	}
}

func slicesEqual(a, b []string) bool {
	return len(a) == len(b) && (len(a) == 0 || reflect.DeepEqual(a, b))
}
