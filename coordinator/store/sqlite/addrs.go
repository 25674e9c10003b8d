package sqlite

import (
	"context"
	"database/sql"
	"fmt"
	"net/netip"

	"github.com/meshctl/meshctl/coordinator/ipam"
	"github.com/meshctl/meshctl/coordinator/store"
)

// addrIndex is an in-memory copy of the addresses held in the nodes table
// (ip_released = 0: active nodes and revoked ones in quarantine), so that
// an enrollment allocates without reading every node. Enrollment is the
// only write that takes or frees addresses, and every write runs on the
// single writer connection, one transaction at a time; the index follows
// the transaction's changes in a journal, which a savepoint rollback
// unwinds, and is dropped (to be loaded again) whenever a transaction that
// changed it does not commit.
type addrIndex struct {
	pool4, pool6 netip.Prefix
	held         map[netip.Addr]bool // IPv4 and IPv6
	// low: every usable address of pool4 below it is held, so the lowest
	// free one is found from there.
	low     netip.Addr
	journal []addrOp
}

// addrOp is one change of the current transaction.
type addrOp struct {
	v4, v6  netip.Addr
	take    bool // taken (else released)
	prevLow netip.Addr
}

// addrs returns the index for these pools, loading it inside tx if there
// is none (or it was made for other pools). The caller holds s.addrMu for
// the whole transaction.
func (s *Store) addrs(ctx context.Context, tx *sql.Tx, pool4, pool6 netip.Prefix) (*addrIndex, error) {
	if ix := s.addrIx; ix != nil && ix.pool4 == pool4 && ix.pool6 == pool6 {
		return ix, nil
	}
	s.addrIx = nil
	rows, err := tx.QueryContext(ctx, `SELECT ipv4, ipv6 FROM nodes WHERE ip_released = 0`)
	if err != nil {
		return nil, fmt.Errorf("load addresses: %w", err)
	}
	defer rows.Close()
	ix := &addrIndex{pool4: pool4, pool6: pool6, held: map[netip.Addr]bool{}}
	for rows.Next() {
		var a4, a6 string
		if err := rows.Scan(&a4, &a6); err != nil {
			return nil, fmt.Errorf("load addresses: %w", err)
		}
		for _, str := range []string{a4, a6} {
			a, err := netip.ParseAddr(str)
			if err != nil {
				return nil, fmt.Errorf("load addresses: stored address %q: %w", str, err)
			}
			ix.held[a] = true
		}
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("load addresses: %w", err)
	}
	s.addrIx = ix
	return ix, nil
}

// dropAddrs forgets the index (after a transaction that may have changed
// it did not commit). The caller holds s.addrMu.
func (s *Store) dropAddrs() { s.addrIx = nil }

// allocate takes the lowest free IPv4 address of the pool and its IPv6
// counterpart. An address is free if neither it nor its IPv6 counterpart
// is held, in either family.
func (ix *addrIndex) allocate() (netip.Addr, netip.Addr, error) {
	var none netip.Addr
	v4, ok := ipam.NextFrom(ix.pool4, ix.low, func(a netip.Addr) bool {
		if ix.held[a] {
			return true
		}
		a6, err := ipam.IPv6For(ix.pool6, a)
		return err != nil || ix.held[a6]
	})
	if !ok {
		return none, none, fmt.Errorf("no free address in %v: %w", ix.pool4, store.ErrPoolExhausted)
	}
	v6, err := ipam.IPv6For(ix.pool6, v4)
	if err != nil {
		return none, none, err
	}
	ix.journal = append(ix.journal, addrOp{v4: v4, v6: v6, take: true, prevLow: ix.low})
	ix.held[v4], ix.held[v6] = true, true
	ix.low = v4
	return v4, v6, nil
}

// release frees a revoked node's addresses after its quarantine.
func (ix *addrIndex) release(v4, v6 netip.Addr) {
	ix.journal = append(ix.journal, addrOp{v4: v4, v6: v6, prevLow: ix.low})
	delete(ix.held, v4)
	delete(ix.held, v6)
	if ix.low.IsValid() && v4.Less(ix.low) { // (zero: from the start anyway)
		ix.low = v4
	}
}

// mark and rollbackTo bracket a savepoint.
func (ix *addrIndex) mark() int { return len(ix.journal) }

func (ix *addrIndex) rollbackTo(mark int) {
	for i := len(ix.journal) - 1; i >= mark; i-- {
		op := ix.journal[i]
		if op.take {
			delete(ix.held, op.v4)
			delete(ix.held, op.v6)
		} else {
			ix.held[op.v4], ix.held[op.v6] = true, true
		}
		ix.low = op.prevLow
	}
	ix.journal = ix.journal[:mark]
}

// committed ends the transaction's journal.
func (ix *addrIndex) committed() { ix.journal = ix.journal[:0] }
