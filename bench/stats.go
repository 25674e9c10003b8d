package main

import (
	"fmt"
	"math"
	"slices"
)

// results holds every figure by metric and row, one value per run (index
// = run number), so that a row's run i can be compared with its
// baseline's run i.
type results map[string]map[string][]float64

// add records value v of row for metric in run i (runs are added in order).
func (r results) add(metric, row string, i int, v float64) {
	if r[metric] == nil {
		r[metric] = map[string][]float64{}
	}
	vals := r[metric][row]
	for len(vals) <= i {
		vals = append(vals, math.NaN())
	}
	vals[i] = v
	r[metric][row] = vals
}

func (r results) get(metric, row string) []float64 { return r[metric][row] }

// median of the values that are not NaN (NaN if none).
func median(xs []float64) float64 {
	s := valid(xs)
	if len(s) == 0 {
		return math.NaN()
	}
	slices.Sort(s)
	if n := len(s); n%2 == 1 {
		return s[n/2]
	} else {
		return (s[n/2-1] + s[n/2]) / 2
	}
}

// spread is the min and max of the values that are not NaN.
func spread(xs []float64) (lo, hi float64) {
	s := valid(xs)
	if len(s) == 0 {
		return math.NaN(), math.NaN()
	}
	return slices.Min(s), slices.Max(s)
}

func valid(xs []float64) []float64 {
	var s []float64
	for _, x := range xs {
		if !math.IsNaN(x) {
			s = append(s, x)
		}
	}
	return s
}

// ratios divides each run's value by the baseline's value in the same run.
func ratios(xs, base []float64) []float64 {
	out := make([]float64, len(xs))
	for i, x := range xs {
		out[i] = math.NaN()
		if i < len(base) && base[i] > 0 {
			out[i] = x / base[i]
		}
	}
	return out
}

// num formats a figure with three significant digits (and no exponent).
func num(x float64) string {
	switch a := math.Abs(x); {
	case math.IsNaN(x):
		return "–"
	case a >= 100:
		return fmt.Sprintf("%.0f", x)
	case a >= 10:
		return fmt.Sprintf("%.1f", x)
	case a >= 1:
		return fmt.Sprintf("%.2f", x)
	default:
		return fmt.Sprintf("%.3f", x)
	}
}

// ratioText is the median of per-run ratios, as "0.42×".
func ratioText(xs, base []float64) string {
	m := median(ratios(xs, base))
	if math.IsNaN(m) {
		return "–"
	}
	return num(m) + "×"
}

// rangeText is "median (min–max)", or the value alone for a single run.
func rangeText(xs []float64) string {
	m := median(xs)
	lo, hi := spread(xs)
	if len(valid(xs)) < 2 {
		return num(m)
	}
	return fmt.Sprintf("%s (%s–%s)", num(m), num(lo), num(hi))
}
