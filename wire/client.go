package wire

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
)

// APIError is a non-2xx answer from a meshctl API, decoded from Error.
type APIError struct {
	Status     int
	Code       string
	Message    string
	RetryAfter int // seconds, from Retry-After on 429
}

func (e *APIError) Error() string {
	if e.Message == "" {
		return fmt.Sprintf("HTTP %d", e.Status)
	}
	return e.Message
}

// IsCode reports whether err is an APIError with the given code.
func IsCode(err error, code string) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.Code == code
}

// ErrNotModified is returned by Call for a 304 answer (a long-poll that
// timed out without a change).
var ErrNotModified = errors.New("not modified")

// maxResponse bounds what a client reads from a server.
const maxResponse = 64 << 20

// Call sends in (if non-nil) as JSON and decodes a 2xx JSON answer into out
// (if non-nil). Non-2xx answers become *APIError.
func Call(ctx context.Context, hc *http.Client, method, url string, header http.Header, in, out any) error {
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return err
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, url, body)
	if err != nil {
		return err
	}
	for k, v := range header {
		req.Header[k] = v
	}
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	req.Header.Set(HeaderProtocol, strconv.Itoa(ProtocolVersion))
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err != nil {
		return fmt.Errorf("read answer from %s: %w", url, err)
	}
	if resp.StatusCode == http.StatusNotModified {
		return ErrNotModified
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		ae := &APIError{Status: resp.StatusCode}
		var e Error
		if json.Unmarshal(b, &e) == nil {
			ae.Code, ae.Message = e.Code, e.Message
		} else {
			ae.Message = fmt.Sprintf("HTTP %d from %s (not a meshctl API?)", resp.StatusCode, url)
		}
		ae.RetryAfter, _ = strconv.Atoi(resp.Header.Get("Retry-After"))
		return ae
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("decode answer from %s: %w", url, err)
		}
	}
	return nil
}
