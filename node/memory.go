package node

import (
	"os"
	"runtime"
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

// trimLoop gives memory back to the OS once traffic has calmed down
// (less than 1 MiB allocated in a 5 s window), so that RSS falls after
// load instead of staying at its peak: an idle agent allocates too little
// for the collector ever to run again, and what the load left behind
// (wireguard-go's pooled 64 KiB buffers, the network stack's) stays
// reachable from sync.Pools, which a collection only empties on its
// second pass. So, once per calm spell after a busy one: two collections
// and then debug.FreeOSMemory.
func (a *Agent) trimLoop() {
	samples := []metrics.Sample{{Name: "/gc/heap/allocs:bytes"}}
	metrics.Read(samples)
	t := trimmer{last: samples[0].Value.Uint64()}
	for a.ctx.Err() == nil {
		a.sleep(5 * time.Second)
		metrics.Read(samples)
		if t.observe(samples[0].Value.Uint64()) {
			trimMemory()
		}
	}
}

// trimmer decides when to trim from the allocation counter sampled every
// window: once, in the first calm window (< calmBytes allocated) after a
// busy one.
type trimmer struct {
	last uint64 // the counter at the previous sample
	busy bool   // a busy window since the last trim
}

const calmBytes = 1 << 20

func (t *trimmer) observe(allocs uint64) (trim bool) {
	calm := allocs-t.last < calmBytes
	t.last = allocs
	if !calm {
		t.busy = true
		return false
	}
	trim, t.busy = t.busy, false
	return trim
}

// trimMemory empties sync.Pools (two collections) and returns the freed
// heap to the OS.
func trimMemory() {
	runtime.GC()
	debug.FreeOSMemory() // the second collection, then the release
}
