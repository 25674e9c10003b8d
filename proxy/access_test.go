package proxy

import (
	"context"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/meshctl/meshctl/wire"
)

// fakeChecker stands in for the coordinator at the access-check seam.
type fakeChecker struct {
	key string
	exp time.Time
}

func (f *fakeChecker) CheckAccessKey(_ context.Context, req wire.AccessCheckRequest) (wire.AccessCheckResponse, error) {
	if req.Key != f.key {
		return wire.AccessCheckResponse{}, &wire.APIError{Status: 401, Code: wire.CodeUnauthorized}
	}
	return wire.AccessCheckResponse{ID: "key1", Expires: f.exp}, nil
}

func newTestAccess(t *testing.T) (*access, *fakeChecker) {
	t.Helper()
	f := &fakeChecker{key: "good", exp: time.Now().Add(time.Hour)}
	a, err := newAccess(t.TempDir(), f)
	if err != nil {
		t.Fatal(err)
	}
	return a, f
}

var privRoute = Route{Host: "pi1.example.com", Node: "pi1", Service: "web"}

func signIn(t *testing.T, a *access, key, origin string) *httptest.ResponseRecorder {
	t.Helper()
	form := url.Values{"key": {key}, "next": {"/app?x=1"}}
	r := httptest.NewRequest(http.MethodPost, "http://pi1.example.com"+signInPath, strings.NewReader(form.Encode()))
	r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if origin != "" {
		r.Header.Set("Origin", origin)
	}
	w := httptest.NewRecorder()
	if a.authorize(w, r, privRoute) {
		t.Fatal("sign-in request forwarded to the backend")
	}
	return w
}

func TestSessionCookie(t *testing.T) {
	a, _ := newTestAccess(t)
	w := signIn(t, a, "good", "http://pi1.example.com")
	if w.Code != http.StatusSeeOther || w.Header().Get("Location") != "/app?x=1" {
		t.Fatalf("sign-in: %d %q", w.Code, w.Header().Get("Location"))
	}
	cookies := w.Result().Cookies()
	if len(cookies) != 1 || cookies[0].Name != sessionCookie || !cookies[0].HttpOnly || cookies[0].SameSite != http.SameSiteLaxMode || cookies[0].Domain != "" {
		t.Fatalf("cookie: %+v", cookies)
	}
	c := cookies[0]
	req := func(host string, cookie *http.Cookie, other bool) (*http.Request, bool) {
		r := httptest.NewRequest(http.MethodGet, "http://"+host+"/", nil)
		r.AddCookie(cookie)
		if other {
			r.AddCookie(&http.Cookie{Name: "app", Value: "keep"})
		}
		rt := privRoute
		rt.Host = CanonicalHost(host)
		return r, a.authorize(httptest.NewRecorder(), r, rt)
	}
	r, ok := req("pi1.example.com", c, true)
	if !ok {
		t.Fatal("valid session refused")
	}
	if _, err := r.Cookie(sessionCookie); err == nil {
		t.Fatal("session cookie forwarded to the backend")
	}
	if v, err := r.Cookie("app"); err != nil || v.Value != "keep" {
		t.Fatal("the application's own cookie was dropped")
	}
	if _, ok := req("pi2.example.com", c, false); ok {
		t.Fatal("session for pi1 accepted on pi2")
	}
	tampered := *c
	tampered.Value = strings.Replace(c.Value, c.Value[2:3], string(rune(c.Value[2]^1)), 1)
	if _, ok := req("pi1.example.com", &tampered, false); ok {
		t.Fatal("tampered cookie accepted")
	}
	a.setRevoked([]string{"key1"})
	if _, ok := req("pi1.example.com", c, false); ok {
		t.Fatal("session of a revoked key accepted")
	}
	a.setRevoked(nil)
	a.now = func() time.Time { return time.Now().Add(2 * time.Hour) }
	if _, ok := req("pi1.example.com", c, false); ok {
		t.Fatal("expired session accepted")
	}
}

func TestSignInRefusals(t *testing.T) {
	a, _ := newTestAccess(t)
	if w := signIn(t, a, "good", "https://evil.example"); w.Code != http.StatusForbidden {
		t.Fatalf("cross-origin sign-in: %d", w.Code)
	}
	last := 0
	for range 20 {
		if last = signIn(t, a, "bad", "").Code; last == http.StatusTooManyRequests {
			break
		}
		if last != http.StatusUnauthorized {
			t.Fatalf("wrong key: %d", last)
		}
	}
	if last != http.StatusTooManyRequests {
		t.Fatal("wrong keys never rate-limited")
	}
	if w := signIn(t, a, "good", ""); w.Code != http.StatusTooManyRequests {
		t.Fatalf("good key while rate-limited: %d", w.Code)
	}
}

func TestSafeNext(t *testing.T) {
	for in, want := range map[string]string{
		"/a?b=c": "/a?b=c", "": "/", "https://evil.example/": "/", "//evil.example": "/",
		"/\\evil.example": "/", "javascript:alert(1)": "/", signInPath: "/",
	} {
		if got := safeNext(in); got != want {
			t.Errorf("safeNext(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestPrivateRouteShowsSignIn(t *testing.T) {
	a, _ := newTestAccess(t)
	w := httptest.NewRecorder()
	r := httptest.NewRequest(http.MethodGet, "http://pi1.example.com/page", nil)
	if a.authorize(w, r, privRoute) {
		t.Fatal("private route without a session forwarded")
	}
	if w.Code != http.StatusUnauthorized || !strings.Contains(w.Body.String(), `name="key"`) || !strings.Contains(w.Body.String(), `value="/page"`) {
		t.Fatalf("sign-in page: %d %s", w.Code, w.Body.String())
	}
	pub := privRoute
	pub.Public = true
	if !a.authorize(httptest.NewRecorder(), httptest.NewRequest(http.MethodGet, "http://pi1.example.com/", nil), pub) {
		t.Fatal("public route not forwarded")
	}
}
