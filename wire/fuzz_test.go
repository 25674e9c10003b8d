package wire

import (
	"encoding/json"
	"testing"
)

// FuzzDuration decodes arbitrary JSON as a Duration (token and key TTLs in
// admin requests). Invariants: a decoded Duration encodes to a string that
// decodes to the same Duration (a fixed point after one round); a value
// that fails to decode leaves the Duration as it was.
//
// Seeds: f.Add below and testdata/fuzz/FuzzDuration.
func FuzzDuration(f *testing.F) {
	for _, s := range []string{`"1h30m"`, `"0"`, `"-5s"`, `"1.5h"`, `"9223372036854775807ns"`, `"9223372036854775808ns"`,
		`"1µs"`, `"1us"`, `3600`, `null`, `"1h"x`, `""`, `".5m"`, `"2540400h10m10.000000000s"`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		const sentinel = Duration(12345)
		d := sentinel
		if err := json.Unmarshal(b, &d); err != nil {
			if d != sentinel {
				t.Fatalf("failed decode of %q changed the duration to %v", b, d)
			}
			return
		}
		out, err := json.Marshal(d)
		if err != nil {
			t.Fatalf("%q decoded to %v, which does not encode: %v", b, d, err)
		}
		var d2 Duration
		if err := json.Unmarshal(out, &d2); err != nil || d2 != d {
			t.Fatalf("%q decoded to %v, encoded as %s, decodes to %v (%v)", b, d, out, d2, err)
		}
	})
}
