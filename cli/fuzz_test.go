package cli

import (
	"strconv"
	"testing"
)

// FuzzParseSize checks --memory-limit parsing: an accepted size is 0 (no
// limit) or at least 8 MiB, never negative or wrapped around, and its
// value in plain bytes (and in MiB when whole) parses back to the same
// size: a fixed point.
//
// Seeds: f.Add below and testdata/fuzz/FuzzParseSize (among them the
// oversized value that once came back negative).
func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"64MiB", "64M", "1GiB", "0", "100000000", " 48 mib ", "1.5GiB", "", "MiB", "-1MiB",
		"64XB", "1MiB", "abc", "99999999999999999999G", "8388608", "8388607", "0.0000001", "1e9", ".5G", "1..2M"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := parseSize(s)
		if err != nil {
			if n != 0 {
				t.Fatalf("parseSize(%q) failed but returned %d", s, n)
			}
			return
		}
		if n < 0 || n > 0 && n < 8<<20 {
			t.Fatalf("parseSize(%q) = %d", s, n)
		}
		if again, err := parseSize(strconv.FormatInt(n, 10)); err != nil || again != n {
			t.Fatalf("parseSize(%q) = %d, but %d parses to %d, %v", s, n, n, again, err)
		}
		if n%(1<<20) == 0 {
			mib := strconv.FormatInt(n>>20, 10) + "MiB"
			if again, err := parseSize(mib); err != nil || again != n {
				t.Fatalf("parseSize(%q) = %d, but %q parses to %d, %v", s, n, mib, again, err)
			}
		}
	})
}
