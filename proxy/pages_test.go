package proxy

import (
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
)

func TestWritePage(t *testing.T) {
	rec := httptest.NewRecorder()
	writePage(rec, 502, "Down <now>", `a "quoted" <script>alert(1)</script> & more`)
	if rec.Code != 502 {
		t.Errorf("status %d", rec.Code)
	}
	for k, want := range map[string]string{
		"Content-Type":           "text/html; charset=utf-8",
		"X-Content-Type-Options": "nosniff",
		"Cache-Control":          "no-store",
	} {
		if got := rec.Header().Get(k); got != want {
			t.Errorf("%s = %q, want %q", k, got, want)
		}
	}
	body := rec.Body.String()
	if strings.Contains(body, "<script>") || strings.Contains(body, "<now>") {
		t.Errorf("not escaped:\n%s", body)
	}
	if !strings.Contains(body, "&lt;script&gt;") || !strings.Contains(body, "<title>Down &lt;now&gt;</title>") {
		t.Errorf("escaped text missing:\n%s", body)
	}
	if rec.Header().Get("Content-Length") != "" && rec.Header().Get("Content-Length") != strconv.Itoa(len(body)) {
		t.Errorf("Content-Length %s for %d bytes", rec.Header().Get("Content-Length"), len(body))
	}
	if len(body) > 2048 {
		t.Errorf("page is %d bytes", len(body))
	}
}
