//go:build linux

package tundev

import (
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/tun"
)

const cloneDevice = "/dev/net/tun"

// Create makes the TUN device with wireguard-go's tun.CreateTUN, assigns
// the addresses (IPv6 with IFA_F_NODAD so it is usable at once), sets the
// link up, and returns the device. The device lives as long as it is open:
// closing it removes the interface, its addresses and its routes.
//
// It fails with an error wrapping ErrNeedRoot without CAP_NET_ADMIN,
// ErrNoTUN when /dev/net/tun is missing, and ErrNameTaken when an interface
// of that name exists (which it leaves alone). On any failure it removes
// what it created.
func Create(o Options) (tun.Device, error) {
	return create(o, hasNetAdmin)
}

// create is Create with the capability check as a parameter, so that a test
// can also exercise the kernel's own refusal.
func create(o Options, netAdmin func() bool) (tun.Device, error) {
	o, err := o.check()
	if err != nil {
		return nil, err
	}
	name := o.Name
	fail := func(err error) error { return fmt.Errorf("create TUN %q: %w", name, err) }

	// Check what we can before tun.CreateTUN: it leaks its file
	// descriptor when the TUNSETIFF ioctl fails.
	if !netAdmin() {
		return nil, fail(ErrNeedRoot)
	}
	if _, err := os.Stat(cloneDevice); errors.Is(err, os.ErrNotExist) {
		return nil, fail(ErrNoTUN)
	}
	if exists, err := linkExists(name); err != nil {
		return nil, fail(err)
	} else if exists {
		return nil, fail(ErrNameTaken)
	}

	dev, err := tun.CreateTUN(name, o.MTU)
	if err != nil {
		switch {
		case errors.Is(err, unix.EPERM), errors.Is(err, unix.EACCES):
			return nil, fail(fmt.Errorf("%w (%v)", ErrNeedRoot, err))
		case errors.Is(err, unix.EBUSY):
			return nil, fail(ErrNameTaken)
		}
		// tun.CreateTUN can fail after the kernel made the interface
		// (and then keeps its descriptor): remove it, since it did not
		// exist a moment ago.
		if l, lerr := netlink.LinkByName(name); lerr == nil && l.Type() == "tuntap" {
			_ = netlink.LinkDel(l)
		}
		return nil, fail(err)
	}

	link, err := configure(name, o)
	if err != nil {
		destroy(dev, link)
		return nil, fail(err)
	}
	return dev, nil
}

// configure sets the link up and adds the addresses. It returns the link
// once it has found it, also on error, for cleanup.
func configure(name string, o Options) (netlink.Link, error) {
	link, err := netlink.LinkByName(name)
	if err != nil {
		return nil, fmt.Errorf("find the new interface: %w", err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return link, fmt.Errorf("set link up: %w", err)
	}
	if o.IPv4.IsValid() {
		a := &netlink.Addr{IPNet: &net.IPNet{
			IP:   o.IPv4.Addr().AsSlice(),
			Mask: net.CIDRMask(o.IPv4.Bits(), 32),
		}}
		if err := netlink.AddrAdd(link, a); err != nil {
			return link, fmt.Errorf("add IPv4 address %s: %w", o.IPv4, err)
		}
	}
	if o.IPv6.IsValid() {
		a := &netlink.Addr{
			IPNet: &net.IPNet{
				IP:   o.IPv6.Addr().AsSlice(),
				Mask: net.CIDRMask(o.IPv6.Bits(), 128),
			},
			Flags: unix.IFA_F_NODAD,
		}
		if err := netlink.AddrAdd(link, a); err != nil {
			if errors.Is(err, unix.EACCES) {
				// The kernel's answer when IPv6 is disabled on the
				// interface; it is not a privilege problem.
				return link, fmt.Errorf("add IPv6 address %s: %w (is IPv6 disabled? see sysctl net.ipv6.conf.all.disable_ipv6 and net.ipv6.conf.default.disable_ipv6)", o.IPv6, err)
			}
			return link, fmt.Errorf("add IPv6 address %s: %w", o.IPv6, err)
		}
	}
	return link, nil
}

// destroy closes dev, which makes the kernel remove the interface, and
// makes sure it is gone.
func destroy(dev tun.Device, link netlink.Link) {
	_ = dev.Close()
	if link == nil {
		return
	}
	idx := link.Attrs().Index
	for i := 0; i < 50; i++ {
		if _, err := netlink.LinkByIndex(idx); err != nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	_ = netlink.LinkDel(link)
}

func linkExists(name string) (bool, error) {
	_, err := netlink.LinkByName(name)
	if err == nil {
		return true, nil
	}
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return false, nil
	}
	return false, fmt.Errorf("look up interface: %w", err)
}

// hasNetAdmin reports whether the calling thread has CAP_NET_ADMIN in its
// effective set. If that cannot be told, it says yes and lets the kernel
// decide.
func hasNetAdmin() bool {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if err := unix.Capget(&hdr, &data[0]); err != nil {
		return true
	}
	return data[unix.CAP_NET_ADMIN/32].Effective&(1<<(unix.CAP_NET_ADMIN%32)) != 0
}
