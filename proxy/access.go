package proxy

import (
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"net/http"
	"net/netip"
	"net/url"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/meshctl/meshctl/internal/ratelimit"
	"github.com/meshctl/meshctl/pki"
	"github.com/meshctl/meshctl/wire"
)

// Access control at the proxy. A private route needs a session: the
// browser signs in at /.meshctl/signin on the node's own host with an
// access key (meshctl access-key create); the proxy checks the key with the
// coordinator over its mTLS identity (it never stores key hashes itself),
// then sets a session cookie scoped to that host: HttpOnly, SameSite=Lax,
// Secure on TLS, signed with a key only this proxy has, and bound to the
// host, the access key's id and an expiry (the key's, at most 12 h). A key
// revoked by an admin arrives in the proxy's netmap (access_revoked) and
// ends its sessions at once. The cookie is removed from every request
// before it is forwarded, so a device never sees it.

const (
	sessionCookie  = "meshctl_session"
	signInPath     = ReservedPrefix + "signin"
	sessionKeyFile = "session.key"
	maxSession     = 12 * time.Hour
	maxKeyLen      = 256
)

// accessChecker verifies access keys (the coordinator, through the
// proxy's control client).
type accessChecker interface {
	CheckAccessKey(ctx context.Context, req wire.AccessCheckRequest) (wire.AccessCheckResponse, error)
}

type access struct {
	key     []byte // HMAC key for session cookies
	check   accessChecker
	limiter *ratelimit.FailLimiter
	revoked atomic.Pointer[[]string]
	now     func() time.Time
}

func newAccess(stateDir string, check accessChecker) (*access, error) {
	key, err := loadOrCreateSessionKey(filepath.Join(stateDir, sessionKeyFile))
	if err != nil {
		return nil, err
	}
	a := &access{key: key, check: check, limiter: ratelimit.New(10, 6*time.Second, time.Now), now: time.Now}
	a.revoked.Store(&[]string{})
	return a, nil
}

func loadOrCreateSessionKey(path string) ([]byte, error) {
	b, err := pki.ReadPrivateFile(path)
	if err == nil && len(b) == 32 {
		return b, nil
	}
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("session key: %w", err)
	}
	key := make([]byte, 32)
	rand.Read(key)
	if err := pki.WriteFileAtomic(path, key, 0o600); err != nil {
		return nil, fmt.Errorf("session key: %w", err)
	}
	return key, nil
}

// setRevoked takes the revoked access-key ids from a netmap.
func (a *access) setRevoked(ids []string) {
	ids = slices.Clone(ids)
	a.revoked.Store(&ids)
}

// authorize is the handler's Authorize hook.
func (a *access) authorize(w http.ResponseWriter, r *http.Request, rt Route) bool {
	if r.URL.Path == signInPath {
		a.signIn(w, r, rt)
		return false
	}
	ok := rt.Public || a.validSession(r, rt)
	stripSessionCookie(r)
	if ok {
		return true
	}
	setReason(w, "private: no session")
	a.signInPage(w, r, http.StatusUnauthorized, "", r.URL.RequestURI())
	return false
}

// session cookie value: base64url("v1|host|keyid|unixexp") "." base64url(hmac)
func (a *access) mint(host, keyID string, exp time.Time) string {
	payload := "v1|" + host + "|" + keyID + "|" + strconv.FormatInt(exp.Unix(), 10)
	return base64.RawURLEncoding.EncodeToString([]byte(payload)) + "." + base64.RawURLEncoding.EncodeToString(a.sign(payload))
}

func (a *access) sign(payload string) []byte {
	m := hmac.New(sha256.New, a.key)
	m.Write([]byte(payload))
	return m.Sum(nil)
}

func (a *access) validSession(r *http.Request, rt Route) bool {
	c, err := r.Cookie(sessionCookie)
	if err != nil {
		return false
	}
	p64, s64, ok := strings.Cut(c.Value, ".")
	if !ok {
		return false
	}
	payload, err1 := base64.RawURLEncoding.DecodeString(p64)
	sig, err2 := base64.RawURLEncoding.DecodeString(s64)
	if err1 != nil || err2 != nil || !hmac.Equal(sig, a.sign(string(payload))) {
		return false
	}
	parts := strings.Split(string(payload), "|")
	if len(parts) != 4 || parts[0] != "v1" || parts[1] != rt.Host {
		return false
	}
	exp, err := strconv.ParseInt(parts[3], 10, 64)
	if err != nil || !a.now().Before(time.Unix(exp, 0)) {
		return false
	}
	return !slices.Contains(*a.revoked.Load(), parts[2])
}

// stripSessionCookie removes the proxy's cookie from what the device gets.
func stripSessionCookie(r *http.Request) {
	cookies := r.Cookies()
	r.Header.Del("Cookie")
	for _, c := range cookies {
		if c.Name != sessionCookie {
			r.AddCookie(c)
		}
	}
}

func (a *access) signIn(w http.ResponseWriter, r *http.Request, rt Route) {
	next := safeNext(r.FormValue("next"))
	if r.Method == http.MethodGet {
		setReason(w, "sign-in page")
		a.signInPage(w, r, http.StatusOK, "", next)
		return
	}
	if r.Method != http.MethodPost {
		writePage(w, http.StatusMethodNotAllowed, "Not allowed", "Use the sign-in form.")
		return
	}
	if origin := r.Header.Get("Origin"); origin != "" {
		if u, err := url.Parse(origin); err != nil || CanonicalHost(u.Host) != rt.Host {
			setReason(w, "sign-in: cross-origin post")
			writePage(w, http.StatusForbidden, "Forbidden", "Sign in from this site's own page.")
			return
		}
	}
	src := clientAddr(r)
	if ok, wait := a.limiter.Allow(src); !ok {
		setReason(w, "sign-in: rate limited")
		w.Header().Set("Retry-After", strconv.Itoa(int(wait/time.Second)+1))
		a.signInPage(w, r, http.StatusTooManyRequests, fmt.Sprintf("Too many failed attempts. Try again in %s.", (wait+time.Second).Truncate(time.Second)), next)
		return
	}
	key := strings.TrimSpace(r.PostFormValue("key"))
	if key == "" || len(key) > maxKeyLen {
		setReason(w, "sign-in: key refused")
		a.limiter.Fail(src)
		a.signInPage(w, r, http.StatusUnauthorized, "That access key was not accepted.", next)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), 10*time.Second)
	defer cancel()
	res, err := a.check.CheckAccessKey(ctx, wire.AccessCheckRequest{Key: key, Node: rt.Node, Service: rt.Service})
	switch {
	case wire.IsCode(err, wire.CodeUnauthorized):
		setReason(w, "sign-in: key refused")
		a.limiter.Fail(src)
		a.signInPage(w, r, http.StatusUnauthorized, "That access key was not accepted.", next)
		return
	case err != nil:
		setReason(w, "sign-in: coordinator check failed: "+err.Error())
		writePage(w, http.StatusServiceUnavailable, "Cannot sign in right now", "The access key cannot be checked at the moment. Try again shortly.")
		return
	}
	exp := a.now().Add(maxSession)
	if res.Expires.Before(exp) {
		exp = res.Expires
	}
	http.SetCookie(w, &http.Cookie{
		Name: sessionCookie, Value: a.mint(rt.Host, res.ID, exp), Path: "/",
		Expires: exp, HttpOnly: true, Secure: r.TLS != nil, SameSite: http.SameSiteLaxMode,
	})
	setReason(w, "signed in with access key "+res.ID)
	http.Redirect(w, r, next, http.StatusSeeOther)
}

// safeNext keeps a redirect target on the same host: a path, never a
// scheme-relative or absolute URL.
func safeNext(next string) string {
	if !strings.HasPrefix(next, "/") || strings.HasPrefix(next, "//") || strings.HasPrefix(next, "/\\") || strings.HasPrefix(next, ReservedPrefix) {
		return "/"
	}
	return next
}

func clientAddr(r *http.Request) netip.Addr {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return netip.Addr{}
	}
	return ap.Addr().Unmap()
}

var signInTmpl = template.Must(template.New("signin").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Sign in</title>
<style>body{font:16px/1.5 system-ui,sans-serif;max-width:34rem;margin:15vh auto;padding:0 1rem;color:#222}h1{font-size:1.4rem}input{font:inherit;padding:.4rem;width:100%;box-sizing:border-box}button{font:inherit;margin-top:.6rem;padding:.4rem 1rem}.err{color:#a00}</style>
</head><body><h1>Sign in to {{.Host}}</h1>
<p>This service is private. Paste the access key your administrator gave you.</p>
{{if .Error}}<p class="err" role="alert">{{.Error}}</p>{{end}}
<form method="post" action="{{.Action}}">
<input type="hidden" name="next" value="{{.Next}}">
<label for="key">Access key</label>
<input id="key" name="key" type="password" autocomplete="off" autofocus required>
<button type="submit">Sign in</button>
</form></body></html>
`))

func (a *access) signInPage(w http.ResponseWriter, r *http.Request, status int, msg, next string) {
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Cache-Control", "no-store")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'")
	w.WriteHeader(status)
	signInTmpl.Execute(w, struct{ Host, Error, Action, Next string }{CanonicalHost(r.Host), msg, signInPath, safeNext(next)})
}
