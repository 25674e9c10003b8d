package main

import (
	"bytes"
	"compress/gzip"
	"encoding/binary"
	"errors"
	"io"
	"time"
)

// cpuByLabel sums the CPU time of a gzipped pprof CPU profile (as
// runtime/pprof writes it) by the value of the sample label key; samples
// without that label are summed under "". It decodes just enough of
// profile.proto (sample_type, sample.value, sample.label, string_table) to
// avoid a dependency on github.com/google/pprof.
func cpuByLabel(gz []byte, key string) (map[string]time.Duration, error) {
	zr, err := gzip.NewReader(bytes.NewReader(gz))
	if err != nil {
		return nil, err
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		return nil, err
	}
	type label struct{ key, str int64 }
	type sample struct {
		values []int64
		labels []label
	}
	var (
		samples     []sample
		sampleTypes []int64 // string index of each value's type
		strs        []string
	)
	err = protoFields(raw, func(field int, wt int, v uint64, b []byte) error {
		switch {
		case field == 1 && wt == 2: // sample_type: ValueType{type=1, unit=2}
			var typ int64
			if err := protoFields(b, func(f, wt int, v uint64, _ []byte) error {
				if f == 1 && wt == 0 {
					typ = int64(v)
				}
				return nil
			}); err != nil {
				return err
			}
			sampleTypes = append(sampleTypes, typ)
		case field == 2 && wt == 2: // sample
			var s sample
			if err := protoFields(b, func(f, wt int, v uint64, b []byte) error {
				switch {
				case f == 2 && wt == 0:
					s.values = append(s.values, int64(v))
				case f == 2 && wt == 2: // packed
					for len(b) > 0 {
						x, n := binary.Uvarint(b)
						if n <= 0 {
							return errors.New("bad packed varint")
						}
						s.values = append(s.values, int64(x))
						b = b[n:]
					}
				case f == 3 && wt == 2:
					var l label
					if err := protoFields(b, func(f, wt int, v uint64, _ []byte) error {
						switch {
						case f == 1 && wt == 0:
							l.key = int64(v)
						case f == 2 && wt == 0:
							l.str = int64(v)
						}
						return nil
					}); err != nil {
						return err
					}
					s.labels = append(s.labels, l)
				}
				return nil
			}); err != nil {
				return err
			}
			samples = append(samples, s)
		case field == 6 && wt == 2:
			strs = append(strs, string(b))
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	str := func(i int64) string {
		if i < 0 || int(i) >= len(strs) {
			return ""
		}
		return strs[i]
	}
	cpu := -1
	for i, t := range sampleTypes {
		if str(t) == "cpu" {
			cpu = i
		}
	}
	if cpu < 0 {
		return nil, errors.New("profile has no cpu sample type")
	}
	out := map[string]time.Duration{}
	for _, s := range samples {
		if cpu >= len(s.values) {
			continue
		}
		side := ""
		for _, l := range s.labels {
			if str(l.key) == key {
				side = str(l.str)
			}
		}
		out[side] += time.Duration(s.values[cpu])
	}
	return out, nil
}

// protoFields calls fn for each field of the protobuf message b: varints
// in v, length-delimited fields in b (fixed-size fields are skipped).
func protoFields(b []byte, fn func(field, wt int, v uint64, b []byte) error) error {
	for len(b) > 0 {
		tag, n := binary.Uvarint(b)
		if n <= 0 {
			return errors.New("bad tag")
		}
		b = b[n:]
		field, wt := int(tag>>3), int(tag&7)
		switch wt {
		case 0:
			v, n := binary.Uvarint(b)
			if n <= 0 {
				return errors.New("bad varint")
			}
			b = b[n:]
			if err := fn(field, wt, v, nil); err != nil {
				return err
			}
		case 1:
			if len(b) < 8 {
				return errors.New("short fixed64")
			}
			b = b[8:]
		case 2:
			l, n := binary.Uvarint(b)
			if n <= 0 || uint64(len(b)-n) < l {
				return errors.New("bad length")
			}
			if err := fn(field, wt, 0, b[n:n+int(l)]); err != nil {
				return err
			}
			b = b[n+int(l):]
		case 5:
			if len(b) < 4 {
				return errors.New("short fixed32")
			}
			b = b[4:]
		default:
			return errors.New("unknown wire type")
		}
	}
	return nil
}
