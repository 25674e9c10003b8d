package sqlite

import (
	"context"
	"database/sql"
	"fmt"

	"github.com/meshctl/meshctl/coordinator/store"
)

// Enrollment with group commit.
//
// A durable commit (WAL, synchronous=FULL) costs an fsync, and writes go
// through one connection, so one transaction per enrollment caps the
// enrollment rate at the fsync rate. Concurrent enrollments are therefore
// committed together: each call queues its enrollment; a call that finds
// no batch running runs one with everything queued, in one transaction
// with one commit, each enrollment inside its own savepoint. An enrollment
// that fails (bad token, name taken, ...) is rolled back to its savepoint,
// alone, as if it had run in its own transaction; the others go on. No
// call returns before the transaction that holds its enrollment has
// committed (or failed as a whole: then none of the batch is written and
// every call in it gets the error). When a batch ends and more enrollments
// have queued meanwhile, a new goroutine runs the next batch, so that no
// caller keeps committing other callers' enrollments after its own.

// maxEnrollBatch bounds the enrollments committed together.
const maxEnrollBatch = 256

type enrollReq struct {
	ctx  context.Context
	p    store.EnrollParams
	node store.Node
	err  error
	done chan struct{}
}

// Enroll verifies and consumes the token, checks name and key, allocates
// addresses and inserts the node and its audit row, atomically and
// durably before it returns, committed together with concurrent
// enrollments (see above). A ctx that ends before the enrollment runs
// cancels it; once it runs, it completes.
func (s *Store) Enroll(ctx context.Context, p store.EnrollParams) (store.Node, error) {
	if err := checkEnroll(p); err != nil {
		return store.Node{}, fmt.Errorf("enroll %q: %w", p.Name, err)
	}
	r := &enrollReq{ctx: ctx, p: p, done: make(chan struct{})}
	s.enrollMu.Lock()
	s.enrollQueue = append(s.enrollQueue, r)
	lead := !s.enrollRunning
	s.enrollRunning = true
	s.enrollMu.Unlock()
	if lead {
		s.runEnrollBatch()
	}
	<-r.done
	if r.err != nil {
		return store.Node{}, fmt.Errorf("enroll %q: %w", p.Name, s.diskFull(r.err))
	}
	return r.node, nil
}

// runEnrollBatch commits one batch of queued enrollments, then hands the
// queue to a new goroutine or, if it is empty, marks no batch running.
func (s *Store) runEnrollBatch() {
	s.enrollMu.Lock()
	n := min(len(s.enrollQueue), maxEnrollBatch)
	batch := s.enrollQueue[:n:n]
	s.enrollQueue = s.enrollQueue[n:]
	s.enrollMu.Unlock()

	s.enrollBatch(batch)

	s.enrollMu.Lock()
	more := len(s.enrollQueue) > 0
	s.enrollRunning = more
	s.enrollMu.Unlock()
	if more {
		go s.runEnrollBatch()
	}
}

// enrollBatch runs the enrollments of batch in one transaction and
// reports each one's outcome.
func (s *Store) enrollBatch(batch []*enrollReq) {
	defer func() {
		for _, r := range batch {
			close(r.done)
		}
	}()
	// The transaction is the batch's, not any caller's: one caller going
	// away must not roll back the others' enrollments.
	ctx := context.Background()
	s.addrMu.Lock()
	defer s.addrMu.Unlock()
	var ix *addrIndex
	err := s.write(ctx, func(tx *sql.Tx) error {
		var err error
		if ix, err = s.addrs(ctx, tx, batch[0].p.IPv4Pool, batch[0].p.IPv6Pool); err != nil {
			return err
		}
		for _, r := range batch {
			if r.err = r.ctx.Err(); r.err != nil {
				continue
			}
			if ix, err = s.addrs(ctx, tx, r.p.IPv4Pool, r.p.IPv6Pool); err != nil {
				return err
			}
			if _, err := tx.ExecContext(ctx, `SAVEPOINT enroll`); err != nil {
				return fmt.Errorf("savepoint: %w", err)
			}
			mark := ix.mark()
			r.node, r.err = s.enrollOne(ctx, tx, r.p, ix)
			if r.err != nil {
				if _, err := tx.ExecContext(ctx, `ROLLBACK TO enroll`); err != nil {
					return fmt.Errorf("roll back to savepoint: %w", err)
				}
				ix.rollbackTo(mark)
			}
			if _, err := tx.ExecContext(ctx, `RELEASE enroll`); err != nil {
				return fmt.Errorf("release savepoint: %w", err)
			}
		}
		return nil
	})
	if err != nil {
		s.dropAddrs()
		for _, r := range batch {
			if r.err == nil { // it ran, but nothing of the batch was written
				r.node, r.err = store.Node{}, err
			}
		}
		return
	}
	ix.committed()
}

// enrollOne is enroll, with a panic (in VerifyToken, say) turned into this
// enrollment's error rather than the batch's end.
func (s *Store) enrollOne(ctx context.Context, tx *sql.Tx, p store.EnrollParams, ix *addrIndex) (n store.Node, err error) {
	defer func() {
		if v := recover(); v != nil {
			err = fmt.Errorf("enrollment panicked: %v", v)
		}
	}()
	return s.enroll(ctx, tx, p, ix)
}
