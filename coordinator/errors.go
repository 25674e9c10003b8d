package coordinator

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"

	"github.com/meshctl/meshctl/coordinator/store"
	"github.com/meshctl/meshctl/wire"
)

// apiError is an error with the status and client-facing message the API
// returns. Its Error() may carry more detail for the log than the client
// sees.
type apiError struct {
	status int
	code   string
	msg    string // shown to the client
	cause  error  // logged, never shown
}

func (e *apiError) Error() string {
	if e.cause != nil {
		return fmt.Sprintf("%s: %v", e.msg, e.cause)
	}
	return e.msg
}

func (e *apiError) Unwrap() error { return e.cause }

func errf(status int, code, format string, args ...any) *apiError {
	return &apiError{status: status, code: code, msg: fmt.Sprintf(format, args...)}
}

// errTokenRefused is the one answer to every kind of bad token, so that a
// caller cannot tell an unknown token from a used or expired one.
var errTokenRefused = errf(http.StatusUnauthorized, wire.CodeUnauthorized,
	"enrollment token refused: it is malformed, unknown, expired, used up or revoked; ask an admin for a new one (meshctl token create)")

// toAPIError maps an internal error to what the client is told. Errors that
// are not recognised become a 500 whose message names nothing internal.
func toAPIError(err error) *apiError {
	var ae *apiError
	switch {
	case errors.As(err, &ae):
		return ae
	case errors.Is(err, store.ErrTokenInvalid):
		return &apiError{status: errTokenRefused.status, code: errTokenRefused.code, msg: errTokenRefused.msg, cause: err}
	case errors.Is(err, store.ErrNameTaken):
		return &apiError{status: http.StatusConflict, code: wire.CodeNameTaken, msg: "that node name is already in use: choose another with --name, or revoke the old node first (meshctl nodes revoke NAME)", cause: err}
	case errors.Is(err, store.ErrKeyTaken):
		return &apiError{status: http.StatusConflict, code: wire.CodeKeyTaken, msg: "this WireGuard public key is already registered to a node; every enrollment needs a fresh key", cause: err}
	case errors.Is(err, store.ErrPoolExhausted):
		return &apiError{status: http.StatusServiceUnavailable, code: wire.CodePoolExhausted, msg: "the coordinator has no free overlay address left in its pool: an admin must widen --cidr or wait for quarantined addresses to be released", cause: err}
	case errors.Is(err, store.ErrAmbiguous):
		return &apiError{status: http.StatusConflict, code: wire.CodeBadRequest, msg: "that name is also another node's id; name the node by its id instead (see meshctl nodes list)", cause: err}
	case errors.Is(err, store.ErrNotFound):
		return &apiError{status: http.StatusNotFound, code: wire.CodeNotFound, msg: "not found", cause: err}
	case errors.Is(err, store.ErrSSHOnly):
		return &apiError{status: http.StatusBadRequest, code: wire.CodeBadRequest, msg: "not possible for an SSH-only node", cause: err}
	case errors.Is(err, store.ErrDiskFull):
		return &apiError{status: http.StatusServiceUnavailable, code: wire.CodeUnavailable, msg: "the coordinator's disk is full, so nothing was written: retry once an admin has freed space on the disk of the server's data dir", cause: err}
	case errors.Is(err, store.ErrRevoked):
		return &apiError{status: http.StatusForbidden, code: wire.CodeRevoked, msg: "this node has been revoked", cause: err}
	}
	return &apiError{status: http.StatusInternalServerError, code: wire.CodeInternal, msg: "internal error (see the coordinator's log)", cause: err}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v)
}

// maxBody bounds every request body the API reads.
const maxBody = 64 << 10

// decodeJSON reads a JSON request body strictly: application/json only,
// at most maxBody bytes, no unknown fields, exactly one value.
func decodeJSON(w http.ResponseWriter, r *http.Request, v any) error {
	// Exactly one Content-Type: with two, which one counts is ambiguous.
	cts := r.Header.Values("Content-Type")
	if ct := strings.Join(cts, ", "); len(cts) != 1 || ct != "application/json" && ct != "application/json; charset=utf-8" {
		return errf(http.StatusUnsupportedMediaType, wire.CodeBadRequest, "Content-Type must be application/json, got %q", ct)
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, maxBody))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return errf(http.StatusRequestEntityTooLarge, wire.CodeTooLarge, "request body larger than %d bytes", maxBody)
		}
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "malformed JSON body: %v", err)
	}
	if dec.More() {
		return errf(http.StatusBadRequest, wire.CodeBadRequest, "malformed JSON body: more than one value")
	}
	return nil
}
