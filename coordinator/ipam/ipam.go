// Package ipam allocates overlay addresses. It is pure: no I/O, no state.
//
// Nodes get an IPv4 address from the mesh's IPv4 pool and an IPv6 address
// made of the mesh's IPv6 (ULA) pool with the node's IPv4 in the low 32 bits,
// so the two are always in one-to-one correspondence.
package ipam

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/netip"
)

// Pool size limits accepted by ValidatePools.
const (
	MinIPv4Bits = 8  // largest IPv4 pool: /8
	MaxIPv4Bits = 30 // smallest IPv4 pool: /30, two usable addresses
	MaxIPv6Bits = 96 // an IPv6 pool must leave 32 bits for the IPv4 address
)

// ula is fc00::/7, the IPv6 unique local address range (RFC 4193).
var ula = netip.PrefixFrom(netip.AddrFrom16([16]byte{0xfc}), 7)

// Next returns the lowest address of the IPv4 pool that is neither the
// network address, nor the broadcast address (for prefixes shorter than
// /31), nor used. It reports false if there is none, or if pool is not a
// valid IPv4 prefix. pool is masked first, so 10.0.0.7/24 means 10.0.0.0/24.
//
// used is called at most once per candidate, in increasing order; a scan of
// a /8 with every address taken costs 2^24 calls, which is linear in the
// pool size and the best possible without knowing more about used.
func Next(pool netip.Prefix, used func(netip.Addr) bool) (netip.Addr, bool) {
	return NextFrom(pool, netip.Addr{}, used)
}

// NextFrom is Next for a caller that knows every usable address of pool
// below from is used: it returns the lowest unused usable address that is
// not below from (the zero Addr, or one outside pool, means the start of
// pool). used is called only for candidates from from on.
func NextFrom(pool netip.Prefix, from netip.Addr, used func(netip.Addr) bool) (netip.Addr, bool) {
	if !pool.IsValid() || !pool.Addr().Is4() {
		return netip.Addr{}, false
	}
	pool = pool.Masked()
	bits := pool.Bits()
	base := u32(pool.Addr())
	size := uint64(1) << (32 - bits) // 1 .. 2^32
	last := size - 1                 // offset of the broadcast address
	if bits >= 31 {
		last = size // no broadcast address in a /31 or /32
	}
	// Offset 0 is the network address and never used.
	start := uint64(1)
	if from.Is4() && pool.Contains(from) {
		start = max(start, uint64(u32(from)-base))
	}
	for off := start; off < last; off++ {
		a := fromU32(base + uint32(off))
		if !used(a) {
			return a, true
		}
	}
	return netip.Addr{}, false
}

// IPv6For returns the address of pool6 whose low 32 bits are v4. pool6 must
// be an IPv6 prefix of at most /96 and v4 an IPv4 address (an IPv4-mapped
// IPv6 address is accepted and unmapped).
func IPv6For(pool6 netip.Prefix, v4 netip.Addr) (netip.Addr, error) {
	if !pool6.IsValid() || !pool6.Addr().Is6() || pool6.Addr().Is4In6() {
		return netip.Addr{}, fmt.Errorf("ipam: IPv6 pool %v is not an IPv6 prefix", pool6)
	}
	if pool6.Bits() > MaxIPv6Bits {
		return netip.Addr{}, fmt.Errorf("ipam: IPv6 pool %v is longer than /%d; it needs 32 free bits for the IPv4 address", pool6, MaxIPv6Bits)
	}
	v4 = v4.Unmap()
	if !v4.Is4() {
		return netip.Addr{}, fmt.Errorf("ipam: %v is not an IPv4 address", v4)
	}
	b := pool6.Masked().Addr().As16()
	v := v4.As4()
	copy(b[12:], v[:])
	return netip.AddrFrom16(b), nil
}

// ValidatePools checks the mesh's address pools: v4 must be an IPv4 network
// address of length /8 to /30, v6 an IPv6 network address of length at most
// /96 inside the unique local range fc00::/7. Errors say what is wrong and
// how to fix it; IPv4 errors name the --cidr flag the pool comes from (the
// IPv6 pool has no flag: it is generated at first start and stored).
func ValidatePools(v4, v6 netip.Prefix) error {
	return errors.Join(validateV4(v4), validateV6(v6))
}

func validateV4(p netip.Prefix) error {
	switch {
	case !p.IsValid():
		return errors.New("--cidr is missing or invalid; give an IPv4 network such as 10.100.0.0/16")
	case !p.Addr().Is4():
		return fmt.Errorf("--cidr %v is not an IPv4 network; give one such as 10.100.0.0/16", p)
	case p.Bits() < MinIPv4Bits:
		return fmt.Errorf("--cidr %v is too large; use a prefix of /%d or longer, e.g. %v", p, MinIPv4Bits, netip.PrefixFrom(p.Addr(), MinIPv4Bits).Masked())
	case p.Bits() > MaxIPv4Bits:
		return fmt.Errorf("--cidr %v is too small (no room for two nodes); use a prefix of /%d or shorter, e.g. %v", p, MaxIPv4Bits, netip.PrefixFrom(p.Addr(), 24).Masked())
	case p.Masked() != p:
		return fmt.Errorf("--cidr %v is not a network address; did you mean %v?", p, p.Masked())
	}
	return nil
}

func validateV6(p netip.Prefix) error {
	switch {
	case !p.IsValid():
		return errors.New("IPv6 pool is missing or invalid; it must be a ULA network such as fd12:3456:789a::/48")
	case !p.Addr().Is6() || p.Addr().Is4In6():
		return fmt.Errorf("IPv6 pool %v is not an IPv6 network; it must be a ULA network such as fd12:3456:789a::/48", p)
	case p.Bits() > MaxIPv6Bits:
		return fmt.Errorf("IPv6 pool %v is too small; use a prefix of /%d or shorter (the low 32 bits hold the node's IPv4 address), e.g. %v", p, MaxIPv6Bits, netip.PrefixFrom(p.Addr(), 48).Masked())
	case !ula.Contains(p.Addr()) || p.Bits() < ula.Bits():
		return fmt.Errorf("IPv6 pool %v is not a unique local (fc00::/7) network; use an fdXX:XXXX:XXXX::/48 prefix such as one from NewULA48", p)
	case p.Masked() != p:
		return fmt.Errorf("IPv6 pool %v is not a network address; did you mean %v?", p, p.Masked())
	}
	return nil
}

// NewULA48 returns a random RFC 4193 unique local /48: fd00::/8 followed by
// a 40-bit global ID read from r (use crypto/rand.Reader). It panics only if
// r fails, which crypto/rand.Reader does not.
func NewULA48(r io.Reader) netip.Prefix {
	var b [16]byte
	b[0] = 0xfd
	if _, err := io.ReadFull(r, b[1:6]); err != nil {
		panic(fmt.Sprintf("ipam: reading random global ID: %v", err))
	}
	return netip.PrefixFrom(netip.AddrFrom16(b), 48)
}

func u32(a netip.Addr) uint32 {
	b := a.As4()
	return binary.BigEndian.Uint32(b[:])
}

func fromU32(v uint32) netip.Addr {
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], v)
	return netip.AddrFrom4(b)
}
