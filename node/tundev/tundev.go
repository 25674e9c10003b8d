// Package tundev creates the kernel TUN device that the node agent runs
// wireguard-go on when it has root (the --tun mode), and filters what mesh
// peers may send to the host through it (see Filter).
//
// Without --tun the agent uses a gVisor netstack instead and needs no
// privileges; this package is only for the TUN mode.
package tundev

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
)

// DefaultMTU is the TUN MTU when Options.MTU is 0: WireGuard's usual 1420
// (1500 less the outer IPv6, UDP and WireGuard headers).
const DefaultMTU = 1420

// Options for Create.
type Options struct {
	// Name is the interface name: required, at most 15 bytes, no '/',
	// ':', '%' or white space.
	Name string
	// MTU defaults to DefaultMTU. It must be at least 1280 when IPv6 is
	// set (the kernel disables IPv6 below that), at least 576 otherwise,
	// and at most 65535.
	MTU int
	// IPv4 is the node's address with the overlay pool's prefix length,
	// e.g. 100.64.0.5/16: the kernel then adds the connected route for
	// the pool. The zero Prefix assigns no IPv4 address.
	IPv4 netip.Prefix
	// IPv6 is the node's IPv6 address with the pool's prefix length,
	// e.g. fd12:3456:789a::6440:5/48. It is added without duplicate
	// address detection, so it is usable at once. The zero Prefix assigns
	// no IPv6 address.
	IPv6 netip.Prefix
}

var (
	// ErrNeedRoot is returned (wrapped) by Create when the process may
	// not create network devices.
	ErrNeedRoot = errors.New("--tun needs root (or CAP_NET_ADMIN); run without --tun to use the userspace network stack")
	// ErrNoTUN is returned (wrapped) by Create when /dev/net/tun is
	// missing.
	ErrNoTUN = errors.New("/dev/net/tun does not exist (load the tun kernel module, or pass the device into the container); run without --tun to use the userspace network stack")
	// ErrNameTaken is returned (wrapped) by Create when an interface with
	// the requested name already exists.
	ErrNameTaken = errors.New("an interface with this name already exists; choose another name or remove it")
)

// check validates o and fills in defaults.
func (o Options) check() (Options, error) {
	if o.Name == "" {
		return o, errors.New("tundev: interface name is required")
	}
	if len(o.Name) > 15 {
		return o, fmt.Errorf("tundev: interface name %q is longer than 15 bytes", o.Name)
	}
	if o.Name == "." || o.Name == ".." || strings.ContainsAny(o.Name, "/:%\x00 \t\n\r\v\f") {
		return o, fmt.Errorf("tundev: invalid interface name %q", o.Name)
	}
	if o.MTU == 0 {
		o.MTU = DefaultMTU
	}
	lo := 576
	if o.IPv6.IsValid() {
		lo = 1280
	}
	if o.MTU < lo || o.MTU > 65535 {
		return o, fmt.Errorf("tundev: MTU %d out of range [%d, 65535]", o.MTU, lo)
	}
	if o.IPv4.IsValid() && !o.IPv4.Addr().Is4() {
		return o, fmt.Errorf("tundev: IPv4 address %s is not IPv4", o.IPv4)
	}
	if o.IPv6.IsValid() && (!o.IPv6.Addr().Is6() || o.IPv6.Addr().Is4In6() || o.IPv6.Addr().Zone() != "") {
		return o, fmt.Errorf("tundev: IPv6 address %s is not a plain IPv6 address", o.IPv6)
	}
	return o, nil
}
