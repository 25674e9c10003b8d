package node

import (
	"os"
	"runtime/debug"
	"runtime/metrics"
	"time"
)

// Memory budget. A node agent runs on small devices (a Raspberry Pi next
// to other software), so by default it keeps the Go runtime under a soft
// memory limit and gives memory back to the system soon after a burst of
// traffic: the garbage collector works harder as the heap nears the
// limit (throughput drops a little instead of memory growing), and an idle
// agent returns its free heap to the OS instead of keeping its peak.

// DefaultMemoryLimit is the agent's default soft memory limit (the Go
// runtime's, as GOMEMLIMIT): enough for sustained bulk traffic, small
// enough for a Pi. Below about 32 MiB the collector runs too often.
const DefaultMemoryLimit = 64 << 20

// SetMemoryLimit applies limit bytes as the Go runtime's soft memory limit
// (0 = none) unless GOMEMLIMIT is set in the environment, which wins; it
// returns the limit in force (math.MaxInt64 for none).
func SetMemoryLimit(limit int64) int64 {
	if os.Getenv("GOMEMLIMIT") == "" && limit > 0 {
		debug.SetMemoryLimit(limit)
	}
	return debug.SetMemoryLimit(-1)
}

// trimLoop returns free heap memory to the OS once traffic has calmed
// down (less than 1 MiB allocated in a 5 s window), so RSS falls back
// after load instead of staying at its peak until the next forced GC.
func (a *Agent) trimLoop() {
	samples := []metrics.Sample{
		{Name: "/gc/heap/allocs:bytes"},
		{Name: "/memory/classes/heap/free:bytes"}, // free, not yet returned
	}
	metrics.Read(samples)
	lastAllocs := samples[0].Value.Uint64()
	for a.ctx.Err() == nil {
		a.sleep(5 * time.Second)
		metrics.Read(samples)
		allocs, free := samples[0].Value.Uint64(), samples[1].Value.Uint64()
		if allocs-lastAllocs < 1<<20 && free > 4<<20 {
			debug.FreeOSMemory()
		}
		lastAllocs = allocs
	}
}
