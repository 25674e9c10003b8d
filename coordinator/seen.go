package coordinator

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/meshctl/meshctl/coordinator/store"
)

// seenTracker keeps each node's last-seen time in memory and writes it to
// the store at most once per flushInterval per node, so that long-polls
// from a large fleet do not turn into a stream of writes. It also counts
// open long-polls: a node with one open is online.
type seenTracker struct {
	st  store.Store
	now func() time.Time
	log *slog.Logger

	mu    sync.Mutex
	last  map[string]time.Time
	dirty map[string]bool
	polls map[string]int
}

const (
	flushInterval = 30 * time.Second
	// onlineWindow: a node seen this recently counts as online even between
	// long-polls.
	onlineWindow = 90 * time.Second
)

func newSeenTracker(st store.Store, now func() time.Time, log *slog.Logger) *seenTracker {
	return &seenTracker{st: st, now: now, log: log, last: map[string]time.Time{}, dirty: map[string]bool{}, polls: map[string]int{}}
}

func (t *seenTracker) touch(id string) {
	t.mu.Lock()
	t.last[id] = t.now()
	t.dirty[id] = true
	t.mu.Unlock()
}

// polling marks a long-poll open; call the returned func when it ends.
func (t *seenTracker) polling(id string) func() {
	t.mu.Lock()
	t.polls[id]++
	t.mu.Unlock()
	return func() {
		t.mu.Lock()
		if t.polls[id]--; t.polls[id] <= 0 {
			delete(t.polls, id)
		}
		t.last[id] = t.now()
		t.dirty[id] = true
		t.mu.Unlock()
	}
}

func (t *seenTracker) online(id string) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.polls[id] > 0 || (!t.last[id].IsZero() && t.now().Sub(t.last[id]) < onlineWindow)
}

// lastSeen returns the newer of the in-memory and the stored time.
func (t *seenTracker) lastSeen(id string, stored time.Time) time.Time {
	t.mu.Lock()
	defer t.mu.Unlock()
	if l := t.last[id]; l.After(stored) {
		return l
	}
	return stored
}

func (t *seenTracker) run(ctx context.Context) {
	tick := time.NewTicker(flushInterval)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			t.flush(ctx)
		}
	}
}

func (t *seenTracker) flush(ctx context.Context) {
	t.mu.Lock()
	batch := make(map[string]time.Time, len(t.dirty))
	for id := range t.dirty {
		batch[id] = t.last[id]
	}
	clear(t.dirty)
	t.mu.Unlock()
	for id, at := range batch {
		if err := t.st.TouchNode(ctx, id, at); err != nil && ctx.Err() == nil {
			t.log.Warn("record last-seen time", "node_id", id, "err", err)
		}
	}
}
