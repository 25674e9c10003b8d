package coordinator_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/meshctl/meshctl/coordinator"
	"github.com/meshctl/meshctl/internal/meshtest"
	"github.com/meshctl/meshctl/wire"
)

// BenchmarkNetmapFanout measures how long a change takes to reach every
// watching node: one node changes its services, and an operation ends when
// all W watchers' long-polls have returned the new netmap over mTLS. The
// W=1 case is the baseline for the ratio.
//
//	go test -run '^$' -bench NetmapFanout ./coordinator/
func BenchmarkNetmapFanout(b *testing.B) {
	for _, watchers := range []int{1, 50} {
		b.Run(fmt.Sprintf("watchers=%d", watchers), func(b *testing.B) {
			c := meshtest.NewCoordinator(b, func(o *coordinator.Options) { o.LongPoll = time.Minute })
			tok := c.CreateToken(b, wire.TokenCreateRequest{Reusable: true})
			changer, err := c.Enroll(b, "changer", tok.Token)
			if err != nil {
				b.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			got := make(chan uint64, watchers)
			for i := range watchers {
				w, err := c.Enroll(b, fmt.Sprintf("w%d", i), tok.Token)
				if err != nil {
					b.Fatal(err)
				}
				nm, err := w.Client.Netmap(ctx, 0)
				if err != nil {
					b.Fatal(err)
				}
				go func(since uint64) {
					for ctx.Err() == nil {
						nm, err := w.Client.Netmap(ctx, since)
						if err != nil || nm == nil {
							continue
						}
						since = nm.Version
						select {
						case got <- since:
						case <-ctx.Done():
						}
					}
				}(nm.Version)
			}
			// Let every watcher park its long-poll before timing starts.
			meshtest.WaitFor(b, 30*time.Second, func() bool {
				online := 0
				for _, n := range c.Nodes(b) {
					if n.Online && n.Name != "changer" {
						online++
					}
				}
				return online == watchers
			}, "watchers online")
			b.ResetTimer()
			for i := range b.N {
				svcs := []wire.Service{{Name: "web", Port: uint16(1000 + i%2)}}
				if err := changer.Client.Update(ctx, wire.UpdateRequest{Services: &svcs}); err != nil {
					b.Fatal(err)
				}
				for range watchers {
					<-got
				}
			}
		})
	}
}
