package coordinator

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"reflect"
	"regexp"
	"strings"
	"testing"

	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// decodeBody runs decodeJSON on body as the API would see it.
func decodeBody(body []byte, v any) error {
	r := httptest.NewRequest(http.MethodPost, "/", bytes.NewReader(body))
	r.Header.Set("Content-Type", "application/json")
	return decodeJSON(httptest.NewRecorder(), r, v)
}

// jsonNames returns the JSON field names of struct type t.
func jsonNames(t reflect.Type) []string {
	var out []string
	for i := range t.NumField() {
		name, _, _ := strings.Cut(t.Field(i).Tag.Get("json"), ",")
		out = append(out, name)
	}
	return out
}

// checkKnownFields fails unless every member of the JSON object body names
// one of the fields (encoding/json matches names case-insensitively).
func checkKnownFields(t *testing.T, body []byte, known []string) {
	t.Helper()
	var members map[string]json.RawMessage
	if json.Unmarshal(body, &members) != nil {
		return // not an object (null): nothing to check
	}
	for k := range members {
		ok := false
		for _, n := range known {
			ok = ok || strings.EqualFold(k, n)
		}
		if !ok {
			t.Fatalf("body with unknown field %q accepted: %s", k, body)
		}
	}
}

var dnsLabel = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// validateEnroll is handleEnroll's validation of a decoded request, in its
// order, up to the CSR (which crypto/x509 parses).
func validateEnroll(req *wire.EnrollRequest) error {
	if _, _, err := pki.ParseSecret(pki.KindEnroll, req.Token); err != nil {
		return err
	}
	if err := validateMemberName(req.Name, req.Role); err != nil {
		return err
	}
	return validateWireGuardKey(req.WireGuardKey)
}

// FuzzEnrollRequest decodes arbitrary bodies as an enrollment request, as
// handleEnroll does, and validates what decodes. Invariants:
//   - a body with a member that is not a field of wire.EnrollRequest, or
//     with two JSON values, is refused;
//   - an accepted request re-encodes to a body that decodes to the same
//     request (a fixed point);
//   - validation is deterministic (same error text twice);
//   - a request that validates has canonical fields: a lower-case DNS
//     label name without "--" (reserved names only for proxies) and the
//     WireGuard key in its one canonical base64 spelling, not all zeros, so
//     that the store's uniqueness check on the key string cannot be
//     sidestepped by another spelling of a registered key.
//
// Seeds: f.Add below and testdata/fuzz/FuzzEnrollRequest (among them the
// non-canonical key spelling this target found). Run longer with
//
//	go test -run '^$' -fuzz '^FuzzEnrollRequest$' -fuzztime 5m ./coordinator/
func FuzzEnrollRequest(f *testing.F) {
	tok, _, _, _ := pki.NewSecret(pki.KindEnroll)
	key := "RJ0wRoO4fRp3Mhn+0K0lUUv9Q8M44bQHYJSq3XxYyUU="
	for _, req := range []wire.EnrollRequest{
		{Token: tok, Name: "pi1", WireGuardKey: key, CSR: "x"},
		{Token: tok, Name: "proxy", WireGuardKey: key, Role: wire.RoleProxy},
		{Token: tok, Name: "proxy", WireGuardKey: key},
		{Token: " " + tok + "\n", Name: "Pi1", WireGuardKey: key},
		{Token: tok, Name: "a--b", WireGuardKey: key},
		{Token: tok, Name: "ok", WireGuardKey: strings.Repeat("A", 43) + "="},
		{Token: tok, Name: "ok", WireGuardKey: key[:42] + "V="},
		{Token: tok, Name: "ok", WireGuardKey: key[:20] + "\n" + key[20:]},
	} {
		b, _ := json.Marshal(req)
		f.Add(b)
	}
	f.Add([]byte(`{"token":"x","name":"a","wireguard_key":"k","csr":"c","extra":1}`))
	f.Add([]byte(`{"TOKEN":"x","Name":"a"}`))
	f.Add([]byte(`{"name":"a"} {"name":"b"}`))
	f.Add([]byte(`null`))
	f.Add([]byte(`{"name":"a","name":"b"}`))

	known := jsonNames(reflect.TypeFor[wire.EnrollRequest]())
	f.Fuzz(func(t *testing.T, body []byte) {
		var req wire.EnrollRequest
		if err := decodeBody(body, &req); err != nil {
			return
		}
		checkKnownFields(t, body, known)
		again, _ := json.Marshal(req)
		var req2 wire.EnrollRequest
		if err := decodeBody(again, &req2); err != nil || req2 != req {
			t.Fatalf("re-encoded request %s decodes to %+v (%v), want %+v", again, req2, err, req)
		}

		err := validateEnroll(&req)
		err2 := validateEnroll(&req)
		if (err == nil) != (err2 == nil) || err != nil && err.Error() != err2.Error() {
			t.Fatalf("validation not deterministic: %v, then %v", err, err2)
		}
		if err != nil {
			return
		}
		if !dnsLabel.MatchString(req.Name) || strings.Contains(req.Name, "--") {
			t.Fatalf("name %q accepted", req.Name)
		}
		if reservedNames[req.Name] && req.Role != wire.RoleProxy {
			t.Fatalf("reserved name %q accepted for role %q", req.Name, req.Role)
		}
		k, err := wgtypes.ParseKey(req.WireGuardKey)
		if err != nil || k.String() != req.WireGuardKey || k == (wgtypes.Key{}) {
			t.Fatalf("wireguard key %q accepted; canonical spelling %q (%v)", req.WireGuardKey, k.String(), err)
		}
	})
}

// FuzzUpdateRequest decodes arbitrary bodies as a node's update (services,
// endpoints, disco key) and validates them as handleUpdate does.
// Invariants: unknown members are refused; an accepted request re-encodes
// to a fixed point; validation is deterministic; accepted services have
// valid, distinct names and non-zero ports, at most maxServices of them;
// accepted endpoints are at most maxEndpoints usable IP:port pairs (not
// port 0, unspecified or multicast) whose canonical spelling is accepted
// too; an accepted disco key is the canonical base64 of 32 bytes, not zero.
func FuzzUpdateRequest(f *testing.F) {
	for _, req := range []wire.UpdateRequest{
		{Services: &[]wire.Service{{Name: "web", Port: 80}, {Name: "ssh", Port: 22, Public: true}}},
		{Services: &[]wire.Service{{Name: "web", Port: 80}, {Name: "web", Port: 81}}},
		{Services: &[]wire.Service{{Name: "Web", Port: 0}}},
		{Endpoints: &[]string{"192.0.2.1:51820", "[2001:db8::1]:51820"}},
		{Endpoints: &[]string{"192.0.2.1:0", "0.0.0.0:1", "224.0.0.1:5"}},
		{Endpoints: &[]string{"192.0.2.1:051820", "[::ffff:192.0.2.1]:7", "[fe80::1%eth0]:9"}},
		{DiscoKey: ptr(base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{7}, 32)))},
		{DiscoKey: ptr(strings.Repeat("A", 43) + "=")},
		{DiscoKey: ptr(strings.Repeat("A", 42) + "B=")},
	} {
		b, _ := json.Marshal(req)
		f.Add(b)
	}
	f.Add([]byte(`{"services":null,"endpoints":[],"disco_key":""}`))
	f.Add([]byte(`{"services":[{"name":"web","port":80,"target":"127.0.0.1:80"}]}`))
	f.Add([]byte(`{"endpoints":["1.2.3.4:5"],"ipv4":"100.64.0.9"}`))

	known := jsonNames(reflect.TypeFor[wire.UpdateRequest]())
	f.Fuzz(func(t *testing.T, body []byte) {
		var req wire.UpdateRequest
		if err := decodeBody(body, &req); err != nil {
			return
		}
		checkKnownFields(t, body, known)
		again, _ := json.Marshal(req)
		var req2 wire.UpdateRequest
		if err := decodeBody(again, &req2); err != nil || !reflect.DeepEqual(req, req2) {
			t.Fatalf("re-encoded request %s decodes differently (%v)", again, err)
		}
		if req.Services != nil {
			svcs := *req.Services
			err := validateServices(svcs)
			if err2 := validateServices(svcs); (err == nil) != (err2 == nil) {
				t.Fatalf("services validation not deterministic: %v, then %v", err, err2)
			}
			if err == nil {
				if len(svcs) > maxServices {
					t.Fatalf("%d services accepted", len(svcs))
				}
				seen := map[string]bool{}
				for _, s := range svcs {
					if !dnsLabel.MatchString(s.Name) || strings.Contains(s.Name, "--") || seen[s.Name] || s.Port == 0 {
						t.Fatalf("service %+v accepted in %+v", s, svcs)
					}
					seen[s.Name] = true
				}
			}
		}
		if req.Endpoints != nil {
			eps := *req.Endpoints
			err := validateEndpoints(eps)
			if err2 := validateEndpoints(eps); (err == nil) != (err2 == nil) {
				t.Fatalf("endpoints validation not deterministic: %v, then %v", err, err2)
			}
			if err == nil {
				if len(eps) > maxEndpoints {
					t.Fatalf("%d endpoints accepted", len(eps))
				}
				canon := make([]string, len(eps))
				for i, e := range eps {
					ap, err := netip.ParseAddrPort(e)
					a := ap.Addr()
					if err != nil || ap.Port() == 0 || a.IsUnspecified() || a.IsMulticast() {
						t.Fatalf("endpoint %q accepted", e)
					}
					canon[i] = ap.String()
				}
				if err := validateEndpoints(canon); err != nil {
					t.Fatalf("endpoints %q accepted, their canonical form %q refused: %v", eps, canon, err)
				}
			}
		}
		if req.DiscoKey != nil {
			k := *req.DiscoKey
			err := validateDiscoKey(k)
			if err2 := validateDiscoKey(k); (err == nil) != (err2 == nil) {
				t.Fatalf("disco key validation not deterministic: %v, then %v", err, err2)
			}
			if err == nil {
				b, derr := base64.StdEncoding.Strict().DecodeString(k)
				if derr != nil || len(b) != 32 || base64.StdEncoding.EncodeToString(b) != k || [32]byte(b) == [32]byte{} {
					t.Fatalf("disco key %q accepted", k)
				}
			}
		}
	})
}

func ptr[T any](v T) *T { return &v }
