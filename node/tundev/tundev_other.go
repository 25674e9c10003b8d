//go:build !linux

package tundev

import (
	"errors"

	"golang.zx2c4.com/wireguard/tun"
)

// Create is only implemented on Linux.
func Create(o Options) (tun.Device, error) {
	if _, err := o.check(); err != nil {
		return nil, err
	}
	return nil, errors.New("tundev: --tun is only supported on Linux; run without --tun to use the userspace network stack")
}
