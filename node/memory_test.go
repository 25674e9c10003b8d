package node

import "testing"

func TestTrimOncePerCalmSpellAfterLoad(t *testing.T) {
	tr := trimmer{last: 100}
	steps := []struct {
		allocs uint64
		trim   bool
	}{
		{100 + 10<<20, false},          // busy
		{100 + 30<<20, false},          // still busy
		{100 + 30<<20 + 1000, true},    // calm after load: trim
		{100 + 30<<20 + 2000, false},   // still calm: nothing more to give back
		{100 + 30<<20 + 3000, false},   //
		{100 + 40<<20, false},          // busy again
		{100 + 40<<20 + 512<<10, true}, // calm (under 1 MiB): trim again
	}
	for i, s := range steps {
		if got := tr.observe(s.allocs); got != s.trim {
			t.Errorf("step %d (allocs %d): trim = %v, want %v", i, s.allocs, got, s.trim)
		}
	}
}
