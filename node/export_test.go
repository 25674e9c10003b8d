package node

import "github.com/meshctl/meshctl/wire"

// Test hooks for the external node_test package.

// ApplyNetmap applies nm as if the coordinator had sent it.
func (a *Agent) ApplyNetmap(nm *wire.Netmap) error { return a.apply(nm) }

// AppliedNetmap returns the netmap the device runs.
func (a *Agent) AppliedNetmap() *wire.Netmap {
	if cur := a.applied.Load(); cur != nil {
		return cur.nm
	}
	return nil
}
