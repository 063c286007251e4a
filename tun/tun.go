// Package tun opens overlayd's TUN device: a Linux TUN with virtio-net
// offloads (TSO/GSO on read, GRO on write), read and written in batches
// through wireguard-go's tun package.
package tun

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
	wgtun "golang.zx2c4.com/wireguard/tun"
)

// Device is a TUN device with batched I/O: Read(bufs, sizes, offset) and
// Write(bufs, offset) move up to BatchSize() packets per call, each packet
// starting offset bytes into its buffer. Write needs offset to be at least
// VirtioHeaderLen: it writes the offload header in front of each packet.
type Device = wgtun.Device

// VirtioHeaderLen is the headroom Write needs in front of each packet.
const VirtioHeaderLen = 10

// MaxNameLen is the longest interface name Linux accepts (IFNAMSIZ - 1).
const MaxNameLen = unix.IFNAMSIZ - 1

// CloneDevice is the path of the TUN clone device.
const CloneDevice = "/dev/net/tun"

// Check reports whether a TUN device can be created here: the clone device
// exists and opens for writing (which needs root or CAP_NET_ADMIN later on).
func Check() error {
	f, err := os.OpenFile(CloneDevice, os.O_RDWR, 0)
	if err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("tun: %s does not exist: load the tun module (modprobe tun)", CloneDevice)
		}
		return fmt.Errorf("tun: cannot open %s: %w (overlayd needs root or CAP_NET_ADMIN)", CloneDevice, err)
	}
	return f.Close()
}

// Create makes (or takes over) the TUN device name with the given MTU. The
// device is created down; the caller brings it up with its addresses. The
// caller must drain Events() until it is closed and Close the device.
func Create(name string, mtu int) (Device, error) {
	if name == "" || len(name) > MaxNameLen {
		return nil, fmt.Errorf("tun: interface name %q must be 1 to %d bytes", name, MaxNameLen)
	}
	dev, err := wgtun.CreateTUN(name, mtu)
	if err != nil {
		return nil, fmt.Errorf("tun: creating %s: %w", name, err)
	}
	return dev, nil
}
