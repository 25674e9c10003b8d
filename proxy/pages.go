package proxy

import (
	"bytes"
	"html/template"
	"net/http"
	"strconv"
)

var pageTemplate = template.Must(template.New("page").Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{.Title}}</title>
<style>body{font:16px/1.5 system-ui,sans-serif;max-width:34rem;margin:15vh auto;padding:0 1rem;color:#222}h1{font-size:1.4rem}</style>
</head><body><h1>{{.Title}}</h1><p>{{.Message}}</p></body></html>
`))

// writePage writes a small, self-contained HTML page. Title and message are
// escaped; they must name no internals (addresses, node ids).
func writePage(w http.ResponseWriter, status int, title, message string) {
	var buf bytes.Buffer
	if err := pageTemplate.Execute(&buf, struct{ Title, Message string }{title, message}); err != nil {
		http.Error(w, title, status) // unreachable: the template is static
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Content-Length", strconv.Itoa(buf.Len()))
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	w.Write(buf.Bytes())
}
