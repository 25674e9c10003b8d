package pki

import (
	"crypto/sha256"
	"encoding/hex"
	"strings"
	"testing"
)

// FuzzParseSecret throws strings at the secret parser (enrollment tokens,
// admin and access keys share it) and checks that
//   - an accepted string is exactly meshctl-<kind>-<id>-<secret> once
//     trimmed, with the id returned and the hash of the secret part: the
//     parse re-encodes to the same string, so one secret has one spelling;
//   - it is accepted for one kind at most;
//   - a valid secret with any one byte changed never verifies (same id and
//     an equal hash) against the original.
//
// Seeds: f.Add below and testdata/fuzz/FuzzParseSecret. Run longer with
//
//	go test -run '^$' -fuzz '^FuzzParseSecret$' -fuzztime 5m ./pki/
func FuzzParseSecret(f *testing.F) {
	for _, kind := range []string{KindEnroll, KindAdmin, KindAccess} {
		s, _, _, err := NewSecret(kind)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(s, uint16(20), byte('x'))
		f.Add("  "+s+"\n", uint16(len(s)), byte('A'))
		f.Add(strings.ToUpper(s), uint16(0), byte(0))
	}
	f.Add("meshctl-enroll-0123456789ab-abcdefghijklmnopqrstuvwxyz234567", uint16(30), byte('-'))
	f.Add("meshctl-enroll-0123456789AB-abcdefghijklmnopqrstuvwxyz234567", uint16(1), byte('0'))
	f.Add("meshctl-enroll-0123456789ab-abcdefghijklmnopqrstuvwxyz23456=", uint16(2), byte('1'))
	f.Add("meshctl-enroll--", uint16(0), byte(0))
	f.Add("", uint16(0), byte(0))

	kinds := []string{KindEnroll, KindAdmin, KindAccess}
	f.Fuzz(func(t *testing.T, s string, pos uint16, b byte) {
		accepted := 0
		for _, kind := range kinds {
			id, hash, err := ParseSecret(kind, s)
			if err != nil {
				if id != "" || hash != ([32]byte{}) {
					t.Fatalf("ParseSecret(%q, %q) failed but returned id %q / a hash", kind, s, id)
				}
				continue
			}
			accepted++
			canon := strings.TrimSpace(s)
			prefix := "meshctl-" + kind + "-" + id + "-"
			part, ok := strings.CutPrefix(canon, prefix)
			if !ok {
				t.Fatalf("ParseSecret(%q, %q) = id %q, but the string is not %s…", kind, s, id, prefix)
			}
			if raw, err := hex.DecodeString(id); err != nil || len(raw) != idBytes || hex.EncodeToString(raw) != id {
				t.Fatalf("id %q is not %d canonical hex bytes", id, idBytes)
			}
			sec, err := b32.DecodeString(strings.ToUpper(part))
			if err != nil || len(sec) != secretBytes || strings.ToLower(b32.EncodeToString(sec)) != part {
				t.Fatalf("secret part %q of an accepted %q is not canonical base32 of %d bytes", part, s, secretBytes)
			}
			if hash != sha256.Sum256([]byte(part)) {
				t.Fatalf("hash of %q is not SHA-256 of its secret part", s)
			}
			// Deterministic, and the canonical spelling parses the same.
			id2, hash2, err := ParseSecret(kind, canon)
			if err != nil || id2 != id || !HashEqual(hash, hash2) {
				t.Fatalf("canonical form %q of %q parses differently: %q %v", canon, s, id2, err)
			}

			// One byte changed: never the same id with an equal hash.
			i := int(pos) % len(canon)
			if canon[i] == b {
				return
			}
			m := canon[:i] + string([]byte{b}) + canon[i+1:]
			if mid, mhash, err := ParseSecret(kind, m); err == nil && mid == id && HashEqual(mhash, hash) {
				t.Fatalf("mutated %q (byte %d -> %q) verifies as %q", m, i, b, canon)
			}
		}
		if accepted > 1 {
			t.Fatalf("%q parses as %d kinds of secret", s, accepted)
		}
	})
}

// FuzzParsePin checks that an accepted CA pin is "sha256:" and 64 hex
// digits (any case, surrounding white space ignored), and that the hash it
// returns formats back to the same pin (lower-case): parse and format
// reach a fixed point.
func FuzzParsePin(f *testing.F) {
	f.Add("sha256:" + strings.Repeat("ab", 32))
	f.Add(" sha256:" + strings.Repeat("AB", 32) + "\n")
	f.Add("sha256:" + strings.Repeat("ab", 31))
	f.Add("SHA256:" + strings.Repeat("ab", 32))
	f.Add("sha256:" + strings.Repeat("zz", 32))
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		sum, err := ParsePin(s)
		if err != nil {
			if sum != ([32]byte{}) {
				t.Fatalf("ParsePin(%q) failed but returned a hash", s)
			}
			return
		}
		canon := pinPrefix + hex.EncodeToString(sum[:])
		if strings.ToLower(strings.TrimSpace(s)) != canon {
			t.Fatalf("ParsePin(%q) accepted; its canonical form is %q", s, canon)
		}
		again, err := ParsePin(canon)
		if err != nil || again != sum {
			t.Fatalf("canonical pin %q does not parse back: %v", canon, err)
		}
	})
}
