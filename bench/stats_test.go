package main

import (
	"math"
	"testing"
)

func TestMedianSpreadRatios(t *testing.T) {
	r := results{}
	for i, v := range []float64{30, 10, 20} {
		r.add("rps", "mesh", i, v)
	}
	for i, v := range []float64{60, 40, 40} {
		r.add("rps", "direct", i, v)
	}
	mesh, direct := r.get("rps", "mesh"), r.get("rps", "direct")
	if m := median(mesh); m != 20 {
		t.Errorf("median = %v, want 20", m)
	}
	if lo, hi := spread(mesh); lo != 10 || hi != 30 {
		t.Errorf("spread = %v–%v, want 10–30", lo, hi)
	}
	// Per-run ratios 0.5, 0.25, 0.5: the median is 0.5, not 20/40.
	if got := ratioText(mesh, direct); got != "0.500×" {
		t.Errorf("ratioText = %q, want 0.500×", got)
	}
	if got := rangeText(mesh); got != "20.0 (10.0–30.0)" {
		t.Errorf("rangeText = %q", got)
	}
	if m := median([]float64{1, 2, 3, 4}); m != 2.5 {
		t.Errorf("even median = %v, want 2.5", m)
	}
	// A run missing from the baseline gives no ratio for that run.
	if got := ratios([]float64{1, 2}, []float64{2}); got[0] != 0.5 || !math.IsNaN(got[1]) {
		t.Errorf("ratios = %v", got)
	}
	if got := rangeText(nil); got != "–" {
		t.Errorf("rangeText(nil) = %q", got)
	}
}
