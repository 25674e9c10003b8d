package pki

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base32"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
)

// Secret kinds: the prefix tells a human (and a secret scanner) what a
// string is. Format: meshctl-<kind>-<id>-<secret>, where id is 12 hex
// digits (public, used for lookup) and secret is 32 base32 characters
// (160 bits).
const (
	KindEnroll = "enroll"
	KindAdmin  = "admin"
	// KindAccess is an access key: it lets a browser through the proxy to
	// private services ("meshctl-access-<id>-<secret>").
	KindAccess = "access"
)

const (
	idBytes     = 6
	secretBytes = 20
)

var b32 = base32.StdEncoding.WithPadding(base32.NoPadding)

// ErrMalformedSecret is returned by ParseSecret for anything that is not a
// well-formed secret of the expected kind.
var ErrMalformedSecret = errors.New("malformed secret")

// NewSecret returns a fresh secret of kind, its public id and the SHA-256
// hash of its secret part (the only thing a server stores).
func NewSecret(kind string) (secret, id string, hash [32]byte, err error) {
	var b [idBytes + secretBytes]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", "", hash, err
	}
	id = hex.EncodeToString(b[:idBytes])
	s := strings.ToLower(b32.EncodeToString(b[idBytes:]))
	return "meshctl-" + kind + "-" + id + "-" + s, id, sha256.Sum256([]byte(s)), nil
}

// ParseSecret splits a secret of kind into its public id and the hash of
// its secret part. Surrounding white space is ignored (tokens are pasted).
func ParseSecret(kind, secret string) (id string, hash [32]byte, err error) {
	secret = strings.TrimSpace(secret)
	rest, ok := strings.CutPrefix(secret, "meshctl-"+kind+"-")
	if !ok {
		return "", hash, fmt.Errorf("%w: expected a meshctl-%s-… string", ErrMalformedSecret, kind)
	}
	id, s, ok := strings.Cut(rest, "-")
	if !ok || len(id) != 2*idBytes || len(s) != b32.EncodedLen(secretBytes) {
		return "", hash, fmt.Errorf("%w: wrong length", ErrMalformedSecret)
	}
	if _, err := hex.DecodeString(id); err != nil || strings.ToLower(id) != id {
		return "", hash, fmt.Errorf("%w: bad id", ErrMalformedSecret)
	}
	// The decoder skips line breaks: only 20 decoded bytes mean 32 digits.
	if raw, err := b32.DecodeString(strings.ToUpper(s)); err != nil || len(raw) != secretBytes || strings.ToLower(s) != s {
		return "", hash, fmt.Errorf("%w: bad secret part", ErrMalformedSecret)
	}
	return id, sha256.Sum256([]byte(s)), nil
}

// HashEqual compares two secret hashes in constant time.
func HashEqual(a, b [32]byte) bool {
	return subtle.ConstantTimeCompare(a[:], b[:]) == 1
}
